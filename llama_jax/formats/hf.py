"""Hugging Face ``LlamaForCausalLM`` directories: ``config.json`` + safetensors <-> the llama_jax parameter tree.

    params, cfg = read("Llama-3.2-1B/")             # numpy tree in the stored dtype (bf16 stays bf16)
    write("out-hf/", params, cfg, tokenizer=tok)    # into an existing, empty directory

On disk: ``config.json`` (bos/eos ids only where the vocabulary holds them), the weights (below), with a tokenizer
also ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and ``generation_config.json``
(``formats.hf_tokenizer``), and ``llama_jax.json`` (``formats.provenance``: the tokenizer's identity).

Weights: ``model.safetensors``, or shards ``model-00001-of-0000N.safetensors ...`` listed by
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``). Only the
numpy side of safetensors is used (ml_dtypes gives it bfloat16), so torch is never needed here.

HF stores each projection as a torch Linear weight ``[out, in]``; we keep heads as their own axis
(``query [D, N, H]``, ``out [N, H, D]``) and stack layers. Both use rotate-half RoPE, so q/k need no
permutation here (Meta's interleaved layout is handled in ``formats.meta``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from llama_jax import config as config_lib
from llama_jax.config import ModelConfig
from llama_jax.errors import CheckpointError
from llama_jax.formats import hf_tokenizer, provenance
from llama_jax.tokenizer import Tokenizer

Progress = Callable[[Iterable], Iterable]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_SHARD_BYTES = 5 * 2**30


def read(path: str, *, progress: Progress = iter) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """An HF model directory -> (numpy parameter tree, config); dtype as stored."""
    tensors = read_tensors(path, progress)
    dtypes = sorted({str(a.dtype) for a in tensors.values()})
    if len(dtypes) != 1 or dtypes[0] not in config_lib.DTYPES:
        raise CheckpointError(f"{path}: expected one float dtype for all tensors, found {dtypes}")
    try:
        cfg = config_lib.from_hf(read_config(path), param_dtype=dtypes[0], dtype=dtypes[0])
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)}: {e}") from e
    try:
        return params_from_hf(tensors, cfg), cfg
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def write(path: str, params: dict[str, Any], cfg: ModelConfig, *, tokenizer: Tokenizer | None = None,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress = iter) -> None:
    """Writes ``params`` (and ``tokenizer``'s files, if given) as an HF model directory into the existing, empty
    directory ``path``."""
    tensors = {name: np.asarray(w) for name, w in params_to_hf(params, cfg).items()}
    config = {**config_lib.to_hf(cfg), **hf_tokenizer.config_ids(tokenizer, cfg.vocab_size)}
    write_files(path, config, tensors, max_shard_bytes=max_shard_bytes, progress=progress)
    if tokenizer is not None:
        files = hf_tokenizer.tokenizer_files(tokenizer, model_max_length=cfg.max_seq_len)
        files[GENERATION_CONFIG_FILE] = hf_tokenizer.generation_config(tokenizer, cfg.vocab_size)
        for name, content in files.items():
            with open(os.path.join(path, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=None if name == "tokenizer.json" else 2, ensure_ascii=False)
    provenance.write(path, cfg, tokenizer)


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and bool(_safetensors_files_or_none(path))


def _safetensors_files_or_none(path: str) -> list[str] | None:
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        return sorted(set(_read_json(index, "weight_map")["weight_map"].values()))
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        return [SINGLE_FILE]
    return None


def _read_json(path: str, required_key: str | None = None) -> Any:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if required_key is not None and not isinstance(data.get(required_key), dict):
        raise CheckpointError(f"{path} lacks the {required_key!r} mapping")
    return data


def read_config(path: str) -> dict[str, Any]:
    """The ``config.json`` dict of an HF model directory."""
    return _read_json(os.path.join(path, CONFIG_FILE))


def read_tensors(path: str, progress: Progress = iter) -> dict[str, np.ndarray]:
    """Every tensor of an HF model directory, name -> numpy array in its stored dtype (bf16 stays bf16).

    ``progress`` wraps the list of files (e.g. ``tqdm``). Raises CheckpointError naming the file that is
    missing, truncated or disagrees with the index.
    """
    files = _safetensors_files_or_none(path)
    if not files:
        raise CheckpointError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    weight_map = None
    if os.path.isfile(os.path.join(path, INDEX_FILE)):
        weight_map = _read_json(os.path.join(path, INDEX_FILE), "weight_map")["weight_map"]
    for name in files:
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"shard {os.path.join(path, name)} listed in {INDEX_FILE} is missing")

    tensors: dict[str, np.ndarray] = {}
    for name in progress(files):
        file = os.path.join(path, name)
        try:
            with safe_open(file, framework="numpy") as f:
                for key in f.keys():
                    if key in tensors:
                        raise CheckpointError(f"tensor {key!r} appears twice (again in {file})")
                    if weight_map is not None and weight_map.get(key) != name:
                        raise CheckpointError(f"{file} holds {key!r}, which {INDEX_FILE} places in "
                                              f"{weight_map.get(key)!r}")
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:  # truncated / corrupt header or data
            raise CheckpointError(f"cannot read safetensors file {file}: {e}") from e
    if weight_map is not None and set(weight_map) != set(tensors):
        missing = sorted(set(weight_map) - set(tensors))[:8]
        raise CheckpointError(f"{INDEX_FILE} in {path} lists tensors no shard holds: {missing}")
    return tensors


def write_files(path: str, config: dict[str, Any], tensors: dict[str, np.ndarray], *,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress = iter) -> None:
    """Writes ``config.json`` and the tensors into the (existing, empty) directory ``path``.

    Tensors go to ``model.safetensors`` when they fit in ``max_shard_bytes``, else to consecutive shards of at
    most that size (a single larger tensor gets a shard of its own) plus ``model.safetensors.index.json``.
    """
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(array)
        size += array.nbytes
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)

    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {
            "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    for name, shard in progress(list(zip(names, shards))):
        # transformers refuses safetensors files whose metadata does not name a framework it knows.
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})


# --- tensor names <-> our tree ----------------------------------------------------------------------

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
