"""Attention with masks built from positions and segment ids, and the choice of implementation.

    out = attention(q, k, v, q_positions, q_segment_ids, k_positions, k_segment_ids, impl="dense",
                    precision="highest")

Shapes: q [B, T, N, H]; k, v [B, S, K, H] (grouped-query: query head n reads key/value head n // (N // K));
positions and segment ids [B, T] / [B, S]. Key s is visible to query t when both carry the same segment id and s's
position is not after t's: packed documents never see each other, segment id 0 (padding) sees nothing real, and
causality by position rather than by index lets a row be stored in any order (context parallelism's zig-zag
layout) and lets a KV cache hold its slots' positions. The mask is built per call from these [B, T] vectors, never
carried through the network as a [B, T, S] array.

Shared prefix: a key whose segment id is negative is also visible to every real query (segment id > 0) of its row,
causally by position. That is the reward model's packed row (the paper's): one prompt (segment -1) and its replies
(segments 1, 2, 3, positions continuing from the prompt's end), each reply seeing the prompt and itself only, as if
it were its own row. Data rows never carry negative ids, so they are unchanged by this rule.

``precision`` is the ``precision=`` of the kernel's matmuls (``ModelConfig.resolved_matmul_precision``: "highest",
"high" or None for the backend's default); every implementation takes it, so a float32 model gets float32
attention on GPUs and TPUs too.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from llama_jax.errors import ConfigError
from llama_jax.ops import flash_attention

IMPLS = ("dense", "flash")


def attention_mask(q_positions, q_segment_ids, k_positions, k_segment_ids) -> jax.Array:
    """[B, T, S] bool from [B, T] query and [B, S] key positions / segment ids."""
    same_document = q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
    shared_prefix = (k_segment_ids[:, None, :] < 0) & (q_segment_ids[:, :, None] > 0)
    return (same_document | shared_prefix) & (k_positions[:, None, :] <= q_positions[:, :, None])


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          precision: str | None = None) -> jax.Array:
    """Dense grouped-query attention: q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] -> [B, T, N, H]."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    # Scaling q ([B, T, N, H]) is cheaper than scaling the S-times-larger scores. Scores keep T next to G: the
    # layout [B, K, T, G, S] made XLA:CPU's train step ~3% faster than [B, K, G, T, S] (fewer transposes).
    q = (q * jnp.asarray(1 / math.sqrt(h), q.dtype)).reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKTGS", q, k, preferred_element_type=jnp.float32, precision=precision)
    scores = jnp.where(mask[:, None, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKTGS,BSKH->BTKGH", probs, v, precision=precision)
    return out.reshape(b, t, n, h)


def attention(q, k, v, q_positions, q_segment_ids, k_positions, k_segment_ids, *, impl: str = "dense",
              precision: str | None = None) -> jax.Array:
    """Self- or cached attention with the document mask above, its matmuls at ``precision``, by ``impl``:
    "dense" (XLA: materialises float32 [B, K, T, G, S] scores) or "flash" (the fused kernel of the backend,
    ``ops.flash_attention``: Pallas on GPU, splash on TPU for rows in natural order, Pallas's interpreter on CPU).
    Under a mesh the kernel runs per shard of batch and heads (``shard_map``): XLA cannot split a custom kernel."""
    if impl == "dense":
        mask = attention_mask(q_positions, q_segment_ids, k_positions, k_segment_ids)
        return dot_product_attention(q, k, v, mask, precision)
    if impl != "flash":
        raise ConfigError(f"attention implementation must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()

    def fused(*args):
        if backend == "tpu":
            return flash_attention.splash_attention(*args)
        return flash_attention.flash_attention(*args, precision=precision, interpret=backend != "gpu")

    mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return fused(q, k, v, q_positions, q_segment_ids, k_positions, k_segment_ids)
    q_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"), rules)
    kv_spec = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "head_dim"), rules)
    vector = PartitionSpec(q_spec[0], q_spec[1])
    return jax.shard_map(fused, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, vector, vector, vector, vector),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_positions, q_segment_ids, k_positions,
                                                           k_segment_ids)
