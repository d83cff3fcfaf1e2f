"""Convert weights between Hugging Face, Meta and llama_jax layouts.

    python -m llama_jax.convert --checkpoint Meta-Llama-3.1-70B/ --to hf --out llama-3.1-70b-hf/
    python -m llama_jax.convert --checkpoint runs/sft/ --to meta --num-shards 8 --out exported-meta/
    python -m llama_jax.convert --checkpoint llama-3.2-1b-hf/ --to llama_jax --out ckpt/

The source format is detected from its files (``--from`` only checks it). ``--out`` must not exist yet (or be an
empty directory); it appears only when the conversion has succeeded. The tokenizer's identity and the context length
travel with the weights (an HF export also gets tokenizer files and a generation config); where the source does
not record them (a Meta or HF directory from elsewhere), the tokenizer is inferred from a tokenizer.model there or a
Llama 3 vocabulary, else give ``--tokenizer`` (it also replaces a recorded one); Meta's context length from its
RoPE scaling, else ``--max-seq-len``. A quantized checkpoint converts only to llama_jax.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from llama_jax import checkpoint, cli
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.tokenizer import from_identity

parser = cli.parser("python -m llama_jax.convert", __doc__)
cli.add_checkpoint(parser)
parser.add_argument("--from", dest="src_format", choices=checkpoint.FORMATS,
                    help="expected format of the source (default: detected from its files)")
parser.add_argument("--to", dest="dst_format", choices=checkpoint.FORMATS, required=True)
cli.add_out(parser)
parser.add_argument("--num-shards", type=int, default=1, help="model-parallel shards of a Meta export")
parser.add_argument("--max-shard-gb", type=float, default=5.0, help="size of HF safetensors shards")
cli.add_tokenizer(parser)
parser.add_argument("--max-seq-len", type=int, default=None,
                    help="the model's context length where the source does not record it (Meta's params.json)")


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
    tokenizer = from_identity(metadata.get("tokenizer"), args.tokenizer)
    if args.max_seq_len is not None:
        cfg = cfg.replace(max_seq_len=args.max_seq_len)
    checkpoint.export(args.out, args.dst_format, params, cfg, tokenizer=tokenizer,
                      num_shards=args.num_shards, max_shard_bytes=int(args.max_shard_gb * 2**30),
                      progress=lambda files: cli.progress(files, desc="writing", unit="file"))
    cli.log(f"wrote {args.dst_format} checkpoint of {cfg.num_params():,} parameters to {args.out}")
    if tokenizer is None:
        cli.log(f"warning: {args.checkpoint} does not say which tokenizer the model uses (and its vocabulary is not "
                "Llama 3's), so the export records none and has no tokenizer files: pass --tokenizer to add them")
    return {"from": detected, "to": args.dst_format, "out": args.out, "num_params": cfg.num_params(),
            "tokenizer": None if tokenizer is None else tokenizer.name, "max_seq_len": cfg.max_seq_len}


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
