"""Low-rank adapters on the stacked layer tree: made, split from and joined to a base tree, merged into it.

    cfg = cfg.replace(lora=LoRA(rank=16, alpha=32, targets=("query", "value")))
    adapters = lora.init(cfg, jax.random.key(0))          # {"layers": {"attention": {"query_lora_a": [L, D, r], ...}}}
    logits = model.Llama(cfg).apply({"params": lora.join(base, adapters)}, tokens)   # == the base's at the start
    merged = lora.merge(lora.join(base, adapters), cfg)   # W + scale A B folded in: a plain Llama tree

An adapter of projection ``name`` is two leaves beside its kernel: ``<name>_lora_a`` [L, in dims, r] (PEFT's
``lora_A`` transposed, its init) and ``<name>_lora_b`` [L, r, out dims] (zeros), with the kernel's logical axes and
``lora_rank`` for r, so they stack, scan, remat and shard as the weights they adapt (``model._adapted`` runs them).
A tree without them runs the base network: DPO's reference is the base with the adapters off.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from llama_jax import model
from llama_jax.config import ModelConfig
from llama_jax.ops import low_rank, quantized

SUFFIXES = ("_lora_a", "_lora_b")
# Every projection with the number of its leading input axes (query [D, N, H] contracts D, out [N, H, D] N and H).
PROJECTIONS = {"attention": {"query": 1, "key": 1, "value": 1, "out": 2},
               "feed_forward": {"gate": 1, "up": 1, "down": 1}}


def is_adapter(path: str) -> bool:
    """Whether the leaf at ``path`` ("layers/attention/query_lora_a") is an adapter's."""
    return path.endswith(SUFFIXES)


def split(params: dict) -> tuple[dict, dict]:
    """(the tree without adapters, the adapters alone), both nested like ``params``."""
    flat = traverse_util.flatten_dict(params, sep="/")
    base = {k: v for k, v in flat.items() if not is_adapter(k)}
    adapters = {k: v for k, v in flat.items() if is_adapter(k)}
    return traverse_util.unflatten_dict(base, sep="/"), traverse_util.unflatten_dict(adapters, sep="/")


def check(adapters: dict, cfg: ModelConfig) -> None:
    """ConfigError listing every leaf that is not one of ``cfg.lora``'s adapters, of its shape."""
    model.check_tree(adapters, split(model.param_shapes(cfg))[1])


def join(base: dict, adapters: dict) -> dict:
    """One tree holding ``base``'s leaves and ``adapters``'."""
    flat = traverse_util.flatten_dict(base, sep="/") | traverse_util.flatten_dict(adapters, sep="/")
    return traverse_util.unflatten_dict(flat, sep="/")


def boxed_init(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Fresh adapters of ``cfg.lora`` with their logical axes (``nn.Partitioned`` leaves): A as PEFT draws it, B
    zero. Only the adapters are computed; the base's leaves are shapes, never allocated."""
    boxed = jax.eval_shape(lambda: model.boxed_params(cfg, jax.random.key(0)))
    flat = traverse_util.flatten_dict(boxed, sep="/", is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
    adapters = {}
    for i, (path, leaf) in enumerate(sorted((k, v) for k, v in flat.items() if is_adapter(k))):
        shape, dtype = leaf.value.shape, leaf.value.dtype
        if path.endswith("_lora_b"):
            value = jnp.zeros(shape, dtype)
        else:  # [L, in dims, r]: drawn as PEFT draws A, every layer its own values
            value = low_rank.a_init(int(np.prod(shape[1:-1])))(jax.random.fold_in(rng, i), shape, dtype)
        adapters[path] = leaf.replace_boxed(value)
    return traverse_util.unflatten_dict(adapters, sep="/")


def init(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Fresh adapters of ``cfg.lora`` (plain arrays): see ``boxed_init``."""
    return nn.meta.unbox(boxed_init(cfg, rng))


def merge(params: dict, cfg: ModelConfig) -> dict:
    """A plain Llama tree: each adapted kernel W + scale A B (summed in float32, stored in W's dtype), the
    adapters gone."""
    base, adapters = split(params)
    flat_base = traverse_util.flatten_dict(base, sep="/")
    for path, a in traverse_util.flatten_dict(adapters, sep="/").items():
        if not path.endswith("_lora_a"):
            continue
        kernel_path = path.removesuffix("_lora_a")
        w, b = flat_base[kernel_path], traverse_util.flatten_dict(adapters, sep="/")[f"{kernel_path}_lora_b"]
        layers, rank = a.shape[0], a.shape[-1]
        delta = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank).astype(jnp.float32),
                           b.reshape(layers, rank, -1).astype(jnp.float32), precision="highest")
        flat_base[kernel_path] = (w.astype(jnp.float32) + cfg.lora.scale * delta.reshape(w.shape)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat_base, sep="/")


def quantize_base(params: dict, cfg: ModelConfig, mode: str) -> dict:
    """A frozen base with every projection quantized (``mode`` "nf4": QLoRA's 4-bit NormalFloat, "int8": per output
    channel), in ``cfg``'s layout; embeddings, norms and the LM head stay as they are, as PEFT's QLoRA leaves them,
    and so do adapters beside the kernels. The matmuls decode the kernels inside the step (``ops.quantized``)."""

    def block(layer, stacked: bool) -> dict:
        layer = dict(layer)
        for group, kernels in PROJECTIONS.items():
            weights = dict(layer[group])
            for name, contracted in kernels.items():
                quantize = functools.partial(quantized.quantize_kernel, mode=mode, contracted=contracted)
                weights[name] = (jax.vmap(quantize) if stacked else quantize)(weights[name])
            layer[group] = weights
        return layer

    if cfg.scan_layers:
        return {**params, "layers": block(params["layers"], stacked=True)}
    return {**params, **{f"layers_{i}": block(params[f"layers_{i}"], stacked=False) for i in range(cfg.num_layers)}}
