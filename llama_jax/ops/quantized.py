"""Quantized weights as their own pytree type, and the one matmul that dispatches on it.

    w = quantize_kernel(kernel, "fp8")          # QuantizedArray(values float8_e4m3fn [in, out], scale float32 [out])
    y = matmul(x, w, dtype, precision)          # plain kernels and QuantizedArrays alike

FP8 follows the Llama 3 paper (sec. 6.2) and Meta's reference (llama-models' fp8 path over fbgemm's
``quantize_fp8_per_row`` / ``f8f8bf16_rowwise``): e4m3 weights *and* activations; row-wise scales: each weight
output channel has a static scale amax / 448 (448 = e4m3's largest finite value) and each activation row (one
token) a dynamic one; "we upper bound the dynamic scale factors to 1200": Meta's ``fp8_activation_scale_ub``
bounds the *row amax* the activation scale derives from, so a row's scale is ``min(amax, 1200) / 448`` and
entries beyond +-1200 saturate at +-448. One huge activation then cannot stretch its row's scale until every
ordinary value underflows. The fp8 matmul multiplies the e4m3 values exactly and accumulates in float32, then
applies both scales; on a CPU XLA upcasts the operands, which gives the same numbers as an fp8 GEMM with float32
accumulation. Int8 is weight-only: symmetric per output channel, scale amax / 127, activations in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from llama_jax.errors import ConfigError

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
ACTIVATION_AMAX_BOUND = 1200.0  # the paper's "upper bound of 1200 on the dynamic scale factors"
MODES = ("fp8", "int8")
_TINY = 1e-12  # keeps an all-zero row's scale positive (fbgemm's EPS)


@struct.dataclass
class QuantizedArray:
    """A kernel [in, out] stored as fp8 / int8 ``values`` with one float32 ``scale`` per output channel [out]."""

    values: jax.Array  # first field: flax compares its shape with the kernel shape the module declares
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def mode(self) -> str:
        return "fp8" if self.values.dtype == FP8 else "int8"


def quantize_rows(x: jax.Array, amax_bound: float | None = None) -> tuple[jax.Array, jax.Array]:
    """e4m3 values and scales [..., 1] with x ~= values * scales, one scale per row (last axis reduced).

    With ``amax_bound`` each row's absolute maximum is clamped to it before the scale is taken, so larger
    entries saturate at +-448.
    """
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    if amax_bound is not None:
        amax = jnp.minimum(amax, amax_bound)
    amax = jnp.maximum(amax, _TINY)
    # Multiply by the reciprocal as fbgemm does; clip first because casting past 448 gives NaN.
    values = jnp.clip(x.astype(jnp.float32) * (FP8_MAX / amax), -FP8_MAX, FP8_MAX).astype(FP8)
    return values, amax / FP8_MAX


def quantize_kernel(w: jax.Array, mode: str) -> QuantizedArray:
    """A [in, out] kernel -> QuantizedArray with one scale per output channel."""
    if mode == "fp8":
        values, scale = quantize_rows(w.T)  # rows of the torch-layout [out, in] weight
        return QuantizedArray(values=values.T, scale=scale[:, 0])
    if mode == "int8":
        w32 = w.astype(jnp.float32)
        scale = jnp.maximum(jnp.max(jnp.abs(w32), axis=0), _TINY) / INT8_MAX
        return QuantizedArray(values=jnp.clip(jnp.round(w32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8),
                              scale=scale)
    raise ConfigError(f"unknown quantization mode {mode!r}; expected one of {MODES}")


def matmul(x: jax.Array, kernel, dtype, precision: str | None = None) -> jax.Array:
    """x [..., in] @ kernel [in, out] in ``dtype``; a QuantizedArray kernel takes its quantized path.

    ``precision`` (``ModelConfig.resolved_matmul_precision``) applies to plain and int8 kernels. The fp8 product
    keeps the backend's default: e4m3 values are exact in TF32 and in bfloat16, so no precision changes its
    result, and the default leaves XLA free to pick its fp8 GEMM.
    """
    if not isinstance(kernel, QuantizedArray):
        return jnp.matmul(x, kernel.astype(dtype), precision=precision)
    if kernel.mode == "int8":  # weight-only: dequantize on the fly, multiply in the compute dtype
        return jnp.matmul(x, kernel.values.astype(dtype), precision=precision) * kernel.scale.astype(dtype)
    values, row_scale = quantize_rows(x, ACTIVATION_AMAX_BOUND)
    y = jnp.einsum("...i,io->...o", values, kernel.values, preferred_element_type=jnp.float32)
    return (y * row_scale * kernel.scale).astype(dtype)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


def mode_of(params) -> str | None:
    """"fp8", "int8" or None: whether a parameter tree holds QuantizedArrays, and of which kind."""
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        if isinstance(leaf, QuantizedArray):
            return leaf.mode
    return None


def rebuild(tree):
    """A quantized tree as orbax restores it without a target ({"values", "scale"} dicts) -> QuantizedArrays."""
    if isinstance(tree, dict):
        if set(tree) == {"values", "scale"}:
            return QuantizedArray(values=tree["values"], scale=tree["scale"])
        return {k: rebuild(v) for k, v in tree.items()}
    return tree


def logical_axes(params, axes):
    """Logical PartitionSpecs for ``params`` given those of its unquantized tree: a QuantizedArray's values are
    split like the kernel, its per-output-channel scale like the kernel's output axis."""

    def spec(leaf, kernel_axes):
        if isinstance(leaf, QuantizedArray):
            return QuantizedArray(values=kernel_axes, scale=jax.sharding.PartitionSpec(kernel_axes[-1]))
        return kernel_axes

    return jax.tree.map(spec, params, axes, is_leaf=is_quantized)
