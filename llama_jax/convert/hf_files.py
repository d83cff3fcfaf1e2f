"""Hugging Face model directories on disk: ``config.json`` + safetensors (one file, or shards + index).

    model.safetensors                                   one file, or
    model-00001-of-0000N.safetensors ...                shards, listed by
    model.safetensors.index.json                        {"metadata": {"total_size": bytes}, "weight_map": {name: file}}

Only the numpy side of safetensors is used (ml_dtypes gives it bfloat16), so torch is never needed here.
Tensor names <-> our parameter tree is ``convert.hf``'s job; this module moves bytes and checks them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from llama_jax.errors import CheckpointError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30


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


def read_tensors(path: str, progress: Callable[[Iterable], Iterable] = iter) -> dict[str, np.ndarray]:
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


def write(path: str, config: dict[str, Any], tensors: dict[str, np.ndarray], *,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Callable[[Iterable], Iterable] = iter) -> None:
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
