"""Reading one step directory back: its arrays onto the shardings asked for, verified against its checksums.

    restored = restore_dir(step_dir, params_target=abstract_params, opt_state_target=abstract_opt_state)

Targets are trees of ``jax.ShapeDtypeStruct`` carrying the shardings wanted (for params on another mesh,
``sharding.abstract_params(cfg, mesh)``): orbax reads only each device's slices. Arrays are verified as they were
written, then cast to the targets' dtypes. Whatever says the files are damaged is a ``CorruptCheckpointError``, on
every process at once (docs/recovery.md); a sound checkpoint that does not fit the targets is a ``CheckpointError``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llama_jax.checkpoint import checksums
from llama_jax.checkpoint.format import (
    check_structure,
    orbax_checkpointer,
    read_data_state,
    rng_from_json,
    verify_tree,
)
from llama_jax.errors import CheckpointError, CorruptCheckpointError
from llama_jax.ops import quantized

# Orbax reports truncated, garbled or missing files with anything from tensorstore's ValueErrors and JSON errors to
# bare Exceptions; only runtime errors (out of memory, a failing device) say nothing about the files.
_NOT_ABOUT_FILES = (RuntimeError, MemoryError)


@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any  # None when params_only or the checkpoint has none
    data_state: dict | None
    rng: jax.Array | None
    metadata: dict
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # newer steps that did not verify


def restore_dir(directory: str, *, params_target=None, opt_state_target=None, params_only: bool = False) -> Restored:
    """Restores one step directory and verifies it (see ``CheckpointManager.restore`` for the arguments).

    Raises CorruptCheckpointError when the directory is incomplete, an item is missing or unreadable, or a
    checksum differs; CheckpointError when it is fine but does not fit the targets.
    """
    directory = os.path.abspath(directory)
    metadata = check_structure(directory)
    checkpointer = orbax_checkpointer()
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
        verify_tree(metadata, item, restored[item], directory)
    data_state = None if params_only else read_data_state(directory, metadata)
    params = _cast_to(restored["params"], params_target)
    if metadata.get("quantization"):
        params = quantized.rebuild(params)
    opt_state = _cast_to(restored["opt_state"], opt_state_target) if "opt_state" in items else None
    return Restored(step=int(metadata["step"]), params=params, opt_state=opt_state, data_state=data_state,
                    rng=rng_from_json(metadata.get("rng")), metadata=metadata)


def saved_tree(directory: str, item: str):
    """The shapes and dtypes of item ``item`` as orbax recorded them (reads no array)."""
    checkpointer = orbax_checkpointer()
    return _read_item(lambda: checkpointer.metadata(directory).item_metadata[item].tree, directory,
                      f"{item}/_METADATA")


def _on_any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (every process calls it)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


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


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
    # Paths as plain names: orbax's metadata turns NamedTuples (optax states) into dicts.
    return {checksums.leaf_path(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


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
    dtypes = {checksums.leaf_path(p): m.dtype for p, m in jax.tree_util.tree_leaves_with_path(saved)}  # target may
    return jax.tree_util.tree_map_with_path(  # hold NamedTuples where orbax's metadata has dicts: match by path
        lambda p, x: jax.ShapeDtypeStruct(x.shape, dtypes[checksums.leaf_path(p)],
                                          sharding=getattr(x, "sharding", None) or device), target)


def _cast_to(restored, target):
    if target is None:
        return restored
    return jax.tree.map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype), restored, target)
