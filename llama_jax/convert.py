"""Convert weights between Hugging Face, Meta and llama_jax layouts.

    python -m llama_jax.convert --checkpoint Meta-Llama-3.1-70B/ --to hf --out llama-3.1-70b-hf/
    python -m llama_jax.convert --checkpoint runs/sft/ --to meta --num-shards 8 --out exported-meta/
    python -m llama_jax.convert --checkpoint llama-3.2-1b-hf/ --to llama_jax --out ckpt/

The source format is detected from its files (``--from`` only checks it). OUT must not exist yet (or be an empty
directory); it appears only when the conversion has succeeded.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from llama_jax import checkpoint, cli
from llama_jax.errors import CheckpointError, ConfigError

parser = cli.parser("python -m llama_jax.convert", __doc__)
cli.add_checkpoint(parser, help="source: llama_jax run or step directory, Hugging Face directory or Meta directory")
parser.add_argument("--from", dest="src_format", choices=checkpoint.FORMATS,
                    help="expected format of the source (default: detected from its files)")
parser.add_argument("--to", dest="dst_format", choices=checkpoint.FORMATS, required=True)
parser.add_argument("--out", required=True, metavar="DIR", help="new directory to write")
parser.add_argument("--num-shards", type=int, default=1, help="model-parallel shards of a Meta export")
parser.add_argument("--max-shard-gb", type=float, default=5.0, help="size of HF safetensors shards")


def run(args: argparse.Namespace) -> dict:
    if args.num_shards < 1:
        raise ConfigError(f"--num-shards must be >= 1 (model-parallel ranks of a Meta export), got {args.num_shards}")
    if not args.max_shard_gb > 0:
        raise ConfigError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    checkpoint.check_destination(args.out)  # before reading: fail in seconds, not after minutes
    detected = checkpoint.detect_format(args.checkpoint)
    if args.src_format is not None and args.src_format != detected:
        raise CheckpointError(f"{args.checkpoint} looks like a {detected!r} checkpoint, not {args.src_format!r}")
    params, cfg, metadata = checkpoint.load(args.checkpoint, progress=lambda files: cli.progress(
        files, desc="reading", unit="file"))
    checkpoint.export(args.out, args.dst_format, params, cfg, tokenizer=metadata.get("tokenizer"),
                      num_shards=args.num_shards, max_shard_bytes=int(args.max_shard_gb * 2**30),
                      progress=lambda files: cli.progress(files, desc="writing", unit="file"))
    cli.log(f"wrote {args.dst_format} checkpoint of {cfg.num_params():,} parameters to {args.out}")
    return {"from": detected, "to": args.dst_format, "out": args.out, "num_params": cfg.num_params()}


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
