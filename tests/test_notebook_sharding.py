"""notebooks/08_sharding_and_memory.ipynb executes headless from top to bottom (LLAMA_JAX_NOTEBOOK_FAST=1: two
compiled layouts), on the 8 simulated CPU devices it sets up itself, and reaches its asserted finding."""

import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="executing notebooks needs nbclient: pip install 'llama_jax[test]'")
from nbclient import NotebookClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _execute(name: str, env: dict) -> tuple[str, list[str]]:
    """(stdout of every code cell, stderr lines) after executing notebooks/<name> in a fresh kernel."""
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    saved = dict(os.environ)
    # The kernel inherits this environment; it must make its own 8 devices (not conftest's flag) before jax starts.
    os.environ.update(env, XLA_FLAGS="")
    try:
        NotebookClient(notebook, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    stdout = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    stderr = [line for o in outputs if o.output_type == "stream" and o.name == "stderr" for line in o.text.splitlines()]
    return stdout, stderr


def test_sharding_notebook_reaches_its_finding():
    stdout, stderr = _execute("08_sharding_and_memory.ipynb", {"LLAMA_JAX_NOTEBOOK_FAST": "1"})
    assert "backend cpu" in stdout and "device 0 holds" in stdout
    assert "Llama 3.1 405B" in stdout and "train step: seq 8,192 x 512 rows" in stdout  # the planner's tables
    assert re.search(r"Finding: .* within \d+\.\d% of the compiler's", stdout), stdout[-2000:]
    assert (ROOT / "notebooks" / "figures" / "08_analytic_vs_compiled.png").is_file()
    assert not stderr, stderr
