"""Convert weights between Hugging Face, Meta and llama_jax layouts.

    python -m llama_jax.convert --from meta --to hf Meta-Llama-3.1-70B/ llama-3.1-70b-hf/
    python -m llama_jax.convert --from llama_jax --to meta --num-shards 8 runs/sft/ exported-meta/
    python -m llama_jax.convert --to llama_jax llama-3.2-1b-hf/ ckpt/        # --from detected from the files

DST must not exist yet; it appears only when the conversion has succeeded.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from llama_jax import convert
from llama_jax.errors import LlamaJaxError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="src_format", choices=convert.FORMATS,
                        help="format of SRC (default: detected from its files)")
    parser.add_argument("--to", dest="dst_format", choices=convert.FORMATS, required=True)
    parser.add_argument("--num-shards", type=int, default=1, help="model-parallel shards of a Meta export")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="size of HF safetensors shards")
    parser.add_argument("src", metavar="SRC")
    parser.add_argument("dst", metavar="DST")
    args = parser.parse_args(argv)

    def progress(what: str):
        return lambda items: tqdm(items, desc=what, unit="file", file=sys.stderr)

    try:
        convert.check_destination(args.dst)  # before reading: fail in seconds, not after minutes
        detected = convert.detect_format(args.src)
        if args.src_format is not None and args.src_format != detected:
            raise LlamaJaxError(f"{args.src} looks like a {detected!r} checkpoint, not {args.src_format!r}")
        params, cfg = convert.read(args.src, detected, progress=progress("reading"))
        convert.write(args.dst, args.dst_format, params, cfg, progress=progress("writing"),
                      num_shards=args.num_shards, max_shard_bytes=int(args.max_shard_gb * 2**30))
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst_format} checkpoint of {cfg.num_params():,} parameters to {args.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
