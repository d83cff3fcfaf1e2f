"""The planner: exact parameter shards, analytic memory vs XLA's compiled figures, AOT at 8B / 405B size,
the paper's Table 4 layouts and FP8 inference on one 8 x 80 GB node."""

import json
import os
import subprocess
import sys

import jax
import pytest

from llama_jax import config, plan
from llama_jax.errors import ConfigError

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def test_param_shards_are_exact():
    cfg = config.get("llama3.1-8b")
    mesh = {"data": 2, "fsdp": 8, "tensor": 1, "sequence": 1}
    assert plan.param_bytes_per_device(cfg, mesh) == cfg.num_params() * 2 / 8  # every dim divides by 8
    big = config.get("llama3.1-405b")
    layout = {"data": 1, "fsdp": 64, "tensor": 8, "sequence": 1}  # the paper's TP8 x DP64, with PP16
    d, layers = big.dim, big.num_layers
    per_layer = (big.num_params() - 2 * big.vocab_size * d - d) / layers
    norms = 2 * d  # the two RMSNorm scales per layer: split by fsdp only, not by tensor
    want = ((per_layer - norms) / 512 + norms / 64) * 2 * 8 + big.vocab_size * d * 2 / 512  # 8 layers + embedding
    assert plan.param_bytes_per_device(big, layout, pp=16) == pytest.approx(want, rel=1e-12)


@needs8
@pytest.mark.parametrize("preset, mesh, seq, remat, dtype", [
    ("tiny", "data=2,fsdp=2,tensor=2", 256, "full", None),
    ("llama3.2-1b", "fsdp=8", 2048, "full", None),
    # Tensor parallelism: the chunked loss once gathered the LM head whole on every tensor rank (1.26x).
    ("llama3.2-1b", "fsdp=4,tensor=2", 512, "full", None),
    # remat="none" in float32: XLA:CPU keeps float32 copies of bf16 activations, a GPU would not (plan.py).
    ("llama3.2-1b", "fsdp=4,tensor=2", 512, "none", "float32"),
    pytest.param("llama3.2-1b", "fsdp=8", 256, "dots", None, marks=pytest.mark.slow),
])
def test_analytic_memory_within_15_percent_of_xla(preset, mesh, seq, remat, dtype):
    cfg = config.get(preset, remat=remat, **({"dtype": dtype, "param_dtype": dtype} if dtype else {}))
    compiled = plan.aot_train_step(cfg, mesh, seq, 8)
    analytic = plan.train_budget(cfg, mesh, seq, 8)
    assert compiled["backend"] == "cpu" and compiled["devices"] == 8
    assert compiled["argument_bytes"] == pytest.approx(analytic.params + analytic.opt_state, rel=0.01)  # state shards
    assert analytic.total == pytest.approx(compiled["bytes_per_device"], rel=0.15)


@needs8
def test_aot_compiles_8b_train_step_on_8_devices():
    cfg = config.get("llama3.1-8b", remat="full")
    compiled = plan.aot_train_step(cfg, "fsdp=8", 2048, 8)
    params_and_adam = cfg.num_params() * 2 * 3 / 8  # bf16 params + two bf16 moments, 8 shards
    assert compiled["argument_bytes"] == pytest.approx(params_and_adam, rel=0.01)
    assert compiled["bytes_per_device"] > compiled["argument_bytes"]


def test_aot_compiles_405b_train_step_on_64_simulated_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=64", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "llama_jax.plan", "--model", "llama3.1-405b", "--mesh", "fsdp=8,tensor=8",
         "--seq", "2048", "--batch", "8", "--remat", "full", "--aot", "--json"],
        env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["aot_devices"] == 64 and result["aot_backend"] == "cpu"
    cfg = config.get("llama3.1-405b")
    assert result["aot_argument_gb"] * plan.GB == pytest.approx(cfg.num_params() * 2 * 3 / 64, rel=0.01)
    assert result["model_flops_per_token"] == cfg.flops_per_token(2048)


def test_table4_layouts():
    rows = plan.table4_rows()
    cfg = config.get("llama3.1-405b")
    assert [(r["gpus"], r["tp"], r["cp"], r["pp"], r["dp"]) for r in rows] == [
        (8192, 8, 1, 16, 64), (16384, 8, 1, 16, 128), (16384, 8, 16, 16, 8)]
    for r in rows:
        assert r["tokens_per_batch"] == 16 * 2**20  # the paper's 16M tokens per batch
        assert r["model_flops_per_token"] == cfg.flops_per_token(r["seq"])
        assert r["step_flops"] == pytest.approx(r["tokens_per_batch"] * r["model_flops_per_token"])
        assert r["flash_fits_80gb"]  # with a fused attention kernel all three layouts fit, as they did
    assert not rows[2]["fits_80gb"]  # 128K context with dense [T, S] scores does not
    out = subprocess.run([sys.executable, "-m", "llama_jax.plan", "--table4"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.count("\n8192 |") + out.stdout.count("\n16384 |") == 3


def test_405b_inference_fits_one_node_in_fp8_not_bf16():
    cfg = config.get("llama3.1-405b")
    bf16 = plan.inference_budget(cfg, tensor=8, batch=1, context=8192)
    fp8 = plan.inference_budget(cfg, tensor=8, batch=1, context=8192, weights="fp8")
    assert bf16.weights == cfg.num_params() * 2 / 8
    assert bf16.total > plan.H100_BYTES > fp8.total
    d, f = cfg.dim, cfg.ffn_dim
    quantized_kernels = 124 * 3 * d * f  # first and last layers stay bf16
    scales = 124 * (2 * f + d) * 4
    assert fp8.weights * 8 == cfg.num_params() * 2 - quantized_kernels + scales
    assert bf16.kv_cache == 2 * 126 * 8192 * 1 * 128 * 2  # k and v, 8 kv heads / 8 devices, bf16


def test_bad_input():
    cfg = config.get("tiny")
    with pytest.raises(ConfigError, match="do not divide"):
        plan.train_budget(cfg, "data=2,fsdp=4", 256, 4)
    with pytest.raises(ConfigError, match="unknown axis"):
        plan.train_budget(cfg, "pipeline=4", 256, 4)
    with pytest.raises(ConfigError, match="fp8"):
        plan.inference_budget(cfg, tensor=1, batch=1, context=16, weights="int4")
