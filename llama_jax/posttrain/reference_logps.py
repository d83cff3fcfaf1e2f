"""Precompute DPO's reference log-probs into the preference data, once, so DPO keeps no reference model in memory.

    python -m llama_jax.posttrain.reference_logps --config configs/dpo/tiny.py:prefs.jsonl --out prefs.ref.jsonl
    python -m llama_jax.train --config configs/dpo/tiny.py:prefs.ref.jsonl --config.dpo.reference=precomputed \\
        --config.init_from=runs/sft --config.run_dir=runs/dpo

Reads the DPO config's preference sources (every record of every file, in order), encodes each record as the DPO
stage does (the config's tokenizer and data.seq_len), and writes it with the column ``reference_logps``: for each
reply the sums of the reference's log-probs over its dpo_mask and loss_mask targets, with the reference's identity
(``checkpoint.identity``), the tokenizer and seq_len (layout: ``data.preference``), to ``--out`` (a new file). The
reference is the config's init_from (the checkpoint DPO starts from), or ``--checkpoint``. Records the DPO stage
cannot use are errors naming file and line, or with the config's ``data.on_error="skip"`` left out and counted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from llama_jax import checkpoint, cli, sharding
from llama_jax.data import REPLIES, encode_pair
from llama_jax.data.preference import PairRows, reference_column
from llama_jax.data.sources import expand_paths
from llama_jax.errors import ConfigError, DataError
from llama_jax.tokenizer import get_tokenizer
from llama_jax.train import dpo, loop

parser = cli.parser("python -m llama_jax.posttrain.reference_logps", __doc__, config=True)
cli.add_checkpoint(parser, required=False)
cli.add_out(parser)
cli.add_batch_size(parser, 16)
cli.add_mesh(parser)


def _records(config):
    """(file:line, record) of every non-blank line of the config's preference sources."""
    for spec in config.data.sources:
        if spec.get("format") != "preference":
            raise ConfigError(f"data source {dict(spec)} is not preference data")
        for path in expand_paths(spec["path"]):
            with open(path) as f:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        yield f"{path}:{number}", line


def run(args: argparse.Namespace) -> dict:
    config = args.config
    if config is None or config.stage != "dpo":
        raise ConfigError("--config must be a DPO experiment config (configs/dpo/*.py[:data])")
    reference = args.checkpoint or config.init_from
    if not reference:
        raise ConfigError("no reference model: pass --checkpoint or set the config's init_from")
    if os.path.exists(args.out):
        raise ConfigError(f"{args.out} already exists; choose another output file")
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    cfg = loop.model_config(config.model)  # computed as the DPO run computes: its dtypes, its parameter dtype
    params, _, _ = loop.start_from(reference, cfg, mesh)
    params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
    tok, seq_len = get_tokenizer(config.data.tokenizer), int(config.data.seq_len)
    rows, identity = PairRows(seq_len, tok), checkpoint.identity(reference)
    logps = jax.jit(functools.partial(dpo.reply_logps, cfg=cfg.replace(remat="none"),
                                      chunk_size=config.loss.vocab_chunk or None))
    skipped, written = {}, 0
    partial = f"{args.out}.partial"

    def flush(pending, f):
        batch = rows.batch([[pair] for _, pair in pending] + [[]] * (args.batch_size - len(pending)))
        with sharding.activate(mesh) if mesh is not None else contextlib.nullcontext():
            sums = {name: {mask: np.asarray(v) for mask, v in logps(params, rows=batch[name])[0].items()}
                    for name in REPLIES if any(name in pair.replies for _, pair in pending)}
        for i, (record, pair) in enumerate(pending):
            values = {name: {mask: sums[name][mask][i] for mask in sums[name]} for name in pair.replies}
            f.write(json.dumps({**record, "reference_logps": reference_column(identity, tok, seq_len, values)}) + "\n")

    with open(partial, "w") as f:
        pending = []
        for where, line in cli.progress(_records(config), desc="reference log-probs", unit="record"):
            try:
                record = json.loads(line)  # DPO reads no edited reply: neither encoded nor checked
                pending.append((record, encode_pair(tok, record, seq_len=seq_len, edited=False)))
            except (ValueError, KeyError, TypeError) as e:
                if config.data.on_error != "skip":
                    raise DataError(f"{where}: {e}; set data.on_error='skip' to leave such records out") from None
                skipped[where] = str(e)
                continue
            if len(pending) == args.batch_size:
                flush(pending, f)
                written, pending = written + len(pending), []
        if pending:
            flush(pending, f)
            written += len(pending)
    os.replace(partial, args.out)
    return {"out": os.path.abspath(args.out), "records": written, "skipped": len(skipped),
            "skipped_lines": skipped, "reference": identity}


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
