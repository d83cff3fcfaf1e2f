"""A synthetic instruction task whose preference a program checks: "Write N words about TOPIC."

    prompt = make_prompt(random.Random(0))       # e.g. "Write 3 words about the sea."
    judge(prompt, "Salt and foam.")              # 0: obeys; -k: k words too many or too few
    prefer(prompt, a, b)                         # 1 if a is better, -1 if b is, 0 on a tie
    write_datasets("runs/posttrain/data", seed=0)    # sft, preference, prompt and held-out files
    pairs = annotate(rejection_sampling_records)    # the judge ranks a policy's samples: preference pairs
    rows = win_rates({"sft": "runs/sft", "dpo": "runs/dpo"}, "heldout.jsonl", baseline="sft")

    python -m llama_jax.eval.word_count data --out runs/posttrain/data
    python -m llama_jax.eval.word_count annotate --input samples.jsonl --out prefs.jsonl   # of rejection_sample
    python -m llama_jax.eval.word_count winrate --input heldout.jsonl --baseline sft \\
        --checkpoint sft=runs/sft --checkpoint dpo=runs/dpo

``annotate``'s input is rejection_sample's output written with ``--keep-samples``; ``winrate`` names each
``--checkpoint`` NAME=PATH and compares them with the one ``--baseline`` names. (The old spellings ``annotate SAMPLES
OUT`` and ``winrate --prompts FILE NAME=PATH ...`` work for one release.)

The judge: a reply's words are its whitespace-separated pieces; its score is ``-|words - N|`` (0 is a reply that
obeys), and of two replies the one with the higher score wins. The data (``write_datasets``) is made to leave a
round of post-training something to fix: the SFT replies obey only ``sft_accuracy`` of the time (else they are one
or two words off), preference pairs rank a reply closer to N above one further away (an edited reply, when a
record has one, is the chosen reply corrected to N words), and prompts for rejection sampling and held-out prompts
come from separate random streams (held-out prompts are never trained on).

Annotation (``annotate``): the paper's preference data are pairs of the latest models' samples ranked by human
annotators; here the judge ranks the samples that rejection sampling kept (``--keep-samples``): per prompt, the
usable sample it likes best (chosen) against the one it likes least (rejected), where it tells them apart.

Measured on held-out prompts, from ``samples`` replies per prompt sampled at ``temperature`` (the policy as rejection
sampling sees it: greedy decoding would show only each distribution's mode), with the same seeds for every model:
``compliance`` is the share of replies that obey, ``words_off`` the mean |words - N|, and the win rate against a
baseline the share of (prompt, sample index) pairs where the judge prefers the model's reply to the baseline's, a
tie counting half (50%: as good as the baseline). ``greedy_compliance``: the share of greedy replies that obey.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from llama_jax import cli, generate
from llama_jax.data import read_prompts
from llama_jax.errors import ConfigError, DataError

TOPICS = ("the sea", "a king", "the night", "love", "war", "the moon", "a rose", "the wind", "a sword", "spring",
          "the crown", "a ghost", "the sun", "a storm", "the forest", "a fool")
WORDS = ("salt", "foam", "wave", "deep", "blue", "crown", "throne", "lord", "proud", "old", "dark", "star", "cold",
         "sleep", "dream", "sweet", "heart", "fair", "true", "blood", "steel", "fight", "pale", "silver", "light",
         "red", "bloom", "thorn", "soft", "wild", "cry", "storm", "rain", "green", "tree", "leaf", "gold", "fire",
         "day", "bright", "grave", "moan", "jest", "merry", "song", "shade", "high", "long", "still", "gentle")
MAX_WORDS = 6


def words_in(text: str) -> int:
    return len(text.split())


def asked_words(prompt: str | Sequence[Mapping]) -> int:
    """N of a task prompt (a string, or messages whose last user message is the task)."""
    text = prompt if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] == "user"][-1]
    pieces = text.split()
    if len(pieces) < 3 or pieces[0] != "Write" or not pieces[1].isdigit() or pieces[2] not in ("word", "words"):
        raise ConfigError(f"not a word-count prompt: {text!r} (expected 'Write N words about ...')")
    return int(pieces[1])


def judge(prompt, reply: str) -> int:
    """0 when the reply has the N words asked for, else minus how many words it is off."""
    return -abs(words_in(reply) - asked_words(prompt))


def prefer(prompt, a: str, b: str) -> int:
    """1 if the judge prefers reply a, -1 if b, 0 on a tie."""
    return int(np.sign(judge(prompt, a) - judge(prompt, b)))


def make_prompt(rng: random.Random) -> str:
    n = rng.randint(1, MAX_WORDS)
    return f"Write {n} word{'s' if n > 1 else ''} about {rng.choice(TOPICS)}."


def make_reply(rng: random.Random, n: int) -> str:
    """n words (at least 1), capitalised, ending with a full stop."""
    words = [rng.choice(WORDS) for _ in range(max(n, 1))]
    return " ".join(words).capitalize() + "."


def _off_by(rng: random.Random, n: int, low: int, high: int) -> int:
    """A word count low..high words away from n (and >= 1)."""
    candidates = [m for d in range(low, high + 1) for m in (n - d, n + d) if m >= 1]
    return rng.choice(candidates)


def sft_record(rng: random.Random, accuracy: float) -> dict:
    prompt = make_prompt(rng)
    n = asked_words(prompt)
    count = n if rng.random() < accuracy else _off_by(rng, n, 1, 2)
    return {"prompt": prompt, "completion": make_reply(rng, count)}


def preference_record(rng: random.Random, edited_share: float) -> dict:
    """chosen is closer to N than rejected; in ``edited_share`` of the records chosen is one word off and an edited
    reply, chosen corrected to N words, ranks above it (edited > chosen > rejected)."""
    prompt = make_prompt(rng)
    n = asked_words(prompt)
    edited = rng.random() < edited_share
    chosen_count = _off_by(rng, n, 1, 1) if edited or rng.random() < 0.3 else n
    off = abs(chosen_count - n)
    record = {"prompt": prompt, "chosen": make_reply(rng, chosen_count),
              "rejected": make_reply(rng, _off_by(rng, n, off + 1, off + 2))}
    if edited:
        words = record["chosen"].rstrip(".").split()
        words = words[:n] if len(words) > n else words + [rng.choice(WORDS)] * (n - len(words))
        record["edited"] = " ".join(words).capitalize() + "."
    return record


def write_datasets(out: str | os.PathLike, *, seed: int = 0, sft: int = 2000, preference: int = 2000,
                   prompts: int = 256, heldout: int = 128, sft_accuracy: float = 0.5,
                   edited_share: float = 0.3) -> dict[str, str]:
    """sft.jsonl (prompt/completion), preference.jsonl, prompts.jsonl (rejection sampling) and heldout.jsonl
    under ``out``, each from its own seeded stream; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    streams = {name: random.Random(f"{seed}:{name}") for name in ("sft", "preference", "prompts", "heldout")}
    records = {
        "sft": [sft_record(streams["sft"], sft_accuracy) for _ in range(sft)],
        "preference": [preference_record(streams["preference"], edited_share) for _ in range(preference)],
        "prompts": [{"id": f"p{i}", "prompt": make_prompt(streams["prompts"])} for i in range(prompts)],
        "heldout": [{"id": f"h{i}", "prompt": make_prompt(streams["heldout"])} for i in range(heldout)],
    }
    paths = {}
    for name, rows in records.items():
        paths[name] = str(out / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def annotate(records: Iterable[Mapping]) -> list[dict]:
    """Preference records from rejection-sampling records that kept their samples: the judge's best usable sample
    as chosen, its worst as rejected (ties to the earlier sample), for every prompt where the two differ in score."""
    pairs = []
    for record in records:
        if "samples" not in record:
            raise DataError("a rejection-sampling record without samples: run rejection_sample with --keep-samples")
        prompt = record["messages"][:-1]
        usable = list(dict.fromkeys(t for t, ok in zip(record["samples"], record["usable"]) if ok))
        if len(usable) < 2:
            continue
        ranked = sorted(usable, key=lambda text: -judge(prompt, text))  # stable: ties keep sample order
        if judge(prompt, ranked[0]) > judge(prompt, ranked[-1]):
            pairs.append({"prompt": prompt, "chosen": ranked[0], "rejected": ranked[-1]})
    return pairs


def replies(checkpoint: str, prompts_path: str, *, samples: int = 1, temperature: float = 0.0, seed: int = 0,
            max_new_tokens: int = 48, batch_size: int = 64) -> tuple[list[list[dict]], list[list[str]]]:
    """(the prompts of a prompt file as messages, ``samples`` replies of the checkpoint to each), in file order;
    sample j of prompt i is request ``i * samples + j`` of ``seed``, whatever ``batch_size``."""
    params, cfg, tok = generate.load_model(checkpoint)
    prompts, _ = read_prompts(prompts_path, tok)
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids = [p.ids for p in prompts[start:start + batch_size]]
        outputs = generate.generate(params, cfg, ids, max_new_tokens, temperature, seed=seed,
                                    stop_ids=tok.stop_ids, vocab_size=tok.vocab_size, samples_per_prompt=samples,
                                    first_request=start * samples)
        decoded = [tok.decode([t for t in new if t not in tok.stop_ids]) for new in outputs]
        texts += [decoded[i:i + samples] for i in range(0, len(decoded), samples)]
    return [p.messages for p in prompts], texts


def win_rates(checkpoints: Mapping[str, str], prompts_path: str, *, baseline: str, samples: int = 4,
              temperature: float = 1.0, seed: int = 0, max_new_tokens: int = 48) -> list[dict]:
    """One row per checkpoint: compliance, words off and win rate against ``baseline`` of sampled replies, and
    the compliance of greedy replies (see the module docstring)."""
    if baseline not in checkpoints:
        raise ConfigError(f"baseline {baseline!r} is not one of the checkpoints {list(checkpoints)}")
    sampled, greedy = {}, {}
    for name, path in cli.progress(checkpoints.items(), desc="models", unit="model"):
        prompts, sampled[name] = replies(path, prompts_path, samples=samples, temperature=temperature, seed=seed,
                                         max_new_tokens=max_new_tokens)
        _, greedy[name] = replies(path, prompts_path, max_new_tokens=max_new_tokens)
    rows = []
    for name, texts in sampled.items():
        scores = np.array([[judge(p, t) for t in replies_of] for p, replies_of in zip(prompts, texts)])
        duels = np.array([[prefer(p, a, b) for a, b in zip(ours, theirs)]
                          for p, ours, theirs in zip(prompts, texts, sampled[baseline])])
        rows.append({"model": name, "checkpoint": checkpoints[name], "prompts": len(prompts), "samples": samples,
                     "temperature": temperature, "compliance": float(np.mean(scores == 0)),
                     "words_off": float(-scores.mean()), "win_rate": float(np.mean((duels + 1) / 2)),
                     "greedy_compliance": float(np.mean([judge(p, t[0]) == 0 for p, t in zip(prompts, greedy[name])])),
                     "example": greedy[name][0][0]})
    return rows


def format_table(rows: Sequence[Mapping], baseline: str) -> str:
    r0 = rows[0]
    lines = [f"{r0['prompts']} held-out prompts x {r0['samples']} samples at temperature {r0['temperature']}: "
             f"compliance, mean |words - N|, win rate vs {baseline} (the judge prefers the reply closer to N words; a "
             "tie counts half); and the compliance of greedy replies", "",
             "| model | compliance | words off | win rate | greedy compliance |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['compliance']:.1%} | {r['words_off']:.2f} | {r['win_rate']:.1%} | "
              f"{r['greedy_compliance']:.1%} |" for r in rows]
    return "\n".join(lines)


parser = cli.parser("python -m llama_jax.eval.word_count", __doc__)
commands = parser.add_subparsers(dest="command", required=True)
data_parser = commands.add_parser("data", help="write the synthetic datasets")
cli.add_out(data_parser)
cli.add_seed(data_parser)
data_parser.add_argument("--sft", type=int, default=2000, help="SFT records")
data_parser.add_argument("--preference", type=int, default=2000, help="preference records")
data_parser.add_argument("--prompts", type=int, default=256, help="prompts for rejection sampling")
data_parser.add_argument("--heldout", type=int, default=128, help="held-out prompts")
annotate_parser = commands.add_parser("annotate", help="preference pairs of rejection-sampling samples",
                                      description="--input: rejection_sample's output written with --keep-samples; "
                                                  "--out: the preference JSONL to write")
cli.add_input(annotate_parser)
cli.add_out(annotate_parser)
cli.deprecate(annotate_parser, positional=("--input", "--out"))
win_parser = commands.add_parser("winrate", help="compliance and win rate of checkpoints on held-out prompts",
                                 description="--input: the held-out prompt file; each --checkpoint is NAME=PATH")
cli.add_input(win_parser)
cli.add_checkpoint(win_parser, repeated=True)
win_parser.add_argument("--baseline", required=True, metavar="NAME", help="the NAME the others are compared with")
cli.add_samples(win_parser, 4)
cli.add_temperature(win_parser, 1.0)
cli.add_seed(win_parser)
cli.add_max_new_tokens(win_parser, 48)
cli.deprecate(win_parser, positional=("--checkpoint",), renamed={"--prompts": "--input"})


def run(args: argparse.Namespace) -> dict:
    if args.command == "data":
        paths = write_datasets(args.out, seed=args.seed, sft=args.sft, preference=args.preference,
                               prompts=args.prompts, heldout=args.heldout)
        return {"out": os.path.abspath(args.out), **paths}
    if args.command == "annotate":
        with open(args.input) as f:
            pairs = annotate(json.loads(line) for line in f if line.strip())
        Path(args.out).write_text("".join(json.dumps(p) + "\n" for p in pairs))
        return {"out": os.path.abspath(args.out), "pairs": len(pairs)}
    checkpoints = dict(spec.split("=", 1) for spec in args.checkpoint if "=" in spec)
    if len(checkpoints) != len(args.checkpoint):
        raise ConfigError(f"name each --checkpoint NAME=PATH, got {args.checkpoint}")
    rows = win_rates(checkpoints, args.input, baseline=args.baseline, samples=args.samples,
                     temperature=args.temperature, seed=args.seed, max_new_tokens=args.max_new_tokens)
    print(format_table(rows, args.baseline))
    return {"baseline": args.baseline, "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
