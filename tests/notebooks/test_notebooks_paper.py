"""The paper's findings at laptop scale (notebooks 03-05) execute headless from top to bottom in their fast versions
(LLAMA_JAX_NOTEBOOK_FAST=1: fewer sizes, seeds and steps), report the backend, state their finding, save their
figures and print nothing on stderr. The full versions' assertions (the findings) run with `make notebooks`."""

from pathlib import Path

import pytest
from test_notebooks import _execute  # the kernel, environment and output handling of notebooks 01 and 02


def _execute_fast(name: str, tmp_path: Path) -> str:
    env = {"LLAMA_JAX_NOTEBOOK_FAST": "1", "LLAMA_JAX_RUNS": str(tmp_path / "runs"),
           "LLAMA_JAX_FIGURES": str(tmp_path / "figures")}
    (tmp_path / "runs").mkdir()
    stdout, stderr = _execute(name, env)
    assert not stderr, stderr
    text = "".join(stdout)
    assert "backend cpu" in text
    return text


@pytest.mark.slow  # three training runs of three sizes, each compiled, and 15 checkpoints scored: ~3 min on 2 shared
def test_scaling_law_notebook(tmp_path):  # cores, ~60 s of CPU
    text = _execute_fast("03_scaling_law.ipynb", tmp_path)
    assert "The compute-optimal size grows as N* ~ C^" in text
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"03_isoflop.png", "03_two_step_prediction.png"}


@pytest.mark.slow  # four training runs: ~2 min on 2 shared cores
def test_document_mask_notebook(tmp_path):
    text = _execute_fast("04_document_mask.ipynb", tmp_path)
    assert "Without the document mask, the held-out loss on the first 16 bytes" in text
    assert (tmp_path / "figures" / "04_document_mask.png").is_file()


@pytest.mark.slow  # two training runs: ~2 min on 2 shared cores
def test_rope_and_context_notebook(tmp_path):
    text = _execute_fast("05_rope_and_context.ipynb", tmp_path)
    assert "Past the 64-byte training length the held-out loss rises by" in text
    assert (tmp_path / "figures" / "05_rope_and_context.png").is_file()
