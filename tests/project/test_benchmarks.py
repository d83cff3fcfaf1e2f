"""The benchmarks run where the GPU machines benchmarks/gpu.sh is written for have only jax, flax, optax, orbax,
torch, transformers, tiktoken and safetensors: every module they import, at the top or inside a side's function,
loads without ml_collections, grain or llama-models; and the train-step benchmark runs end to end."""

import ast
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, env

BENCHMARKS = ROOT / "benchmarks"
ABSENT_ON_GPU_MACHINES = ("ml_collections", "grain", "llama_models")


def imported_modules() -> set[str]:
    """Every absolute module name the benchmark scripts import, anywhere in them."""
    names = set()
    for path in BENCHMARKS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
    return names


@pytest.mark.slow  # 13 s on 2 busy cores
def test_benchmarks_import_nothing_the_gpu_machines_lack():
    modules = sorted(name for name in imported_modules() if name.split(".")[0] in ("llama_jax", "harness"))
    assert {"llama_jax.generate", "llama_jax.train.pretrain", "harness"} <= set(modules)
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    code = "\n".join([
        "import sys",
        *(f"sys.modules[{name!r}] = None  # import fails as if not installed" for name in ABSENT_ON_GPU_MACHINES),
        *(f"import {name}" for name in modules + scripts),
    ])
    with_benchmarks = env()
    with_benchmarks["PYTHONPATH"] += os.pathsep + str(BENCHMARKS)
    done = subprocess.run([sys.executable, "-c", code], env=with_benchmarks, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_import_check_notices_a_missing_package():
    code = "import sys\nsys.modules['ml_collections'] = None\nimport llama_jax.train.defaults"
    done = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "ml_collections" in done.stderr


@pytest.mark.slow
def test_train_step_benchmark_runs_each_side_in_its_own_process():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "train_step.py"), "--preset", "quick", "--batch", "2",
                           "--seq", "32", "--steps", "1", "--alternations", "2"],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["config"]["resolved_matmul_precision"] == "highest"
    for side in ("ours", "torch"):
        assert len(result["sides"][side]["process_best_step_s"]) == 2  # two processes per side
        assert result["sides"][side]["tokens_per_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["sides"]["ours"]["tokens_per_s"] / result["sides"]["torch"]["tokens_per_s"], rel=1e-2)


@pytest.mark.slow  # 26 s on 2 busy cores
def test_lora_benchmark_times_both_sides_and_their_ratio():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "lora.py"), "--preset", "quick", "--batch", "2", "--seq",
                           "32", "--steps", "2", "--alternations", "2"],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    lora, full = result["sides"]["lora"], result["sides"]["full"]
    assert len(lora["process_best_step_s"]) == len(full["process_best_step_s"]) == 2  # two processes per side
    assert lora["step_s"]["n"] == full["step_s"]["n"] == 4 and lora["step_s"]["best"] <= lora["step_s"]["worst"]
    # The adapters train: rank 16, 2 layers, r x (in + out) for q, k and v (dim 128 -> 4 x 32, 2 x 32, 2 x 32), o,
    # and gate, up, down (128 <-> 256); the full side trains every parameter.
    assert lora["trained_params"] == 2 * 16 * ((128 + 128) + 2 * (128 + 64) + (128 + 128) + 3 * (128 + 256))
    assert full["trained_params"] == result["config"]["params"]
    assert result["ratio"] == pytest.approx(lora["tokens_per_s"] / full["tokens_per_s"], rel=1e-2)
    assert f"lora / full: {result['ratio']} (best steps)" in done.stdout
