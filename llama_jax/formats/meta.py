"""Meta's original checkpoint directories (params.json + consolidated.NN.pth) <-> the llama_jax parameter tree.

    params, cfg = read("Meta-Llama-3.1-8B/")
    write("out-meta/", params, cfg, num_shards=8, tokenizer=tok)     # into an existing, empty directory

Tensors pass through Hugging Face's names (``formats.hf`` maps those to our tree).

    params.json            {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                            "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope"}
    consolidated.00.pth    one torch state dict per model-parallel rank (8 for 70B and 405B)
    consolidated.01.pth ...
    tokenizer.model        the Llama 3 tokenizer (written when the model uses it; Meta's releases ship it)
    llama_jax.json         what params.json lacks: the tokenizer's identity and max_seq_len (``formats.provenance``);
                           without it max_seq_len is params.json's, else 131,072 with scaled RoPE (Llama 3.1 / 3.2),
                           else 8,192 (Llama 3)

Model parallelism follows Meta's llama3 reference code (fairscale layers in ``llama_models/llama3/model.py``):
column-parallel weights are split along their output rows (dim 0): ``wq wk wv w1 w3 output`` and the
``VocabParallelEmbedding`` ``tok_embeddings`` (Llama 3 splits the vocabulary; Llama 2 split the embedding dim);
row-parallel weights along their input columns (dim 1): ``wo w2``; norms are replicated on every rank.

Meta rotates q/k by interleaved pairs (2i, 2i+1) within a head; HF (and llama_jax) pair (i, i + H/2). HF's
conversion script permutes each head's rows: ``w.view(heads, H // 2, 2, D).transpose(1, 2)``; we do the same.

.pth files are read with ``torch.load(weights_only=True)`` (no pickled code runs) and memory-mapped, one rank at a
time, each rank's slices copied into the full tensors. torch is imported only here, and only when needed.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import ml_dtypes
import numpy as np

from llama_jax.config import ModelConfig, RopeScaling
from llama_jax.errors import CheckpointError
from llama_jax.formats import hf as hf_format
from llama_jax.formats import provenance
from llama_jax.tokenizer import Llama3Tokenizer, Tokenizer

PARAMS_FILE = "params.json"
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")

# Meta name inside ``layers.{i}.`` -> HF name inside ``model.layers.{i}.``
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_SPLIT_ROWS = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight",
               "tok_embeddings.weight")
_SPLIT_COLUMNS = ("wo.weight", "w2.weight")

# Rope scaling hard-coded in Meta's llama3 reference code; params.json only switches it on.
_META_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
# (multiple_of, ffn_dim_multiplier) pairs of Meta's releases, tried first when exporting.
_META_FFN_RULES = ((1024, 1.3), (4096, 1.3), (4096, 1.2), (256, 1.5), (256, None), (256, 1.0))
# Context lengths of Meta's releases: Llama 3.1 / 3.2 (scaled RoPE) and Llama 3, for params.json files without one.
_SCALED_CONTEXT, _PLAIN_CONTEXT = 131_072, 8192
_KNOWN_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_high_freq_factor",
               "max_batch_size", "max_seq_len"}


def _split_dim(meta_name: str) -> int | None:
    """The dimension model-parallel ranks split ``meta_name`` along; None for replicated tensors."""
    if meta_name.endswith(_SPLIT_ROWS):
        return 0
    if meta_name.endswith(_SPLIT_COLUMNS):
        return 1
    return None


def meta_to_hf_name(meta_name: str) -> str:
    if meta_name in _TOP_NAMES:
        return _TOP_NAMES[meta_name]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", meta_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise CheckpointError(f"unknown tensor name {meta_name!r} in a Meta checkpoint")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def hf_to_meta_name(hf_name: str) -> str:
    for meta, hf in _TOP_NAMES.items():
        if hf == hf_name:
            return meta
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    for meta, hf in _LAYER_NAMES.items():
        if match is not None and hf == match.group(2):
            return f"layers.{match.group(1)}.{meta}"
    raise CheckpointError(f"HF tensor {hf_name!r} has no counterpart in Meta's layout")


def interleaved_to_half(w: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows [heads * H, D] from Meta's interleaved rotary pairs to HF's rotate-half order."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def half_to_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of ``interleaved_to_half``."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden width as Meta's FeedForward derives it from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_rule(cfg: ModelConfig) -> tuple[int, float | None]:
    plain = [(2**k, None) for k in range(12, 0, -1)]  # no multiplier: round 8D/3 up to a power of two
    for multiple_of, multiplier in (*_META_FFN_RULES, *plain):
        if ffn_dim(cfg.dim, multiple_of, multiplier) == cfg.ffn_dim:
            return multiple_of, multiplier
    # Rounding up to a multiple of ffn_dim itself reproduces ffn_dim from any hidden width in (0, ffn_dim].
    return cfg.ffn_dim, cfg.ffn_dim / int(8 * cfg.dim / 3)


def is_meta_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PARAMS_FILE)) and bool(_shard_files(path))


def _shard_files(path: str) -> list[str]:
    files = [f for f in glob.glob(os.path.join(path, "consolidated.*.pth")) if _SHARD_RE.search(f)]
    return sorted(files, key=lambda f: int(_SHARD_RE.search(f).group(1)))


def params_json(cfg: ModelConfig) -> dict[str, Any]:
    """Meta's params.json for ``cfg``; raises CheckpointError for what Meta's layout cannot express."""
    if cfg.head_dim is not None and cfg.head_dim != cfg.dim // cfg.num_heads:
        raise CheckpointError(f"Meta's layout derives head_dim from dim / n_heads; cannot store head_dim="
                              f"{cfg.head_dim} with dim={cfg.dim}, n_heads={cfg.num_heads}")
    multiple_of, multiplier = _ffn_rule(cfg)
    d = {
        "dim": cfg.dim, "n_layers": cfg.num_layers, "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
        "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "use_scaled_rope": cfg.rope_scaling is not None,
    }
    s = cfg.rope_scaling
    if s is not None:
        if (s.low_freq_factor, s.original_max_position) != (_META_ROPE.low_freq_factor,
                                                           _META_ROPE.original_max_position):
            raise CheckpointError(f"Meta's params.json cannot express rope scaling {s}")
        # Keys of Meta's later (llama4) params.json; llama3's reference code ignores them and uses factor 8.
        if s.factor != _META_ROPE.factor:
            d["rope_scaling_factor"] = s.factor
        if s.high_freq_factor != _META_ROPE.high_freq_factor:
            d["rope_high_freq_factor"] = s.high_freq_factor
    return d


def config_from_params_json(d: dict[str, Any], *, file: str = PARAMS_FILE) -> ModelConfig:
    """A ModelConfig from params.json (float32 unless overridden; ``read`` sets the tensors' dtype)."""
    unknown = sorted(set(d) - _KNOWN_KEYS)
    if unknown:
        raise CheckpointError(f"{file} has key(s) llama_jax does not understand: {unknown}")
    missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of") if k not in d]
    if missing:
        raise CheckpointError(f"{file} lacks key(s) {missing}")
    if not isinstance(d["multiple_of"], int) or d["multiple_of"] < 1:
        raise CheckpointError(f"{file}: multiple_of must be a positive integer (the FFN width is rounded up to a "
                              f"multiple of it), got {d['multiple_of']!r}")
    multiplier = d.get("ffn_dim_multiplier")
    if multiplier is not None and (not isinstance(multiplier, int | float) or not multiplier > 0):
        raise CheckpointError(f"{file}: ffn_dim_multiplier must be a positive number or null, got {multiplier!r}")
    try:
        scaling = None
        if d.get("use_scaled_rope", False):
            scaling = RopeScaling(factor=float(d.get("rope_scaling_factor", _META_ROPE.factor)),
                                  high_freq_factor=float(d.get("rope_high_freq_factor", _META_ROPE.high_freq_factor)))
        fields = dict(
            vocab_size=int(d["vocab_size"]), dim=int(d["dim"]), num_layers=int(d["n_layers"]),
            num_heads=int(d["n_heads"]), num_kv_heads=int(d.get("n_kv_heads") or d["n_heads"]),
            ffn_dim=ffn_dim(int(d["dim"]), int(d["multiple_of"]), d.get("ffn_dim_multiplier")),
            norm_eps=float(d.get("norm_eps", 1e-5)), rope_theta=float(d.get("rope_theta", 500_000.0)),
            rope_scaling=scaling,
            max_seq_len=int(d.get("max_seq_len") or (_SCALED_CONTEXT if scaling is not None else _PLAIN_CONTEXT)),
        )
        return ModelConfig(**fields)
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{file}: {e}") from e


# --- torch tensors <-> numpy, safely ------------------------------------------------------------------


def _torch():
    try:
        import torch
    except ImportError as e:
        raise CheckpointError("reading or writing Meta .pth checkpoints needs PyTorch: pip install torch") from e
    return torch


def _to_numpy(t) -> np.ndarray:
    torch = _torch()
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret the bits as ml_dtypes'
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _to_torch(a: np.ndarray):
    torch = _torch()
    a = np.require(a, requirements=["C", "W"])  # torch wants writable memory; copies only when needed
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def load_pth(file: str) -> dict[str, Any]:
    """A .pth state dict, loaded without running pickled code and memory-mapped (tensors read lazily)."""
    torch = _torch()
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError (forbidden object), RuntimeError (truncated zip), OSError, ...
        raise CheckpointError(f"cannot load {file} as a plain tensor state dict: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise CheckpointError(f"{file} is not a state dict of named tensors")
    return sd


# --- reading and writing directories ------------------------------------------------------------------


def read(path: str, *, progress: Callable[[Iterable], Iterable] = iter) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """A Meta checkpoint directory -> (numpy parameter tree, config).

    The config's param_dtype/dtype follow the tensors; ``tie_embeddings`` is set when ``output.weight`` equals
    ``tok_embeddings.weight`` bit for bit (Llama 3.2 1B/3B).
    """
    cfg, tensors = _read_hf_named(path, progress)
    try:
        return hf_format.params_from_hf(tensors, cfg), cfg
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _read_hf_named(path: str, progress) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, HF-named numpy tensors in rotate-half order) of a Meta checkpoint directory."""
    params_file = os.path.join(path, PARAMS_FILE)
    try:
        with open(params_file) as f:
            params = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {params_file}: {e}") from e
    files = _shard_files(path)
    if not files:
        raise CheckpointError(f"{path} holds no consolidated.NN.pth files")
    ranks = [int(_SHARD_RE.search(f).group(1)) for f in files]
    missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
    if missing:
        raise CheckpointError(f"Meta checkpoint {path} lacks shard(s) "
                              + ", ".join(f"consolidated.{r:02d}.pth" for r in missing))
    cfg = config_from_params_json(params, file=params_file)

    full: dict[str, np.ndarray] = {}
    for rank, file in enumerate(progress(files)):
        shard = load_pth(file)
        if rank == 0:
            names = set(shard)
        elif set(shard) != names:
            raise CheckpointError(f"{file} holds tensors {sorted(set(shard) ^ names)[:8]} that "
                                  f"{files[0]} does not (or the reverse)")
        for name, tensor in shard.items():
            part, dim = _to_numpy(tensor), _split_dim(name)
            rank_expected = 1 if name.endswith("norm.weight") else 2  # norms are vectors, the rest matrices
            if part.ndim != rank_expected:
                raise CheckpointError(f"{file}: tensor {name!r} has shape {list(part.shape)}; a Meta checkpoint's "
                                      f"{name.rsplit('.', 2)[-2]} weight has {rank_expected} dimension(s)")
            if rank == 0:
                shape = list(part.shape)
                if dim is not None:
                    shape[dim] *= len(files)
                full[name] = np.empty(shape, part.dtype)
            target = full[name]
            if dim is None:
                if rank == 0:
                    target[...] = part
                elif not np.array_equal(part, target):
                    raise CheckpointError(f"replicated tensor {name!r} differs between {files[0]} and {file}")
                continue
            size = target.shape[dim] // len(files)
            each = [*target.shape[:dim], size, *target.shape[dim + 1:]]
            if part.dtype != target.dtype or list(part.shape) != each:  # every dimension: numpy would only broadcast
                raise CheckpointError(f"{file}: {name!r} is {part.dtype}{list(part.shape)}; the part of each rank is "
                                      f"{target.dtype}{each} (rank 0's, split along dim {dim})")
            index = [slice(None)] * target.ndim
            index[dim] = slice(rank * size, (rank + 1) * size)
            target[tuple(index)] = part
        del shard  # drop the memory map before opening the next rank

    dtypes = {str(a.dtype) for a in full.values()}
    if len(dtypes) != 1 or dtypes.pop() not in ("float32", "bfloat16", "float16"):
        raise CheckpointError(f"Meta checkpoint {path} mixes or uses unsupported dtypes: "
                              f"{sorted({str(a.dtype) for a in full.values()})}")
    dtype = str(next(iter(full.values())).dtype)
    tied = "output.weight" in full and np.array_equal(full["output.weight"], full.get("tok_embeddings.weight"))
    cfg = cfg.replace(param_dtype=dtype, dtype=dtype, tie_embeddings=tied,
                      max_seq_len=provenance.recorded_max_seq_len(path) or cfg.max_seq_len)
    _check_shapes(full, cfg, params_file)

    hf: dict[str, np.ndarray] = {}
    for name, array in full.items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        if name.endswith(("wq.weight", "wk.weight")):
            heads = cfg.num_heads if name.endswith("wq.weight") else cfg.num_kv_heads
            array = interleaved_to_half(array, heads)
        hf[meta_to_hf_name(name)] = array
    return cfg, hf


def _check_shapes(full: dict[str, np.ndarray], cfg: ModelConfig, params_file: str) -> None:
    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.resolved_head_dim, cfg.num_kv_heads * cfg.resolved_head_dim
    expected = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    per_layer = {"attention.wq.weight": (q, d), "attention.wk.weight": (kv, d), "attention.wv.weight": (kv, d),
                 "attention.wo.weight": (d, q), "feed_forward.w1.weight": (f, d), "feed_forward.w3.weight": (f, d),
                 "feed_forward.w2.weight": (d, f), "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}
    for i in range(cfg.num_layers):
        expected.update({f"layers.{i}.{k}": s for k, s in per_layer.items()})
    problems = [f"missing {k} {list(s)}" for k, s in expected.items() if k not in full]
    problems += [f"unexpected {k} {list(a.shape)}" for k, a in full.items() if k not in expected]
    problems += [f"{k}: tensors give {list(full[k].shape)}, params.json implies {list(s)}"
                 for k, s in expected.items() if k in full and full[k].shape != s]
    if problems:
        raise CheckpointError(f"{params_file} disagrees with the tensors:\n  " + "\n  ".join(problems[:12]))


def write(path: str, params: dict[str, Any], cfg: ModelConfig, *, num_shards: int = 1,
          tokenizer: Tokenizer | None = None, progress: Callable[[Iterable], Iterable] = iter) -> None:
    """Writes params.json, ``num_shards`` consolidated.NN.pth files, llama_jax.json and (for the Llama 3 tokenizer)
    tokenizer.model into the existing, empty directory ``path``.

    Tied embeddings are written out as ``output.weight`` too, since Meta's reference model always has one.
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise CheckpointError(f"num_shards (model-parallel ranks of a Meta export) must be an integer >= 1, got "
                              f"{num_shards!r}")
    hf = {name: np.asarray(w) for name, w in hf_format.params_to_hf(params, cfg).items()}
    torch = _torch()
    for what, size in (("n_heads", cfg.num_heads), ("n_kv_heads", cfg.num_kv_heads), ("ffn_dim", cfg.ffn_dim),
                       ("vocab_size", cfg.vocab_size)):
        if size % num_shards:
            raise CheckpointError(f"cannot split {what}={size} into {num_shards} model-parallel shards")
    with open(os.path.join(path, PARAMS_FILE), "w") as f:
        json.dump(params_json(cfg), f, indent=2)
    full = {hf_to_meta_name(name): array for name, array in hf.items()}
    if "output.weight" not in full:
        full["output.weight"] = full["tok_embeddings.weight"]
    for name in list(full):
        if name.endswith(("wq.weight", "wk.weight")):
            heads = cfg.num_heads if name.endswith("wq.weight") else cfg.num_kv_heads
            full[name] = half_to_interleaved(full[name], heads)
    for rank in progress(range(num_shards)):
        shard = {}
        for name, array in full.items():
            dim = _split_dim(name)
            if dim is not None:
                array = np.split(array, num_shards, axis=dim)[rank]
            shard[name] = _to_torch(array)
        torch.save(shard, os.path.join(path, f"consolidated.{rank:02d}.pth"))
    if isinstance(tokenizer, Llama3Tokenizer):
        shutil.copyfile(tokenizer.path, os.path.join(path, provenance.TOKENIZER_MODEL))
    provenance.write(path, cfg, tokenizer)
