"""Device meshes, the one table of logical-axis rules, and trees of logical axes -> shardings. Knows no model.

    mesh = make_mesh("data=2,fsdp=2,tensor=2")         # 8 devices; missing axes are 1
    shardings = logical_to_sharding(logical_axes, mesh) # e.g. model.logical_axes(cfg) -> NamedShardings
    batch = shard_batch(numpy_batch, mesh)              # process-local rows -> global arrays
    with activate(mesh):                                # the model's activation constraints use the rules
        loss = jax.jit(loss_fn)(params, batch)

Mesh axes: ``data`` (pure data parallel: params replicated), ``pipeline`` (pipeline parallelism: the stacked
``layers`` axis of the params split into consecutive blocks; ``llama_jax.parallel.pipeline`` runs them), ``fsdp`` (data
parallel with params, grads and optimizer state sharded along ``embed``), ``tensor`` (heads, kv heads, MLP and
vocab split across devices), ``sequence`` (activations split along length; attention then runs context-parallel).

Axis types: every mesh here uses ``AxisType.Auto`` (classic GSPMD): we give shardings for the jit inputs
/ outputs and a few activation constraints inside the model, and XLA propagates the rest and inserts the
collectives. (jax 0.10's ``jax.make_mesh`` would default to Explicit axes, so we build ``Mesh`` directly.)
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import sys
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llama_jax.errors import ConfigError, DataError

# Outermost (slowest links) first: mesh_utils gives the last axes the closest devices.
MESH_AXES = ("data", "pipeline", "fsdp", "tensor", "sequence")
# Old spellings of mesh axes, still read for one release (mesh specs, and the mesh a checkpoint recorded).
RENAMED_AXES = {"stage": "pipeline"}

# Logical name -> mesh axes, in priority order (flax semantics: a mesh axis is used at most once per array,
# so the first rule that can claim it wins). Activations [batch, length, embed] give `fsdp` to batch, which
# leaves embed unsharded; parameters have no batch axis, so there `embed` is the FSDP-sharded dimension.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("lookup_batch", "data"),  # embedding lookup output: rows over data only, embed split like the table's
    ("layers", "pipeline"),  # each pipeline rank holds its own consecutive layers
    ("head_dim", None),
    ("lora_rank", None),  # an adapter's rank: a few columns, never split
)

_BATCH_SPEC = PartitionSpec(("data", "fsdp"), "sequence")


@functools.cache  # once per process: a run parses its mesh many times
def _say_renamed(old: str, new: str) -> None:
    print(f"deprecated: mesh axis {old} -> use {new}", file=sys.stderr)


def parse_mesh(spec: str | Mapping[str, int] | None, num_devices: int | None = None) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` or ``{"tensor": 2}`` -> sizes of all five axes, their product = num_devices.

    Missing axes are 1; one axis may be -1 and takes what is left; None puts every device on fsdp. An axis's old
    name (RENAMED_AXES: ``stage=``, also in the mesh an older checkpoint recorded) still works and says so on stderr.
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    if spec is None or spec == "":
        spec = {"fsdp": -1}
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for part in spec.split(","):
            match = re.fullmatch(r"\s*(\w+)\s*=\s*(-?\d+)\s*", part)
            if not match:
                raise ConfigError(f"mesh spec {spec!r}: cannot parse {part!r}; expected e.g. 'data=2,fsdp=4'")
            if match[1] in sizes:
                raise ConfigError(f"mesh spec {spec!r} names axis {match[1]!r} twice")
            sizes[match[1]] = int(match[2])
    else:
        sizes = {str(k): int(v) for k, v in dict(spec).items()}
    for old, new in RENAMED_AXES.items():
        if old in sizes:
            if new in sizes:
                raise ConfigError(f"mesh spec {spec!r} names axis {new!r} twice (once by its old name {old!r})")
            _say_renamed(old, new)
            sizes[new] = sizes.pop(old)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh spec {spec!r} has unknown axis name(s) {unknown}; axes are {MESH_AXES}")
    bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
    if bad or list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"mesh spec {spec!r}: sizes must be positive, with at most one -1; got {sizes}")
    shape = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    known = math.prod(v for v in shape.values() if v != -1)
    for axis, size in shape.items():
        if size == -1:
            if num_devices % known:
                raise ConfigError(f"mesh spec {spec!r}: {num_devices} devices are not divisible by {known}")
            shape[axis] = num_devices // known
    if math.prod(shape.values()) != num_devices:
        raise ConfigError(
            f"mesh spec {spec!r} has {math.prod(shape.values())} devices ({shape}) but there are {num_devices}"
        )
    return shape


def _dcn_shape(shape: dict[str, int], num_granules: int) -> list[int]:
    """How many hosts (or TPU slices) each axis spans: they go to the outer data-parallel axes first (slow links
    carry only the gradient reduction), then to pipeline ranks (one activation transfer per microbatch), never
    to tensor or sequence (their collectives run every layer)."""
    dcn, left = [1] * len(MESH_AXES), num_granules
    for axis in ("data", "fsdp", "pipeline"):
        span = math.gcd(shape[axis], left)
        dcn[MESH_AXES.index(axis)], left = span, left // span
    if left != 1:
        raise ConfigError(
            f"mesh {shape} cannot be split over {num_granules} hosts or slices: data * fsdp * pipeline must be a "
            "multiple of it"
        )
    return dcn


def make_mesh(spec: str | Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A mesh with axes MESH_AXES (Auto axis types). Across slow links (hosts of a GPU/CPU cluster, or the slices
    of a multi-slice TPU job) go the data-parallel axes, then pipeline ranks; tensor / sequence stay inside one host or
    slice. The hosts of one TPU slice share its fast interconnect, so there the slice is the unit, not the host."""
    devices = jax.devices() if devices is None else list(devices)
    shape = parse_mesh(spec, len(devices))
    by_slice = hasattr(devices[0], "slice_index")  # TPU devices of a multi-slice topology
    num_granules = len({d.slice_index if by_slice else d.process_index for d in devices})
    if devices[0].platform == "tpu" and not by_slice:
        num_granules = 1  # one slice: every host is on its interconnect
    if num_granules > 1:
        dcn = _dcn_shape(shape, num_granules)
        ici = [size // span for size, span in zip(shape.values(), dcn)]
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice,
                                                    allow_split_physical_axes=True)
    else:
        try:  # allow_split_physical_axes: e.g. tensor=8 on a 16x16x16 torus takes half of one of its rings
            grid = mesh_utils.create_device_mesh(list(shape.values()), devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError):  # topology-unaware fallback (e.g. odd device subsets)
            grid = np.asarray(devices).reshape(list(shape.values()))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_sharding(logical_tree, mesh: Mesh):
    """A tree of PartitionSpecs of logical names -> the same tree of NamedShardings (via LOGICAL_RULES)."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, LOGICAL_RULES)


def check_divisible(shapes, shardings) -> None:
    """Raises ConfigError naming every leaf whose dimension is not divisible by the mesh axes splitting it."""
    problems = []
    for (path, shape), sharding in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(shardings)):
        dims = np.shape(shape) if not hasattr(shape, "shape") else shape.shape
        for dim, axes in zip(dims, sharding.spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            ways = math.prod(sharding.mesh.shape[a] for a in axes)
            if dim % ways:
                problems.append(f"{jax.tree_util.keystr(path)} {tuple(dims)}: dim {dim} not divisible by "
                                f"{'x'.join(axes)} = {ways}")
    if problems:
        raise ConfigError("mesh does not divide the arrays it shards:\n  " + "\n  ".join(problems))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [B, T] batch arrays: rows over (data, fsdp), length over sequence."""
    return NamedSharding(mesh, _BATCH_SPEC)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Process-local [B_local, T] numpy arrays (nested dicts allowed, e.g. DPO's chosen / rejected)
    -> global jax.Arrays with ``batch_sharding``; B_local * process_count rows in all."""
    sharding = batch_sharding(mesh)
    rows = mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count()
    seq = mesh.shape["sequence"]

    def put(path, x):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[0] % max(rows, 1) or x.shape[1] % seq:
            raise DataError(
                f"batch{jax.tree_util.keystr(path)} has shape {x.shape}; expected [B, T] with B divisible by "
                f"{rows} (data x fsdp per process) and T by {seq} (sequence)"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(put, dict(batch))


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Makes ``mesh`` current (jax.set_mesh) and installs LOGICAL_RULES, so the model's logical activation
    constraints and context-parallel attention see it. Use around tracing (jit calls) of the model."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield mesh
