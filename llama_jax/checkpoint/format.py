"""The llama_jax checkpoint format: what one step directory holds, and how it is written, read and checked.

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

(orbax gives every item its own directory, hence ``metadata/metadata.json`` rather than a bare file.) The parameter
layout is recorded, never guessed from keys: "stacked" (per-layer leaves under ``layers`` with a leading L axis;
what training saves) or "per_layer" (``layers_0 ...``; quantized inference trees).

orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it once every item is durable. A step is
*complete* with ``commit_success.txt``, ``params/`` and ``metadata/metadata.json``; *intact* when, besides, its
metadata is unaltered and every item present (``check_structure``); and it *verifies* when every array and the data
state are what metadata.json records (``verify_tree``, ``read_data_state``). What each command does with a step
that does not, and why: docs/recovery.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import llama_jax
from llama_jax.checkpoint import checksums
from llama_jax.config import ModelConfig
from llama_jax.errors import CheckpointError, CorruptCheckpointError
from llama_jax.ops import quantized

FORMAT_VERSION = 2
LAYOUTS = ("stacked", "per_layer")
CHECKPOINTS_DIR = "checkpoints"
METADATA_FILE = os.path.join("metadata", "metadata.json")
_COMMIT_FILE = "commit_success.txt"  # orbax's completion marker (atomicity_types.COMMIT_SUCCESS_FILE)
_DATA_STATE = os.path.join("data_state", "data_state.json")
_SELF_SUM = "metadata_sha256"  # metadata.json's own checksum (over every other key)

def orbax_checkpointer(*, background: bool = False) -> ocp.AbstractCheckpointer:
    """orbax's writer and reader of a step directory's items; ``background``: a save goes on after ``save``
    returns (``wait_until_finished`` blocks until it is durable)."""
    handler = ocp.CompositeCheckpointHandler(
        params=ocp.StandardCheckpointHandler(),
        opt_state=ocp.StandardCheckpointHandler(),
        metadata=ocp.JsonCheckpointHandler(filename="metadata.json"),
        data_state=ocp.JsonCheckpointHandler(filename="data_state.json"),
    )
    return ocp.AsyncCheckpointer(handler) if background else ocp.Checkpointer(handler)


def save_args(params, metadata: dict, *, opt_state=None, data_state: dict | None = None) -> ocp.args.Composite:
    """The items of one step directory, for ``orbax_checkpointer().save``."""
    items = {"params": ocp.args.StandardSave(params), "metadata": ocp.args.JsonSave(metadata)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    if data_state is not None:
        items["data_state"] = ocp.args.JsonSave(data_state)
    return ocp.args.Composite(**items)


def warn(message: str) -> None:
    """``warning: message`` on stderr, once per job (process 0)."""
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _sha256(value: Any) -> str:
    """sha256 of a JSON value in one canonical spelling (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"cannot read {path}: {e}") from e


def jsonable(x: Any) -> Any:
    """Experiment configs (ConfigDicts, tuples, numpy scalars) as plain JSON values."""
    if isinstance(x, Mapping) or hasattr(x, "to_dict"):
        items = x.to_dict() if hasattr(x, "to_dict") else x
        return {str(k): jsonable(v) for k, v in items.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


# --- metadata.json ------------------------------------------------------------------------------------------


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


def rng_from_json(d: dict | None):
    """The RNG key a metadata.json records (None when it records none)."""
    if d is None:
        return None
    data = np.asarray(d["key_data"], np.uint32)
    return jax.numpy.asarray(data) if d["impl"] is None else jax.random.wrap_key_data(data, impl=d["impl"])


def make_metadata(step: int, cfg: ModelConfig, stage: str, stage_config, tokenizer, mesh, rng, params, *,
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
        "stage_config": jsonable(stage_config),
        "model_config": jsonable(cfg.to_dict()),
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


def read_metadata(directory: str) -> dict:
    """The metadata.json of a step directory, checked for a format version this library reads."""
    metadata = _read_json(os.path.join(directory, METADATA_FILE))
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(f"{os.path.join(directory, METADATA_FILE)} holds {type(metadata).__name__}, "
                                     "not an object")
    if metadata.get("format_version", 0) != FORMAT_VERSION:
        raise CheckpointError(f"{directory} has checkpoint format_version {metadata.get('format_version')}; this "
                              f"llama_jax reads version {FORMAT_VERSION}")
    return metadata


# --- checks -------------------------------------------------------------------------------------------------


def is_checkpoint_dir(path: str) -> bool:
    """True for a complete step directory (see the module docstring)."""
    return (os.path.isfile(os.path.join(path, _COMMIT_FILE)) and os.path.isdir(os.path.join(path, "params"))
            and os.path.isfile(os.path.join(path, METADATA_FILE)))


def check_structure(directory: str) -> dict:
    """The metadata of a complete step directory whose metadata verifies and whose items are all present;
    CorruptCheckpointError naming what is missing or altered otherwise. Reads no array."""
    if not is_checkpoint_dir(directory):
        missing = [name for name in (_COMMIT_FILE, "params", METADATA_FILE)
                   if not os.path.exists(os.path.join(directory, name))]
        raise CorruptCheckpointError(f"{directory} is not a complete checkpoint (no {', '.join(missing)}): an "
                                     "interrupted save, or files deleted since")
    metadata = read_metadata(directory)
    expected = metadata.get(_SELF_SUM)
    if expected is not None and expected != _sha256({k: v for k, v in metadata.items() if k != _SELF_SUM}):
        raise CorruptCheckpointError(f"{os.path.join(directory, METADATA_FILE)} was altered after it was written "
                                     f"(its {_SELF_SUM} does not match)")
    for item in metadata.get("items", ["params"]):
        if not os.path.isdir(os.path.join(directory, item)) or not os.listdir(os.path.join(directory, item)):
            raise CorruptCheckpointError(f"{directory} lacks its {item}/ item (saved with it): deleted or truncated")
        if item in ("params", "opt_state"):
            _read_json(os.path.join(directory, item, "_METADATA"))  # orbax's tree of the item: names it if damaged
    return metadata


def verify_tree(metadata: dict, item: str, tree, directory: str) -> None:
    """CorruptCheckpointError naming the arrays of ``tree`` (item ``item`` as read back) whose checksums differ
    from those ``metadata`` records; a warning when it records none (saved by an older llama_jax)."""
    integrity = metadata.get("integrity")
    if integrity is None:
        warn(f"{directory} records no checksums (saved by an older llama_jax): {item} restored unverified")
        return
    if integrity.get("algorithm") != checksums.ALGORITHM:
        raise CheckpointError(f"{directory}: checksum algorithm {integrity.get('algorithm')!r} is not "
                              f"{checksums.ALGORITHM!r}, the one this llama_jax computes")
    bad = checksums.mismatches(integrity[item], checksums.tree_checksums(tree))
    if bad:
        raise CorruptCheckpointError(f"{os.path.join(directory, item)}: {len(bad)} array(s) differ from what was "
                                     f"saved (checksum mismatch): {', '.join(bad[:8])}"
                                     + (f" and {len(bad) - 8} more" if len(bad) > 8 else ""))


def read_data_state(directory: str, metadata: dict) -> dict | None:
    """The data state saved in a step directory (None when it has none), checked against its sha256."""
    if "data_state" not in metadata.get("items", ["data_state"]):
        return None
    path = os.path.join(directory, _DATA_STATE)
    if not os.path.isfile(path) and "items" not in metadata:
        return None
    data_state = _read_json(path)
    expected = (metadata.get("integrity") or {}).get("data_state")
    if expected is not None and expected != _sha256(data_state):
        raise CorruptCheckpointError(f"{path} differs from what was saved (sha256 mismatch)")
    return data_state

