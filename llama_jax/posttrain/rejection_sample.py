"""Rejection sampling (Llama 3, section 4.2.2): K samples per prompt from the policy, the reward model's favourite
kept as an SFT chat record.

    python -m llama_jax.posttrain.rejection_sample --checkpoint runs/sft --reward runs/rm --input prompts.jsonl \\
        --out out.jsonl --samples 10 --temperature 1.0 --top-p 0.9 --max-new-tokens 256 [--system-prompt "Be brief."]
    records, dropped = best_of_k(policy, scorer, prompts, Settings(samples=10))    # the same, in Python

Prompts are ``data.prompts`` records ({"prompt": str | [messages], "id": ...}). Each prompt is prefilled once and its
KV cache broadcast to its K samples (``generate``'s samples_per_prompt). A steering system prompt
(``--system-prompt``; the paper steers tone and format this way) goes in front of the prompt for sampling only. A
sample is usable when it ends with <|eot_id|>, holds no other special token nor an id the tokenizer lacks, its bytes
are valid UTF-8 (a reply cut inside a character, or of stray bytes, would reach SFT as U+FFFD), and it is not blank.
Every sample is scored by the reward model as a reply to the prompt as recorded, re-encoded from its text as SFT will
read it (an unusable sample's text leaves the special and unknown ids out); the best is the usable sample of the
highest score, ties to the lowest index. A prompt with no usable sample is not written: the log line and the result
count such prompts ("dropped") and their samples by why they are unusable ("dropped_samples"). Each output line:

    {"id", "messages": prompt messages + [{"role": "assistant", "content": best}], "scores": [K floats],
     "best": index, "usable": [K bools], "policy": identity, "reward": identity, "sampling": settings}

(identities: ``checkpoint.identity``; with ``--keep-samples`` also "samples": the K texts). The SFT stage reads it
as a chat record. The steering system prompt stays out of "messages" unless ``--keep-system-prompt``.

``--checkpoint`` is the policy, ``--reward`` the reward model, ``--input`` the prompts, ``--out`` the records
written. Sample j of prompt i (in the order read) is request i K + j of ``--seed`` (``generate``'s per-request
keys), so the samples do not depend on how prompts are batched: any ``--batch-size`` (prompts that go through the
policy together) writes the same file. Each batch's records are appended to OUT and fsynced when done. A rerun keeps
OUT's complete records and goes on after the prompt of the last one (prompts after it left no record or were not
sampled yet): a killed run loses at most the batch in flight and ends with exactly the records of an uninterrupted
one, whatever the batch sizes of the two runs; the result counts the prompts this run sampled. A rerun whose settings
or checkpoints differ from OUT's records is refused. Malformed prompt records and prompts too long to continue by
``--max-new-tokens`` are errors, or skipped with ``--on-error skip``.
(The old spelling ``... prompts.jsonl out.jsonl`` works for one release.)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_jax import checkpoint, cli, generate
from llama_jax.config import ModelConfig
from llama_jax.data import PromptRecord, read_prompts
from llama_jax.data.chat import encode_prompt
from llama_jax.errors import ConfigError, DataError
from llama_jax.posttrain.score import Scorer, encode_replies
from llama_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Settings:
    """How samples are drawn; recorded in every output record (a rerun must match them)."""

    samples: int = 10  # K per prompt (the paper: 10 to 30)
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int = 256
    system_prompt: str | None = None  # steering prompt, for sampling only
    keep_system_prompt: bool = False  # keep it in the record's messages
    keep_samples: bool = False  # write every sample's text too
    seed: int = 0

    def __post_init__(self):
        if self.samples < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"samples and max_new_tokens must be >= 1: {self}")
        if self.temperature <= 0 and self.samples > 1:
            raise ConfigError("temperature 0 (greedy) gives K identical samples; rejection sampling needs > 0")


@dataclasses.dataclass
class Policy:
    """A policy as ``generate.load_model`` gives it (per-layer parameters for decoding)."""

    params: Any
    cfg: ModelConfig
    tokenizer: Tokenizer


def sampled_messages(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The prompt with the steering system prompt in front (before the prompt's own system message, if any)."""
    if not system_prompt:
        return messages
    if messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{system_prompt}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": system_prompt}, *messages]


@functools.lru_cache(maxsize=4)
def _token_bytes(tok: Tokenizer) -> list[bytes]:
    return tok.token_bytes()  # built once: Llama 3's sorts 128k entries


def sample_text(tok: Tokenizer, ids: Sequence[int]) -> tuple[str, str | None]:
    """(the reply text of a sample, why it is unusable or None if it is usable: see the module docstring)."""
    body = list(ids[:-1]) if ids and ids[-1] in tok.stop_ids else list(ids)
    plain = [t for t in body if t < tok.vocab_size and t not in tok.special_tokens.values()]
    text = tok.decode(plain)
    if not ids or ids[-1] != tok.eot_id:
        return text, "no <|eot_id|> at the end"
    if any(t >= tok.vocab_size for t in body):
        return text, "an id the tokenizer lacks"
    if len(plain) != len(body):
        return text, "a special token inside"
    try:
        b"".join(_token_bytes(tok)[t] for t in plain).decode("utf-8")
    except UnicodeDecodeError:
        return text, "not valid UTF-8"
    return text, None if text.strip() else "blank"


def best_of_k(policy: Policy, scorer: Scorer, prompts: Sequence[PromptRecord], settings: Settings, *,
              first: int = 0) -> tuple[list[dict], dict[str, list[str]]]:
    """One batch: K samples of each prompt, scored. Returns the records of the prompts with a usable sample (without
    the identities) and, for the others, why each of their samples is unusable (prompt id -> K reasons). ``first``:
    the index of ``prompts[0]`` among all prompts sampled (whose requests' keys its samples use)."""
    tok, k = policy.tokenizer, settings.samples
    sampled = [sampled_messages(p.messages, settings.system_prompt) for p in prompts]
    outputs = generate.generate(policy.params, policy.cfg, [encode_prompt(tok, m) for m in sampled],
                                settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p,
                                seed=settings.seed, stop_ids=tok.stop_ids, vocab_size=tok.vocab_size,
                                samples_per_prompt=k, first_request=first * k)
    records, dropped = [], {}
    for i, prompt in enumerate(prompts):
        texts, problems = zip(*(sample_text(tok, ids) for ids in outputs[i * k:(i + 1) * k]))
        usable = [problem is None for problem in problems]
        if not any(usable):
            dropped[prompt.id] = list(problems)
            continue
        kept = sampled[i] if settings.keep_system_prompt else prompt.messages
        scores = scorer.score(encode_replies(scorer.tokenizer, kept, texts))
        best = max((j for j in range(k) if usable[j]), key=lambda j: (scores[j], -j))
        record = {"id": prompt.id, "messages": [*kept, {"role": "assistant", "content": texts[best]}],
                  "scores": [float(s) for s in scores], "best": best, "usable": usable}
        if settings.keep_samples:
            record["samples"] = list(texts)
        records.append(record)
    return records, dropped


def _done_prompts(out: Path, prompts: list[PromptRecord], header: dict) -> tuple[int, int]:
    """(how many leading prompts OUT has done: up to the one of its last complete record, its records); OUT is
    rewritten without a cut-off last line."""
    if not out.exists():
        return 0, 0
    lines = out.read_text().split("\n")
    records = []
    for number, line in enumerate(lines[:-1], start=1):  # the text after the last newline is a cut-off write
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{out}:{number} is not JSON; this is not a rejection-sampling output to resume") from None
    for number, record in enumerate(records, start=1):
        differing = {key: (record.get(key), value) for key, value in header.items() if record.get(key) != value}
        if differing:
            raise ConfigError(f"{out}:{number} was written with other settings or checkpoints (record, now: "
                              f"{differing}); write to another file or rerun with the same ones")
    done = 0
    ids = [p.id for p in prompts]
    for number, record in enumerate(records, start=1):  # the records' ids, in the prompts' order
        try:
            done = ids.index(record["id"], done) + 1
        except ValueError:
            raise ConfigError(f"{out}:{number} holds a record (id {record['id']!r}) that is not among the prompts "
                              f"after those of the lines before it: it was written from another prompt file; write "
                              "to another file") from None
    if lines[-1]:
        partial = out.with_name(out.name + ".partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(partial, out)
    return done, len(records)


parser = cli.parser("python -m llama_jax.posttrain.rejection_sample", __doc__)
cli.add_checkpoint(parser)
cli.add_reward(parser)
cli.add_input(parser)
cli.add_out(parser)
cli.add_tokenizer(parser)
cli.add_sampling(parser, temperature=1.0)
cli.add_max_new_tokens(parser)
cli.add_seed(parser)
cli.add_samples(parser, 10)
parser.add_argument("--system-prompt", default=None, help="steering system prompt, for sampling only")
parser.add_argument("--keep-system-prompt", action="store_true", help="keep the steering prompt in the records")
parser.add_argument("--keep-samples", action="store_true", help="write every sample's text too")
cli.add_batch_size(parser, 8)
parser.add_argument("--score-batch-size", type=int, default=32, help="sequences per reward-model forward pass")
cli.add_on_error(parser)
cli.deprecate(parser, positional=("--input", "--out"))


def run(args: argparse.Namespace) -> dict:
    settings = Settings(samples=args.samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_new_tokens=args.max_new_tokens, system_prompt=args.system_prompt,
                        keep_system_prompt=args.keep_system_prompt, keep_samples=args.keep_samples, seed=args.seed)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    policy = Policy(*generate.load_model(args.checkpoint, args.tokenizer))
    scorer = Scorer.load(args.reward, batch_size=args.score_batch_size)
    if scorer.tokenizer.sha256 != policy.tokenizer.sha256:
        raise ConfigError(f"the policy's tokenizer ({policy.tokenizer.name}) and the reward model's "
                          f"({scorer.tokenizer.name}) differ: the reward model could not read the samples")
    prompts, skipped = read_prompts(args.input, policy.tokenizer, on_error=args.on_error)
    room = policy.cfg.max_seq_len - settings.max_new_tokens
    for p in prompts:
        if len(encode_prompt(policy.tokenizer, sampled_messages(p.messages, settings.system_prompt))) > room:
            if args.on_error != "skip":
                raise DataError(f"{p.where}: prompt {p.id!r} leaves fewer than max_new_tokens="
                                f"{settings.max_new_tokens} positions of max_seq_len={policy.cfg.max_seq_len}")
            skipped[p.where] = "too long to continue by max_new_tokens"
    prompts = [p for p in prompts if p.where not in skipped]
    header = {"policy": checkpoint.identity(args.checkpoint), "reward": checkpoint.identity(args.reward),
              "sampling": dataclasses.asdict(settings)}
    out = Path(args.out)
    done, kept = _done_prompts(out, prompts, header)
    cli.log(f"rejection sampling: {len(prompts)} prompts x {settings.samples} samples; {done} already done "
            f"({kept} records in {out})")
    written, dropped = 0, {}
    with open(out, "a") as f:
        starts = range(done, len(prompts), args.batch_size)
        for start in cli.progress(starts, total=len(starts), desc="batches"):
            records, unusable = best_of_k(policy, scorer, prompts[start:start + args.batch_size], settings,
                                          first=start)
            f.write("".join(json.dumps({**r, **header}) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
            written, dropped = written + len(records), {**dropped, **unusable}
    reasons = dict(sorted(Counter(reason for problems in dropped.values() for reason in problems).items()))
    cli.log(f"rejection sampling: {written} records written, {len(dropped)} prompts without a usable sample not "
            f"written (their samples: {', '.join(f'{n} {reason}' for reason, n in reasons.items()) or 'none'})")
    return {"out": str(out.resolve()), "prompts": len(prompts), "resumed_prompts": done,
            "sampled_prompts": len(prompts) - done, "written": written, "dropped": len(dropped),
            "dropped_samples": reasons, "skipped": len(skipped),
            "skipped_lines": skipped}


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
