"""FP8 and int8 inference weights for the feed-forward matmuls, the way Llama 3 405B was served.

    qparams, qcfg = quantize_params(params, cfg, mode="fp8")   # a per-layer tree; the model runs it as is
    generate(qparams, qcfg, prompts, 64)
    python -m llama_jax.quantize --checkpoint SRC --out DST --mode fp8     # quantize once, store, load anywhere

The paper's recipe (sec. 6.2; the numerics are in ``llama_jax.ops.quantized``): e4m3 weights and activations in
the SwiGLU matmuls (gate, up, down) only, with row-wise scales; attention, embeddings, norms and the LM head stay
as they are; the first and last transformer layers are not quantized. Int8 (``mode="int8"``) is weight-only, all
layers. A quantized kernel is an ``ops.quantized.QuantizedArray`` leaf, which the model's matmul dispatches on.
Because layers differ (first/last unquantized), the tree is per layer (``layers_0 .. layers_{L-1}``), and the
returned config says so (``scan_layers=False``).

``mode="nf4"`` builds QLoRA's frozen base instead (not a stored format): all seven projections of every layer in
NF4 (``ops.quantized.NF4Array``); embeddings, norms and the LM head stay as they are, as PEFT's QLoRA leaves them.
No layer differs, so the tree keeps its layout: a stacked tree stays stacked (and scanned).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import numpy as np

from llama_jax import checkpoint, cli, lora, model
from llama_jax.config import ModelConfig
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.ops import quantized
from llama_jax.ops.quantized import MODES

_KERNELS = ("gate", "up", "down")


def quantize_params(params, cfg: ModelConfig, mode: str = "fp8",
                    keep_layers: Sequence[int] | None = None) -> tuple[dict, ModelConfig]:
    """(the inference tree with FFN kernels quantized, its per-layer config). ``keep_layers`` (default: first and
    last for fp8, none for int8) stay as they are. ``params`` is in ``cfg``'s layout (stacked or per layer).
    "nf4": (every projection in NF4, ``cfg``), in ``cfg``'s layout; ``keep_layers`` does not apply."""
    if mode not in (*MODES, "nf4"):
        raise ConfigError(f"unknown quantization mode {mode!r}; expected one of {(*MODES, 'nf4')}")
    if quantized.mode_of(params) is not None:
        raise ConfigError(f"parameters are already quantized ({quantized.mode_of(params)})")
    if mode == "nf4":
        model.check_params(params, cfg)
        return lora.quantize_base(params, cfg, "nf4"), cfg
    if keep_layers is None:
        keep_layers = (0, cfg.num_layers - 1) if mode == "fp8" else ()
    model.check_params(params, cfg)
    params = dict(model.unstack_layers(params, cfg.num_layers) if cfg.scan_layers else params)
    for i in range(cfg.num_layers):
        if i in keep_layers:
            continue
        layer = params[f"layers_{i}"]
        ffn = {name: quantized.quantize_kernel(layer["feed_forward"][name], mode) for name in _KERNELS}
        params[f"layers_{i}"] = {**layer, "feed_forward": ffn}
    return params, cfg.replace(scan_layers=False)


def param_bytes(params, shardings=None) -> int:
    """Bytes the tree's arrays (or ShapeDtypeStructs) take in all, or on one device given their shardings."""
    leaves = jax.tree.leaves(params)
    shapes = [x.shape for x in leaves] if shardings is None else [
        s.shard_shape(x.shape) for x, s in zip(leaves, jax.tree.leaves(shardings))]
    return sum(int(np.prod(shape)) * np.dtype(x.dtype).itemsize for x, shape in zip(leaves, shapes))


def quantized_shapes(cfg: ModelConfig, mode: str):
    """The quantized tree of a full-size config as ShapeDtypeStructs: nothing is allocated."""
    return jax.eval_shape(lambda p: quantize_params(p, cfg, mode)[0], model.param_shapes(cfg))


def quantize_checkpoint(src: str, dst: str, mode: str = "fp8") -> dict:
    """Loads any checkpoint, quantizes it, saves a params-only llama_jax checkpoint at ``dst``."""
    checkpoint.check_destination(dst)  # before reading: fail in seconds, not after minutes
    params, cfg, metadata = checkpoint.load(src)
    if quantized.mode_of(params) is not None:
        raise CheckpointError(f"{src} is already quantized ({quantized.mode_of(params)})")
    before = param_bytes(params)
    qparams, qcfg = jax.jit(lambda p: quantize_params(p, cfg, mode)[0])(params), cfg.replace(scan_layers=False)
    checkpoint.save_params(dst, qparams, qcfg, stage=f"quantize-{mode}", tokenizer=metadata.get("tokenizer"))
    return {"mode": mode, "bytes_before": before, "bytes_after": param_bytes(qparams), "out": dst}


parser = cli.parser("python -m llama_jax.quantize", "Quantize a checkpoint's feed-forward weights to fp8 or int8; "
                                                   "--out is the new directory of the quantized checkpoint.")
cli.add_checkpoint(parser)
cli.add_out(parser)
parser.add_argument("--mode", choices=MODES, default="fp8")


def run(args: argparse.Namespace) -> dict:
    report = quantize_checkpoint(args.checkpoint, args.out, args.mode)
    print(f"{args.mode}: parameters {report['bytes_before'] / 2**20:.1f} MiB -> {report['bytes_after'] / 2**20:.1f} "
          f"MiB, written to {args.out}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
