"""Matmul precision: every dot_general of the forward pass, the train step (loss and gradients), prefill, decode,
context-parallel attention and the quantized matmul carries ``ModelConfig.resolved_matmul_precision``.

The checks read the traced programs (jaxprs, nested ones included: scan, remat, cond, shard_map), so they hold
for every backend although they run on the CPU, where float32 matmuls are full precision whatever they carry.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from llama_jax import generate, model, optim, sharding
from llama_jax.config import ModelConfig, RopeScaling
from llama_jax.errors import ConfigError
from llama_jax.ops import quantized
from llama_jax.train import abstract_state, make_train_step, state_shardings
from llama_jax.train.pretrain import make_loss_fn

CFG = ModelConfig(vocab_size=96, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64,
                  rope_scaling=RopeScaling(original_max_position=16), max_seq_len=64)
HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
HIGH = (jax.lax.Precision.HIGH, jax.lax.Precision.HIGH)


def _subjaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _subjaxprs(item)


def dot_generals(jaxpr) -> list:
    """Every dot_general equation of ``jaxpr`` and of the programs nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for param in eqn.params.values():
            for inner in _subjaxprs(param):
                found += dot_generals(inner)
    return found


def precisions(fn, *args) -> list:
    """(precision, operand dtypes) of every matmul ``fn(*args)`` traces to; fails if it has none at all."""
    if hasattr(fn, "trace"):  # a jitted function: traced with its shardings
        jaxpr = fn.trace(*args).jaxpr.jaxpr
    else:
        jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    dots = dot_generals(jaxpr)
    assert dots, "no dot_general traced: the walk over the program is broken"
    return [(eqn.params["precision"], tuple(str(v.aval.dtype) for v in eqn.invars)) for eqn in dots]


def assert_all(found: list, expected) -> None:
    wrong = [f for f in found if f[0] != expected]
    assert not wrong, f"{len(wrong)} of {len(found)} matmuls not at {expected}: {wrong}"


def _tokens(b=2, t=8):
    return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


def forward(cfg, mesh=None):
    params = model.param_shapes(cfg.replace(context_parallel="off"))  # the same tree; init needs no mesh then
    with sharding.activate(mesh) if mesh is not None else contextlib.nullcontext():
        return precisions(lambda p, x: model.Llama(cfg).apply({"params": p}, x), params, _tokens())


def train_step(cfg, chunk_size):
    mesh = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
    tx = optim.adamw(1e-3)
    step = make_train_step(make_loss_fn(cfg, chunk_size=chunk_size), tx, mesh, state_shardings(cfg, tx, mesh))
    tokens = np.asarray(_tokens())
    batch = {"tokens": tokens, "targets": tokens, "loss_mask": np.ones_like(tokens),
             "segment_ids": np.ones_like(tokens), "positions": np.broadcast_to(np.arange(8), (2, 8)).astype(np.int32)}
    state, batch = abstract_state(cfg, tx, mesh), sharding.shard_batch(batch, mesh)
    with sharding.activate(mesh):
        return precisions(step.jitted, state, batch)


def prefill_and_decode(cfg):
    cfg = cfg.replace(scan_layers=False)  # generate.inference_layout's per-layer tree
    params = model.param_shapes(cfg)
    sampling, tokens, keys = generate.Sampling(), _tokens(), jax.random.split(jax.random.key(0), 2)  # one per row
    prefill = functools.partial(generate._prefill, cfg=cfg, sampling=sampling, cache_len=16)
    found = precisions(prefill, params, tokens, jnp.full((2,), 8, jnp.int32), keys)
    cache = model.init_cache(cfg, 2, 16)
    decode = functools.partial(generate._decode_step, cfg=cfg, sampling=sampling)
    return found + precisions(decode, params, cache, tokens[:, 0], jnp.full((2,), 8, jnp.int32), keys)


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_float32_forward_runs_every_matmul_at_highest(tie_embeddings):
    assert_all(forward(CFG.replace(tie_embeddings=tie_embeddings)), HIGHEST)


@pytest.mark.parametrize("chunk_size, remat", [(None, "none"), (32, "full")])  # one matmul / a scan over chunks
def test_float32_train_step_runs_every_matmul_and_gradient_at_highest(chunk_size, remat):
    found = train_step(CFG.replace(remat=remat), chunk_size)
    assert_all(found, HIGHEST)
    # forward + two gradient matmuls each: the step must hold far more than the forward's matmuls
    assert len(found) >= 3 * len(forward(CFG))


def test_float32_prefill_and_decode_run_every_matmul_at_highest():
    assert_all(prefill_and_decode(CFG), HIGHEST)


def test_bfloat16_compute_keeps_the_backends_fast_default():
    cfg = CFG.replace(dtype="bfloat16")
    assert cfg.resolved_matmul_precision is None
    for found in (forward(cfg), train_step(cfg, 32), prefill_and_decode(cfg)):
        assert_all(found, None)


def test_one_field_chooses_the_precision_everywhere():
    high = CFG.replace(matmul_precision="high")
    for found in (forward(high), train_step(high, 32), prefill_and_decode(high)):
        assert_all(found, HIGH)
    assert_all(forward(CFG.replace(dtype="bfloat16", matmul_precision="highest")), HIGHEST)
    assert_all(forward(CFG.replace(matmul_precision="default")), None)
    with pytest.raises(ConfigError, match="matmul_precision"):
        CFG.replace(matmul_precision="tf32")


@pytest.mark.parametrize("impl", ["ring", "all_gather"])
def test_context_parallel_attention_runs_at_the_models_precision(impl):
    cfg = CFG.replace(context_parallel=impl)
    found = forward(cfg, sharding.make_mesh("fsdp=2,sequence=2", devices=jax.devices()[:4]))
    assert_all(found, HIGHEST)


def test_quantized_matmuls_run_at_highest_except_the_exact_fp8_product():
    params = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))
    for mode in ("int8", "fp8"):
        layers = dict(params["layers"])
        layers["feed_forward"] = {name: quantized.quantize_kernel(w, mode) if w.ndim == 2 else jax.vmap(
            functools.partial(quantized.quantize_kernel, mode=mode))(w)
            for name, w in params["layers"]["feed_forward"].items()}
        found = precisions(lambda p, x: model.Llama(CFG).apply({"params": p}, x), {**params, "layers": layers},
                           _tokens())
        fp8 = [f for f in found if "float8_e4m3fn" in f[1]]
        assert len(fp8) == (3 if mode == "fp8" else 0)
        assert_all([f for f in found if f not in fp8], HIGHEST)
        assert_all(fp8, None)  # e4m3 values are exact in every matmul mode; XLA keeps its fp8 GEMM


def test_the_check_sees_a_matmul_hidden_in_nested_programs():
    """A program with one matmul without precision, deep in scan / remat / cond / shard_map, fails the check."""
    mesh = sharding.make_mesh("fsdp=2", devices=jax.devices()[:2])

    def body(carry, w):
        inner = jax.checkpoint(lambda c: jax.lax.cond(True, lambda c: c @ w, lambda c: c, c))
        return jnp.matmul(inner(carry), w, precision="highest"), None

    def program(x, ws):
        sharded = jax.shard_map(lambda x: jax.lax.scan(body, x, ws)[0], mesh=mesh, in_specs=PartitionSpec("fsdp"),
                                out_specs=PartitionSpec("fsdp"))
        return sharded(x)

    found = precisions(program, jnp.ones((4, 4)), jnp.ones((3, 4, 4)))
    assert sorted(f[0] is None for f in found) == [False, True]
    with pytest.raises(AssertionError, match="1 of 2 matmuls"):
        assert_all(found, HIGHEST)
