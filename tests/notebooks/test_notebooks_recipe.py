"""Notebooks 06 (annealing and checkpoint averaging) and 07 (a post-training round and the DPO ablation) execute
headless from top to bottom with LLAMA_JAX_NOTEBOOK_FAST=1 (a few steps of every run, and the notebook's weaker
fast-mode assertion), report the backend, keep stderr to the training loop's own lines, save their figures and
work in a new run directory each time."""

import time

import pytest
from conftest import ROOT

pytest.importorskip("nbformat", reason="executing notebooks needs nbclient: pip install 'llama_jax[test]'")
# The kernel, environment and output handling of notebooks 01 and 02 (pytest puts tests/ on sys.path); LOOP_LINES:
# what the training loop writes on stderr when a notebook trains in its own kernel.
from test_notebooks import LOOP_LINES, _execute  # noqa: E402

FIGURES = ROOT / "notebooks" / "figures"


def _run(name: str, runs) -> str:
    """The notebook's stdout; it must have written each of its figures anew."""
    stdout, stderr = _execute(name, {"LLAMA_JAX_NOTEBOOK_FAST": "1", "LLAMA_JAX_RUNS": str(runs),
                                     "HF_HUB_OFFLINE": "1"})
    assert [line for line in stderr if not LOOP_LINES.match(line)] == []
    text = "".join(stdout)
    assert "backend cpu" in text
    return text


@pytest.mark.slow  # ~70 s of CPU (4 min wall at load 20 on 2 cores): four training runs, three averages, 14 evals
def test_annealing_notebook(tmp_path):
    started = time.time()
    text = _run("06_annealing_and_averaging.ipynb", tmp_path)
    assert "annealing on them with the learning rate to 0" in text
    assert len(list(tmp_path.glob("notebook-anneal-*"))) == 1
    assert (FIGURES / "06_annealing_and_averaging.png").stat().st_mtime >= started


@pytest.mark.slow  # ~160 s of CPU (9 min wall at load 22): fourteen commands, each a process importing jax
def test_post_training_notebook(tmp_path):
    started = time.time()
    text = _run("07_post_training_round.ipynb", tmp_path)
    assert "held-out duels" in text and "without the NLL term" in text
    assert len(list(tmp_path.glob("notebook-posttrain-*"))) == 1
    for figure in ("07_win_rate_per_stage.png", "07_dpo_ablation_logps.png"):
        assert (FIGURES / figure).stat().st_mtime >= started
