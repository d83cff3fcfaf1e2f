"""NF4, QLoRA's frozen base (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): the code values
against the normal quantiles they are defined as, the bytes against a NumPy implementation of bitsandbytes'
algorithm written here, the round-trip error against int4-absmax, the matmul, a model on an NF4 (and an int8) base,
and the bytes of the 8B's NF4 tree without allocating it."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from llama_jax import config, model
from llama_jax import quantize as q
from llama_jax.ops import quantized as qops

CFG = config.get("tiny")


# --- A NumPy reference of bitsandbytes' quantize_4bit(nf4, blocksize=64, compress_statistics=True) ------------


def reference_code() -> np.ndarray:
    """The NF4 values as the paper's appendix E and bitsandbytes' create_normal_map define them: with
    offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 ~= 0.9677, the 8 quantiles ppf(linspace(offset, 1/2, 9)[:-1]), the
    mirror of 7 quantiles ppf(linspace(offset, 1/2, 8)[:-1]) and 0, scaled to [-1, 1]."""
    offset = (1 - 1 / 30 + 1 - 1 / 32) / 2
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    return values / values.max()


def nearest(x: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest code value by brute force (the library searches midpoints)."""
    return np.abs(x[:, None] - code[None, :]).argmin(axis=1)


def numpy_nf4(w: np.ndarray, contracted: int) -> dict:
    """bitsandbytes' bytes for the torch weight [out, in] of our kernel [*in, *out], in float32 NumPy."""
    ins = math.prod(w.shape[:contracted])
    flat = w.reshape(ins, -1).T.reshape(-1, 64).astype(np.float32)  # torch layout, blocks of 64
    absmax = np.abs(flat).max(axis=1)
    idx = np.stack([nearest(row / m, qops.NF4_CODE) for row, m in zip(flat, absmax)])
    packed = (idx[:, 0::2] * 16 + idx[:, 1::2]).astype(np.uint8).reshape(-1)
    offset = absmax.mean(dtype=np.float32)
    centred = absmax - offset
    groups = np.pad(centred, (0, -centred.size % 256)).reshape(-1, 256)
    group_max = np.abs(groups).max(axis=1)
    scale_idx = np.concatenate([nearest(g / m, qops.dynamic_code()) for g, m in zip(groups, group_max)])
    return {"codes": packed, "scale_codes": scale_idx[:centred.size].astype(np.uint8), "scale_scale": group_max,
            "scale_offset": offset}


def numpy_dequantize(stored: dict, shape: tuple[int, ...], contracted: int) -> np.ndarray:
    """Decodes the bytes: high nibble first, value * (dynamic_code[scale code] * group max + offset)."""
    idx = np.stack([stored["codes"] >> 4, stored["codes"] & 15], axis=1).reshape(-1, 64)
    count = idx.shape[0]
    groups = np.repeat(stored["scale_scale"], 256)[:count]
    scales = qops.dynamic_code()[stored["scale_codes"]] * groups + stored["scale_offset"]
    torch_layout = (qops.NF4_CODE[idx] * scales[:, None]).reshape(-1, math.prod(shape[:contracted]))
    return torch_layout.T.reshape(shape)


def int4_absmax_round_trip(w: np.ndarray) -> np.ndarray:
    """The linear 4-bit baseline: symmetric int4 in [-7, 7], one absmax scale per block of 64 (same layout)."""
    blocks = w.reshape(-1, 64)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 7
    return (np.round(blocks / scale) * scale).reshape(w.shape)


# --- Tests -----------------------------------------------------------------------------------------------


def test_nf4_values_are_the_normal_quantiles_of_the_paper():
    np.testing.assert_allclose(qops.NF4_CODE, reference_code(), rtol=0, atol=3e-7)  # float32 rounding
    assert qops.NF4_CODE[7] == 0.0 and qops.NF4_CODE[0] == -1.0 and qops.NF4_CODE[-1] == 1.0
    # bitsandbytes' dynamic map: 256 distinct values; 0 and 1 exact; 10^-6 .. 1 in magnitude.
    dynamic = qops.dynamic_code()
    assert dynamic.size == 256 and np.unique(dynamic).size == 256
    assert 0.0 in dynamic and dynamic.max() == 1.0 and np.abs(dynamic[dynamic != 0]).min() < 1e-6


@pytest.mark.parametrize("shape, contracted", [((128, 96), 1), ((64, 4, 32), 1), ((4, 32, 64), 2), ((256, 320), 1)])
def test_the_bytes_match_a_numpy_reference_of_bitsandbytes(shape, contracted):
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    got = qops.quantize_kernel(jnp.asarray(w), "nf4", contracted)
    expected = numpy_nf4(w, contracted)
    assert got.shape == shape and qops.mode_of({"w": got}) == "nf4"
    np.testing.assert_array_equal(np.asarray(got.codes), expected["codes"])
    np.testing.assert_array_equal(np.asarray(got.scale_codes), expected["scale_codes"])
    np.testing.assert_allclose(np.asarray(got.scale_scale), expected["scale_scale"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got.scale_offset), expected["scale_offset"], rtol=1e-6)
    # Decoding our own bytes in NumPy gives the library's dequantized kernel exactly (float32 both).
    ours = {name: np.asarray(getattr(got, name)) for name in expected}
    np.testing.assert_array_equal(np.asarray(qops.dequantize_nf4(got, jnp.float32)),
                                  numpy_dequantize(ours, shape, contracted))


def test_round_trip_error_on_normal_weights_beats_int4_absmax():
    """N(0, 0.02) weights (a [1024, 1024] kernel), mean absolute error in units of the weights' std: NF4 with
    double-quantized scales 0.0729, with exact float32 scales 0.0728, int4-absmax (same blocks) 0.0914. The QLoRA
    paper gives no such figure (it compares data types by perplexity and zero-shot accuracy, its figure 3 and
    table 2), so the bounds come from these measurements and the NumPy reference above."""
    w = (np.random.default_rng(0).standard_normal((1024, 1024)) * 0.02).astype(np.float32)
    nf4 = np.asarray(qops.dequantize_nf4(qops.quantize_nf4(jnp.asarray(w)), jnp.float32))
    nf4_error = np.abs(nf4 - w).mean() / w.std()
    int4_error = np.abs(int4_absmax_round_trip(w) - w).mean() / w.std()
    stored = numpy_nf4(w, 1)
    exact_scales = np.abs(w.T.reshape(-1, 64)).max(axis=1)  # the float32 absmax, before double quantization
    idx = np.stack([stored["codes"] >> 4, stored["codes"] & 15], axis=1).reshape(-1, 64)
    single = (qops.NF4_CODE[idx] * exact_scales[:, None]).reshape(1024, 1024).T
    single_error = np.abs(single - w).mean() / w.std()
    assert 0.065 < nf4_error < 0.075, nf4_error
    assert nf4_error < 0.85 * int4_error, (nf4_error, int4_error)
    assert abs(nf4_error - single_error) < 0.002, (nf4_error, single_error)  # double quantization costs ~nothing


def test_the_nf4_matmul_is_x_times_the_dequantized_kernel():
    """To float32 rounding, not bit for bit: under jit XLA fuses the scales' multiply-add into an FMA and folds the
    [out, in] -> [in, out] transpose into the GEMM, so a stored float kernel sums in another order."""
    rng = np.random.default_rng(1)
    for shape, contracted, x_shape in (((64, 96), 1, (2, 5, 64)), ((4, 16, 64), 2, (2, 5, 4, 16))):
        w = qops.quantize_kernel(jnp.asarray(rng.standard_normal(shape), jnp.float32), "nf4", contracted)
        x = rng.standard_normal(x_shape).astype(np.float32)
        decoded = numpy_dequantize({name: np.asarray(getattr(w, name)) for name in (
            "codes", "scale_codes", "scale_scale", "scale_offset")}, shape, contracted)
        inside_jit = jax.jit(lambda w: qops.dequantize_nf4(w, jnp.float32))(w)
        np.testing.assert_allclose(inside_jit, decoded, rtol=5e-7, atol=0)  # one FMA rounding at most
        for dtype, eps in ((jnp.float32, 2.0**-23), (jnp.bfloat16, 2.0**-8)):
            x_in = jnp.asarray(x, dtype)  # activations arrive in the compute dtype
            got = jax.jit(lambda x, w, d=dtype, c=contracted: qops.matmul(x, w, d, "highest", c))(x_in, w)
            assert got.dtype == dtype
            x_in = np.asarray(x_in, np.float64)
            kernel = np.asarray(jnp.asarray(decoded, dtype), np.float64)  # the kernel rounded to the compute dtype
            expected = np.tensordot(x_in, kernel, contracted)
            bound = 4 * eps * np.tensordot(np.abs(x_in), np.abs(kernel), contracted)  # float rounding of the sums
            assert np.all(np.abs(np.asarray(got, np.float64) - expected) <= bound + 1e-30), dtype


def test_the_backward_pass_decodes_the_kernel_again_instead_of_keeping_it():
    """Gradients reach x (the adapters' path) as through the decoded kernel; the frozen base gets none; what the
    backward pass keeps is the 4-bit kernel (its bytes), not a float copy of it."""
    rng = np.random.default_rng(2)
    for shape, contracted, x_shape in (((256, 128), 1, (2, 3, 256)), ((4, 16, 64), 2, (2, 3, 4, 16))):
        w = qops.quantize_kernel(jnp.asarray(rng.standard_normal(shape), jnp.float32), "nf4", contracted)
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)

        def loss(x, w, c=contracted):
            return jnp.sum(jnp.sin(qops.matmul(x, w, jnp.float32, "highest", c)))

        decoded = qops.dequantize_nf4(w, jnp.float32)
        np.testing.assert_allclose(jax.grad(loss)(x, w), jax.grad(loss)(x, decoded), rtol=1e-5, atol=1e-5)
        grads = jax.tree.leaves(jax.grad(loss, argnums=1, allow_int=True)(x, w))
        assert not any(np.any(np.asarray(g, np.float32)) for g in grads if g.dtype != jax.dtypes.float0)
        _, backward = jax.vjp(functools.partial(loss, w=w), x)
        kept = sum(a.size for a in jax.tree.leaves(backward) if jnp.issubdtype(a.dtype, jnp.floating))
        assert kept < math.prod(shape) / 4, kept  # x, the output and the scales; no [*in, *out] float kernel


def _dequantized(params):
    return jax.tree.map(lambda x: qops.dequantize_nf4(x, jnp.float32) if isinstance(x, qops.NF4Array) else x,
                        params, is_leaf=qops.is_quantized)


def normal_params(cfg):
    """Random parameters whose kernels are normal, std 1 / sqrt(fan in), like trained Llama weights (bell-shaped;
    the init's truncated normal has no tails, which favours the linear int4 grid)."""
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 16))
    fan_in = {"query": 1, "key": 1, "value": 1, "out": 2, "gate": 1, "up": 1, "down": 1}
    layers = {group: {name: jax.random.normal(next(keys), w.shape) / math.sqrt(math.prod(w.shape[1:1 + fan_in[name]]))
                      for name, w in kernels.items()} if group in ("attention", "feed_forward") else kernels
              for group, kernels in params["layers"].items()}
    return {**params, "layers": layers}


def test_a_model_on_an_nf4_base_runs_stacked_and_per_layer():
    cfg = CFG.replace(num_layers=2)
    params = normal_params(cfg)
    nf4, nf4_cfg = q.quantize_params(params, cfg, "nf4")
    assert nf4_cfg == cfg and isinstance(nf4["layers"]["attention"]["out"], qops.NF4Array)
    assert nf4["layers"]["attention"]["out"].shape == params["layers"]["attention"]["out"].shape
    assert not isinstance(nf4["embedding"], qops.NF4Array)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    forward = jax.jit(lambda p, cfg: model.Llama(cfg).apply({"params": p}, tokens), static_argnums=1)
    exact, on_nf4 = forward(params, cfg), forward(nf4, cfg)
    # The NF4 network is the float network on the dequantized kernels.
    np.testing.assert_allclose(on_nf4, forward(_dequantized(nf4), cfg), rtol=1e-5, atol=1e-5)
    # Per layer (scan_layers=False) gives the same logits as the stacked tree.
    flat_cfg = cfg.replace(scan_layers=False)
    flat, _ = q.quantize_params(model.unstack_layers(params, cfg.num_layers), flat_cfg, "nf4")
    np.testing.assert_allclose(forward(flat, flat_cfg), on_nf4, rtol=1e-5, atol=1e-5)
    # Close to the float model, closer than int4-absmax: the logits' relative error, measured 0.248 with NF4 and
    # 0.317 with int4 on this random network, where each of the 14 projections carries its weights' ~7% error.
    int4 = jax.tree.map(lambda x: jnp.asarray(int4_absmax_round_trip(np.asarray(x))) if x.ndim >= 3 else x,
                        params)
    error = float(jnp.linalg.norm(on_nf4 - exact) / jnp.linalg.norm(exact))
    int4_error = float(jnp.linalg.norm(forward(int4, cfg) - exact) / jnp.linalg.norm(exact))
    assert error < 0.3 and error < 0.9 * int4_error, (error, int4_error)


def test_an_int8_base_quantizes_the_attention_projections_too():
    params = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))
    layers = params["layers"]
    contracted = {"query": 1, "key": 1, "value": 1, "out": 2}
    attention = {name: jax.vmap(lambda w, c=contracted[name]: qops.quantize_kernel(w, "int8", c))(w)
                 for name, w in layers["attention"].items()}
    assert attention["out"].scale.shape == (CFG.num_layers, CFG.dim)  # one scale per output channel
    int8 = {**params, "layers": {**layers, "attention": attention}}
    dequantized = {**params, "layers": {**layers, "attention": {
        name: a.values.astype(jnp.float32) * a.scale.reshape(a.scale.shape[:1] + (1,) * contracted[name]
                                                             + a.scale.shape[1:]) for name, a in attention.items()}}}
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    forward = jax.jit(lambda p: model.Llama(CFG).apply({"params": p}, tokens))
    np.testing.assert_allclose(forward(int8), forward(dequantized), rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(forward(int8) - forward(params)).max()) > 0  # the quantized path ran


def test_the_8b_nf4_base_takes_4_127_bits_a_kernel_weight_without_allocating():
    """Llama 3.1 8B: 6.98e9 projection weights -> 3.60 GB in NF4 (4 bits + an 8-bit scale per 64 + a float32 per
    64 * 256), against 13.96 GB in bfloat16; the whole tree, with the bfloat16 embedding and LM head, 5.70 GB."""
    cfg = config.get("llama3.1-8b")
    shapes = q.quantized_shapes(cfg, "nf4")  # jax.eval_shape: nothing is allocated
    kernels = [leaf for leaf in jax.tree.leaves(shapes, is_leaf=qops.is_quantized) if qops.is_quantized(leaf)]
    assert len(kernels) == 7
    weights = sum(math.prod(k.shape) for k in kernels)
    nf4_bytes = q.param_bytes(kernels)
    assert weights == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14_336)
    assert nf4_bytes == pytest.approx(weights * (0.5 + 1 / 64 + 4 / (64 * 256)), rel=1e-4)
    assert 3.59e9 < nf4_bytes < 3.61e9
    plain = model.param_shapes(cfg)
    plain_kernels = [plain["layers"][group][name] for group, name in (
        ("attention", "query"), ("attention", "key"), ("attention", "value"), ("attention", "out"),
        ("feed_forward", "gate"), ("feed_forward", "up"), ("feed_forward", "down"))]
    assert q.param_bytes(shapes) == q.param_bytes(plain) - q.param_bytes(plain_kernels) + nf4_bytes
    # Sharding: each kernel's blocks stay whole; a stack splits along its layers axis only.
    specs = qops.logical_axes(shapes, model.logical_axes(cfg))
    assert specs["layers"]["attention"]["query"].codes == jax.sharding.PartitionSpec("layers", None)
