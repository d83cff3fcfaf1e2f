"""The llama_jax checkpoint: one orbax format for every stage; ``load`` and ``export`` for every weight format.

A training run keeps its checkpoints under ``<run_dir>/checkpoints/``, one directory per step:

    <run_dir>/checkpoints/<step>/
        params/                       the parameter tree of model.py's docstring (orbax PyTree, OCDBT)
        opt_state/                    optimizer state; absent in params-only / exported checkpoints
        metadata/metadata.json        format_version, llama_jax_version, step, stage, stage_config,
                                      model_config (ModelConfig.to_dict), param_layout ("stacked" | "per_layer"),
                                      quantization (null | "fp8" | "int8"), tokenizer {name, sha256},
                                      mesh {axis: size} it was saved from, rng {impl, key_data}, has_opt_state
        data_state/data_state.json    the data iterator's state (training checkpoints)
        _CHECKPOINT_METADATA          orbax's bookkeeping
        commit_success.txt            written by orbax once every item is durable

(orbax gives every item its own directory, hence ``metadata/metadata.json`` rather than a bare file.)
An exported checkpoint (``save_params``, ``export(..., "llama_jax", ...)``) is one such step directory on its own.
The parameter layout is recorded, never guessed from keys: "stacked" (per-layer leaves under ``layers`` with a
leading L axis; what training saves) or "per_layer" (``layers_0 ...``; quantized inference trees), and ``load``
returns a config whose ``scan_layers`` matches it.

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` when all
items are written (on object stores, where rename is not atomic, ``commit_success.txt`` marks completion).
A step counts as complete only with ``commit_success.txt``, ``params/`` and ``metadata/metadata.json``, so a crash
mid-save never yields a checkpoint that loads as valid; ``latest_step`` is the newest complete one.

Restoring onto another mesh: pass targets of ``jax.ShapeDtypeStruct`` carrying the new shardings (for
params, ``sharding.abstract_params(cfg, mesh)``); orbax reads only each device's slices.

    manager = CheckpointManager(run_dir, keep_last=3, keep_every=1000)
    manager.save(step, params=params, cfg=cfg, stage="pretrain", opt_state=opt_state, data_state=it_state)
    restored = manager.restore(params_target=abstract_params, opt_state_target=abstract_opt_state)
    params, cfg, metadata = load("Meta-Llama-3.1-8B/")    # llama_jax run/step dir, HF dir or Meta dir
    export("out-hf/", "hf", params, cfg)                      # hf | meta | llama_jax, atomically
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import llama_jax
from llama_jax import model, sharding
from llama_jax.config import ModelConfig
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.formats import hf as hf_format
from llama_jax.formats import meta as meta_format
from llama_jax.ops import quantized

FORMAT_VERSION = 2
FORMATS = ("hf", "meta", "llama_jax")
LAYOUTS = ("stacked", "per_layer")
CHECKPOINTS_DIR = "checkpoints"
_COMMIT_FILE = "commit_success.txt"  # orbax's completion marker (atomicity_types.COMMIT_SUCCESS_FILE)
_METADATA = os.path.join("metadata", "metadata.json")
_DATA_STATE = os.path.join("data_state", "data_state.json")


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    return {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "metadata": ocp.JsonCheckpointHandler(filename="metadata.json"),
        "data_state": ocp.JsonCheckpointHandler(filename="data_state.json"),
    }


@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any  # None when params_only or the checkpoint has none
    data_state: dict | None
    rng: jax.Array | None
    metadata: dict


def is_checkpoint_dir(path: str) -> bool:
    """True for a complete step directory (see the module docstring)."""
    return (os.path.isfile(os.path.join(path, _COMMIT_FILE)) and os.path.isdir(os.path.join(path, "params"))
            and os.path.isfile(os.path.join(path, _METADATA)))


def _jsonable(x: Any) -> Any:
    """Experiment configs (ConfigDicts, tuples, numpy scalars) as plain JSON values."""
    if isinstance(x, Mapping) or hasattr(x, "to_dict"):
        items = x.to_dict() if hasattr(x, "to_dict") else x
        return {str(k): _jsonable(v) for k, v in items.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


def _mesh_shape(mesh, params) -> dict[str, int] | None:
    if mesh is None:  # infer from how the parameters are laid out
        sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
        mesh = getattr(sharding, "mesh", None)
    return None if mesh is None else {str(k): int(v) for k, v in mesh.shape.items()}


def _local_value(x) -> np.ndarray:
    # A replicated global array spanning several processes: this process's copy is the whole value.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def _rng_json(rng) -> dict | None:
    if rng is None:
        return None
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return {"impl": str(jax.random.key_impl(rng)), "key_data": _local_value(jax.random.key_data(rng)).tolist()}
    return {"impl": None, "key_data": _local_value(rng).tolist()}  # a raw uint32 key


def _rng_from_json(d: dict | None):
    if d is None:
        return None
    data = np.asarray(d["key_data"], np.uint32)
    return jax.numpy.asarray(data) if d["impl"] is None else jax.random.wrap_key_data(data, impl=d["impl"])


def _metadata(step: int, cfg: ModelConfig, stage: str, stage_config, tokenizer, mesh, rng, params, has_opt_state,
              init_from: dict | None = None, extra_params: Sequence[str] = ()):
    return {
        "format_version": FORMAT_VERSION,
        "llama_jax_version": llama_jax.__version__,
        "step": int(step),
        "stage": stage,
        "stage_config": _jsonable(stage_config),
        "model_config": _jsonable(cfg.to_dict()),
        "param_layout": "stacked" if cfg.scan_layers else "per_layer",
        "quantization": quantized.mode_of(params),
        "extra_params": sorted(extra_params),
        "init_from": init_from,
        "tokenizer": None if tokenizer is None else {"name": tokenizer["name"], "sha256": tokenizer["sha256"]},
        "mesh": _mesh_shape(mesh, params),
        "rng": _rng_json(rng),
        "has_opt_state": has_opt_state,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _check_params(params, cfg: ModelConfig, extra_params: Sequence[str]) -> None:
    """The tree must be what ``cfg`` describes, plus the top-level leaves a stage declares (a reward head)."""
    try:
        model.check_params({k: v for k, v in params.items() if k not in extra_params}, cfg)
    except ConfigError as e:
        raise CheckpointError(f"refusing to save: {e}") from e


class CheckpointManager:
    """Saves and restores the checkpoints of one run (``<run_dir>/checkpoints/<step>/``).

    keep_last: newest checkpoints kept (older ones are deleted); keep_every: additionally keep every step that
    is a multiple of it; async_save: ``save`` returns once arrays are copied to host, writing continues in the
    background (``wait`` blocks until it is durable).
    """

    def __init__(self, run_dir: str, *, keep_last: int = 3, keep_every: int | None = None, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(run_dir), CHECKPOINTS_DIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every, enable_async_checkpointing=async_save, create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

    def save(self, step: int, *, params, cfg: ModelConfig, stage: str, opt_state=None, data_state: dict | None = None,
             rng=None, stage_config: dict | None = None, tokenizer: dict | None = None, mesh=None,
             init_from: dict | None = None, extra_params: Sequence[str] = (), force: bool = False) -> bool:
        """Starts saving ``step``; False (nothing written) when that step already exists.

        init_from: where the run took its first parameters ({"path", "format", "step", "stage"}), recorded.
        extra_params: top-level entries of ``params`` that a stage adds to the Llama tree (e.g. "reward_head").
        force: save even where orbax's policy would skip (e.g. a step older than the newest one).
        """
        if step in self.all_steps():
            return False
        _check_params(params, cfg, extra_params)
        items = {
            "params": ocp.args.StandardSave(params),
            "metadata": ocp.args.JsonSave(_metadata(step, cfg, stage, stage_config, tokenizer, mesh, rng, params,
                                                    opt_state is not None, init_from, extra_params)),
        }
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if data_state is not None:
            items["data_state"] = ocp.args.JsonSave(_jsonable(data_state))
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        if not os.path.isdir(self.directory):
            return []
        steps = [int(name) for name in os.listdir(self.directory) if name.isdigit()]
        return sorted(s for s in steps if is_checkpoint_dir(self.step_dir(s)))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore(self, step: int | None = None, *, params_target=None, opt_state_target=None,
                params_only: bool = False) -> Restored:
        """A checkpoint (the latest complete one by default) restored onto the targets' shardings.

        Targets are trees of ``jax.ShapeDtypeStruct`` (with ``.sharding``) or arrays; None restores onto the
        default device. params_only: skip optimizer and data state (starting a new stage from this one).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        if not is_checkpoint_dir(self.step_dir(step)):
            raise CheckpointError(f"{self.step_dir(step)} is not a complete checkpoint; complete steps: "
                                  f"{self.all_steps()}")
        return restore_dir(self.step_dir(step), params_target=params_target, opt_state_target=opt_state_target,
                           params_only=params_only)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- reading one step directory ----------------------------------------------------------------------


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
    # Paths as plain names: orbax's metadata turns NamedTuples (optax states) into dicts.
    return {_path_str(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_target(saved, target, item: str, directory: str) -> None:
    """CheckpointError listing every leaf whose path or shape differs between checkpoint and target."""
    have, want = _leaf_shapes(saved), _leaf_shapes(target)
    problems = [f"missing in checkpoint: {k} {s}" for k, s in want.items() if k not in have]
    problems += [f"not in target: {k} {s}" for k, s in have.items() if k not in want]
    problems += [f"{k}: checkpoint has {have[k]}, target expects {s}"
                 for k, s in want.items() if k in have and have[k] != s]
    if problems:
        raise CheckpointError(f"{os.path.join(directory, item)} does not fit the requested {item}:\n  "
                              + "\n  ".join(problems[:20]) + (f"\n  ... {len(problems) - 20} more"
                                                              if len(problems) > 20 else ""))


def _default_target(saved):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)


def _as_target(tree):
    """Arrays -> ShapeDtypeStructs with their shardings (the default device for host arrays)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device), tree)


def restore_dir(directory: str, *, params_target=None, opt_state_target=None, params_only: bool = False) -> Restored:
    """Restores one complete step directory (see ``CheckpointManager.restore`` for the arguments)."""
    directory = os.path.abspath(directory)
    if not is_checkpoint_dir(directory):
        raise CheckpointError(f"{directory} is not a complete llama_jax checkpoint (needs params/, {_METADATA} and "
                              f"{_COMMIT_FILE})")
    metadata = read_metadata(directory)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_handlers()))
    saved = checkpointer.metadata(directory).item_metadata
    items = {}
    for item, target in (("params", params_target), ("opt_state", opt_state_target)):
        if item == "opt_state" and (params_only or not metadata.get("has_opt_state")):
            continue
        target = _default_target(saved[item].tree) if target is None else _as_target(target)
        _check_target(saved[item].tree, target, item, directory)
        items[item] = ocp.args.StandardRestore(target)
    restored = checkpointer.restore(directory, args=ocp.args.Composite(**items))
    data_state_file = os.path.join(directory, _DATA_STATE)
    data_state = None
    if not params_only and os.path.isfile(data_state_file):
        data_state = _read_json(data_state_file)
    params = restored["params"]
    if metadata.get("quantization"):
        params = quantized.rebuild(params)
    return Restored(step=int(metadata["step"]), params=params, opt_state=restored.get("opt_state"),
                    data_state=data_state, rng=_rng_from_json(metadata.get("rng")), metadata=metadata)


def read_metadata(directory: str) -> dict:
    """The metadata.json of a step directory, checked for a format version this library reads."""
    metadata = _read_json(os.path.join(directory, _METADATA))
    if metadata.get("format_version", 0) != FORMAT_VERSION:
        raise CheckpointError(f"{directory} has checkpoint format_version {metadata.get('format_version')}; this "
                              f"llama_jax reads version {FORMAT_VERSION}")
    return metadata


# --- any format in, any format out ----------------------------------------------------------------------


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
        f"{path} is neither a llama_jax checkpoint ({_METADATA} + params/, or checkpoints/), an HF model "
        f"(config.json + model.safetensors[.index.json]) nor a Meta one (params.json + consolidated.NN.pth)"
    )


def resolve_step_dir(path: str) -> str:
    """A step directory itself, or the newest complete step of a run directory."""
    if is_checkpoint_dir(path):
        return path
    run_checkpoints = os.path.join(path, CHECKPOINTS_DIR)
    steps = sorted((int(n) for n in os.listdir(run_checkpoints) if n.isdigit()), reverse=True)
    for step in steps:
        if is_checkpoint_dir(os.path.join(run_checkpoints, str(step))):
            return os.path.join(run_checkpoints, str(step))
    raise CheckpointError(f"no complete checkpoint in {run_checkpoints}")


def load(path: str, *, shardings=None, progress: Callable[[Iterable], Iterable] = iter
         ) -> tuple[Any, ModelConfig, dict]:
    """(params, config, metadata) from a llama_jax run or step directory, an HF directory or a Meta directory.

    shardings: None (default device), a ``jax.sharding.Mesh`` (parameters laid out by the logical-axis rules) or
    a tree of shardings matching the parameters. The config's ``scan_layers`` matches the tree's layout. For HF /
    Meta directories metadata is {"format", "path"}. ``progress`` wraps the list of weight files read.
    """
    fmt = detect_format(path)
    if fmt != "llama_jax":
        params, cfg = (hf_format if fmt == "hf" else meta_format).read(path, progress=progress)
        placement = None if shardings is None else _param_shardings(shardings, params, cfg)
        return jax.device_put(params, placement), cfg, {"format": fmt, "path": os.path.abspath(path)}
    step_dir = resolve_step_dir(path)
    metadata = read_metadata(step_dir)
    layout = metadata.get("param_layout")
    if layout not in LAYOUTS:
        raise CheckpointError(f"{step_dir}: param_layout {layout!r} is not one of {LAYOUTS}")
    cfg = ModelConfig.from_dict(metadata["model_config"]).replace(scan_layers=layout == "stacked")
    if shardings is None or metadata.get("quantization"):
        params = restore_dir(step_dir, params_only=True).params
        placement = None if shardings is None else _param_shardings(shardings, params, cfg)
        return jax.device_put(params, placement), cfg, metadata
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          model.param_shapes(cfg), _param_shardings(shardings, None, cfg))
    if metadata.get("extra_params") and isinstance(shardings, jax.sharding.Mesh):  # a stage's own leaves (a
        saved = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_handlers())).metadata(step_dir)  # reward head)
        replicated = jax.sharding.NamedSharding(shardings, jax.sharding.PartitionSpec())
        for name in metadata["extra_params"]:
            target[name] = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                                        saved.item_metadata["params"].tree[name])
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
    metadata = _metadata(0, cfg, stage, stage_config, tokenizer, None, None, params, False,
                         extra_params=extra_params)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_handlers()))
    checkpointer.save(os.path.abspath(path), args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(metadata)))


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


def export(path: str, fmt: str, params, cfg: ModelConfig, *, tokenizer: dict | None = None, num_shards: int = 1,
           max_shard_bytes: int = hf_format.DEFAULT_SHARD_BYTES, progress: Callable[[Iterable], Iterable] = iter,
           ) -> None:
    """Writes ``params`` in format ``fmt`` (one of FORMATS) to the new directory ``path``, atomically.

    ``num_shards``: Meta model-parallel ranks. ``max_shard_bytes``: size of HF safetensors shards. ``tokenizer``:
    identity recorded in a llama_jax checkpoint.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown weight format {fmt!r}; known: {FORMATS}")
    if fmt != "llama_jax" and quantized.mode_of(params) is not None:
        raise CheckpointError(f"a {quantized.mode_of(params)}-quantized checkpoint cannot be exported to {fmt}: "
                              "export the unquantized checkpoint instead")
    with atomic_directory(path) as tmp:
        if fmt == "llama_jax":
            save_params(tmp, params, cfg, tokenizer=tokenizer)
            return
        if not cfg.scan_layers:
            params, cfg = model.stack_layers(params, cfg.num_layers), cfg.replace(scan_layers=True)
        os.makedirs(tmp)
        if fmt == "hf":
            hf_format.write(tmp, params, cfg, max_shard_bytes=max_shard_bytes, progress=progress)
        else:
            meta_format.write(tmp, params, cfg, num_shards=num_shards, progress=progress)
