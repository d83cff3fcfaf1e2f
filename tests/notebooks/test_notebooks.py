"""Both notebooks execute headless from top to bottom (notebook 02 with LLAMA_JAX_NOTEBOOK_FAST=1: a few training
steps), report the backend, print nothing on stderr but the training loop's own lines, and notebook 02 trains a fresh
run every time it is executed instead of resuming the last one."""

import os
import re

import pytest
from conftest import ROOT

nbformat = pytest.importorskip("nbformat", reason="executing notebooks needs nbclient: pip install 'llama_jax[test]'")
from nbclient import NotebookClient  # noqa: E402

# What the training loop itself writes on stderr (banner, compile, evals); anything else there is clutter.
LOOP_LINES = re.compile(r"^(llama_jax pretrain: .*|compiling the pretrain step .*|step \d+: eval loss [\d.]+)?$")


def _execute(name: str, env: dict) -> tuple[list[str], list[str]]:
    """(stdout texts, stderr lines) of every code cell after executing notebooks/<name> in a fresh kernel."""
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    saved = dict(os.environ)
    # The kernel inherits this process's environment, but runs on one CPU device as on a laptop (not conftest's 8).
    os.environ.update(env, XLA_FLAGS="")
    try:
        NotebookClient(notebook, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    stdout = [o.text for o in outputs if o.output_type == "stream" and o.name == "stdout"]
    stderr = [line for o in outputs if o.output_type == "stream" and o.name == "stderr" for line in o.text.splitlines()]
    return stdout, stderr


@pytest.mark.slow  # 13 s on 2 busy cores
def test_model_and_parity_notebook():
    stdout, stderr = _execute("01_model_and_parity.ipynb", {"HF_HUB_OFFLINE": "1"})
    text = "".join(stdout)
    assert "backend cpu" in text and "max |logit difference|" in text
    assert not stderr, stderr


@pytest.mark.slow  # two executions, ~70 s of CPU
def test_train_notebook_starts_a_fresh_run_each_time(tmp_path):
    env = {"LLAMA_JAX_NOTEBOOK_FAST": "1", "LLAMA_JAX_RUNS": str(tmp_path)}
    for execution in (1, 2):
        stdout, stderr = _execute("02_train_sample_quantize.ipynb", env)
        assert "backend cpu" in "".join(stdout) and "mean KL(float || fp8)" in "".join(stdout)
        assert any("steps 0 -> 4; fresh parameters" in line for line in stderr), stderr
        assert [line for line in stderr if not LOOP_LINES.match(line)] == []
        assert len(list(tmp_path.glob("notebook-*"))) == execution
