"""Fused attention with document masks: a Pallas flash-attention kernel (GPU), splash attention (TPU), cuDNN (GPU).

    out = flash_attention(q, k, v, q_positions, q_segment_ids, k_positions, k_segment_ids,
                          block_q=64, block_k=64, interpret=True)        # interpret: any backend; GPU: compiled
    out, lse = flash_attention(..., return_lse=True)                    # lse [B, T, N] float32, for block merges
    impl = select_impl("per_backend", natural_order=True, backend="gpu")  # "pallas"; TPU "splash"; CPU "dense"
    if impl != "dense":
        out = fused_attention(q, k, v, positions, segment_ids, positions, segment_ids, impl=impl, natural_order=True)

Semantics are those of the dense attention (``ops.attention``): q [B, T, N, H], k/v [B, S, K, H], query head n
reads key/value head n // (N // K); scale 1/sqrt(H); key s is visible to query t iff both carry the same segment id
and k_positions[s] <= q_positions[t] (causal by position, so a row may be stored in any order). Softmax in float32,
output in v's dtype. One difference, shared with ring attention: a query that sees no key at all gets a zero output
(dense softmax gives it the mean of every value) and a log-sum-exp of float32's most negative finite number, so
merging per-block results never computes inf - inf; its gradients are zero. Shared-prefix rows (negative segment
ids: ``ops.attention``'s rule for the reward model's packed rows) are not implemented by these kernels: refused
with ConfigError when the ids are concrete, their rows' outputs NaN under ``jit``.

``flash_attention`` (Pallas; Triton lowering on GPU, ``interpret=True`` anywhere): grid (query block, batch, query
head); each program folds key blocks into a float32 online softmax, so no [T, S] array exists. Key/value heads are
read through the index map (n // G), never repeated. A (query block, key block) pair is skipped when the blocks'
ranges of segment ids do not overlap or every key position is after every query position; the loop also starts and
ends at the first and last pair that may hold a visible key. The backward pass (custom_vjp) recomputes
probabilities from the saved log-sum-exp: one kernel for dq over key blocks, one for dk/dv per key block and
key/value head that loops over the G query heads sharing it, so dk/dv need no [B, S, N, H] buffer. The log-sum-exp
output is differentiable too (its cotangent enters as delta - dlse). Lengths that are not multiples of the block
sizes are padded (padded queries and keys see nothing); head dims are padded to a power of two >= 16 for Triton.

``splash_attention`` (TPU): ``jax.experimental.pallas.ops.tpu.splash_attention`` with segment ids and its causal
mask, which is by index. That equals our position rule when, within every document (segment id > 0), positions
count up by one per index, as in rows packed by ``data`` in natural order (``is_natural_order``), and queries and
keys are the same tokens (T == S). It does not hold for the zig-zag context-parallel layout or a KV cache. The
wrapper raises ``ConfigError`` when it can see the vectors (eager call) and, under ``jit``, turns the output of a
row that breaks the rule into NaN rather than a silently different result. Padding queries (segment 0) see padding
keys by index there; no real token sees them, so loss-masked training is unchanged. Splash runs in Pallas's
interpret mode on CPU (jax 0.10.2), which the tests use.

cuDNN (read from jax 0.10.2's ``jax/_src/nn/functions.py`` and ``jax/_src/cudnn/fused_attention_stablehlo.py``;
not run here): ``jax.nn.dot_product_attention(..., implementation="cudnn")`` takes our [B, T, N, H] / [B, S, K, H]
layout and does GQA natively (N a multiple of K), bf16/fp16 only, head dim <= 128 (<= 256 on Hopper) and a multiple
of 8. Its public arguments express one segment per row (``query_seq_lengths`` / ``key_value_seq_lengths``, i.e.
right padding) and a causal mask by index (``is_causal``; top-left aligned in jax's own XLA implementation, so it
cannot place a KV-cache query block at the end of S); it has no segment ids. Packed documents need either ``mask=``
(a boolean [B, 1, T, S] array that jax turns into a dense additive bias: O(T * S) memory per call, and even T and S
when training) or the private ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`` with
``q_offsets`` / ``kv_offsets`` per segment (cuDNN's packed THD layout, Hopper or newer; each segment is its own
sequence there, so causality is by index within it: natural order only).
``cudnn_attention`` therefore passes the document mask as ``mask=`` (exact for any order) and sets ``is_causal``
when the caller promises natural order so cuDNN can skip the upper triangle. ``implementation="xla"`` runs the same
call on any backend, which is how the tests check its inputs on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from llama_jax.errors import ConfigError

IMPLS = ("pallas", "splash", "cudnn")
_NEG = float(np.finfo(np.float32).min)  # finite "minus infinity": running maxima never give inf - inf = nan
_PAD_Q_SEGMENT = int(np.iinfo(np.int32).min)  # padded queries: a segment no key carries
_PAD_K_SEGMENT = _PAD_Q_SEGMENT + 1  # padded keys: a segment no query carries ...
_PAD_K_POSITION = int(np.iinfo(np.int32).max)  # ... and a position after every query's
_MIN_BLOCK = 16  # Triton's dot needs every dimension >= 16


# ---------------------------------------------------------------------------------------------- masks and blocks


def _visible(q_pos, q_seg, k_pos, k_seg):
    """[bq, bk] mask from [bq] query and [bk] key positions / segment ids."""
    return (q_seg[:, None] == k_seg[None, :]) & (k_pos[None, :] <= q_pos[:, None])


def _may_see(q_seg_lo, q_seg_hi, q_pos_hi, k_seg_lo, k_seg_hi, k_pos_lo):
    """Whether a query block may see a key of a key block, from the blocks' ranges: False is certain."""
    return (k_seg_lo <= q_seg_hi) & (k_seg_hi >= q_seg_lo) & (k_pos_lo <= q_pos_hi)


def _block_ranges(positions, segments, block):
    """Per block of ``block`` tokens: segment min, segment max, position min, position max, each [B, L / block]."""
    b, length = segments.shape
    seg = segments.reshape(b, length // block, block)
    pos = positions.reshape(b, length // block, block)
    return seg.min(-1), seg.max(-1), pos.min(-1), pos.max(-1)


def _first_and_last(may, axis):
    """[lo, hi) of the True entries along ``axis`` (0, 0 where there is none), int32."""
    count = may.shape[axis]
    lo = jnp.argmax(may, axis=axis)
    hi = count - jnp.argmax(jnp.flip(may, axis=axis), axis=axis)
    found = may.any(axis=axis)
    return jnp.where(found, lo, 0).astype(jnp.int32), jnp.where(found, hi, 0).astype(jnp.int32)


def _loop_bounds(q_pos, q_seg, k_pos, k_seg, block_q, block_k):
    """Key-block range [B, nq] per query block and query-block range [B, nk] per key block, each as (lo, hi)."""
    qs_lo, qs_hi, _, qp_hi = _block_ranges(q_pos, q_seg, block_q)
    ks_lo, ks_hi, kp_lo, _ = _block_ranges(k_pos, k_seg, block_k)
    may = _may_see(qs_lo[:, :, None], qs_hi[:, :, None], qp_hi[:, :, None],
                   ks_lo[:, None, :], ks_hi[:, None, :], kp_lo[:, None, :])  # [B, nq, nk]
    return _first_and_last(may, axis=2), _first_and_last(may, axis=1)


def _dot_nt(a, b, precision):
    """a [m, h] . b [n, h]^T -> [m, n] float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision)


def _dot_tn(a, b, precision):
    """a [k, m]^T . b [k, n] -> [m, n] float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision)


def _dot(a, b, precision):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision)


# ---------------------------------------------------------------------------------------------- kernels


def _forward_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref,
                    out_ref, lse_ref, *, scale, block_k, precision):
    """One query block of one head: q [bq, H] against key blocks of k/v [S, H]."""
    q, q_pos, q_seg = q_ref[...], q_pos_ref[...], q_seg_ref[...]
    q_range = (jnp.min(q_seg), jnp.max(q_seg), jnp.max(q_pos))

    def fold_key_block(j, carry):
        keys = pl.ds(j * block_k, block_k)
        k_pos, k_seg = k_pos_ref[keys], k_seg_ref[keys]

        def fold(carry):
            m, norm, acc = carry
            visible = _visible(q_pos, q_seg, k_pos, k_seg)
            scores = jnp.where(visible, _dot_nt(q, k_ref[keys, :], precision) * scale, _NEG)  # [bq, bk]
            m_new = jnp.maximum(m, jnp.max(scores, axis=1))
            p = jnp.where(visible, jnp.exp(scores - m_new[:, None]), 0.0)
            correction = jnp.exp(m - m_new)
            v = v_ref[keys, :]
            pv = _dot(p.astype(v.dtype), v, precision)
            return m_new, norm * correction + jnp.sum(p, axis=1), acc * correction[:, None] + pv

        may = _may_see(*q_range, jnp.min(k_seg), jnp.max(k_seg), jnp.min(k_pos))
        return lax.cond(may, fold, lambda c: c, carry)

    block_q, head_dim = q.shape
    init = (jnp.full((block_q,), _NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, head_dim), jnp.float32))
    m, norm, acc = lax.fori_loop(lo_ref[...], hi_ref[...], fold_key_block, init)
    seen = norm > 0
    safe_norm = jnp.where(seen, norm, 1.0)
    out_ref[...] = (acc / safe_norm[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_norm), _NEG)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, scale, block_k, precision):
    """dq of one query block of one head, over the same key blocks as the forward pass."""
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_pos, q_seg = q_pos_ref[...], q_seg_ref[...]
    q_range = (jnp.min(q_seg), jnp.max(q_seg), jnp.max(q_pos))

    def fold_key_block(j, dq):
        keys = pl.ds(j * block_k, block_k)
        k_pos, k_seg = k_pos_ref[keys], k_seg_ref[keys]

        def fold(dq):
            k, v = k_ref[keys, :], v_ref[keys, :]
            visible = _visible(q_pos, q_seg, k_pos, k_seg)
            p = jnp.exp(jnp.where(visible, _dot_nt(q, k, precision) * scale - lse[:, None], _NEG))  # [bq, bk]
            ds = p * (_dot_nt(do, v, precision) - delta[:, None])
            return dq + _dot(ds.astype(k.dtype), k, precision)

        may = _may_see(*q_range, jnp.min(k_seg), jnp.max(k_seg), jnp.min(k_pos))
        return lax.cond(may, fold, lambda c: c, dq)

    dq = lax.fori_loop(lo_ref[...], hi_ref[...], fold_key_block, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, scale, block_q, groups, precision):
    """dk/dv of one key block of one key/value head: query blocks of q/do [T, G, H] for each of the G heads."""
    k, v, k_pos, k_seg = k_ref[...], v_ref[...], k_pos_ref[...], k_seg_ref[...]
    k_range = (jnp.min(k_seg), jnp.max(k_seg), jnp.min(k_pos))

    def fold_query_block(i, carry):
        rows = pl.ds(i * block_q, block_q)
        q_pos, q_seg = q_pos_ref[rows], q_seg_ref[rows]

        def fold(carry):
            visible = _visible(q_pos, q_seg, k_pos, k_seg)  # [bq, bk], shared by the G heads

            def fold_head(g, carry):
                dk, dv = carry
                q, do = q_ref[rows, g, :], do_ref[rows, g, :]
                lse, delta = lse_ref[g, rows], delta_ref[g, rows]
                p = jnp.exp(jnp.where(visible, _dot_nt(q, k, precision) * scale - lse[:, None], _NEG))
                ds = p * (_dot_nt(do, v, precision) - delta[:, None])
                return dk + _dot_tn(ds.astype(q.dtype), q, precision), dv + _dot_tn(p.astype(do.dtype), do, precision)

            return lax.fori_loop(0, groups, fold_head, carry)

        may = _may_see(jnp.min(q_seg), jnp.max(q_seg), jnp.max(q_pos), *k_range)
        return lax.cond(may, fold, lambda c: c, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo_ref[...], hi_ref[...], fold_query_block, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------- pallas calls


@dataclasses.dataclass(frozen=True)
class _Plan:
    block_q: int
    block_k: int
    scale: float
    interpret: bool
    precision: str | None = None  # of every dot in the kernels ("highest": no TF32 for float32 configs)

    def compiler_params(self, head_dim: int):
        # Triton tutorial defaults for flash attention; only read by the GPU lowering.
        return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _forward(plan: _Plan, q, k, v, q_pos, q_seg, k_pos, k_seg):
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    groups = n // kv_heads
    bq, bk = plan.block_q, plan.block_k
    (lo, hi), _ = _loop_bounds(q_pos, q_seg, k_pos, k_seg, bq, bk)
    scalar = pl.BlockSpec((None, None), lambda i, b, n: (b, i))
    q_block = pl.BlockSpec((None, bq, None, h), lambda i, b, n: (b, i, n, 0))
    kv_all = pl.BlockSpec((None, s, None, h), lambda i, b, n: (b, 0, n // groups, 0))
    q_vec = pl.BlockSpec((None, bq), lambda i, b, n: (b, i))
    k_vec = pl.BlockSpec((None, s), lambda i, b, n: (b, 0))
    lse_block = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
    return pl.pallas_call(
        functools.partial(_forward_kernel, scale=plan.scale, block_k=bk, precision=plan.precision),
        grid=(t // bq, b, n),
        in_specs=[scalar, scalar, q_block, kv_all, kv_all, q_vec, q_vec, k_vec, k_vec],
        out_specs=[q_block, lse_block],
        out_shape=[jax.ShapeDtypeStruct(q.shape, v.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        compiler_params=plan.compiler_params(h),
        interpret=plan.interpret,
        name="flash_attention_forward",
    )(lo, hi, q, k, v, q_pos, q_seg, k_pos, k_seg)


def _backward(plan: _Plan, q, k, v, q_pos, q_seg, k_pos, k_seg, out, lse, d_out, d_lse):
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    groups = n // kv_heads
    bq, bk = plan.block_q, plan.block_k
    (q_lo, q_hi), (k_lo, k_hi) = _loop_bounds(q_pos, q_seg, k_pos, k_seg, bq, bk)
    # delta = rowsum(dO * O); the log-sum-exp's own cotangent enters the same place with the opposite sign.
    delta = jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32), d_out.astype(jnp.float32)) - d_lse
    d_out = d_out.astype(out.dtype)

    scalar = pl.BlockSpec((None, None), lambda i, b, n: (b, i))
    q_block = pl.BlockSpec((None, bq, None, h), lambda i, b, n: (b, i, n, 0))
    kv_all = pl.BlockSpec((None, s, None, h), lambda i, b, n: (b, 0, n // groups, 0))
    q_vec = pl.BlockSpec((None, bq), lambda i, b, n: (b, i))
    k_vec_all = pl.BlockSpec((None, s), lambda i, b, n: (b, 0))
    row_block = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=plan.scale, block_k=bk, precision=plan.precision),
        grid=(t // bq, b, n),
        in_specs=[scalar, scalar, q_block, kv_all, kv_all, q_vec, q_vec, k_vec_all, k_vec_all, q_block, row_block,
                  row_block],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plan.compiler_params(h),
        interpret=plan.interpret,
        name="flash_attention_dq",
    )(q_lo, q_hi, q, k, v, q_pos, q_seg, k_pos, k_seg, d_out, lse, delta)

    # Grid over (key block, batch, key/value head); the G query heads of that kv head are a block of the N axis.
    scalar = pl.BlockSpec((None, None), lambda j, b, m: (b, j))
    q_group = pl.BlockSpec((None, t, groups, h), lambda j, b, m: (b, 0, m, 0))
    kv_block = pl.BlockSpec((None, bk, None, h), lambda j, b, m: (b, j, m, 0))
    q_vec_all = pl.BlockSpec((None, t), lambda j, b, m: (b, 0))
    k_vec = pl.BlockSpec((None, bk), lambda j, b, m: (b, j))
    rows_group = pl.BlockSpec((None, groups, t), lambda j, b, m: (b, m, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=plan.scale, block_q=bq, groups=groups, precision=plan.precision),
        grid=(s // bk, b, kv_heads),
        in_specs=[scalar, scalar, q_group, kv_block, kv_block, q_vec_all, q_vec_all, k_vec, k_vec, q_group,
                  rows_group, rows_group],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plan.compiler_params(h),
        interpret=plan.interpret,
        name="flash_attention_dkv",
    )(k_lo, k_hi, q, k, v, q_pos, q_seg, k_pos, k_seg, d_out, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan: _Plan, q, k, v, q_pos, q_seg, k_pos, k_seg):
    """(out [B, T, N, H], lse [B, N, T]) on block-aligned, padded inputs."""
    return _forward(plan, q, k, v, q_pos, q_seg, k_pos, k_seg)


def _flash_fwd(plan: _Plan, q, k, v, q_pos, q_seg, k_pos, k_seg):
    out, lse = _forward(plan, q, k, v, q_pos, q_seg, k_pos, k_seg)
    return (out, lse), (q, k, v, q_pos, q_seg, k_pos, k_seg, out, lse)


def _flash_bwd(plan: _Plan, residuals, cotangents):
    q, k, v, q_pos, q_seg, k_pos, k_seg, out, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv = _backward(plan, q, k, v, q_pos, q_seg, k_pos, k_seg, out, lse, d_out, d_lse)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------- public API


def _shared_prefix_rows(q_segment_ids, k_segment_ids) -> jax.Array:
    """[B] bool: rows with a negative segment id (a shared prefix, see ``ops.attention``), which no kernel here does."""
    return jnp.any(q_segment_ids < 0, axis=1) | jnp.any(k_segment_ids < 0, axis=1)


def _nan_if_shared_prefix(out, q_segment_ids, k_segment_ids):
    return jnp.where(_shared_prefix_rows(q_segment_ids, k_segment_ids)[:, None, None, None], jnp.nan, out)


def _check_inputs(q, k, v, q_positions, q_segment_ids, k_positions, k_segment_ids) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ConfigError(f"attention wants q [B, T, N, H] and k/v [B, S, K, H]; got q {q.shape}, k {k.shape}, "
                          f"v {v.shape}")
    (b, t, n, h), (kb, s, kv_heads, kh) = q.shape, k.shape
    if kb != b or kh != h or n % kv_heads:
        raise ConfigError(f"q {q.shape} and k {k.shape} need one batch, one head dim and N a multiple of K")
    if not q.dtype == k.dtype == v.dtype:
        raise ConfigError(f"q, k and v need one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, vector, shape in (("q_positions", q_positions, (b, t)), ("q_segment_ids", q_segment_ids, (b, t)),
                                ("k_positions", k_positions, (b, s)), ("k_segment_ids", k_segment_ids, (b, s))):
        if vector.shape != shape:
            raise ConfigError(f"{name} has shape {vector.shape}; expected {shape} for q {q.shape}, k {k.shape}")
    shared = _shared_prefix_rows(q_segment_ids, k_segment_ids)
    if not isinstance(shared, jax.core.Tracer) and bool(shared.any()):
        raise ConfigError(f"rows {np.flatnonzero(np.asarray(shared)).tolist()} have negative segment ids (a shared "
                          "prefix, ops.attention's rule for packed reward rows), which the fused kernels do not "
                          "implement; use the dense attention")


def _block_size(name: str, block: int, length: int) -> int:
    """The block size for a length: ``block`` (a power of two >= 16), shrunk for short inputs."""
    if block < _MIN_BLOCK or block & (block - 1):
        raise ConfigError(f"{name}={block}: flash attention blocks must be powers of two >= {_MIN_BLOCK} (Triton)")
    return min(block, max(_MIN_BLOCK, pl.next_power_of_2(length)))


def _pad_to(x, axis: int, size: int, value=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, q_segment_ids: jax.Array,
                    k_positions: jax.Array, k_segment_ids: jax.Array, *, block_q: int = 128, block_k: int = 64,
                    interpret: bool = False, return_lse: bool = False, precision: str | None = None):
    """Pallas flash attention with document masks: q [B, T, N, H], k/v [B, S, K, H], positions / segment ids
    [B, T] and [B, S] -> out [B, T, N, H] in v's dtype (and lse [B, T, N] float32 with ``return_lse``).
    Block sizes are powers of two >= 16; lengths are padded up to them."""
    _check_inputs(q, k, v, q_positions, q_segment_ids, k_positions, k_segment_ids)
    t, h, s = q.shape[1], q.shape[3], k.shape[1]
    bq, bk = _block_size("block_q", block_q, t), _block_size("block_k", block_k, s)
    t_pad, s_pad = -(-t // bq) * bq, -(-s // bk) * bk
    h_pad = max(_MIN_BLOCK, pl.next_power_of_2(h))  # zero columns change no score and no output column
    q = _pad_to(_pad_to(q, 1, t_pad), 3, h_pad)
    k, v = (_pad_to(_pad_to(x, 1, s_pad), 3, h_pad) for x in (k, v))
    q_pos = _pad_to(q_positions.astype(jnp.int32), 1, t_pad)
    q_seg = _pad_to(q_segment_ids.astype(jnp.int32), 1, t_pad, _PAD_Q_SEGMENT)
    k_pos = _pad_to(k_positions.astype(jnp.int32), 1, s_pad, _PAD_K_POSITION)
    k_seg = _pad_to(k_segment_ids.astype(jnp.int32), 1, s_pad, _PAD_K_SEGMENT)
    plan = _Plan(block_q=bq, block_k=bk, scale=1 / math.sqrt(h), interpret=interpret, precision=precision)
    out, lse = _flash(plan, q, k, v, q_pos, q_seg, k_pos, k_seg)
    out = _nan_if_shared_prefix(out[:, :t, :, :h], q_segment_ids, k_segment_ids)
    if return_lse:
        return out, lse[:, :, :t].transpose(0, 2, 1)
    return out


def is_natural_order(positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B] bool: whether, in each row, every document (segment id > 0) has positions that go up by one per index,
    so that "key position <= query position" within a document equals "key index <= query index"."""
    order = jnp.argsort(segment_ids, axis=1, stable=True)  # each document's tokens together, in index order
    seg = jnp.take_along_axis(segment_ids, order, axis=1)
    pos = jnp.take_along_axis(positions, order, axis=1)
    same_document = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    in_step = (pos[:, 1:] - pos[:, :-1]) == (order[:, 1:] - order[:, :-1])
    return jnp.all(~same_document | in_step, axis=1)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, q_segment_ids: jax.Array,
                     k_positions: jax.Array, k_segment_ids: jax.Array, *, block_q: int = 512, block_k: int = 512,
                     interpret: bool = False) -> jax.Array:
    """TPU splash attention on rows in natural order (see the module docstring): same inputs and output as
    ``flash_attention``, T == S with the same tokens as queries and keys; blocks are multiples of 128."""
    _check_inputs(q, k, v, q_positions, q_segment_ids, k_positions, k_segment_ids)
    (_, t, n, h), s = q.shape, k.shape[1]
    if t != s:
        raise ConfigError(f"splash attention (causal by index) needs queries and keys of one row: T={t}, S={s}")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block % 128:
            raise ConfigError(f"splash attention {name}={block} must be a multiple of 128")
    ok = is_natural_order(q_positions, q_segment_ids)
    ok &= jnp.all((q_positions == k_positions) & (q_segment_ids == k_segment_ids), axis=1)
    if not isinstance(ok, jax.core.Tracer) and not bool(ok.all()):
        raise ConfigError(f"splash attention is causal by index: rows {np.flatnonzero(~np.asarray(ok)).tolist()} "
                          "are not packed in natural order (or queries and keys differ); use impl='pallas' or dense")
    length = -(-t // 128) * 128
    bq, bk = min(block_q, length), min(block_k, length)
    length = -(-length // max(bq, bk)) * max(bq, bk)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * n)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                               block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    # Splash does not scale: scale q as the dense path does. Heads go in front: [B, N, T, H], [B, K, S, H].
    q = _pad_to(q * jnp.asarray(1 / math.sqrt(h), q.dtype), 1, length).transpose(0, 2, 1, 3)
    k, v = (_pad_to(x, 1, length).transpose(0, 2, 1, 3) for x in (k, v))
    segments = _pad_to(q_segment_ids.astype(jnp.int32), 1, length, _PAD_Q_SEGMENT)  # pads: one segment of their own
    out = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=splash.SegmentIds(seg, seg)))(q, k, v, segments)
    out = out.transpose(0, 2, 1, 3)[:, :t].astype(v.dtype)
    ok &= ~_shared_prefix_rows(q_segment_ids, k_segment_ids)
    return jnp.where(ok[:, None, None, None], out, jnp.nan).astype(v.dtype)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, q_segment_ids: jax.Array,
                    k_positions: jax.Array, k_segment_ids: jax.Array, *, natural_order: bool = False,
                    implementation: str = "cudnn") -> jax.Array:
    """``jax.nn.dot_product_attention`` with the document mask as a dense [B, 1, T, S] mask (see the module
    docstring); ``natural_order`` adds ``is_causal`` so cuDNN skips the upper triangle. bf16/fp16 for cuDNN;
    ``implementation="xla"`` runs the same call anywhere. A query that sees no key gets the mean of all values."""
    _check_inputs(q, k, v, q_positions, q_segment_ids, k_positions, k_segment_ids)
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ConfigError(f"cuDNN attention runs in bfloat16 or float16, not {q.dtype}")
    visible = jax.vmap(_visible)(q_positions, q_segment_ids, k_positions, k_segment_ids)  # [B, T, S]
    causal = natural_order and q.shape[1] == k.shape[1]
    out = jax.nn.dot_product_attention(q, k, v, mask=visible[:, None], is_causal=causal, implementation=implementation)
    return _nan_if_shared_prefix(out, q_segment_ids, k_segment_ids).astype(v.dtype)


def select_impl(impl: str = "per_backend", *, natural_order: bool = False, backend: str | None = None) -> str:
    """The attention implementation to run: ``impl`` itself, or for "per_backend" by ``backend``: "pallas" on GPU,
    "splash" on TPU when the caller's rows are in natural order (else "dense"), "dense" on CPU and elsewhere.
    ``backend`` is the platform the call is compiled for; its default, ``jax.default_backend()``, is this host's
    ("cpu" on a host that only compiles for an accelerator)."""
    if impl != "per_backend":
        if impl not in (*IMPLS, "dense"):
            raise ConfigError(f"attention impl must be 'per_backend', 'dense' or one of {IMPLS}, got {impl!r}")
        return impl
    backend = backend or jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        return "pallas"
    if backend == "tpu" and natural_order:
        return "splash"
    return "dense"


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, q_segment_ids: jax.Array,
                    k_positions: jax.Array, k_segment_ids: jax.Array, *, impl: str = "per_backend",
                    natural_order: bool = False, interpret: bool = False) -> jax.Array:
    """Fused attention by implementation name (``select_impl``); "dense" is the caller's own path, not here.
    ``natural_order`` is the caller's promise that rows are packed in natural order (needed by "splash", which
    checks it, and used by "cudnn" for causal block skipping)."""
    name = select_impl(impl, natural_order=natural_order)
    args = (q, k, v, q_positions, q_segment_ids, k_positions, k_segment_ids)
    if name == "pallas":
        return flash_attention(*args, interpret=interpret)
    if name == "splash":
        return splash_attention(*args, interpret=interpret)
    if name == "cudnn":
        return cudnn_attention(*args, natural_order=natural_order)
    raise ConfigError(f"no fused attention for impl={impl!r} on backend {jax.default_backend()!r}: "
                      "use the dense attention there")
