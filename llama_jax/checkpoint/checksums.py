"""Checksums of array trees, computed where the arrays live: what a checkpoint records and verifies on restore.

    sums = tree_checksums(params)                # {"layers/attention/query": "9f3a...e1", ...}, 16 hex digits each
    pin = tree_digest(params)                    # one sha256 of them all: what a run that starts from params records
    bad = mismatches(sums, tree_checksums(restored))      # leaf paths whose values differ; [] when intact

A leaf's checksum is a sum, modulo 2**32, of a hash of every element's bits and its position in the array, in two
lanes with different seeds (64 bits in all). Integer sums do not depend on the order of addition, so the value is
the same however the array is sharded, on one device or on a pod, and it is computed inside ``jit`` on the
devices that hold the shards: one read of the state's memory, no copy to the host. A flipped bit changes the
element's hash, a swap of two elements their position-salted hashes; either goes unnoticed with probability
about 2**-64. (Positions wrap modulo 2**32, so only a swap of elements exactly 2**32 apart in one leaf could.)

This guards against files changed after they were written (a bad disk, a truncated or partial copy): what is read
back must be what was saved. It is not a defence against someone who rewrites both arrays and checksums.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHM = "position-hash-sum-2x32"  # recorded next to the checksums, so a future change is recognised
_SEEDS = (0x243F6A88, 0x85A308D3)


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: every input bit affects every output bit (uint32 in, uint32 out)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits(x: jax.Array) -> jax.Array:
    """The raw bits of ``x`` as uint32 (wider elements split into 32-bit words along a new last axis)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return _bits(jax.random.key_data(x))
    width = np.dtype(x.dtype).itemsize
    if width >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[width]).astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """Each element's flat (row-major) index modulo 2**32, built per axis so that no index overflows."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _leaf_sum(x: jax.Array) -> jax.Array:
    bits = _bits(x)
    position = _positions(bits.shape)
    spread = position * jnp.uint32(0x9E3779B1)  # odd: distinct positions stay distinct
    lanes = [jnp.sum(_mix(bits ^ (spread + jnp.uint32(seed))), dtype=jnp.uint32) for seed in _SEEDS]
    return jnp.stack(lanes)  # [2] uint32


@jax.jit
def _tree_sums(tree):
    return jax.tree.map(_leaf_sum, tree)


def leaf_path(path) -> str:
    """A tree path as ``a/b/c`` (dict keys, attribute names and sequence indices alike)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_checksums(tree) -> dict[str, str]:
    """``{leaf path: 16 hex digits}`` for every array leaf of ``tree`` (jax arrays, sharded or not, or numpy).

    Every process of a multi-process job must call it (the sums are collectives over the shards); each gets the
    same result.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        return {}
    sums = [_host_value(s) for s in _tree_sums([leaf for _, leaf in leaves])]
    return {leaf_path(path): f"{int(s[0]):08x}{int(s[1]):08x}" for (path, _), s in zip(leaves, sums)}


def tree_digest(tree) -> str:
    """One sha256 (hex) of ``tree_checksums(tree)`` and the algorithm: a whole tree's identity in one string."""
    record = {"algorithm": ALGORITHM, "leaves": tree_checksums(tree)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _host_value(x: jax.Array) -> np.ndarray:
    # The sums come back replicated; across processes this process's copy is the whole value.
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def mismatches(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Leaf paths whose checksum differs, or that only one side has ("path (missing)" / "path (unexpected)")."""
    problems = [f"{k} (missing)" for k in expected if k not in actual]
    problems += [f"{k} (unexpected)" for k in actual if k not in expected]
    return problems + [k for k in expected if k in actual and expected[k] != actual[k]]
