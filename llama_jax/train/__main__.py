"""``python -m llama_jax.train --config configs/pretrain/tiny.py --config.run_dir=/tmp/run --config.train.steps=50``

Any key of the experiment config can be changed with ``--config.<section>.<key>=<value>`` (lists and dicts as
JSON); unknown keys are an error; ``--help`` with ``--config`` lists every key and its default. ``--data
PATH[:FORMAT]`` (repeatable) replaces ``data.sources`` without writing JSON:

    python -m llama_jax.train --config configs/pretrain/tiny.py --data my.jsonl --config.run_dir=/tmp/mine

The run directory (checkpoints, metrics) is ``--config.run_dir``: the result's ``out``. Rerunning the same command
resumes from the newest checkpoint in ``run_dir`` that verifies. On a pod, start one process per host with
``--coordinator``, ``--num-processes``, ``--process-id`` (or let SLURM / the TPU VM tell them).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from llama_jax import cli
from llama_jax.errors import ConfigError
from llama_jax.train import loop

parser = cli.parser("python -m llama_jax.train", __doc__, config=True)
cli.add_data(parser)


def run(args: argparse.Namespace) -> dict:
    if args.config is None:
        raise ConfigError("--config is required, e.g. --config configs/pretrain/tiny.py")
    if args.data:
        args.config.data.sources = cli.data_sources(args.data)
    metrics = loop.run(args.config)
    return {"out": os.path.abspath(args.config.run_dir), **(metrics or {})}


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
