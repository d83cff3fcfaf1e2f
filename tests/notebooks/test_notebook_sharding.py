"""notebooks/08_sharding_and_memory.ipynb executes headless from top to bottom (LLAMA_JAX_NOTEBOOK_FAST=1: two
compiled layouts) on the 8 simulated CPU devices it sets up itself (the kernel starts without conftest's flag), and
reaches its asserted finding."""

import re

import pytest
from conftest import ROOT
from test_notebooks import _execute  # the kernel, environment and output handling of notebooks 01 and 02


@pytest.mark.slow  # 16 s on 2 busy cores
def test_sharding_notebook_reaches_its_finding():
    stdout, stderr = _execute("08_sharding_and_memory.ipynb", {"LLAMA_JAX_NOTEBOOK_FAST": "1"})
    text = "".join(stdout)
    assert "backend cpu: 8 device(s)" in text and "device 0 holds" in text
    assert "Llama 3.1 405B" in text and "train step: seq 8,192 x 512 rows" in text  # the planner's tables
    assert re.search(r"Finding: .* within \d+\.\d% of the compiler's", text), text[-2000:]
    assert (ROOT / "notebooks" / "figures" / "08_analytic_vs_compiled.png").is_file()
    assert not stderr, stderr
