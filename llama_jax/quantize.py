"""FP8 and int8 inference weights for the feed-forward matmuls, the way Llama 3 405B was served.

    qparams = quantize_params(params, cfg, mode="fp8")       # a new tree; the model runs it as is
    generate(qparams, cfg, prompts, 64)
    python -m llama_jax.quantize SRC DST --mode fp8          # quantize a checkpoint once, store it, load it anywhere

FP8 follows the paper (sec. 6.2) and Meta's reference (llama-models' fp8 path over fbgemm's
``quantize_fp8_per_row`` / ``f8f8bf16_rowwise``):
  * e4m3 weights *and* activations, in the SwiGLU matmuls (gate, up, down) only; attention, embeddings,
    norms and the LM head stay as they are;
  * row-wise scales: each weight output channel has a static scale amax / 448 (448 = e4m3's largest
    finite value); each activation row (one token) gets a dynamic scale at run time;
  * "we upper bound the dynamic scale factors to 1200": Meta's ``fp8_activation_scale_ub`` is the upper
    bound of the *row amax* the activation scale derives from, so a row's scale is
    ``min(amax, 1200) / 448`` and entries beyond +-1200 saturate at +-448 after scaling. One huge
    activation then cannot stretch its row's scale until every ordinary value underflows to zero;
  * the first and last transformer layers are not quantized.
The fp8 matmul multiplies the e4m3 values exactly and accumulates in float32, then applies both scales;
on a CPU XLA upcasts the operands, which gives the same numbers as an fp8 GEMM with float32 accumulation.

Int8 (``mode="int8"``) is weight-only: symmetric per output channel, scale amax / 127, activations in
the compute dtype, all layers.

Tree: a quantized layer's ``feed_forward/{gate,up,down}`` hold float8_e4m3fn / int8 kernels of the
original shapes beside ``{name}_scale`` (float32, one per output channel); ``model.FeedForward`` sees
the scale leaf and calls ``quantized_matmul``. Because layers differ (first/last unquantized), the tree
is per layer (``layers_0 .. layers_{L-1}``) and the model runs it unscanned.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import model
from llama_jax.config import ModelConfig
from llama_jax.errors import CheckpointError, ConfigError

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
ACTIVATION_AMAX_BOUND = 1200.0  # the paper's "upper bound of 1200 on the dynamic scale factors"
MODES = ("fp8", "int8")
_KERNELS = ("gate", "up", "down")
_TINY = 1e-12  # keeps an all-zero row's scale positive (fbgemm's EPS)


def quantize_rows(x: jax.Array, amax_bound: float | None = None) -> tuple[jax.Array, jax.Array]:
    """e4m3 values and scales [..., 1] with x ~= values * scales, one scale per row (last axis reduced).

    With ``amax_bound`` each row's absolute maximum is clamped to it before the scale is taken, so
    larger entries saturate at +-448.
    """
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    if amax_bound is not None:
        amax = jnp.minimum(amax, amax_bound)
    amax = jnp.maximum(amax, _TINY)
    # Multiply by the reciprocal as fbgemm does; clip first because casting past 448 gives NaN.
    values = jnp.clip(x.astype(jnp.float32) * (FP8_MAX / amax), -FP8_MAX, FP8_MAX).astype(FP8)
    return values, amax / FP8_MAX


def quantize_kernel(w: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """A [in, out] kernel -> (quantized kernel [in, out], float32 scale [out]), one scale per output channel."""
    if mode == "fp8":
        values, scale = quantize_rows(w.T)  # rows of the torch-layout [out, in] weight
        return values.T, scale[:, 0]
    if mode == "int8":
        w32 = w.astype(jnp.float32)
        scale = jnp.maximum(jnp.max(jnp.abs(w32), axis=0), _TINY) / INT8_MAX
        return jnp.clip(jnp.round(w32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8), scale
    raise ConfigError(f"unknown quantization mode {mode!r}; expected one of {MODES}")


def quantized_matmul(x: jax.Array, kernel: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., in] @ a quantized kernel [in, out] with its per-output scale [out]; returns x's dtype."""
    if kernel.dtype == jnp.int8:  # weight-only: dequantize on the fly, multiply in the compute dtype
        return (x @ kernel.astype(x.dtype)) * scale.astype(x.dtype)
    if kernel.dtype == FP8:
        values, row_scale = quantize_rows(x, ACTIVATION_AMAX_BOUND)
        y = jnp.einsum("...i,io->...o", values, kernel, preferred_element_type=jnp.float32)
        return (y * row_scale * scale).astype(x.dtype)
    raise ConfigError(f"quantized kernel has dtype {kernel.dtype}; expected float8_e4m3fn or int8")


def quantize_params(params, cfg: ModelConfig, mode: str = "fp8", keep_layers: Sequence[int] | None = None):
    """The inference tree with FFN kernels quantized; ``keep_layers`` (default: first and last for fp8,
    none for int8) stay as they are. Accepts the stacked (``layers``) or per-layer tree."""
    if mode not in MODES:
        raise ConfigError(f"unknown quantization mode {mode!r}; expected one of {MODES}")
    if quantization_mode(params) is not None:
        raise ConfigError(f"parameters are already quantized ({quantization_mode(params)})")
    if keep_layers is None:
        keep_layers = (0, cfg.num_layers - 1) if mode == "fp8" else ()
    params = dict(model.unstack_layers(params, cfg.num_layers) if "layers" in params else params)
    for i in range(cfg.num_layers):
        name = f"layers_{i}"
        if name not in params:
            raise ConfigError(f"parameter tree lacks {name!r} (the model config has {cfg.num_layers} layers)")
        ffn = params[name]["feed_forward"]
        if i in keep_layers:
            continue
        quantized = {}
        for kernel in _KERNELS:
            quantized[kernel], quantized[f"{kernel}_scale"] = quantize_kernel(jnp.asarray(ffn[kernel]), mode)
        params[name] = {**params[name], "feed_forward": quantized}
    return params


def quantization_mode(params) -> str | None:
    """"fp8", "int8" or None: what ``quantize_params`` did to this tree."""
    for leaf in jax.tree.leaves(params):
        if leaf.dtype == FP8:
            return "fp8"
        if leaf.dtype == jnp.int8:
            return "int8"
    return None


def param_bytes(params, shardings=None) -> int:
    """Bytes the tree's arrays (or ShapeDtypeStructs) take in all, or on one device given their shardings."""
    leaves = jax.tree.leaves(params)
    shapes = [x.shape for x in leaves] if shardings is None else [
        s.shard_shape(x.shape) for x, s in zip(leaves, jax.tree.leaves(shardings))]
    return sum(int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize for x, shape in zip(leaves, shapes))


def quantized_shapes(cfg: ModelConfig, mode: str):
    """The quantized tree of a full-size config as ShapeDtypeStructs: nothing is allocated."""
    return jax.eval_shape(lambda p: quantize_params(p, cfg, mode), model.param_shapes(cfg))


def quantize_checkpoint(src: str, dst: str, mode: str = "fp8") -> dict:
    """Loads any checkpoint, quantizes it, saves a params-only llama_jax checkpoint at ``dst``."""
    from llama_jax import checkpoint

    params, cfg, meta = checkpoint.load(src)
    if quantization_mode(params) is not None:
        raise CheckpointError(f"{src} is already quantized ({quantization_mode(params)})")
    before = param_bytes(params)
    quantized = jax.jit(lambda p: quantize_params(p, cfg, mode))(params)
    checkpoint.save_params(dst, quantized, cfg.replace(scan_layers=False), stage=f"quantize-{mode}",
                           tokenizer=meta.get("tokenizer"))
    return {"mode": mode, "bytes_before": before, "bytes_after": param_bytes(quantized)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.quantize",
                                     description="Quantize a checkpoint's feed-forward weights to fp8 or int8.")
    parser.add_argument("src", help="llama_jax run/checkpoint dir, HF dir or Meta dir")
    parser.add_argument("dst", help="directory for the quantized params-only checkpoint")
    parser.add_argument("--mode", choices=MODES, default="fp8")
    args = parser.parse_args(argv)
    report = quantize_checkpoint(args.src, args.dst, args.mode)
    print(f"{args.mode}: parameters {report['bytes_before'] / 2**20:.1f} MiB -> {report['bytes_after'] / 2**20:.1f} "
          f"MiB, written to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
