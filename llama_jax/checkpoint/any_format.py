"""Any weight format in, any out: ``load`` reads a llama_jax run or step directory, a Hugging Face or a Meta one;
``export`` writes any of them to a new directory, atomically.

    params, cfg, metadata = load("Meta-Llama-3.1-8B/", shardings=mesh)   # the format is told by the files present
    export("out-hf/", "hf", params, cfg, tokenizer=tok)                   # hf | meta | llama_jax (one step directory)

``load`` returns a config whose ``scan_layers`` matches the tree's recorded layout. Every format keeps the
tokenizer's identity and ``max_seq_len``: llama_jax metadata records them, HF and Meta directories carry them in
``llama_jax.json`` (``formats.provenance``), and an HF export adds the tokenizer's own files; ``load`` reports the
tokenizer as ``metadata["tokenizer"]`` ({"name", "sha256"}, or None when unknown) for every format. Given a run
directory, ``load`` takes its newest step that verifies and warns about newer ones it skipped (docs/recovery.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax

from llama_jax import lora, model, sharding
from llama_jax.checkpoint import checksums
from llama_jax.checkpoint.format import (
    CHECKPOINTS_DIR,
    LAYOUTS,
    METADATA_FILE,
    check_structure,
    is_checkpoint_dir,
    make_metadata,
    orbax_checkpointer,
    read_metadata,
    save_args,
    warn,
)
from llama_jax.checkpoint.manager import newest_that_verifies, resolve_step_dir
from llama_jax.checkpoint.restore import restore_dir, saved_tree
from llama_jax.config import ModelConfig
from llama_jax.errors import CheckpointError
from llama_jax.formats import hf as hf_format
from llama_jax.formats import meta as meta_format
from llama_jax.formats import provenance
from llama_jax.ops import quantized
from llama_jax.tokenizer import Tokenizer

FORMATS = ("hf", "meta", "llama_jax")


def detect_format(path: str) -> str:
    """'llama_jax' (run dir or step dir), 'hf' or 'meta', from the files present in ``path``."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    if is_checkpoint_dir(path) or os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
        return "llama_jax"
    if hf_format.is_hf_dir(path):
        return "hf"
    if meta_format.is_meta_dir(path):
        return "meta"
    raise CheckpointError(
        f"{path} is neither a llama_jax checkpoint ({METADATA_FILE} + params/, or checkpoints/), an HF model "
        f"(config.json + model.safetensors[.index.json]) nor a Meta one (params.json + consolidated.NN.pth)"
    )


def identity(path: str) -> dict:
    """How records made with a checkpoint name it (rejection samples, precomputed reference log-probs): the absolute
    path and format, and for a llama_jax run or step directory the step directory it resolves to now, with its
    step, stage and save time (a run that saves a newer step is another identity)."""
    fmt = detect_format(path)
    if fmt != "llama_jax":
        return {"path": os.path.abspath(path), "format": fmt}
    step_dir = resolve_step_dir(path)
    metadata = read_metadata(step_dir)
    return {"path": os.path.abspath(step_dir), "format": fmt, "step": metadata.get("step"),
            "stage": metadata.get("stage"), "saved_at": metadata.get("saved_at")}


def load(path: str, *, shardings=None, progress: Callable[[Iterable], Iterable] = iter, merge_adapters: bool = True
         ) -> tuple[Any, ModelConfig, dict]:
    """(params, config, metadata) from a llama_jax run or step directory, an HF directory or a Meta directory.

    shardings: None (default device), a ``jax.sharding.Mesh`` (parameters laid out by the logical-axis rules) or
    a tree of shardings matching the parameters. The config's ``scan_layers`` matches the tree's layout. For HF /
    Meta directories metadata is {"format", "path", "tokenizer"}. ``progress`` wraps the list of weight files read.
    A run trained with adapters (``config.lora``) loads as its base with the adapters merged in, unless
    ``merge_adapters=False`` (then the adapters alone, and the config's ``lora``).
    """
    fmt = detect_format(path)
    if fmt != "llama_jax":
        params, cfg = (hf_format if fmt == "hf" else meta_format).read(path, progress=progress)
        placement = None if shardings is None else _param_shardings(shardings, params, cfg)
        metadata = {"format": fmt, "path": os.path.abspath(path), "tokenizer": provenance.tokenizer_identity(path, cfg)}
        return jax.device_put(params, placement), cfg, metadata
    if is_checkpoint_dir(path):
        params, cfg, metadata = _load_step(os.path.abspath(path), shardings)
    else:
        run_checkpoints = os.path.join(os.path.abspath(path), CHECKPOINTS_DIR)
        step, (params, cfg, metadata), skipped = newest_that_verifies(
            run_checkpoints, lambda step_dir: _load_step(step_dir, shardings))
        for _, problem in skipped:
            warn(f"{problem}\n  skipped; loaded step {step}, the newest checkpoint of {path} that verifies")
    if cfg.lora is not None and merge_adapters:
        params, cfg = _merged_onto_base(params, cfg, metadata, shardings)
    return params, cfg, metadata


def _merged_onto_base(adapters, cfg: ModelConfig, metadata: dict, shardings) -> tuple[Any, ModelConfig]:
    """A run with adapters saves them alone: its network is its base (where the run's init_from pins it, verified
    by checksum) with the adapters merged in, a plain Llama tree."""
    pinned = metadata.get("init_from") or {}
    if "source_dir" not in pinned:
        raise CheckpointError(f"{metadata.get('path', 'this checkpoint')} holds adapters but records no base (its "
                              "init_from): they cannot be applied")
    base, base_cfg, _ = load(pinned["source_dir"], shardings=shardings)
    if not base_cfg.scan_layers:
        base = model.stack_layers(base, base_cfg.num_layers)
    base = {k: base[k] for k in model.param_shapes(cfg.replace(lora=None))}
    if "checksum" in pinned and checksums.tree_digest(base) != pinned["checksum"]:
        raise CheckpointError(f"the base of these adapters, {pinned['source_dir']} (init_from step "
                              f"{pinned.get('step')}), no longer holds the parameters they were trained on")
    return lora.merge(lora.join(base, adapters), cfg), cfg.replace(lora=None)


def _load_step(step_dir: str, shardings) -> tuple[Any, ModelConfig, dict]:
    metadata = check_structure(step_dir)
    layout = metadata.get("param_layout")
    if layout not in LAYOUTS:
        raise CheckpointError(f"{step_dir}: param_layout {layout!r} is not one of {LAYOUTS}")
    cfg = ModelConfig.from_dict(metadata["model_config"]).replace(scan_layers=layout == "stacked")
    if cfg.lora is not None:  # the adapters alone, a few MB: replicated beside the base they join
        placement = (jax.sharding.NamedSharding(shardings, jax.sharding.PartitionSpec())
                     if isinstance(shardings, jax.sharding.Mesh) else None)
        return jax.device_put(restore_dir(step_dir, params_only=True).params, placement), cfg, metadata
    if shardings is None or metadata.get("quantization"):
        params = restore_dir(step_dir, params_only=True).params
        placement = None if shardings is None else _param_shardings(shardings, params, cfg)
        return jax.device_put(params, placement), cfg, metadata
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          model.param_shapes(cfg), _param_shardings(shardings, None, cfg))
    if metadata.get("extra_params") and isinstance(shardings, jax.sharding.Mesh):
        saved = saved_tree(step_dir, "params")  # a stage's own leaves (a reward head), replicated
        replicated = jax.sharding.NamedSharding(shardings, jax.sharding.PartitionSpec())
        for name in metadata["extra_params"]:
            target[name] = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                                        saved[name])
    return restore_dir(step_dir, params_target=target, params_only=True).params, cfg, metadata


def _param_shardings(shardings, params, cfg: ModelConfig):
    if not isinstance(shardings, jax.sharding.Mesh):
        return shardings
    if params is None or quantized.mode_of(params) is None:
        return model.param_shardings(cfg, shardings)
    return sharding.logical_to_sharding(quantized.logical_axes(params, model.logical_axes(cfg)), shardings)


def save_params(path: str, params, cfg: ModelConfig, *, stage: str = "export", tokenizer: dict | None = None,
                stage_config: dict | None = None, extra_params: Sequence[str] = ()) -> None:
    """Writes a params-only checkpoint (one step directory, step 0) to the new directory ``path``, atomically.

    ``cfg.scan_layers`` says which layout ``params`` has (recorded as param_layout); quantized trees are per layer.
    ``stage_config``: what made these parameters (e.g. an average's sources and weights), recorded in metadata.
    """
    if os.path.exists(path):
        raise CheckpointError(f"destination {path} already exists")
    metadata = make_metadata(0, cfg, stage, stage_config, tokenizer, None, None, params, extra_params=extra_params)
    orbax_checkpointer().save(os.path.abspath(path), args=save_args(params, metadata))


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


def export(path: str, fmt: str, params, cfg: ModelConfig, *, tokenizer: Tokenizer | None = None, num_shards: int = 1,
           max_shard_bytes: int = hf_format.DEFAULT_SHARD_BYTES, progress: Callable[[Iterable], Iterable] = iter,
           ) -> None:
    """Writes ``params`` in format ``fmt`` (one of FORMATS) to the new directory ``path``, atomically.

    ``num_shards``: Meta model-parallel ranks. ``max_shard_bytes``: size of HF safetensors shards. ``tokenizer``:
    the model's tokenizer, recorded in every format (and written as tokenizer files for HF); None: unknown.
    A quantized checkpoint only exports to llama_jax: HF and Meta directories hold unquantized weights.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown weight format {fmt!r}; known: {FORMATS}")
    if fmt != "llama_jax" and quantized.mode_of(params) is not None:
        raise CheckpointError(f"a {quantized.mode_of(params)}-quantized checkpoint cannot be exported to {fmt}: "
                              "export the unquantized checkpoint instead")
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids; the model's vocabulary "
                              f"only {cfg.vocab_size}: it is not this model's tokenizer")
    with atomic_directory(path) as tmp:
        if fmt == "llama_jax":
            save_params(tmp, params, cfg, tokenizer=provenance.identity(tokenizer))
            return
        if not cfg.scan_layers:
            params, cfg = model.stack_layers(params, cfg.num_layers), cfg.replace(scan_layers=True)
        os.makedirs(tmp)
        if fmt == "hf":
            hf_format.write(tmp, params, cfg, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes, progress=progress)
        else:
            meta_format.write(tmp, params, cfg, num_shards=num_shards, tokenizer=tokenizer, progress=progress)
