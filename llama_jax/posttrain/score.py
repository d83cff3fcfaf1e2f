"""Reward-model scores of prompt/reply records: ``python -m llama_jax.posttrain.score --checkpoint RM --input in.jsonl
--out out.jsonl``, where RM is a reward-stage run or step directory.

    scorer = Scorer.load("runs/rm")                       # a checkpoint of the reward stage
    ids = encode_replies(scorer.tokenizer, "Hi", ["Hello!", "Go away."])    # prompt + reply ids, one per reply
    scores = scorer.score(ids)                            # float32 [n], batch_size rows at a time

Records (JSON Lines): {"prompt": str | [messages], "response": reply} gets "score", {"prompt": ..., "responses":
[reply, ...]} gets "scores"; other fields are kept. Prompts and replies are written as preference data writes them
(``data.preference``: a reply is a string, an assistant message, or messages from the assistant's to the
assistant's). A reply is scored as the reward stage scores it: the templated prompt's ids, then the reply's, and
the head read at its last token (the closing <|eot_id|>). A malformed record is an error naming file and line, or
with ``--on-error skip`` left out of the output and counted; so is a sequence longer than ``--max-tokens``. The
output file must not exist. (The old spelling ``--reward RM in.jsonl out.jsonl`` works for one release.)
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
from llama_jax.config import ModelConfig
from llama_jax.data.chat import check_order, encode_prompt, encode_reply, prompt_messages, reply_messages
from llama_jax.errors import CheckpointError, ConfigError, DataError
from llama_jax.tokenizer import Tokenizer, get_tokenizer
from llama_jax.train import reward

_BUCKET = 64  # rows are padded to a multiple of this many tokens (fewer recompilations)


def encode_replies(tokenizer: Tokenizer, prompt, replies: Sequence) -> list[list[int]]:
    """The ids of prompt + reply for each reply (see the module docstring for the shapes accepted)."""
    messages = prompt_messages(prompt)
    sequences = []
    for i, reply in enumerate(replies):
        reply = reply_messages(reply, f"reply {i}")
        check_order(messages + reply)
        sequences.append(encode_prompt(tokenizer, messages) + encode_reply(tokenizer, reply)[0])
    return sequences


class Scorer:
    """A reward model ready to score token sequences at their last token, in batches of ``batch_size`` rows."""

    def __init__(self, params, cfg: ModelConfig, tokenizer: Tokenizer, *, batch_size: int = 16, mesh=None):
        if reward.HEAD not in params:
            raise CheckpointError(f"the checkpoint has no {reward.HEAD}: it is not a reward model (train one with "
                                  "the reward stage, configs/reward/)")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.params, self.cfg, self.tokenizer = params, cfg.replace(remat="none"), tokenizer
        self.batch_size, self.mesh = batch_size, mesh
        self._scores = jax.jit(functools.partial(reward.token_scores, cfg=self.cfg))

    @classmethod
    def load(cls, path: str, *, tokenizer: str | None = None, batch_size: int = 16, mesh=None) -> Scorer:
        params, cfg, metadata = checkpoint.load(path, shardings=mesh)
        tok = get_tokenizer(tokenizer or (metadata.get("tokenizer") or {}).get("name") or "llama3")
        if tok.vocab_size > cfg.vocab_size:
            raise ConfigError(f"tokenizer {tok.name!r} has {tok.vocab_size} ids; the reward model only "
                              f"{cfg.vocab_size}: pass the tokenizer it was trained with")
        return cls(params, cfg, tok, batch_size=batch_size, mesh=mesh)

    def score(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [n]: the score of each id sequence (prompt + reply) at its last token."""
        for i, ids in enumerate(sequences):
            if not len(ids) or len(ids) > self.cfg.max_seq_len:
                raise DataError(f"sequence {i} has {len(ids)} tokens; a scored sequence has 1 to the model's "
                                f"max_seq_len={self.cfg.max_seq_len}")
        out = np.zeros(len(sequences), np.float32)
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start:start + self.batch_size]
            length = -(-max(len(ids) for ids in chunk) // _BUCKET) * _BUCKET
            tokens, segments = np.zeros((2, self.batch_size, length), np.int32)  # rows past the chunk: padding
            for row, ids in enumerate(chunk):
                tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
            positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
            with sharding.activate(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                scores = np.asarray(self._scores(self.params, tokens=tokens, positions=positions,
                                                 segment_ids=segments))
            out[start:start + len(chunk)] = scores[np.arange(len(chunk)), [len(ids) - 1 for ids in chunk]]
        return out


def read_records(path: str, tokenizer: Tokenizer, *, max_tokens: int, on_error: str = "raise"
                 ) -> tuple[list[tuple[dict, list[list[int]]]], dict[str, str]]:
    """(record, ids of each reply) of every usable line of a JSONL file, and the skipped lines ("file:line" ->
    why)."""
    records, skipped = [], {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "prompt" not in record or (
                        ("response" in record) == ("responses" in record)):
                    raise DataError('a record is an object with "prompt" and either "response" or "responses"')
                replies = [record["response"]] if "response" in record else record["responses"]
                if not isinstance(replies, list) or not replies:
                    raise DataError('"responses" must be a non-empty list of replies')
                sequences = encode_replies(tokenizer, record["prompt"], replies)
                longest = max(len(ids) for ids in sequences)
                if longest > max_tokens:
                    raise DataError(f"a reply takes {longest} tokens with its prompt, more than {max_tokens}")
            except (ValueError, KeyError, TypeError) as e:  # DataError and JSON errors are ValueErrors
                if on_error != "skip":
                    raise DataError(f"{where}: {e}; use --on-error skip to leave such records out") from None
                skipped[where] = str(e)
                continue
            records.append((record, sequences))
    return records, skipped


parser = cli.parser("python -m llama_jax.posttrain.score", __doc__)
cli.add_checkpoint(parser)
cli.add_input(parser)
cli.add_out(parser)
cli.add_batch_size(parser, 16)
parser.add_argument("--max-tokens", type=int, default=None, help="longest prompt + reply (default: max_seq_len)")
cli.add_on_error(parser)
cli.add_tokenizer(parser)
cli.add_mesh(parser)
cli.deprecate(parser, positional=("--input", "--out"), renamed={"--reward": "--checkpoint"})


def run(args: argparse.Namespace) -> dict:
    if os.path.exists(args.out):
        raise ConfigError(f"{args.out} already exists; choose another output file")
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    scorer = Scorer.load(args.checkpoint, tokenizer=args.tokenizer, batch_size=args.batch_size, mesh=mesh)
    records, skipped = read_records(args.input, scorer.tokenizer, on_error=args.on_error,
                                    max_tokens=args.max_tokens or scorer.cfg.max_seq_len)
    flat = [ids for _, sequences in records for ids in sequences]
    scores = np.zeros(len(flat), np.float32)
    for start in cli.progress(range(0, len(flat), args.batch_size), desc="score", unit="batch"):
        scores[start:start + args.batch_size] = scorer.score(flat[start:start + args.batch_size])
    partial = f"{args.out}.partial"
    with open(partial, "w") as f:
        at = 0
        for record, sequences in records:
            values = [float(s) for s in scores[at:at + len(sequences)]]
            at += len(sequences)
            record = {**record, **({"score": values[0]} if "response" in record else {"scores": values})}
            f.write(json.dumps(record) + "\n")
    os.replace(partial, args.out)
    return {"out": os.path.abspath(args.out), "records": len(records), "replies": len(flat),
            "skipped": len(skipped), "skipped_lines": skipped, "reward": checkpoint.identity(args.checkpoint)}


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
