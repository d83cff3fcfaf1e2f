"""A run's low-rank adapters, folded into its base or written as a PEFT adapter.

    python -m llama_jax.lora merge --checkpoint runs/sft-lora --out sft-merged/     # a plain llama_jax checkpoint
    python -m llama_jax.lora export --checkpoint runs/sft-lora --out sft-adapter/   # PEFT's adapter_config.json...

A run trained with ``config.lora`` saves its adapters alone; its base is where the run's ``init_from`` pins it
(checked by checksum). ``merge`` writes W + scale A B as an ordinary checkpoint that every command reads (and that
``convert`` exports); commands given the run itself merge on load. ``export`` writes the adapters in PEFT's format,
for ``peft.PeftModel.from_pretrained`` on transformers' Llama of the same base (``convert --to hf`` of init_from).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from llama_jax import checkpoint, cli
from llama_jax.errors import ConfigError
from llama_jax.formats import peft

parser = cli.parser("python -m llama_jax.lora", __doc__)
commands = parser.add_subparsers(dest="command", required=True)
for name, help_text in (("merge", "the base with the adapters folded in, as a llama_jax checkpoint"),
                        ("export", "the adapters in PEFT's format")):
    sub = commands.add_parser(name, help=help_text, description=help_text)
    cli.add_checkpoint(sub)
    cli.add_out(sub)


def run(args: argparse.Namespace) -> dict:
    checkpoint.check_destination(args.out)
    adapters, cfg, metadata = checkpoint.load(args.checkpoint, merge_adapters=False)
    if cfg.lora is None:
        raise ConfigError(f"{args.checkpoint} holds no adapters (it was not trained with config.lora)")
    if args.command == "export":
        peft.write(args.out, adapters, cfg)
        cli.log(f"wrote the rank-{cfg.lora.rank} adapters of {args.checkpoint} in PEFT's format to {args.out}")
        return {"out": args.out, "rank": cfg.lora.rank, "targets": list(cfg.lora.targets)}
    params, merged_cfg, _ = checkpoint.load(args.checkpoint)
    checkpoint.save_params(args.out, params, merged_cfg, stage=metadata.get("stage", "export"),
                           tokenizer=metadata.get("tokenizer"),
                           stage_config={"merged": {"adapters": metadata.get("path", args.checkpoint),
                                                    "base": metadata.get("init_from")}},
                           extra_params=metadata.get("extra_params", ()))
    cli.log(f"wrote {args.checkpoint}'s base with its adapters merged in to {args.out}")
    return {"out": args.out, "num_params": merged_cfg.num_params()}


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
