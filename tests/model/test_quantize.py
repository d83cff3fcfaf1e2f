"""FP8 / int8 quantization: e4m3 rounding and the activation clamp against NumPy, the paper's layer rule,
quality on a trained tiny model, the stored checkpoint, and 405B fitting one 8 x 80 GB node."""

import argparse
import inspect
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from llama_jax import checkpoint, config, model, plan, sharding
from llama_jax import generate as gen
from llama_jax import quantize as q
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.ops import quantized as qops

E4M3 = ml_dtypes.float8_e4m3fn


def numpy_rows(x: np.ndarray, bound: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The row-wise recipe in float64 NumPy: scale = min(amax, bound) / 448, values = e4m3(clip(x / scale))."""
    amax = np.abs(x).max(axis=-1, keepdims=True)
    if bound is not None:
        amax = np.minimum(amax, bound)
    scale = np.maximum(amax, 1e-12) / 448.0
    return np.clip(x / scale, -448, 448).astype(E4M3), scale


def test_e4m3_rounding_and_the_activation_clamp():
    x = np.array([
        [100.0, -50.0, 3.0, 0.01],  # amax 100 < 1200: scale 100 / 448
        [5000.0, -1300.0, 600.0, 1.0],  # amax 5000 clamped to 1200: scale 1200 / 448, 5000 and -1300 saturate
        [0.0, 0.0, 0.0, 0.0],
    ], np.float32)
    values, scale = qops.quantize_rows(jnp.asarray(x), qops.ACTIVATION_AMAX_BOUND)
    ref_values, ref_scale = numpy_rows(x.astype(np.float64), 1200.0)
    np.testing.assert_allclose(np.asarray(scale)[:, 0], ref_scale[:, 0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(values).astype(np.float32), ref_values.astype(np.float32))
    assert np.asarray(scale)[1, 0] == pytest.approx(1200 / 448)
    dequantized = np.asarray(values).astype(np.float32) * np.asarray(scale)
    np.testing.assert_allclose(dequantized[1, :2], [1200.0, -1200.0], rtol=1e-6)  # clipped at the bound
    # Without the bound (weights) the scale follows the row's amax.
    assert float(qops.quantize_rows(jnp.asarray(x))[1][1, 0]) == pytest.approx(5000 / 448)
    # e4m3 has 3 mantissa bits: halfway cases round to even (1.0625 -> 1.0, 1.1875 -> 1.25), 440 -> 448, and
    # 2^-10 (half the smallest subnormal) -> 0. amax 448 makes the scale exactly 1.
    row = jnp.asarray([[448.0, 1.0625, 1.1875, 440.0, 2.0**-10]])
    got = np.asarray(qops.quantize_rows(row)[0]).astype(np.float32)
    np.testing.assert_array_equal(got, [[448.0, 1.0, 1.25, 448.0, 0.0]])


def test_fp8_matmul_equals_the_dequantized_product():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 32)).astype(np.float32) * 3
    w = rng.standard_normal((32, 24)).astype(np.float32) / 6
    y = np.asarray(qops.matmul(jnp.asarray(x), qops.quantize_kernel(jnp.asarray(w), "fp8"), jnp.float32))
    xv, xs = numpy_rows(x.astype(np.float64), 1200.0)
    wv, ws = numpy_rows(w.T.astype(np.float64), None)
    reference = (xv.astype(np.float64) * xs) @ (wv.astype(np.float64) * ws).T
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5)
    assert np.abs(y - x @ w).max() > 1e-3  # it is quantized, not a float32 matmul
    # int8 weight-only: per output channel, amax / 127.
    w8 = qops.quantize_kernel(jnp.asarray(w), "int8")
    np.testing.assert_allclose(np.asarray(w8.scale), np.abs(w).max(axis=0) / 127, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(qops.matmul(jnp.asarray(x), w8, jnp.float32)),
                               x @ (np.round(w / (np.abs(w).max(axis=0) / 127)) * (np.abs(w).max(axis=0) / 127)),
                               rtol=1e-4, atol=1e-4)


CFG = ModelConfig(vocab_size=264, dim=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_dim=256,
                  rope_theta=10_000.0, max_seq_len=256)


@pytest.mark.slow  # 4 s on 2 busy cores
def test_first_and_last_layers_stay_unquantized():
    params = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))
    fp8, fp8_cfg = q.quantize_params(params, CFG, "fp8")
    assert not fp8_cfg.scan_layers
    unstacked = model.unstack_layers(params, CFG.num_layers)
    for i in range(CFG.num_layers):
        layer, original = fp8[f"layers_{i}"], unstacked[f"layers_{i}"]
        ffn = layer["feed_forward"]
        if i in (0, CFG.num_layers - 1):
            assert set(ffn) == {"gate", "up", "down"} and ffn["gate"].dtype == jnp.float32
            jax.tree.map(np.testing.assert_array_equal, ffn, original["feed_forward"])
        else:
            assert {k: (v.values.dtype, v.scale.dtype) for k, v in ffn.items()} == {
                "gate": (qops.FP8, jnp.float32), "up": (qops.FP8, jnp.float32), "down": (qops.FP8, jnp.float32)}
            assert ffn["gate"].scale.shape == (CFG.ffn_dim,) and ffn["down"].scale.shape == (CFG.dim,)
        # attention is never quantized
        jax.tree.map(np.testing.assert_array_equal, layer["attention"], original["attention"])
    int8, _ = q.quantize_params(params, CFG, "int8")
    assert all(int8[f"layers_{i}"]["feed_forward"]["up"].values.dtype == jnp.int8 for i in range(CFG.num_layers))
    with pytest.raises(ConfigError, match="already quantized"):
        q.quantize_params(fp8, fp8_cfg, "fp8")
    with pytest.raises(ConfigError, match="unknown quantization mode"):
        q.quantize_params(params, CFG, "int4")


def corpus(*modules) -> np.ndarray:
    return np.frombuffer("".join(inspect.getsource(m) for m in modules).encode(), np.uint8).astype(np.int32)


@pytest.fixture(scope="module")
def trained():
    """The tiny model trained for 150 steps on Python's own source text (bytes): seconds on 2 idle cores."""
    data = corpus(argparse, inspect)
    steps = 150
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, steps), b2=0.95, weight_decay=0.0)
    params = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss(p):
            logits = model.Llama(CFG).apply({"params": p}, batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = rng.integers(0, len(data) - 65, 16)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(np.stack([data[s:s + 65] for s in starts])))
    assert float(loss) < 2.5, float(loss)  # it learned the text (uniform would be ln 264 = 5.6)
    return params


@pytest.mark.slow  # 21 s on 2 busy cores
def test_quantized_logits_stay_close_to_bf16_on_a_trained_model(trained):
    bf16 = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), trained)
    held_out = corpus(textwrap)[: 8 * 256].reshape(8, 256)  # text the model never saw
    tokens, targets = jnp.asarray(held_out[:, :-1]), held_out[:, 1:]

    def evaluate(p, cfg):
        logits = jax.jit(lambda p, t: model.Llama(cfg).apply({"params": p}, t))(p, tokens)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -np.take_along_axis(np.asarray(logp), targets[..., None], axis=-1).mean()
        return logp, float(np.exp(nll))

    ref_logp, ref_ppl = evaluate(params, bf16)
    assert ref_ppl < 25  # the held-out text is predictable for the trained model
    for mode, max_kl, max_ppl_change in (("fp8", 0.002, 0.005), ("int8", 0.001, 0.005)):
        logp, ppl = evaluate(*q.quantize_params(params, bf16, mode))
        kl = float(jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1).mean())
        print(f"{mode}: KL(bf16 || {mode}) = {kl:.5f} nats/token, perplexity {ref_ppl:.4f} -> {ppl:.4f}")
        assert 0 < kl < max_kl
        assert abs(ppl / ref_ppl - 1) < max_ppl_change


@pytest.mark.slow  # 7 s on 2 busy cores
def test_quantized_checkpoint_is_smaller_and_generates_the_same(tmp_path, trained):
    src, dst = str(tmp_path / "f32"), str(tmp_path / "fp8")
    checkpoint.save_params(src, trained, CFG, tokenizer={"name": "byte", "sha256": "-"})
    assert q.main(["--checkpoint", src, "--out", dst, "--mode", "fp8"]) == 0
    params, cfg, meta = checkpoint.load(dst)
    assert meta["stage"] == "quantize-fp8" and not cfg.scan_layers
    assert params["layers_1"]["feed_forward"]["gate"].values.dtype == qops.FP8
    in_memory, in_memory_cfg = q.quantize_params(trained, CFG, "fp8")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)),
                 params, in_memory)
    prompt = [list(b"def main(argv")]
    from_disk = gen.generate(params, cfg, prompt, 16, stop_ids=())
    assert from_disk == gen.generate(in_memory, in_memory_cfg, prompt, 16, stop_ids=())

    def disk(path):
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())

    # FFN kernels of the 2 middle layers go from 4 bytes to 1 byte per weight, plus a float32 scale per channel.
    saved = 2 * 3 * CFG.dim * CFG.ffn_dim * 3 - 2 * (2 * CFG.ffn_dim + CFG.dim) * 4
    assert q.param_bytes(trained) - q.param_bytes(params) == saved
    print(f"on disk: {disk(src)} bytes (float32) -> {disk(dst)} bytes (fp8)")
    assert disk(src) - disk(dst) > 0.6 * saved  # orbax compresses, so on-disk savings are a bit smaller


@pytest.mark.slow  # 3 s on 2 busy cores
def test_405b_fits_one_8x80gb_node_in_fp8_not_in_bf16():
    cfg = config.get("llama3.1-405b")
    mesh = sharding.make_mesh("tensor=8")
    bf16 = model.param_shapes(cfg)
    fp8 = q.quantized_shapes(cfg, "fp8")  # abstract: nothing is allocated
    per_device = {
        "bf16": q.param_bytes(bf16, gen.param_shardings(bf16, cfg, mesh)),
        "fp8": q.param_bytes(fp8, gen.param_shardings(fp8, cfg.replace(scan_layers=False), mesh)),
    }
    kv_cache = plan.inference_budget(cfg, tensor=8, batch=1, context=8192).kv_cache
    print({k: f"{v / 1e9:.2f} GB weights per device" for k, v in per_device.items()})
    assert per_device["bf16"] + kv_cache > 80e9 > per_device["fp8"] + kv_cache
    # The planner's analytic count of the same weights agrees with the real trees' shards.
    for weights, exact in per_device.items():
        analytic = plan.inference_budget(cfg, tensor=8, batch=1, context=8192, weight_dtype=weights).weights
        assert analytic == pytest.approx(exact, rel=1e-3)
