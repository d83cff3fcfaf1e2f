"""Fused attention kernels (Pallas flash attention, splash, the cuDNN call) against the attention formula.

The reference below is written from the definition (scale 1/sqrt(H), key s visible to query t iff same segment
and k_position[s] <= q_position[t], query head n reads kv head n // G, float32 softmax; a query that sees no key
gives zero) in plain jnp; gradients come from jax.vjp of that formula. The kernels run in Pallas interpret mode.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.errors import ConfigError
from llama_jax.ops import flash_attention as fa
from llama_jax.ops.attention import attention_mask, dot_product_attention

HIGHEST = jax.lax.Precision.HIGHEST


def reference(q, k, v, q_pos, q_seg, k_pos, k_seg):
    """(out [B, T, N, H], lse [B, T, N]) from the formula, in float32."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)  # [B, S, N, H]
    visible = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, T, S]
    visible = visible[:, None]  # [B, 1, T, S]
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, precision=HIGHEST) / math.sqrt(h)
    scores = jnp.where(visible, scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1) * visible  # rows that see nothing: all zero
    out = jnp.einsum("bnts,bsnh->btnh", probs, v, precision=HIGHEST)
    lse = jax.nn.logsumexp(scores, axis=-1).transpose(0, 2, 1)
    return out, lse


def packed_rows():
    """Two rows of 64 tokens: several documents with padding (segment 0, position 0) at the end, and a row of
    documents of other lengths without padding. Positions restart at 0 per document."""
    lengths = [[20, 7, 23], [9, 30, 25]]
    positions, segments = np.zeros((2, 64), np.int32), np.zeros((2, 64), np.int32)
    for row, docs in enumerate(lengths):
        start = 0
        for doc, length in enumerate(docs, start=1):
            positions[row, start:start + length] = np.arange(length)
            segments[row, start:start + length] = doc
            start += length
    return positions, segments


def random_qkv(seed, b, t, s, n, kv_heads, h, dtype):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=shape), dtype) for shape in
                 ((b, t, n, h), (b, s, kv_heads, h), (b, s, kv_heads, h)))


def values_and_grads(attend, q, k, v, d_out):
    """attention output and (dq, dk, dv) of sum(out * d_out), for any attend(q, k, v) -> out."""
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(d_out.astype(out.dtype))


def assert_matches_reference(kernel, q, k, v, vectors, *, atol, rtol, rows=None):
    """kernel(q, k, v) equals the reference in values and gradients; ``rows`` [B, T] limits which queries
    count (others get a zero cotangent and are not compared)."""
    mask = jnp.ones(q.shape[:2], bool) if rows is None else jnp.asarray(rows)
    d_out = jax.random.normal(jax.random.key(1), q.shape, jnp.float32) * mask[:, :, None, None]
    got, got_grads = values_and_grads(kernel, q, k, v, d_out)
    want, want_grads = values_and_grads(lambda q, k, v: reference(q, k, v, *vectors)[0], q, k, v, d_out)
    assert got.dtype == v.dtype and got.shape == q.shape
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    np.testing.assert_allclose(np.asarray(got, np.float32) * mask[:, :, None, None],
                               np.asarray(want, np.float32) * mask[:, :, None, None], atol=atol, rtol=rtol)
    for name, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol, rtol=rtol,
                                   err_msg=name)


def flash(vectors, **kwargs):
    kwargs = {"block_q": 16, "block_k": 16, "interpret": True, **kwargs}
    return jax.jit(lambda q, k, v: fa.flash_attention(q, k, v, *vectors, **kwargs))


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (8, 2)])  # GQA groups 1 and 4
@pytest.mark.slow  # 22 s on 2 busy cores
def test_flash_packed_rows_with_padding(heads, kv_heads, dtype, atol):
    positions, segments = packed_rows()
    vectors = (positions, segments, positions, segments)
    q, k, v = random_qkv(0, 2, 64, 64, heads, kv_heads, 32, dtype)
    assert_matches_reference(flash(vectors), q, k, v, vectors, atol=atol, rtol=atol)


def test_flash_equals_the_dense_attention():
    positions, segments = packed_rows()
    q, k, v = random_qkv(1, 2, 64, 64, 4, 2, 32, jnp.float32)
    dense = dot_product_attention(q, k, v, attention_mask(positions, segments, positions, segments))
    got = flash((positions, segments, positions, segments))(q, k, v)
    np.testing.assert_allclose(got, dense, atol=2e-5, rtol=2e-5)


@pytest.mark.slow  # 7 s on 2 busy cores
def test_flash_kv_cache_block_at_an_offset():
    """T != S: 16 queries at positions 30..45 written into cache slots 30..45 of 64; slots 46.. are empty
    (segment 0). A second row has two documents in its cache and queries from the second one."""
    t, s = 16, 64
    k_pos = np.tile(np.arange(s, dtype=np.int32), (2, 1))
    k_seg = np.where(np.arange(s) < 46, 1, 0).astype(np.int32)[None].repeat(2, 0)
    k_seg[1, 10:46] = 2
    k_pos[1, 10:46] = np.arange(36)  # the second document restarts at position 0
    q_pos = np.stack([np.arange(30, 46), np.arange(20, 36)]).astype(np.int32)
    q_seg = np.stack([np.ones(t), np.full(t, 2)]).astype(np.int32)
    vectors = (q_pos, q_seg, k_pos, k_seg)
    q, k, v = random_qkv(2, 2, t, s, 8, 2, 16, jnp.float32)
    assert_matches_reference(flash(vectors, block_k=32), q, k, v, vectors, atol=2e-5, rtol=2e-5)


@pytest.mark.slow  # 6 s on 2 busy cores
def test_flash_key_block_that_starts_at_the_last_query_position():
    """The second key block's first key has the query block's last position: the only visible pair of that
    block pair sits on the boundary of the skipping test, which must keep it."""
    q_pos = np.arange(16, dtype=np.int32)[None]
    k_pos = np.r_[16:32, 15:31].astype(np.int32)[None]
    ones_q, ones_k = np.ones_like(q_pos), np.ones_like(k_pos)
    vectors = (q_pos, ones_q, k_pos, ones_k)
    q, k, v = random_qkv(12, 1, 16, 32, 2, 1, 16, jnp.float32)
    assert_matches_reference(flash(vectors), q, k, v, vectors, atol=2e-5, rtol=2e-5)
    (lo, hi), _ = fa._loop_bounds(q_pos, ones_q, k_pos, ones_k, 16, 16)
    assert (lo.tolist(), hi.tolist()) == ([[1]], [[2]])


@pytest.mark.slow  # 6 s on 2 busy cores
def test_flash_rows_in_any_order():
    """Causality is by position: a row stored in a shuffled order (as context parallelism's zig-zag layout
    stores it) gives the same per-token results, and the block skipping stays exact."""
    positions, segments = packed_rows()
    order = np.random.default_rng(3).permutation(64)
    vectors = (positions[:, order], segments[:, order]) * 2
    q, k, v = random_qkv(3, 2, 64, 64, 4, 2, 16, jnp.float32)
    assert_matches_reference(flash(vectors), q, k, v, vectors, atol=2e-5, rtol=2e-5)


@pytest.mark.slow  # 7 s on 2 busy cores
def test_flash_pads_lengths_and_head_dim_that_do_not_fit_the_blocks():
    """T = S = 40 with blocks of 16 and head dim 24: padded to 48 tokens and 32 dims inside, sliced after.
    Row 0 ends in padding (segment 0), which must not see the padded keys."""
    positions, segments = packed_rows()
    vectors = (positions[:, 24:], segments[:, 24:]) * 2
    q, k, v = random_qkv(4, 2, 40, 40, 4, 2, 24, jnp.float32)
    assert_matches_reference(flash(vectors), q, k, v, vectors, atol=2e-5, rtol=2e-5)


@pytest.mark.slow  # 5 s on 2 busy cores
def test_flash_queries_that_see_no_key_or_only_padding():
    """Query 0 of row 0 has a segment no key carries, query 1 a position before every key of its segment:
    both give zero output and a finite log-sum-exp. Neither they nor padding queries pass gradients to real
    tokens."""
    positions, segments = packed_rows()
    q_pos, q_seg = positions.copy(), segments.copy()
    q_seg[0, 0] = 9
    k_pos = positions.copy()
    k_pos[0, :20] += 5  # document 1 of row 0 now starts at position 5 in the keys; query 1 sits at position 1
    vectors = (q_pos, q_seg, k_pos, segments)
    q, k, v = random_qkv(5, 2, 64, 64, 4, 2, 16, jnp.float32)
    assert_matches_reference(flash(vectors), q, k, v, vectors, atol=2e-5, rtol=2e-5)
    out, lse = jax.jit(lambda q, k, v: fa.flash_attention(q, k, v, *vectors, block_q=16, block_k=16,
                                                          interpret=True, return_lse=True))(q, k, v)
    assert np.all(np.asarray(out[0, :2]) == 0) and np.all(np.isfinite(np.asarray(lse)))
    # Cotangents on those two queries and on the padding queries (segment 0) reach no real token.
    d_out = jnp.zeros(q.shape).at[0, :2].set(1.0).at[0, 50:].set(1.0)
    _, (dq, dk, dv) = values_and_grads(flash(vectors), q, k, v, d_out)
    real = segments > 0
    assert not np.any(np.asarray(dq)[real]) and not np.any(np.asarray(dk)[real]) and not np.any(np.asarray(dv)[real])
    assert np.any(np.asarray(dv)[~real])  # padding queries do see padding keys (same segment 0)


@pytest.mark.slow  # 5 s on 2 busy cores
def test_flash_log_sum_exp_and_its_gradient():
    positions, segments = packed_rows()
    vectors = (positions, segments, positions, segments)
    q, k, v = random_qkv(6, 2, 64, 64, 4, 1, 16, jnp.float32)
    c_out = jax.random.normal(jax.random.key(2), q.shape)
    c_lse = jax.random.normal(jax.random.key(3), q.shape[:3])

    def loss(attend):
        def f(q, k, v):
            out, lse = attend(q, k, v)
            return jnp.sum(out * c_out) + jnp.sum(lse * c_lse)
        return f

    kernel = functools.partial(fa.flash_attention, q_positions=positions, q_segment_ids=segments,
                               k_positions=positions, k_segment_ids=segments, block_q=16, block_k=32,
                               interpret=True, return_lse=True)
    got_lse = jax.jit(kernel)(q, k, v)[1]
    want_lse = reference(q, k, v, *vectors)[1]
    np.testing.assert_allclose(got_lse, want_lse, atol=2e-5, rtol=2e-5)
    got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: reference(q, k, v, *vectors)), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


def test_flash_key_halves_merged_by_log_sum_exp():
    """What context parallelism does: attend to each half of the keys separately and merge the two outputs with
    softmax weights of their log-sum-exps. Queries whose document lies wholly in one half see nothing in the
    other (log-sum-exp float32 min, weight 0). Values and gradients, through the merge, equal the formula."""
    positions, segments = packed_rows()
    vectors = (positions, segments, positions, segments)

    def merged(q, k, v):
        parts = [fa.flash_attention(q, k[:, keys], v[:, keys], positions, segments, positions[:, keys],
                                    segments[:, keys], block_q=16, block_k=16, interpret=True, return_lse=True)
                 for keys in (slice(0, 32), slice(32, 64))]
        weights = jax.nn.softmax(jnp.stack([lse for _, lse in parts]), axis=0)  # [2, B, T, N]
        return sum(w[..., None] * out for (out, _), w in zip(parts, weights))

    q, k, v = random_qkv(13, 2, 64, 64, 4, 2, 16, jnp.float32)
    assert_matches_reference(jax.jit(merged), q, k, v, vectors, atol=2e-5, rtol=2e-5)


def test_block_skipping_bounds_on_packed_rows():
    """Row 0: one 64-token document; row 1: documents of 32 and 32 tokens. With blocks of 16, query block i of
    row 0 visits key blocks [0, i]; in row 1 the second document's query blocks start at key block 2."""
    positions = np.stack([np.arange(64), np.r_[0:32, 0:32]]).astype(np.int32)
    segments = np.stack([np.ones(64), np.r_[np.ones(32), np.full(32, 2)]]).astype(np.int32)
    (lo, hi), (k_lo, k_hi) = fa._loop_bounds(positions, segments, positions, segments, 16, 16)
    np.testing.assert_array_equal(lo, [[0, 0, 0, 0], [0, 0, 2, 2]])
    np.testing.assert_array_equal(hi, [[1, 2, 3, 4], [1, 2, 3, 4]])
    np.testing.assert_array_equal(k_lo, [[0, 1, 2, 3], [0, 1, 2, 3]])
    np.testing.assert_array_equal(k_hi, [[4, 4, 4, 4], [2, 2, 4, 4]])


def test_flash_rejects_bad_configs():
    positions, segments = packed_rows()
    q, k, v = random_qkv(7, 2, 64, 64, 3, 2, 16, jnp.float32)
    with pytest.raises(ConfigError, match="multiple of K"):
        fa.flash_attention(q, k, v, positions, segments, positions, segments, interpret=True)
    q, k, v = random_qkv(7, 2, 64, 64, 4, 2, 16, jnp.float32)
    with pytest.raises(ConfigError, match="block_q=24"):
        fa.flash_attention(q, k, v, positions, segments, positions, segments, block_q=24, interpret=True)
    with pytest.raises(ConfigError, match="k_positions"):
        fa.flash_attention(q, k, v, positions, segments, positions[:, :32], segments, interpret=True)


def test_flash_lowers_to_triton_for_gpu():
    """Forward and backward lower to Triton IR for the CUDA platform without a GPU (Triton's own compile to
    PTX happens on the device and is not covered here)."""
    q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)

    def loss(q, k, v, pos, seg):
        return fa.flash_attention(q, k, v, pos, seg, pos, seg, block_q=64, block_k=64).astype(jnp.float32).sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, ids, ids).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv


def test_is_natural_order():
    positions, segments = packed_rows()
    assert fa.is_natural_order(positions, segments).tolist() == [True, True]
    order = np.r_[32:64, 0:32]  # a row stored in another order
    assert fa.is_natural_order(positions[:, order], segments[:, order]).tolist() == [False, False]
    shifted = positions.copy()
    shifted[1, 40] += 1  # one document skips a position
    assert fa.is_natural_order(shifted, segments).tolist() == [True, False]


def splash_rows():
    """Two 256-token rows packed in natural order, the first with padding at its end."""
    positions, segments = packed_rows()
    chunk = np.repeat(np.arange(4), 64)[None]  # four copies of each row, with document ids of their own
    segments = np.tile(segments, (1, 4))
    return np.tile(positions, (1, 4)), np.where(segments > 0, segments + 4 * chunk, 0).astype(np.int32)


@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (4, 1)])
@pytest.mark.slow  # 9 s on 2 busy cores
def test_splash_packed_rows_in_interpret_mode(heads, kv_heads):
    positions, segments = splash_rows()
    vectors = (positions, segments, positions, segments)
    q, k, v = random_qkv(8, 2, 256, 256, heads, kv_heads, 32, jnp.float32)
    kernel = jax.jit(lambda q, k, v: fa.splash_attention(q, k, v, *vectors, block_q=128, block_k=128,
                                                         interpret=True))
    # Padding queries (segment 0) see padding keys by index in splash, by position in the formula: not compared.
    assert_matches_reference(kernel, q, k, v, vectors, atol=2e-5, rtol=2e-5, rows=segments > 0)


def test_splash_refuses_rows_out_of_natural_order():
    positions, segments = splash_rows()
    order = np.random.default_rng(9).permutation(256)
    positions, segments = positions[:, order], segments[:, order]
    q, k, v = random_qkv(9, 2, 256, 256, 2, 2, 32, jnp.float32)
    with pytest.raises(ConfigError, match="natural order"):
        fa.splash_attention(q, k, v, positions, segments, positions, segments, block_q=128, block_k=128,
                            interpret=True)
    natural_positions, natural_segments = splash_rows()
    positions = np.stack([natural_positions[0], positions[1]])
    segments = np.stack([natural_segments[0], segments[1]])
    out = jax.jit(lambda q, k, v, p, s: fa.splash_attention(q, k, v, p, s, p, s, block_q=128, block_k=128,
                                                            interpret=True))(q, k, v, positions, segments)
    assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1]))


def test_splash_lowers_for_tpu():
    q = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 512), jnp.int32)

    def loss(q, k, v, pos, seg):
        return fa.splash_attention(q, k, v, pos, seg, pos, seg, block_q=256, block_k=256).astype(jnp.float32).sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, ids, ids).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3  # forward, dq, dk/dv


@pytest.mark.parametrize("natural_order", [False, True])
def test_cudnn_call_with_xla_implementation(natural_order):
    """The exact call cudnn_attention makes, run by jax's XLA implementation (cuDNN needs a GPU)."""
    positions, segments = packed_rows()
    vectors = (positions, segments, positions, segments)
    q, k, v = random_qkv(10, 2, 64, 64, 4, 1, 32, jnp.float32)
    kernel = functools.partial(fa.cudnn_attention, q_positions=positions, q_segment_ids=segments,
                               k_positions=positions, k_segment_ids=segments, natural_order=natural_order,
                               implementation="xla")
    rows = segments > 0 if natural_order else None  # is_causal changes what padding queries see
    assert_matches_reference(kernel, q, k, v, vectors, atol=2e-5, rtol=2e-5, rows=rows)
    with pytest.raises(ConfigError, match="bfloat16"):
        fa.cudnn_attention(q, k, v, *vectors)


def test_select_impl_and_dispatch():
    assert fa.select_impl("per_backend", backend="gpu") == "pallas"
    assert fa.select_impl(backend="tpu", natural_order=True) == "splash"
    assert fa.select_impl(backend="tpu") == "dense"
    assert fa.select_impl(backend="cpu", natural_order=True) == "dense"
    assert fa.select_impl("cudnn", backend="tpu") == "cudnn"
    for old_or_wrong in ("flash", "auto"):
        with pytest.raises(ConfigError, match="impl must be"):
            fa.select_impl(old_or_wrong)
    positions, segments = packed_rows()
    q, k, v = random_qkv(11, 2, 64, 64, 2, 2, 16, jnp.float32)
    with pytest.raises(ConfigError, match="dense attention"):
        fa.fused_attention(q, k, v, positions, segments, positions, segments)  # per_backend on CPU
    got = fa.fused_attention(q, k, v, positions, segments, positions, segments, impl="pallas", interpret=True)
    np.testing.assert_allclose(got, reference(q, k, v, positions, segments, positions, segments)[0], atol=2e-5)
