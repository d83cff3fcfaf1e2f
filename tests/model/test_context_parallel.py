"""Context-parallel attention equals dense attention (a NumPy formula) with packed documents, on 2/4/8 shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import config, model, sharding
from llama_jax.errors import ConfigError
from llama_jax.ops import attention, context_parallel

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

B, T, N, K, H = 4, 32, 4, 2, 8


def packed_rows(seed=0):
    """(positions, segments, mask) of rows holding 1-4 documents, then padding (segment 0). The reference
    mask [B, T, T] is causal by storage index and within one document, built independently of the model."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for row in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T - 1), size=rng.integers(0, 4), replace=False))
        end = T - rng.integers(0, 5)
        for doc, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, end]), start=1):
            segments[row, lo:hi] = doc
            positions[row, lo:hi] = np.arange(hi - lo)
        positions[row, end:] = np.arange(T - end)  # padding counts up too, like any run of segment 0
    causal = np.tril(np.ones((T, T), bool))
    return positions, segments, causal[None] & (segments[:, :, None] == segments[:, None, :])


def numpy_attention(q, k, v, mask):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)  # query head n uses kv head n // G
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def qkv(seed=1):
    r = np.random.default_rng(seed)
    return (r.standard_normal((B, T, N, H), np.float32), r.standard_normal((B, T, K, H), np.float32),
            r.standard_normal((B, T, K, H), np.float32))


@pytest.mark.parametrize("impl", ["ring", "all_gather"])
@pytest.mark.parametrize("mesh_spec", ["sequence=2,data=4", "sequence=4,tensor=2", "sequence=8"])
def test_equals_dense_attention(mesh_spec, impl):
    q, k, v = qkv()
    positions, segments, mask = packed_rows()
    mesh = sharding.make_mesh(mesh_spec)
    with sharding.activate(mesh):
        assert context_parallel.num_shards() == mesh.shape["sequence"]
        out = jax.jit(lambda *a: context_parallel.attention(*a, impl=impl))(q, k, v, positions, segments)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_zigzag_layout_gives_the_same_attention_and_balances_work():
    shards = 4
    order = context_parallel.zigzag_order(T, shards)
    assert sorted(order) == list(range(T))
    np.testing.assert_array_equal(order[:8], [0, 1, 2, 3, 28, 29, 30, 31])  # chunks 0 and 7 on device 0
    q, k, v = qkv()
    positions, segments, mask = packed_rows()
    with sharding.activate(sharding.make_mesh("sequence=4,fsdp=2")):  # every input stored in zig-zag order
        out = jax.jit(context_parallel.attention)(q[:, order], k[:, order], v[:, order], positions[:, order],
                                                  segments[:, order])
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, mask)[:, order], rtol=1e-5, atol=1e-5)

    def half_blocks_needed(layout):  # (query half, key half) pairs per device with anything causal to compute
        causal = layout[:, None] >= layout[None, :]
        halves = causal.reshape(2 * shards, T // (2 * shards), 2 * shards, T // (2 * shards)).any(axis=(1, 3))
        return halves.reshape(shards, 2, 2 * shards).sum(axis=(1, 2))

    np.testing.assert_array_equal(half_blocks_needed(np.arange(T)), [3, 7, 11, 15])  # last device: 5x the first
    np.testing.assert_array_equal(half_blocks_needed(order), [9, 9, 9, 9])  # 2 * shards + 1 each


def test_gradients_equal_dense_attention():
    q, k, v = qkv()
    positions, segments, mask = packed_rows(3)
    weights = np.random.default_rng(5).standard_normal((B, T, N, H), np.float32)

    def dense(q, k, v):
        return jnp.sum(attention.dot_product_attention(q, k, v, mask) * weights)

    def ring(q, k, v):
        return jnp.sum(context_parallel.attention(q, k, v, positions, segments) * weights)

    want = jax.grad(dense, argnums=(0, 1, 2))(q, k, v)
    with sharding.activate(sharding.make_mesh("sequence=4,data=2")):
        got = jax.jit(jax.grad(ring, argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shards", [2, 8])
@pytest.mark.slow  # 15 s on 2 busy cores
def test_model_logits_with_sequence_sharding(shards):
    cfg = config.get("tiny", vocab_size=256, dim=64, num_layers=2, num_heads=8, num_kv_heads=4, ffn_dim=128)
    params = model.init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 256, (8 // shards, T), dtype=np.int32)
    segments = np.repeat((np.arange(T) >= 11).astype(np.int32) + 1, 8 // shards).reshape(T, -1).T
    positions = np.where(segments == 1, np.arange(T), np.arange(T) - 11).astype(np.int32)
    want = model.Llama(cfg).apply({"params": params}, tokens, positions, segments)
    mesh = sharding.make_mesh(f"sequence={shards},fsdp=-1")
    with sharding.activate(mesh):
        text = jax.jit(lambda p, *a: model.Llama(cfg).apply({"params": p}, *a)).lower(
            params, tokens, positions, segments).as_text()
        assert "collective_permute" in text or "collective-permute" in text  # the ring, not GSPMD's gather
        got = jax.jit(lambda p, *a: model.Llama(cfg).apply({"params": p}, *a))(params, tokens, positions, segments)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_bad_input():
    q, k, v = qkv()
    positions, segments, _ = packed_rows()
    with pytest.raises(ConfigError, match="active mesh"):
        context_parallel.attention(q, k, v, positions, segments)
    with sharding.activate(sharding.make_mesh("sequence=8")), pytest.raises(ConfigError, match="divisible"):
        context_parallel.attention(q[:, :24], k[:, :24], v[:, :24], positions[:, :24], segments[:, :24])
    with pytest.raises(ConfigError, match="zig-zag"):
        context_parallel.zigzag_order(30, 4)


@pytest.mark.slow  # 7 s on 2 busy cores
def test_all_gather_with_the_fused_kernel_equals_dense_attention_and_its_gradients():
    """Local queries against the gathered keys through the flash kernel (Pallas's interpreter here), zig-zag rows on
    4 shards: outputs against the NumPy formula, gradients against dense attention's."""
    q, k, v = qkv(2)
    positions, segments, mask = packed_rows(3)
    order = context_parallel.zigzag_order(T, 4)
    args = (q[:, order], k[:, order], v[:, order], positions[:, order], segments[:, order])
    mesh = sharding.make_mesh("sequence=4,data=2")

    def loss(impl, kernel):
        def f(q, k, v, positions, segments):
            out = context_parallel.attention(q, k, v, positions, segments, impl=impl, kernel=kernel)
            return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    with sharding.activate(mesh):
        out = jax.jit(lambda *a: context_parallel.attention(*a, impl="all_gather", kernel="flash"))(*args)
        (fused, fused_grads), (dense, dense_grads) = loss("all_gather", "flash")(*args), loss("ring", "dense")(*args)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, mask)[:, order], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused, dense, rtol=1e-5)
    for a, b in zip(fused_grads, dense_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
