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

NF4 (``NF4Array``, the frozen base of QLoRA; Dettmers et al. 2023, "QLoRA", sec. 3 and appendix E) is weight-only
too, laid out as bitsandbytes' ``quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`` writes
it, so a bitsandbytes checkpoint's bytes map onto it one to one: the kernel as the torch ``[out, in]`` weight,
flattened row-major, cut into blocks of 64 values; each block divided by its absolute maximum and rounded to the
nearest of the 16 NormalFloat values ``NF4_CODE``, two codes a byte (the first in the high nibble). The per-block
maxima are double-quantized: their mean (the offset) is subtracted and the rest is cut into blocks of 256, each
stored as 8-bit indices into bitsandbytes' signed dynamic map (``dynamic_code``) times a float32 block maximum.
About 4.127 bits a weight: 4 + 8 / 64 + 32 / (64 * 256). The matmul dequantizes the kernel to the compute dtype
inside the jitted step, then multiplies as the plain path does; its backward pass decodes it again instead of
keeping the decoded copy.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

from llama_jax.errors import ConfigError

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
ACTIVATION_AMAX_BOUND = 1200.0  # the paper's "upper bound of 1200 on the dynamic scale factors"
MODES = ("fp8", "int8")  # what the quantize command stores; "nf4" is the QLoRA base, quantized where it is loaded
_TINY = 1e-12  # keeps an all-zero row's scale positive (fbgemm's EPS)

# The 16 NormalFloat4 values as the QLoRA paper (appendix E) and bitsandbytes' ``get_4bit_type("nf4")`` list them:
# quantiles of N(0, 1) (8 positive ones over the upper half, 7 negative over the lower, and an exact 0),
# divided by the largest so that they span [-1, 1]. tests/model/test_nf4.py recomputes them from scipy's norm.ppf.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
NF4_BLOCK = 64  # weights per absmax scale (the paper's and bitsandbytes' default)
SCALE_BLOCK = 256  # absmax scales per float32 second-level scale (double quantization)


def dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``), its code for the
    double-quantized scales: 0, 1, and for e = 0..6 the midpoints of 2^e + 1 evenly spaced points on [0.1, 1],
    times 10^(e - 6), with both signs: 2 + 2 * 127 = 256 sorted values, fine near 0 and coarse near 1."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = np.linspace(0.1, 1.0, 2**e + 1, dtype=np.float32)
        mids = (edges[:-1] + edges[1:]) / np.float32(2) * np.float32(10.0 ** (e - 6))
        values += [*mids, *-mids]
    return np.sort(np.asarray(values, np.float32))


def _nearest(x: jax.Array, code: np.ndarray) -> jax.Array:
    """Index of the nearest entry of the sorted ``code`` for each x (a tie goes to the lower one, as in
    bitsandbytes); a search over the midpoints, so no [x.size, len(code)] table of distances is built."""
    midpoints = (code[:-1] + code[1:]) / 2
    return jnp.searchsorted(jnp.asarray(midpoints), x, side="left").astype(jnp.uint8)


@struct.dataclass
class QuantizedArray:
    """A kernel [*in, *out] stored as fp8 / int8 ``values`` with one float32 ``scale`` per output channel [*out]."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def mode(self) -> str:
        return "fp8" if self.values.dtype == FP8 else "int8"


@struct.dataclass
class NF4Array:
    """A kernel [*in, *out] (or a stack of them, [L, *in, *out]) in bitsandbytes' NF4 layout (module docstring);
    n = the kernel's size, a multiple of 64. Leading axes of the arrays are the stack's."""

    codes: jax.Array  # uint8 [..., n / 2]: two NF4 indices a byte, torch's [out, in] order
    scale_codes: jax.Array  # uint8 [..., n / 64]: each block's absmax minus the offset, as dynamic_code indices
    scale_scale: jax.Array  # float32 [..., ceil(n / 64 / 256)]: the absmax of each 256 block of the above
    scale_offset: jax.Array  # float32 [...]: the mean of the block maxima
    kernel_shape: tuple[int, ...] = struct.field(pytree_node=False)  # one kernel's shape, [*in, *out]
    contracted: int = struct.field(pytree_node=False)  # how many leading kernel axes are inputs

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-1], *self.kernel_shape)

    @property
    def mode(self) -> str:
        return "nf4"


def quantize_nf4(w: jax.Array, contracted: int = 1) -> NF4Array:
    """One kernel [*in, *out] -> NF4Array (vmap it over a stack)."""
    ins, outs = math.prod(w.shape[:contracted]), math.prod(w.shape[contracted:])
    if (ins * outs) % NF4_BLOCK:
        raise ConfigError(f"an NF4 kernel's size must be a multiple of {NF4_BLOCK}; got shape {w.shape}")
    blocks = w.astype(jnp.float32).reshape(ins, outs).T.reshape(-1, NF4_BLOCK)  # torch's [out, in], row-major
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    codes = _nearest(blocks * (1 / jnp.maximum(absmax, _TINY))[:, None], NF4_CODE).reshape(-1, 2)
    offset = jnp.mean(absmax)
    centred = absmax - offset
    pad = -centred.size % SCALE_BLOCK
    groups = jnp.pad(centred, (0, pad)).reshape(-1, SCALE_BLOCK)
    group_max = jnp.max(jnp.abs(groups), axis=1)
    scale_codes = _nearest(groups * (1 / jnp.maximum(group_max, _TINY))[:, None], dynamic_code())
    return NF4Array(codes=codes[:, 0] << 4 | codes[:, 1], scale_codes=scale_codes.reshape(-1)[:centred.size],
                    scale_scale=group_max, scale_offset=offset, kernel_shape=tuple(w.shape), contracted=contracted)


def nf4_block_scales(w: NF4Array) -> jax.Array:
    """The float32 absmax of every 64 block [..., n / 64], decoded from the double quantization."""
    count = w.scale_codes.shape[-1]
    codes = jnp.pad(w.scale_codes, [(0, 0)] * (w.scale_codes.ndim - 1) + [(0, -count % SCALE_BLOCK)])
    groups = jnp.asarray(dynamic_code())[codes].reshape(*codes.shape[:-1], -1, SCALE_BLOCK)
    scales = (groups * w.scale_scale[..., None]).reshape(*codes.shape[:-1], -1)[..., :count]
    return scales + w.scale_offset[..., None]


def dequantize_nf4(w: NF4Array, dtype) -> jax.Array:
    """The kernel(s) [..., *in, *out] in ``dtype``: code value times block absmax in float32, then one cast."""
    lead = w.codes.shape[:-1]
    indices = jnp.stack([w.codes >> 4, w.codes & 15], axis=-1).reshape(*lead, -1, NF4_BLOCK)
    values = jnp.asarray(NF4_CODE)[indices] * nf4_block_scales(w)[..., None]  # [..., n / 64, 64]
    ins = math.prod(w.kernel_shape[:w.contracted])
    torch_layout = values.astype(dtype).reshape(*lead, -1, ins)  # [..., out, in]
    return jnp.swapaxes(torch_layout, -1, -2).reshape(w.shape)


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


def quantize_kernel(w: jax.Array, mode: str, contracted: int = 1) -> QuantizedArray | NF4Array:
    """A kernel [*in, *out] (its first ``contracted`` axes are inputs) -> its quantized form: fp8 / int8 with one
    scale per output channel, or NF4."""
    if mode == "nf4":
        return quantize_nf4(w, contracted)
    outs = w.shape[contracted:]
    flat = w.reshape(math.prod(w.shape[:contracted]), math.prod(outs))  # [in, out]
    if mode == "fp8":
        values, scale = quantize_rows(flat.T)  # rows of the torch-layout [out, in] weight
        return QuantizedArray(values=values.T.reshape(w.shape), scale=scale[:, 0].reshape(outs))
    if mode == "int8":
        w32 = flat.astype(jnp.float32)
        scale = jnp.maximum(jnp.max(jnp.abs(w32), axis=0), _TINY) / INT8_MAX
        values = jnp.clip(jnp.round(w32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        return QuantizedArray(values=values.reshape(w.shape), scale=scale.reshape(outs))
    raise ConfigError(f"unknown quantization mode {mode!r}; expected one of {(*MODES, 'nf4')}")


def matmul(x: jax.Array, kernel, dtype, precision: str | None = None, contracted: int = 1) -> jax.Array:
    """x [..., *in] @ kernel [*in, *out] -> [..., *out] in ``dtype``, contracting x's last ``contracted`` axes with
    the kernel's first; a quantized kernel takes its quantized path.

    ``precision`` (``ModelConfig.resolved_matmul_precision``) applies to plain, int8 and NF4 kernels. The fp8
    product keeps the backend's default: e4m3 values are exact in TF32 and in bfloat16, so no precision changes its
    result, and the default leaves XLA free to pick its fp8 GEMM.
    """
    if isinstance(kernel, NF4Array):  # weight-only: the kernel exists in ``dtype`` only inside this computation
        return _nf4_matmul(x, kernel, jnp.dtype(dtype), precision, contracted)
    if not isinstance(kernel, QuantizedArray):
        return _contract(x, kernel.astype(dtype), contracted, precision)
    if kernel.mode == "int8":  # weight-only: dequantize on the fly, multiply in the compute dtype
        return _contract(x, kernel.values.astype(dtype), contracted, precision) * kernel.scale.astype(dtype)
    lead, outs = x.shape[:x.ndim - contracted], kernel.scale.shape
    values, row_scale = quantize_rows(x.reshape(*lead, -1), ACTIVATION_AMAX_BOUND)  # one row per token
    y = jnp.einsum("...i,io->...o", values, kernel.values.reshape(values.shape[-1], -1),
                   preferred_element_type=jnp.float32)
    return (y * row_scale * kernel.scale.reshape(-1)).astype(dtype).reshape(*lead, *outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _nf4_matmul(x, kernel: NF4Array, dtype, precision, contracted: int) -> jax.Array:
    return _contract(x, dequantize_nf4(kernel, dtype), contracted, precision)


def _nf4_matmul_forward(x, kernel, dtype, precision, contracted):
    return _nf4_matmul(x, kernel, dtype, precision, contracted), (kernel, jnp.zeros((), x.dtype))


def _nf4_matmul_backward(dtype, precision, contracted, residuals, dy):
    # The frozen base gets no gradient, and its kernel is decoded again here rather than saved by autodiff: between
    # the passes a layer keeps its 4-bit bytes, not a compute-dtype copy (bitsandbytes' MatMul4Bit does the same).
    kernel, x_dtype = residuals
    w = dequantize_nf4(kernel, dtype)
    outs = list(range(contracted, w.ndim))
    dx = jnp.tensordot(dy, w, axes=(list(range(dy.ndim - len(outs), dy.ndim)), outs), precision=precision)
    no_gradient = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0) if a.dtype == jnp.uint8
                               else jnp.zeros_like(a), kernel)
    return dx.astype(x_dtype.dtype), no_gradient


_nf4_matmul.defvjp(_nf4_matmul_forward, _nf4_matmul_backward)


def _contract(x: jax.Array, kernel: jax.Array, contracted: int, precision: str | None) -> jax.Array:
    # Innermost axes first: the order jnp.einsum("BTNH,NHD->BTD") contracts in, which the network used before every
    # projection came here; XLA sums in that order, so the plain path keeps its bits.
    axes = (list(range(x.ndim - 1, x.ndim - contracted - 1, -1)), list(range(contracted - 1, -1, -1)))
    return jnp.tensordot(x, kernel, axes=axes, precision=precision)


def is_quantized(x) -> bool:
    return isinstance(x, (QuantizedArray, NF4Array))


def mode_of(params) -> str | None:
    """"fp8", "int8", "nf4" or None: whether a parameter tree holds quantized kernels, and of which kind."""
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf):
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
    split like the kernel, its per-output-channel scale like the kernel's output axes; an NF4Array's arrays only
    along a stack's leading axes (each kernel's blocks stay whole on one device)."""

    def spec(leaf, kernel_axes):
        if isinstance(leaf, QuantizedArray):
            return QuantizedArray(values=kernel_axes, scale=P(*kernel_axes[len(kernel_axes) - leaf.scale.ndim:]))
        if isinstance(leaf, NF4Array):
            stack = tuple(kernel_axes)[:len(kernel_axes) - len(leaf.kernel_shape)]
            return leaf.replace(codes=P(*stack, None), scale_codes=P(*stack, None), scale_scale=P(*stack, None),
                                scale_offset=P(*stack))
        return kernel_axes

    return jax.tree.map(spec, params, axes, is_leaf=is_quantized)
