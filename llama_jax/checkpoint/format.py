"""The llama_jax checkpoint: one orbax format for every stage; ``load`` and ``export`` for every weight format.

A training run keeps its checkpoints under ``<run_dir>/checkpoints/``, one directory per step:

    <run_dir>/checkpoints/<step>/
        params/                       the parameter tree of model.py's docstring (orbax PyTree, OCDBT)
        opt_state/                    optimizer state; absent in params-only / exported checkpoints
        metadata/metadata.json        format_version, llama_jax_version, step, stage, stage_config,
                                      model_config (ModelConfig.to_dict), param_layout ("stacked" | "per_layer"),
                                      quantization (null | "fp8" | "int8"), tokenizer {name, sha256},
                                      mesh {axis: size} it was saved from, rng {impl, key_data}, has_opt_state,
                                      items saved, healthy, integrity (checksums), metadata_sha256
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

Integrity: metadata.json records a checksum of every saved array (``llama_jax.checksums``, computed on the devices
that hold it), the sha256 of the data state, the items saved, and the sha256 of metadata.json itself. Every
restore (training or ``load``) verifies what it read against them; a step that does not verify, or lacks an item,
or whose files orbax cannot read, raises ``CorruptCheckpointError``. ``CheckpointManager.restore()`` and ``load(run
dir)`` then fall back to the newest step that verifies and report the ones they skipped; nothing unverified is
used silently (checkpoints written before checksums existed load with a warning). The run's writer moves a step
that failed aside (``set_aside``: ``<step>.corrupt-<time>``, kept for inspection) so that it can save that step
again. Checksums cost one read of the state in device memory per save and per restore (benchmarks/checksums.py).

Retention: after each save is durable, the manager deletes the checkpoints no rule keeps. It keeps the newest
``keep_last`` (>= 1) intact steps, every multiple of ``keep_every``, and always the newest *healthy* one: a
checkpoint is healthy unless every step since the previous checkpoint was skipped as non-finite (``save(...,
healthy=False)``), so a run stuck skipping steps can never rotate away the last state it trained from. Only intact
steps (complete, metadata verified, every item present) count; deletion renames a step away before removing it.

Restoring onto another mesh: pass targets of ``jax.ShapeDtypeStruct`` carrying the new shardings (for
params, ``sharding.abstract_params(cfg, mesh)``); orbax reads only each device's slices.

    manager = CheckpointManager(run_dir, keep_last=3, keep_every=1000)
    manager.save(step, params=params, cfg=cfg, stage="pretrain", opt_state=opt_state, data_state=it_state)
    restored = manager.restore(params_target=abstract_params, opt_state_target=abstract_opt_state)
    params, cfg, metadata = load("Meta-Llama-3.1-8B/")    # llama_jax run/step dir, HF dir or Meta dir
    export("out-hf/", "hf", params, cfg, tokenizer=tok)       # hf | meta | llama_jax, atomically

Every format keeps the tokenizer's identity and ``max_seq_len``: llama_jax metadata records them, HF and Meta
directories carry them in ``llama_jax.json`` (``formats.provenance``), and an HF export adds the tokenizer's own
files. ``load`` reports the tokenizer as ``metadata["tokenizer"]`` ({"name", "sha256"} or None when unknown) for
every format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

import llama_jax
from llama_jax import model, sharding
from llama_jax.checkpoint import checksums
from llama_jax.config import ModelConfig
from llama_jax.errors import CheckpointError, ConfigError, CorruptCheckpointError
from llama_jax.formats import hf as hf_format
from llama_jax.formats import meta as meta_format
from llama_jax.formats import provenance
from llama_jax.ops import quantized
from llama_jax.tokenizer import Tokenizer

FORMAT_VERSION = 2
FORMATS = ("hf", "meta", "llama_jax")
LAYOUTS = ("stacked", "per_layer")
CHECKPOINTS_DIR = "checkpoints"
_COMMIT_FILE = "commit_success.txt"  # orbax's completion marker (atomicity_types.COMMIT_SUCCESS_FILE)
_METADATA = os.path.join("metadata", "metadata.json")
_DATA_STATE = os.path.join("data_state", "data_state.json")
_SELF_SUM = "metadata_sha256"  # metadata.json's own checksum (over every other key)
# Orbax reports truncated, garbled or missing files with anything from tensorstore's ValueErrors and JSON errors to
# bare Exceptions; only runtime errors (out of memory, a failing device) say nothing about the files.
_NOT_ABOUT_FILES = (RuntimeError, MemoryError)


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
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # newer steps that did not verify


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _sha256(value: Any) -> str:
    """sha256 of a JSON value in one canonical spelling (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


def _metadata(step: int, cfg: ModelConfig, stage: str, stage_config, tokenizer, mesh, rng, params, *,
              opt_state=None, data_state: dict | None = None, init_from: dict | None = None,
              extra_params: Sequence[str] = (), healthy: bool = True) -> dict:
    """metadata.json of a step: what it is, and the checksums of everything saved beside it (sealed by its own)."""
    trees = {"params": params} if opt_state is None else {"params": params, "opt_state": opt_state}
    integrity = {"algorithm": checksums.ALGORITHM, **{k: checksums.tree_checksums(t) for k, t in trees.items()}}
    if data_state is not None:
        integrity["data_state"] = _sha256(data_state)
    metadata = {
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
        "has_opt_state": opt_state is not None,
        "items": sorted([*trees, *(["data_state"] if data_state is not None else [])]),
        "healthy": bool(healthy),
        "integrity": integrity,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return {**metadata, _SELF_SUM: _sha256(metadata)}


def _check_params(params, cfg: ModelConfig, extra_params: Sequence[str]) -> None:
    """The tree must be what ``cfg`` describes, plus the top-level leaves a stage declares (a reward head)."""
    try:
        model.check_params({k: v for k, v in params.items() if k not in extra_params}, cfg)
    except ConfigError as e:
        raise CheckpointError(f"refusing to save: {e}") from e


class CheckpointManager:
    """Saves and restores the checkpoints of one run (``<run_dir>/checkpoints/<step>/``).

    keep_last: newest intact checkpoints kept (>= 1); keep_every: additionally keep every step that is a multiple
    of it; the newest healthy checkpoint is always kept (see the module docstring). async_save: ``save`` returns
    once arrays are copied to host, writing continues in the background (``wait`` blocks until it is durable).
    One run writes a run directory at a time (``llama_jax.train.lock``); any number may read it.
    """

    def __init__(self, run_dir: str, *, keep_last: int = 3, keep_every: int | None = None, async_save: bool = True):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be an int >= 1 (the newest checkpoints kept), got "
                              f"{keep_last!r}")
        if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
            raise ConfigError(f"checkpoint.keep_every must be an int >= 1 or 0/None (off), got {keep_every!r}")
        self.directory = os.path.join(os.path.abspath(run_dir), CHECKPOINTS_DIR)
        self.keep_last, self.keep_every, self.async_save = keep_last, keep_every, async_save
        self._checkpointer = ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler(**_handlers()))
        self._in_flight: int | None = None  # the step being written in the background

    def save(self, step: int, *, params, cfg: ModelConfig, stage: str, opt_state=None, data_state: dict | None = None,
             rng=None, stage_config: dict | None = None, tokenizer: dict | None = None, mesh=None,
             init_from: dict | None = None, extra_params: Sequence[str] = (), healthy: bool = True) -> bool:
        """Starts saving ``step``; False (nothing written) when that step is already saved or being saved.

        init_from: where the run took its first parameters ({"path", "format", "step", "stage"}), recorded.
        extra_params: top-level entries of ``params`` that a stage adds to the Llama tree (e.g. "reward_head").
        healthy: False when every step since the previous checkpoint was skipped as non-finite (retention keeps
        the newest healthy checkpoint whatever keep_last says).
        Every process calls it (the checksums and the write are collective).
        """
        if step == self._in_flight or step in self.all_steps():
            return False
        _check_params(params, cfg, extra_params)
        data_state = None if data_state is None else _jsonable(data_state)
        metadata = _metadata(step, cfg, stage, stage_config, tokenizer, mesh, rng, params, opt_state=opt_state,
                             data_state=data_state, init_from=init_from, extra_params=extra_params, healthy=healthy)
        items = {"params": ocp.args.StandardSave(params), "metadata": ocp.args.JsonSave(metadata)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if data_state is not None:
            items["data_state"] = ocp.args.JsonSave(data_state)
        self.wait()  # the previous save is durable, and rotated, before this one starts
        if os.path.exists(self.step_dir(step)):  # an incomplete leftover (see all_steps) would block the write
            _warn(f"{self.step_dir(step)} is an incomplete checkpoint; moved to {self.set_aside(step, 'incomplete')}")
        os.makedirs(self.directory, exist_ok=True)
        self._checkpointer.save(self.step_dir(step), args=ocp.args.Composite(**items))
        self._in_flight = step
        if not self.async_save:
            self.wait()
        return True

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return [s for s in self.present_steps() if is_checkpoint_dir(self.step_dir(s))]

    def present_steps(self) -> list[int]:
        """Every step directory on disk, complete or not, ascending."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore(self, step: int | None = None, *, params_target=None, opt_state_target=None,
                params_only: bool = False) -> Restored:
        """A checkpoint restored onto the targets' shardings and verified against its checksums.

        ``step`` None: the newest step that verifies; newer step directories that do not (incomplete, corrupt) are
        listed in ``Restored.skipped`` with the reason, for the caller to report (and ``set_aside``).
        Targets are trees of ``jax.ShapeDtypeStruct`` (with ``.sharding``) or arrays; None restores onto the
        default device. params_only: skip optimizer and data state (starting a new stage from this one).
        """
        kwargs = dict(params_target=params_target, opt_state_target=opt_state_target, params_only=params_only)
        if step is not None:
            if not is_checkpoint_dir(self.step_dir(step)):
                raise CheckpointError(f"{self.step_dir(step)} is not a complete checkpoint; complete steps: "
                                      f"{self.all_steps()}")
            return restore_dir(self.step_dir(step), **kwargs)
        skipped = []
        for candidate in reversed(self.present_steps()):
            try:
                restored = restore_dir(self.step_dir(candidate), **kwargs)
            except CorruptCheckpointError as e:
                skipped.append((candidate, str(e)))
                continue
            restored.skipped = skipped
            return restored
        if skipped:
            raise CorruptCheckpointError(f"no checkpoint in {self.directory} verifies:\n  "
                                         + "\n  ".join(why for _, why in skipped))
        raise CheckpointError(f"no complete checkpoint in {self.directory}")

    def set_aside(self, step: int, why: str) -> str:
        """Renames step directory ``step`` to ``<step>.<why>-<time>`` (kept for inspection, out of every step
        list) and returns the new path. Process 0 renames; every process calls it."""
        new = f"{self.step_dir(step)}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            os.rename(self.step_dir(step), new)
        _sync("llama_jax_set_aside")
        return new

    def remove_leftovers(self) -> list[str]:
        """Deletes what interrupted writes left (orbax temporary directories, half-deleted steps); returns their
        names. Only the run's one writer may call it: another writer's save in progress looks the same."""
        if not os.path.isdir(self.directory):
            return []
        names = [n for n in os.listdir(self.directory) if ".orbax-checkpoint-tmp" in n or ".deleting-" in n]
        if jax.process_index() == 0:
            for name in names:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        _sync("llama_jax_remove_leftovers")
        return names

    def wait(self) -> None:
        """Blocks until the save in flight is durable, then applies the retention rule."""
        step, self._in_flight = self._in_flight, None
        try:
            self._checkpointer.wait_until_finished()
        except Exception as e:  # orbax re-raises whatever failed in the background write (disk full, ...)
            raise CheckpointError(f"writing checkpoint {self.step_dir(step)} failed: {e}") from e
        if step is not None:
            self._rotate()

    def _rotate(self) -> None:
        if jax.process_index() != 0:
            return
        intact = {}
        for step in self.all_steps():
            try:
                intact[step] = check_structure(self.step_dir(step))
            except CheckpointError:  # not counted, not deleted: resume reports it
                continue
        steps = sorted(intact)
        keep = set(steps[-self.keep_last:])
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        keep |= set([s for s in steps if intact[s].get("healthy", True)][-1:])
        for step in steps:
            if step not in keep:
                doomed = f"{self.step_dir(step)}.deleting-{uuid.uuid4().hex[:8]}"
                os.rename(self.step_dir(step), doomed)  # never a half-deleted step that looks complete
                shutil.rmtree(doomed, ignore_errors=True)

    def close(self) -> None:
        self.wait()
        self._checkpointer.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _on_any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (every process calls it)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


# --- reading one step directory ----------------------------------------------------------------------


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"cannot read {path}: {e}") from e


_path_str = checksums.leaf_path


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


def _restore_target(saved, target):
    """ShapeDtypeStructs with the target's shardings (the default device where there is none) and the *saved*
    dtypes: arrays are verified as they were written, then cast (``_cast_to``)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if target is None:
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    dtypes = {_path_str(p): m.dtype for p, m in jax.tree_util.tree_leaves_with_path(saved)}  # target may hold
    return jax.tree_util.tree_map_with_path(  # NamedTuples where orbax's metadata has dicts: match by path
        lambda p, x: jax.ShapeDtypeStruct(x.shape, dtypes[_path_str(p)], sharding=getattr(x, "sharding", None)
                                          or device), target)


def _cast_to(restored, target):
    if target is None:
        return restored
    return jax.tree.map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype), restored, target)


def check_structure(directory: str) -> dict:
    """The metadata of a complete step directory whose metadata verifies and whose items are all present;
    CorruptCheckpointError naming what is missing or altered otherwise. Reads no array."""
    if not is_checkpoint_dir(directory):
        missing = [name for name in (_COMMIT_FILE, "params", _METADATA)
                   if not os.path.exists(os.path.join(directory, name))]
        raise CorruptCheckpointError(f"{directory} is not a complete checkpoint (no {', '.join(missing)}): an "
                                     "interrupted save, or files deleted since")
    metadata = read_metadata(directory)
    expected = metadata.get(_SELF_SUM)
    if expected is not None and expected != _sha256({k: v for k, v in metadata.items() if k != _SELF_SUM}):
        raise CorruptCheckpointError(f"{os.path.join(directory, _METADATA)} was altered after it was written "
                                     f"(its {_SELF_SUM} does not match)")
    for item in metadata.get("items", ["params"]):
        if not os.path.isdir(os.path.join(directory, item)) or not os.listdir(os.path.join(directory, item)):
            raise CorruptCheckpointError(f"{directory} lacks its {item}/ item (saved with it): deleted or truncated")
        if item in ("params", "opt_state"):
            _read_json(os.path.join(directory, item, "_METADATA"))  # orbax's tree of the item: names it if damaged
    return metadata


def _read_item(read, directory: str, what: str):
    """``read()``, with what orbax raises on damaged files turned into CorruptCheckpointError; every process
    learns whether any process failed, so all of them skip the step together."""
    try:
        result, error = read(), None
    except _NOT_ABOUT_FILES:
        raise
    except Exception as e:  # see _NOT_ABOUT_FILES
        result, error = None, e
    if _on_any_process(error is not None):
        detail = "another process could not read it"
        if error is not None:
            detail = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            arrays = re.findall(r"'path': '([^'/][^']*)/'", str(error))  # tensorstore names the array it read
            detail = f"array {arrays[-1]}: {detail}" if arrays else detail
        raise CorruptCheckpointError(f"{directory}: cannot read {what} ({detail})")
    return result


def _verify(metadata: dict, item: str, tree, directory: str) -> None:
    integrity = metadata.get("integrity")
    if integrity is None:
        _warn(f"{directory} records no checksums (saved by an older llama_jax): {item} restored unverified")
        return
    if integrity.get("algorithm") != checksums.ALGORITHM:
        raise CheckpointError(f"{directory}: checksum algorithm {integrity.get('algorithm')!r} is not "
                              f"{checksums.ALGORITHM!r}, the one this llama_jax computes")
    bad = checksums.mismatches(integrity[item], checksums.tree_checksums(tree))
    if bad:
        raise CorruptCheckpointError(f"{os.path.join(directory, item)}: {len(bad)} array(s) differ from what was "
                                     f"saved (checksum mismatch): {', '.join(bad[:8])}"
                                     + (f" and {len(bad) - 8} more" if len(bad) > 8 else ""))


def restore_dir(directory: str, *, params_target=None, opt_state_target=None, params_only: bool = False) -> Restored:
    """Restores one step directory and verifies it (see ``CheckpointManager.restore`` for the arguments).

    Raises CorruptCheckpointError when the directory is incomplete, an item is missing or unreadable, or a
    checksum differs; CheckpointError when it is fine but does not fit the targets.
    """
    directory = os.path.abspath(directory)
    metadata = check_structure(directory)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_handlers()))
    saved = _read_item(lambda: checkpointer.metadata(directory).item_metadata, directory, "orbax's item metadata")
    wanted = {"params": params_target}
    if not params_only and metadata.get("has_opt_state"):
        wanted["opt_state"] = opt_state_target
    items = {}
    for item, target in wanted.items():
        tree = _read_item(lambda item=item: saved[item].tree, directory, f"{item}/_METADATA")
        if target is not None:
            _check_target(tree, target, item, directory)
        items[item] = ocp.args.StandardRestore(_restore_target(tree, target))
    restored = {item: _read_item(lambda item=item: checkpointer.restore(directory, args=ocp.args.Composite(
        **{item: items[item]}))[item], directory, f"{item}/") for item in items}
    for item in items:
        _verify(metadata, item, restored[item], directory)
    data_state = None
    if not params_only and "data_state" in metadata.get("items", ["data_state"]):
        data_state_file = os.path.join(directory, _DATA_STATE)
        if os.path.isfile(data_state_file) or "items" in metadata:
            data_state = _read_json(data_state_file)
            expected = (metadata.get("integrity") or {}).get("data_state")
            if expected is not None and expected != _sha256(data_state):
                raise CorruptCheckpointError(f"{data_state_file} differs from what was saved (sha256 mismatch)")
    params = _cast_to(restored["params"], params_target)
    if metadata.get("quantization"):
        params = quantized.rebuild(params)
    opt_state = _cast_to(restored["opt_state"], opt_state_target) if "opt_state" in items else None
    return Restored(step=int(metadata["step"]), params=params, opt_state=opt_state, data_state=data_state,
                    rng=_rng_from_json(metadata.get("rng")), metadata=metadata)


def read_metadata(directory: str) -> dict:
    """The metadata.json of a step directory, checked for a format version this library reads."""
    metadata = _read_json(os.path.join(directory, _METADATA))
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(f"{os.path.join(directory, _METADATA)} holds {type(metadata).__name__}, "
                                     "not an object")
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


def load(path: str, *, shardings=None, progress: Callable[[Iterable], Iterable] = iter
         ) -> tuple[Any, ModelConfig, dict]:
    """(params, config, metadata) from a llama_jax run or step directory, an HF directory or a Meta directory.

    shardings: None (default device), a ``jax.sharding.Mesh`` (parameters laid out by the logical-axis rules) or
    a tree of shardings matching the parameters. The config's ``scan_layers`` matches the tree's layout. For HF /
    Meta directories metadata is {"format", "path", "tokenizer"}. ``progress`` wraps the list of weight files read.
    """
    fmt = detect_format(path)
    if fmt != "llama_jax":
        params, cfg = (hf_format if fmt == "hf" else meta_format).read(path, progress=progress)
        placement = None if shardings is None else _param_shardings(shardings, params, cfg)
        metadata = {"format": fmt, "path": os.path.abspath(path), "tokenizer": provenance.tokenizer_identity(path, cfg)}
        return jax.device_put(params, placement), cfg, metadata
    if is_checkpoint_dir(path):
        return _load_step(os.path.abspath(path), shardings)
    run_checkpoints = os.path.join(os.path.abspath(path), CHECKPOINTS_DIR)
    steps = sorted((int(n) for n in os.listdir(run_checkpoints) if n.isdigit()), reverse=True)
    problems = []
    for step in steps:
        try:
            loaded = _load_step(os.path.join(run_checkpoints, str(step)), shardings)
        except CorruptCheckpointError as e:
            problems.append(str(e))
            continue
        for problem in problems:
            _warn(f"{problem}\n  skipped; loaded step {step}, the newest checkpoint of {path} that verifies")
        return loaded
    if problems:
        raise CorruptCheckpointError(f"no checkpoint in {run_checkpoints} verifies:\n  " + "\n  ".join(problems))
    raise CheckpointError(f"no complete checkpoint in {run_checkpoints}")


def _load_step(step_dir: str, shardings) -> tuple[Any, ModelConfig, dict]:
    metadata = check_structure(step_dir)
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
        checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_handlers()))  # reward head)
        saved = _read_item(lambda: checkpointer.metadata(step_dir).item_metadata["params"].tree, step_dir,
                           "params/_METADATA")
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
    metadata = _metadata(0, cfg, stage, stage_config, tokenizer, None, None, params, extra_params=extra_params)
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
