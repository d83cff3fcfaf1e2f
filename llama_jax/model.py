"""The Llama 3 / 3.1 / 3.2 network in Flax linen, readable top to bottom.

    model = Llama(cfg)
    params = init_params(cfg, jax.random.key(0))
    logits = model.apply({"params": params}, tokens)                      # [B, T, V] float32
    logits = model.apply({"params": params}, tokens, positions, segment_ids)  # packed documents

Dimension letters: B batch, T query length, S key length, D model dim, N query heads, K key/value
heads, G = N // K query heads per key/value head, H head dim, F feed-forward dim, V vocab, L layers.

Parameter tree (``cfg.scan_layers=True``; per-layer leaves have a leading L axis), with logical axes:

    embedding                          [V, D]        (vocab, embed)
    layers/attention_norm/scale        [L, D]        (layers, embed)
    layers/attention/query             [L, D, N, H]  (layers, embed, heads, head_dim)
    layers/attention/key               [L, D, K, H]  (layers, embed, kv_heads, head_dim)
    layers/attention/value             [L, D, K, H]  (layers, embed, kv_heads, head_dim)
    layers/attention/out               [L, N, H, D]  (layers, heads, head_dim, embed)
    layers/ffn_norm/scale              [L, D]        (layers, embed)
    layers/feed_forward/gate           [L, D, F]     (layers, embed, mlp)      SwiGLU w1
    layers/feed_forward/up             [L, D, F]     (layers, embed, mlp)      SwiGLU w3
    layers/feed_forward/down           [L, F, D]     (layers, mlp, embed)      SwiGLU w2
    final_norm/scale                   [D]           (embed,)
    lm_head                            [D, V]        (embed, vocab)   absent when cfg.tie_embeddings

With ``scan_layers=False`` the blocks are ``layers_0 ... layers_{L-1}`` without the L axis;
``stack_layers`` / ``unstack_layers`` convert. Checkpoints always hold the stacked tree.

RoPE uses the rotate-half convention of Hugging Face (pairs are (i, i + H/2) within a head), so HF
weights load unchanged; Meta's checkpoints pair (2i, 2i+1) and `convert` permutes their q/k rows.

Attention mask: key s is visible to query t when both carry the same segment id and s's position is
not after t's (``ops.attention.attention_mask``; a negative segment id is a prefix shared by the row's
real segments, the reward model's packed row); ``segment_ids`` 0 marks padding. Causality by position rather than
by index lets a packed row be stored in any order (context parallelism's zig-zag layout), and the mask
is built per block from [B, T] vectors, never carried as a [B, T, S] array. The KV cache keeps each
slot's position and segment id (0: empty).

Every matmul, attention's included, runs at ``cfg.resolved_matmul_precision``: float32 compute means float32
products on GPUs and TPUs too, bfloat16 compute the backend's fast default (``ModelConfig.matmul_precision``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import sharding
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError, DataError
from llama_jax.ops import attention as attention_ops
from llama_jax.ops import context_parallel, low_rank, quantized

Params = dict[str, Any]

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init) -> jax.Array:
    if module.has_variable("params", name) and quantized.is_quantized(stored := module.get_variable("params", name)):
        # flax would compare the shapes of a quantized kernel's own arrays (NF4's packed codes) with the kernel's.
        if stored.shape != shape:
            raise ConfigError(f"{module.name}/{name}: quantized kernel of shape {stored.shape}, expected {shape}")
        return stored
    dtype = jnp.dtype(module.cfg.param_dtype)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _fan_in_init(fan_in_axes: tuple[int, ...]):
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=fan_in_axes, out_axis=-1)


def _adapted(module: nn.Module, name: str, y: jax.Array, x: jax.Array, kernel_shape: tuple[int, ...],
             kernel_axes: tuple[str, ...], contracted: int) -> jax.Array:
    """``y`` (x projected by kernel ``name``) plus its adapter's low-rank update (``ops.low_rank``): A [in dims, r]
    and B [r, out dims] beside the kernel, when ``cfg.lora`` adapts it and the tree holds them (a reference model's
    tree without adapters runs the network alone). A "dropout" rng (training steps) enables adapter dropout."""
    lora = module.cfg.lora
    if lora is None or name not in lora.targets or not (module.is_initializing()
                                                         or module.has_variable("params", f"{name}_lora_a")):
        return y
    ins, outs = kernel_shape[:contracted], kernel_shape[contracted:]
    a = _param(module, f"{name}_lora_a", (*ins, lora.rank), (*kernel_axes[:contracted], "lora_rank"),
               low_rank.a_init(int(np.prod(ins))))
    b = _param(module, f"{name}_lora_b", (lora.rank, *outs), ("lora_rank", *kernel_axes[contracted:]),
               nn.initializers.zeros)
    key = module.make_rng("dropout") if lora.dropout > 0 and module.has_rng("dropout") else None
    update = low_rank.update(x, a, b, lora, contracted, jnp.dtype(module.cfg.dtype),
                             module.cfg.resolved_matmul_precision, key)
    return y + update.astype(y.dtype)


def dropout_rngs(rng: jax.Array | None) -> dict:
    """``Llama.apply``'s rngs for a training step's key (adapter dropout, ``cfg.lora.dropout``); none for None."""
    return {} if rng is None else {"dropout": rng}


# --- Rotary embeddings ----------------------------------------------------------------------------


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] (float32), with Llama 3.1's long-context scaling when configured."""
    head_dim = cfg.resolved_head_dim
    inv_freq = (1.0 / cfg.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    wavelength = 2 * np.pi / inv_freq
    # Short wavelengths (< original / high_freq_factor) are kept, long ones (> original / low_freq_factor)
    # slowed by `factor`, and the band in between interpolates smoothly between the two.
    smooth = np.clip((s.original_max_position / wavelength - s.low_freq_factor)
                     / (s.high_freq_factor - s.low_freq_factor), 0.0, 1.0)
    scaled = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    return scaled.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates x [B, T, heads, H] by angle positions * inv_freq, rotate-half pairing."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# --- Layers -----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", (x.shape[-1],), ("embed",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return normed.astype(self.cfg.dtype) * scale.astype(self.cfg.dtype)


def attention_impl(cfg: ModelConfig, cached: bool) -> str:
    """The attention kernel: ``cfg.attention``; a KV-cache step is always dense (one query row: nothing to fuse)."""
    return "dense" if cached else cfg.attention


def context_parallel_mode(cfg: ModelConfig) -> str:
    """"off", "ring" or "all_gather": ``cfg.context_parallel``, where "auto" means ring attention exactly when the
    active mesh splits length (``sharding.activate`` with sequence > 1), as before the option existed."""
    if cfg.context_parallel == "auto":
        return "ring" if context_parallel.num_shards() > 1 else "off"
    return cfg.context_parallel


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, keys, kv_cache=None):
        """keys: (positions, segment_ids) [B, S] of every key (this call's tokens, or the updated cache)."""
        cfg = self.cfg
        d, n, k, h = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        dtype, precision = jnp.dtype(cfg.dtype), cfg.resolved_matmul_precision
        in_init, out_init = _fan_in_init((0,)), _fan_in_init((0, 1))
        wq = _param(self, "query", (d, n, h), ("embed", "heads", "head_dim"), in_init)
        wk = _param(self, "key", (d, k, h), ("embed", "kv_heads", "head_dim"), in_init)
        wv = _param(self, "value", (d, k, h), ("embed", "kv_heads", "head_dim"), in_init)
        wo = _param(self, "out", (n, h, d), ("heads", "head_dim", "embed"), out_init)

        inv_freq = rope_frequencies(cfg)
        def project(name, w, axes):  # [B, T, heads, H]
            return _adapted(self, name, quantized.matmul(x, w, dtype, precision), x, w.shape, axes, contracted=1)

        q = project("query", wq, ("embed", "heads", "head_dim"))
        k = project("key", wk, ("embed", "kv_heads", "head_dim"))
        v = project("value", wv, ("embed", "kv_heads", "head_dim"))
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))

        if kv_cache is not None:  # write this step's keys/values at the cache's write index
            cached_k, cached_v, index = kv_cache
            k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), (0, index, 0, 0))
            kv_cache = (k, v)
        k, v = k.astype(dtype), v.astype(dtype)
        if kv_cache is None and context_parallel_mode(cfg) != "off":  # length split over the mesh's sequence axis
            out = context_parallel.attention(q, k, v, positions, segment_ids, impl=context_parallel_mode(cfg),
                                             kernel=attention_impl(cfg, cached=False),
                                             precision=precision)
        else:
            out = attention_ops.attention(q, k, v, positions, segment_ids, *keys, precision=precision,
                                          impl=attention_impl(cfg, cached=kv_cache is not None))
        y = quantized.matmul(out, wo, dtype, precision, contracted=2)  # [B, T, D]
        return _adapted(self, "out", y, out, wo.shape, ("heads", "head_dim", "embed"), contracted=2), kv_cache


class FeedForward(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        in_init = _fan_in_init((0,))
        gate = _param(self, "gate", (cfg.dim, cfg.ffn_dim), ("embed", "mlp"), in_init)
        up = _param(self, "up", (cfg.dim, cfg.ffn_dim), ("embed", "mlp"), in_init)
        down = _param(self, "down", (cfg.ffn_dim, cfg.dim), ("mlp", "embed"), in_init)
        dtype, precision = jnp.dtype(cfg.dtype), cfg.resolved_matmul_precision
        if quantized.is_quantized(gate):  # an inference tree from llama_jax.quantize, or a QLoRA base
            gated, ungated = (quantized.matmul(x, w, dtype, precision) for w in (gate, up))
        else:
            # One matmul against gate and up stacked on a new axis (the mlp axis keeps its sharding): XLA:CPU ran
            # the train step ~9% faster than with two matmuls, whose backward transposes cost more than the stack.
            kernel = jnp.stack([gate, up], axis=1).astype(dtype)  # [D, 2, F]
            both = jnp.einsum("BTD,DCF->BTCF", x, kernel, precision=precision)
            gated, ungated = both[:, :, 0], both[:, :, 1]
        d, f = cfg.dim, cfg.ffn_dim
        gated = _adapted(self, "gate", gated, x, (d, f), ("embed", "mlp"), contracted=1)
        ungated = _adapted(self, "up", ungated, x, (d, f), ("embed", "mlp"), contracted=1)
        hidden = jax.nn.silu(gated) * ungated  # [B, T, F]
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return _adapted(self, "down", quantized.matmul(hidden, down, dtype, precision), hidden, (f, d),
                        ("mlp", "embed"), contracted=1)


class Block(nn.Module):
    """Pre-norm decoder block: x + attention(norm(x)), then + SwiGLU(norm(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, kv_cache, positions, segment_ids, keys, cache_index):
        cfg = self.cfg
        layer_cache = None if kv_cache is None else (*kv_cache, cache_index)
        h, kv_cache = Attention(cfg, name="attention")(RMSNorm(cfg, name="attention_norm")(x), positions,
                                                       segment_ids, keys, layer_cache)
        x = x + h
        x = x + FeedForward(cfg, name="feed_forward")(RMSNorm(cfg, name="ffn_norm")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), kv_cache


def _block_class(cfg: ModelConfig):
    if cfg.remat == "none":
        return Block
    # prevent_cse is only needed outside scan (scan already keeps XLA from merging recomputation away).
    return nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def _block_stack(cfg: ModelConfig, length: int):
    """The block scanned over ``length`` stacked layers: the module class of the ``layers`` subtree."""
    # Each layer draws its own adapter dropout masks (a broadcast key would repeat one layer's masks in every layer).
    return nn.scan(_block_class(cfg), variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   length=length,
                   in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                   metadata_params={nn.PARTITION_NAME: "layers"})


def apply_layers(cfg: ModelConfig, layers: Params, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array) -> jax.Array:
    """Runs a slice ``[l, ...]`` of ``params["layers"]`` (l consecutive blocks) on hidden states x [B, T, D], as the
    full model's scan would: what one pipeline rank computes."""
    stack = _block_stack(cfg, jax.tree.leaves(layers)[0].shape[0])(cfg)
    return stack.apply({"params": layers}, x, None, positions, segment_ids, (positions, segment_ids), 0)[0]


class Llama(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, output: str = "logits",
                 run_layers=None):
        """tokens [B, T] int -> logits [B, T, V] float32 (or final hidden states [B, T, D] with output="hidden").

        positions [B, T]: RoPE positions (default 0..T-1, or continuing the cache). segment_ids [B, T]: document
        ids inside packed rows (0 = padding). cache: from ``init_cache``; then returns (output, new_cache).
        run_layers: runs the block stack instead of the scan, ``run_layers(params["layers"], x, positions,
        segment_ids) -> x`` (a pipeline schedule built on ``apply_layers``); training only, with existing params.
        """
        cfg = self.cfg
        if output not in ("logits", "hidden"):
            raise ConfigError(f"output must be 'logits' or 'hidden', got {output!r}")
        if run_layers is not None and (cache is not None or not cfg.scan_layers or self.is_initializing()):
            raise ConfigError("run_layers needs stacked layers (scan_layers=True), existing params and no KV cache")
        if not isinstance(tokens, jax.core.Tracer):
            validate_tokens(tokens, cfg.vocab_size)
        b, t = tokens.shape
        start = 0 if cache is None else cache["index"]
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
            if arr.shape != (b, t):
                raise DataError(f"{name} has shape {arr.shape}; expected tokens' shape {(b, t)}")
        keys = (positions, segment_ids)
        if cache is not None:  # this call's tokens join the cached ones at the write index
            keys = tuple(jax.lax.dynamic_update_slice(cache[name], new, (0, start))
                         for name, new in (("positions", positions), ("segment_ids", segment_ids)))

        embedding = _param(self, "embedding", (cfg.vocab_size, cfg.dim), ("vocab", "embed"),
                           nn.initializers.normal(0.02))
        dtype = jnp.dtype(cfg.dtype)
        # The looked-up rows keep the table's embed split (rows over `data` only, "lookup_batch"); the next
        # constraint moves them to the activation layout with one all-to-all. Left to itself, GSPMD replicates
        # the whole global batch's embeddings on every device when data and fsdp are both > 1.
        x = jnp.take(embedding, tokens, axis=0).astype(dtype)  # [B, T, D]
        x = nn.with_logical_constraint(x, ("lookup_batch", "length", "embed"))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        block = _block_class(cfg)
        kv = None if cache is None else (cache["k"], cache["v"])
        if run_layers is not None:
            x = run_layers(self.variables["params"]["layers"], x, positions, segment_ids)
        elif cfg.scan_layers:
            x, kv = _block_stack(cfg, cfg.num_layers)(cfg, name="layers")(x, kv, positions, segment_ids, keys, start)
        else:
            new_kv = []
            for i in range(cfg.num_layers):
                layer_kv = None if kv is None else (kv[0][i], kv[1][i])
                x, layer_kv = block(cfg, name=f"layers_{i}")(x, layer_kv, positions, segment_ids, keys, start)
                new_kv.append(layer_kv)
            kv = None if cache is None else tuple(jnp.stack(parts) for parts in zip(*new_kv))

        x = RMSNorm(cfg, name="final_norm")(x)
        result = x
        if output == "logits":
            head = embedding.T if cfg.tie_embeddings else _param(self, "lm_head", (cfg.dim, cfg.vocab_size),
                                                                 ("embed", "vocab"), _fan_in_init((0,)))
            result = jnp.einsum("BTD,DV->BTV", x, head.astype(dtype), preferred_element_type=jnp.float32,
                                precision=cfg.resolved_matmul_precision)
            result = nn.with_logical_constraint(result, ("batch", "length", "vocab"))
        if cache is None:
            return result
        return result, {"k": kv[0], "v": kv[1], "positions": keys[0], "segment_ids": keys[1], "index": start + t}


# --- Helpers around the module ---------------------------------------------------------------------


def validate_tokens(tokens, vocab_size: int) -> None:
    """Raises DataError for token arrays that are not [B, T] integers in [0, vocab_size). Eager only."""
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise DataError(f"tokens must be [batch, seq]; got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"tokens must be integers; got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)]
        raise DataError(f"token id(s) {sorted(set(bad.tolist()))[:8]} outside the vocabulary [0, {vocab_size})")


def boxed_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Fresh parameters, each leaf boxed with its logical axes (flax's Partitioned). Initialisation traces one
    token through the dense attention, whatever kernel or context parallelism ``cfg`` runs with."""
    init_cfg = cfg.replace(attention="dense", context_parallel="off")
    return Llama(init_cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(cfg: ModelConfig, rng: jax.Array, mesh: jax.sharding.Mesh | None = None) -> Params:
    """Fresh parameters as a plain nested dict; with ``mesh``, each leaf is created directly in its shards."""
    # jit: one compiled program instead of hundreds of eagerly dispatched ops (seconds even for `tiny`).
    init = jax.jit(lambda key: nn.meta.unbox(boxed_params(cfg, key)),
                   out_shardings=None if mesh is None else param_shardings(cfg, mesh))
    return init(rng)


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh):
    """NamedShardings of the parameter tree by the logical-axis rules (checked: every split dimension divides)."""
    shardings = sharding.logical_to_sharding(logical_axes(cfg), mesh)
    sharding.check_divisible(param_shapes(cfg), shardings)
    return shardings


def abstract_params(cfg: ModelConfig, mesh: jax.sharding.Mesh):
    """The parameter tree as ShapeDtypeStructs carrying their shardings (AOT lowering, restore targets)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), param_shapes(cfg),
                        param_shardings(cfg, mesh))


@functools.lru_cache(maxsize=32)
def _abstract_boxed(cfg: ModelConfig):
    return jax.eval_shape(lambda: boxed_params(cfg, jax.random.key(0)))


def param_shapes(cfg: ModelConfig) -> Params:
    """The parameter tree as jax.ShapeDtypeStruct leaves; nothing is allocated."""
    # Not nn.meta.unbox: under an active mesh it would try to constrain these abstract leaves.
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, _abstract_boxed(cfg),
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_axes(cfg: ModelConfig) -> Params:
    """The parameter tree with a PartitionSpec of logical axis names at each leaf."""
    return nn.get_partition_spec(_abstract_boxed(cfg))


def check_params(params: Params, cfg: ModelConfig) -> None:
    """Raises ConfigError listing every leaf whose path or shape differs from what ``cfg`` expects."""
    check_tree(params, param_shapes(cfg))


def check_tree(params: Params, shapes: Params) -> None:
    """Raises ConfigError listing every leaf whose path or shape differs from ``shapes`` (a tree of
    ShapeDtypeStructs)."""
    expected = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(shapes)}
    got = {jax.tree_util.keystr(p): tuple(getattr(v, "shape", np.shape(v)))  # QuantizedArrays count as one leaf
           for p, v in jax.tree_util.tree_leaves_with_path(params, is_leaf=quantized.is_quantized)}
    problems = [f"missing {k} {s}" for k, s in expected.items() if k not in got]
    problems += [f"unexpected {k} {s}" for k, s in got.items() if k not in expected]
    problems += [f"{k}: shape {got[k]}, expected {s}" for k, s in expected.items() if k in got and got[k] != s]
    if problems:
        raise ConfigError("parameters do not match the model config:\n  " + "\n  ".join(problems))


def lm_head_kernel(params: Params, cfg: ModelConfig) -> jax.Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    return params["embedding"].T if cfg.tie_embeddings else params["lm_head"]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: str | None = None) -> dict[str, jax.Array]:
    """An empty KV cache for ``length`` slots: k/v [L, B, S, K, H], each slot's position and segment id, write index."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.resolved_head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    slots = jnp.zeros((batch, length), jnp.int32)  # segment id 0: an empty slot, never attended to
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "positions": slots, "segment_ids": slots,
            "index": jnp.zeros((), jnp.int32)}


def stack_layers(params: Params, num_layers: int) -> Params:
    """``layers_0 .. layers_{L-1}`` (unscanned tree) -> one ``layers`` subtree with a leading L axis."""
    params = dict(params)
    blocks = [params.pop(f"layers_{i}") for i in range(num_layers)]
    return params | {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_layers(params: Params, num_layers: int) -> Params:
    """The inverse of ``stack_layers``."""
    params = dict(params)
    stacked = params.pop("layers")
    return params | {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)}
