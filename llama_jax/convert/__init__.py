"""Weights in three formats, one parameter tree: Hugging Face safetensors, Meta .pth, and llama_jax's checkpoint.

    params, cfg = convert.read("Meta-Llama-3.1-8B/")          # format detected from the files present
    convert.write("llama-3.1-8b-hf/", "hf", params, cfg)      # atomic: a temp dir renamed at the end

Modules: ``hf`` (HF tensor names <-> our tree), ``hf_files`` (config.json + safetensors on disk), ``meta``
(Meta's layout <-> HF names: rotary permutation, model-parallel shards). The CLI is ``python -m llama_jax.convert``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from llama_jax import config as config_lib
from llama_jax.config import ModelConfig
from llama_jax.convert import hf, hf_files, meta
from llama_jax.errors import CheckpointError

FORMATS = ("hf", "meta", "llama_jax")
Progress = Callable[[Iterable], Iterable]


def detect_format(path: str) -> str:
    """'llama_jax' (run dir or checkpoint dir), 'hf' or 'meta', from the files present in ``path``."""
    from llama_jax import checkpoint  # checkpoint imports convert for load(); import lazily both ways

    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    if checkpoint.is_checkpoint_dir(path) or os.path.isdir(os.path.join(path, checkpoint.CHECKPOINTS_DIR)):
        return "llama_jax"
    if hf_files.is_hf_dir(path):
        return "hf"
    if meta.is_meta_dir(path):
        return "meta"
    raise CheckpointError(
        f"{path} is neither a llama_jax checkpoint (meta/meta.json + params/, or checkpoints/), an HF model "
        f"(config.json + model.safetensors[.index.json]) nor a Meta one (params.json + consolidated.NN.pth)"
    )


def _dtype_of(tensors: dict[str, np.ndarray], path: str) -> str:
    dtypes = sorted({str(a.dtype) for a in tensors.values()})
    if len(dtypes) != 1 or dtypes[0] not in config_lib.DTYPES:
        raise CheckpointError(f"{path}: expected one float dtype for all tensors, found {dtypes}")
    return dtypes[0]


def read_hf(path: str, *, progress: Progress = iter, **overrides: Any) -> tuple[dict, ModelConfig]:
    """An HF model directory -> (numpy parameter tree, config); dtype as stored."""
    tensors = hf_files.read_tensors(path, progress)
    dtype = _dtype_of(tensors, path)
    try:
        cfg = config_lib.from_hf(hf_files.read_config(path), **{"param_dtype": dtype, "dtype": dtype, **overrides})
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{os.path.join(path, hf_files.CONFIG_FILE)}: {e}") from e
    return _params_from_hf(tensors, cfg, path), cfg


def read_meta(path: str, *, progress: Progress = iter, **overrides: Any) -> tuple[dict, ModelConfig]:
    """A Meta checkpoint directory (any number of model-parallel shards) -> (numpy parameter tree, config)."""
    cfg, tensors = meta.read(path, progress=progress, **overrides)
    return _params_from_hf(tensors, cfg, path), cfg


def _params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, path: str) -> dict:
    try:
        return hf.params_from_hf(tensors, cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def read(path: str, fmt: str | None = None, *, progress: Progress = iter,
         **overrides: Any) -> tuple[dict, ModelConfig]:
    """Parameters and config from a directory in any of FORMATS (detected when ``fmt`` is None)."""
    fmt = fmt or detect_format(path)
    if fmt == "hf":
        return read_hf(path, progress=progress, **overrides)
    if fmt == "meta":
        return read_meta(path, progress=progress, **overrides)
    if fmt == "llama_jax":
        from llama_jax import checkpoint

        params, cfg, _ = checkpoint.load(path)
        return params, cfg.replace(**overrides) if overrides else cfg
    raise CheckpointError(f"unknown weight format {fmt!r}; known: {FORMATS}")


def check_destination(dst: str) -> None:
    """Raises CheckpointError unless ``dst`` is free: absent, or an empty directory."""
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise CheckpointError(f"destination {os.path.abspath(dst)} already exists and is not empty")


@contextlib.contextmanager
def atomic_directory(dst: str) -> Iterator[str]:
    """Yields a not-yet-existing sibling path to write into; it becomes ``dst`` only if the block succeeds.

    ``dst`` must not exist (or be an empty directory): a failed or interrupted write leaves it untouched.
    """
    dst = os.path.abspath(dst)
    check_destination(dst)
    tmp = f"{dst}.partial-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if os.path.isdir(dst):
            os.rmdir(dst)
        os.rename(tmp, dst)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write(path: str, fmt: str, params: dict, cfg: ModelConfig, *, progress: Progress = iter, num_shards: int = 1,
          max_shard_bytes: int = hf_files.DEFAULT_SHARD_BYTES, tokenizer: dict | None = None) -> None:
    """Writes ``params`` in format ``fmt`` to the new directory ``path``, atomically.

    ``num_shards``: Meta model-parallel ranks. ``max_shard_bytes``: size of HF safetensors shards.
    ``tokenizer``: identity recorded in a llama_jax checkpoint.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown weight format {fmt!r}; known: {FORMATS}")
    with atomic_directory(path) as tmp:
        if fmt == "llama_jax":
            from llama_jax import checkpoint

            checkpoint.save_params(tmp, params, cfg, tokenizer=tokenizer)
            return
        host = {k: np.asarray(v) for k, v in hf.params_to_hf(params, cfg).items()}
        os.makedirs(tmp)
        if fmt == "hf":
            hf_files.write(tmp, config_lib.to_hf(cfg), host, max_shard_bytes=max_shard_bytes, progress=progress)
        else:
            meta.write(tmp, cfg, host, num_shards=num_shards, progress=progress)
