"""Hugging Face ``LlamaForCausalLM`` state dicts <-> the llama_jax parameter tree.

HF stores each projection as a torch Linear weight ``[out, in]``; we keep heads as their own axis
(``query [D, N, H]``, ``out [N, H, D]``) and stack layers. Both use rotate-half RoPE, so q/k need no
permutation here (Meta's interleaved layout is handled in ``convert.meta``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.errors import CheckpointError

# (our path inside a layer, HF name inside ``model.layers.{i}.``)
_LAYER_NAMES = (
    (("attention_norm", "scale"), "input_layernorm.weight"),
    (("attention", "query"), "self_attn.q_proj.weight"),
    (("attention", "key"), "self_attn.k_proj.weight"),
    (("attention", "value"), "self_attn.v_proj.weight"),
    (("attention", "out"), "self_attn.o_proj.weight"),
    (("ffn_norm", "scale"), "post_attention_layernorm.weight"),
    (("feed_forward", "gate"), "mlp.gate_proj.weight"),
    (("feed_forward", "up"), "mlp.up_proj.weight"),
    (("feed_forward", "down"), "mlp.down_proj.weight"),
)


def _to_ours(path: tuple[str, str], w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    d, n, k, h = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    if path[0] == "attention":
        if path[1] == "out":
            return w.T.reshape(n, h, d)  # [D, N*H] -> [N, H, D]
        heads = n if path[1] == "query" else k
        return w.T.reshape(d, heads, h)  # [heads*H, D] -> [D, heads, H]
    if path[0] == "feed_forward":
        return w.T  # [out, in] -> [in, out]
    return w  # norm scales


def _to_hf(path: tuple[str, str], w: np.ndarray) -> np.ndarray:
    if path[0] == "attention":
        if path[1] == "out":
            return w.reshape(-1, w.shape[-1]).T  # [N, H, D] -> [D, N*H]
        return w.reshape(w.shape[0], -1).T  # [D, heads, H] -> [heads*H, D]
    if path[0] == "feed_forward":
        return w.T
    return w


def params_from_hf(state_dict: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Our (stacked) parameter tree from HF tensor names -> arrays. Dtypes are kept as given."""
    sd = {name: np.asarray(w) for name, w in state_dict.items()}

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in sd:
            raise CheckpointError(f"HF state dict lacks tensor {name!r}")
        w = sd.pop(name)
        if w.shape != shape:
            raise CheckpointError(f"HF tensor {name!r} has shape {w.shape}; config expects {shape}")
        return w

    d, n, k, h, f = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.ffn_dim
    hf_shapes = {
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (n * h, d), "self_attn.k_proj.weight": (k * h, d),
        "self_attn.v_proj.weight": (k * h, d), "self_attn.o_proj.weight": (d, n * h),
        "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
    }
    layers: dict[str, dict[str, Any]] = {}
    for path, hf_name in _LAYER_NAMES:
        per_layer = [
            _to_ours(path, take(f"model.layers.{i}.{hf_name}", hf_shapes[hf_name]), cfg)
            for i in range(cfg.num_layers)
        ]
        layers.setdefault(path[0], {})[path[1]] = np.stack(per_layer)

    params: dict[str, Any] = {
        "embedding": take("model.embed_tokens.weight", (cfg.vocab_size, d)),
        "layers": layers,
        "final_norm": {"scale": take("model.norm.weight", (d,))},
    }
    if cfg.tie_embeddings:
        head = sd.pop("lm_head.weight", None)  # some exports write the tied head out anyway
        if head is not None and not np.array_equal(head, params["embedding"]):
            raise CheckpointError("config ties embeddings but HF lm_head.weight differs from embed_tokens")
    else:
        params["lm_head"] = take("lm_head.weight", (cfg.vocab_size, d)).T
    leftovers = sorted(k for k in sd if not k.endswith("rotary_emb.inv_freq"))
    if leftovers:
        raise CheckpointError(f"HF state dict has tensors the config does not use: {leftovers[:8]}")
    return params


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensor names -> numpy arrays (contiguous), the exact inverse of ``params_from_hf``."""
    sd = {"model.embed_tokens.weight": np.asarray(params["embedding"])}
    for path, hf_name in _LAYER_NAMES:
        stacked = np.asarray(params["layers"][path[0]][path[1]])
        for i in range(cfg.num_layers):
            sd[f"model.layers.{i}.{hf_name}"] = _to_hf(path, stacked[i])
    sd["model.norm.weight"] = np.asarray(params["final_norm"]["scale"])
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = np.asarray(params["lm_head"]).T
    return {name: np.ascontiguousarray(w) for name, w in sd.items()}
