"""Context-parallel attention: queries, keys and values split along length over the mesh's sequence axis.

    with sharding.activate(make_mesh("fsdp=2,sequence=4")):    # the model calls this when cfg.context_parallel
        logits = jax.jit(model.apply)(params, tokens, positions, segment_ids)   # is "ring" / "all_gather" / "auto"

Ring attention (``shard_map`` + ``ppermute``): every device keeps its query block and passes its key/value
block, with those keys' positions and segment ids, to the next device, ``shards`` times; the mask of each
(query block, key block) pair is built there from those vectors (``ops.attention.attention_mask``). An online
softmax (running max, normaliser and weighted sum) folds each visiting block in, in float32, so the
result equals dense softmax attention. Each query and key
block is cut in two halves, and a (query half, key half) pair whose mask is all False is skipped.

Load balance: with a causal mask and the natural layout, device i needs i + 1 of the shards key blocks, so
the last device does all the work. The zig-zag layout (`zigzag_order`; Llama 3 paper, section 3.3.2) gives
device i the chunks i and 2 * shards - 1 - i of the sequence, and every device then needs the same number
of half-blocks (2 * shards + 1 of 4 * shards). The caller permutes the batch (tokens, targets, positions,
segment ids); nothing else changes, since the mask is causal by position, not by storage order.

``impl="all_gather"`` instead gathers all keys/values once per layer (what the Llama 3 paper does: keys and
values are small under GQA); it is shorter and skips nothing. With ``kernel="flash"`` (the model's
``attention="flash"``) it runs the fused kernel of ``ops.flash_attention`` on the local queries against the gathered
keys (Pallas on GPU, its interpreter on CPU), so no [local T, S] score array is kept for the backward pass, as in
the paper's long-context training. The ring's blocks are always dense: under autodiff every block's probabilities
are kept for the backward pass, (T / shards) x T per head and layer.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from llama_jax.errors import ConfigError
from llama_jax.ops import flash_attention
from llama_jax.ops.attention import attention_mask

_NEG = float(jnp.finfo(jnp.float32).min)  # finite, so the running max never turns into inf - inf = nan


def _mesh_axes():
    """(mesh, batch axes, sequence axis, q spec, kv spec) of the active mesh under the installed logical rules."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None
    q_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"), rules)
    kv_spec = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "head_dim"), rules)
    return mesh, q_spec[0], q_spec[1], q_spec, kv_spec


def num_shards() -> int:
    """How many ways the active mesh splits sequence length (1 outside ``sharding.activate``)."""
    axes = _mesh_axes()
    if axes is None or axes[2] is None:
        return 1
    mesh, _, length, _, _ = axes
    return math.prod(mesh.shape[a] for a in ((length,) if isinstance(length, str) else length))


def zigzag_order(seq_len: int, shards: int) -> np.ndarray:
    """order[slot] = original index of the token stored at ``slot`` in the load-balanced layout: the sequence
    cut into 2 * shards chunks, device i holding chunks i and 2 * shards - 1 - i."""
    if seq_len % (2 * shards):
        raise ConfigError(f"zig-zag layout needs length {seq_len} divisible by 2 x {shards} shards")
    chunks = np.arange(seq_len).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)])


def _fold(state, q, k, v, mask, precision):
    """Online-softmax update of (max, normaliser, weighted sum) with one key block.
    q [B,t,K,G,H], k/v [B,s,K,H], mask [B,t,s]; matmuls at ``precision``."""
    m, norm, acc = state
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32, precision=precision)
    scores = scores / math.sqrt(q.shape[-1])
    visible = mask[:, None, None]
    scores = jnp.where(visible, scores, _NEG)  # before exp: an inf in the unused branch would nan the gradient
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    p = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    norm = norm * correction + jnp.sum(p, axis=-1)
    pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                    precision=precision)
    return m_new, norm, acc * correction[..., None] + pv


def _fold_unless_masked(state, q, k, v, mask, precision):
    return jax.lax.cond(jnp.any(mask), lambda s: _fold(s, q, k, v, mask, precision), lambda s: s, state)


def _empty_state(q):
    b, t, kv, g, h = q.shape
    return (jnp.full((b, kv, g, t), _NEG, jnp.float32), jnp.zeros((b, kv, g, t), jnp.float32),
            jnp.zeros((b, kv, g, t, h), jnp.float32))


def _finish(state, dtype):
    _, norm, acc = state
    out = acc / jnp.where(norm == 0, 1.0, norm)[..., None]  # 0 only for a query that sees no key at all
    b, kv, g, t, h = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h).astype(dtype)


def _ring(q, k, v, positions, segments, *, axis, shards, precision, kernel):
    """Per-device body: q [B,t,N,H] local queries, k/v [B,t,K,H] this device's keys, positions/segments [B,t]."""
    del kernel  # dense blocks (see the module docstring)
    b, t, n, h = q.shape
    q = q.reshape(b, t, k.shape[2], n // k.shape[2], h)
    half = t // 2
    halves = (slice(0, half), slice(half, t))
    states = [_empty_state(q[:, rows]) for rows in halves]
    visiting = (k, v, positions, segments)  # the key block passed around the ring, with its mask vectors
    for step in range(shards):
        k_block, v_block, k_positions, k_segments = visiting
        for i, rows in enumerate(halves):
            for cols in halves:
                mask = attention_mask(positions[:, rows], segments[:, rows], k_positions[:, cols], k_segments[:, cols])
                states[i] = _fold_unless_masked(states[i], q[:, rows], k_block[:, cols], v_block[:, cols], mask,
                                                precision)
        if step < shards - 1:
            visiting = jax.lax.ppermute(visiting, axis, [(d, (d + 1) % shards) for d in range(shards)])
    return jnp.concatenate([_finish(s, v.dtype) for s in states], axis=1)


def _all_gather(q, k, v, positions, segments, *, axis, shards, precision, kernel):
    del shards
    b, t, n, h = q.shape
    k, v, k_positions, k_segments = (jax.lax.all_gather(x, axis, axis=1, tiled=True)
                                     for x in (k, v, positions, segments))
    if kernel == "flash":
        return flash_attention.flash_attention(q, k, v, positions, segments, k_positions, k_segments,
                                               precision=precision, interpret=jax.default_backend() != "gpu")
    q = q.reshape(b, t, k.shape[2], n // k.shape[2], h)
    mask = attention_mask(positions, segments, k_positions, k_segments)
    return _finish(_fold(_empty_state(q), q, k, v, mask, precision), v.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
              impl: str = "ring", precision: str | None = None, kernel: str = "dense") -> jax.Array:
    """Self-attention with T split over the active mesh's sequence axis: q [B,T,N,H], k/v [B,T,K,H],
    positions / segment_ids [B,T] of those tokens -> [B,T,N,H], equal to ``ops.attention.attention``; matmuls at
    ``precision`` (see there); ``kernel`` "dense" or "flash" (all_gather only: see the module docstring). Call
    inside ``sharding.activate(mesh)``."""
    axes = _mesh_axes()
    if axes is None or axes[2] is None:
        raise ConfigError("context-parallel attention needs an active mesh whose rules shard 'length'")
    mesh, batch, length, q_spec, kv_spec = axes
    shards = num_shards()
    if q.shape[1] != k.shape[1] or q.shape[1] % (2 * shards):
        raise ConfigError(f"context parallelism needs queries and keys of one length divisible by 2 x {shards} "
                          f"shards; got q {q.shape}, k {k.shape}")
    body = {"ring": _ring, "all_gather": _all_gather}.get(impl)
    if body is None:
        raise ConfigError(f"context-parallel impl must be 'ring' or 'all_gather', got {impl!r}")
    if kernel not in ("dense", "flash"):
        raise ConfigError(f"context-parallel attention kernel must be 'dense' or 'flash', got {kernel!r}")
    if kernel == "flash" and impl == "all_gather" and jax.default_backend() == "tpu":
        raise ConfigError("the fused kernel under context parallelism is Pallas's GPU kernel (splash attention needs "
                          "queries and keys of one length); on TPU use attention='dense' with context parallelism")
    vector_spec = PartitionSpec(batch, length)
    run = jax.shard_map(
        lambda *args: body(*args, axis=length, shards=shards, precision=precision, kernel=kernel), mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, vector_spec, vector_spec), out_specs=q_spec, check_vma=False,
    )
    return run(q, k, v, positions, segment_ids)
