"""Scoring retrieval: a model's greedy replies to a grid of prompts, exact match per (length, depth) cell.

    tok = get_tokenizer("byte")
    result = evaluate(model_generate_fn(params, cfg, tok, max_new_tokens=16), tok, Task("passkey"),
                      lengths=[256, 1024, 2048], depths=[0, 0.25, 0.5, 0.75, 1], samples=4)
    result.accuracy                                          # [lengths, depths], exact-match accuracy per cell

Exact match. A reply's *candidates* are its runs of digits (number needles) or its words that are in the needle
vocabulary ``WORDS`` (word needles), in order. A sample is correct when the reply's first k candidates equal the k
asked values exactly, in the asked order (k = 1 except for ``ask="all"``, which asks for every needle in the order
they appear in the text). "714320", "7143" or no number at all are wrong for 71432; "The pass key is 71432." is
right. A cell's accuracy is the fraction of its samples that are correct.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from llama_jax import generate
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError, DataError
from llama_jax.eval.retrieval.tasks import (
    WORDS,
    Sample,
    Task,
    check_grid,
    default_max_new_tokens,
    make_grid,
)
from llama_jax.tokenizer import Tokenizer

_WORD_SET = frozenset(WORDS)


def candidates(reply: str, value: str) -> list[str]:
    """A reply's candidate answers, in order: digit runs (value="number") or vocabulary words (value="word")."""
    if value == "number":
        return re.findall(r"[0-9]+", reply)
    return [w for w in re.findall(r"[a-z]+", reply.lower()) if w in _WORD_SET]


def is_correct(reply: str, sample: Sample, task: Task) -> bool:
    """Exact match: the reply's first candidates equal the asked values, in order (see the module docstring)."""
    return candidates(reply, task.value)[: len(sample.answers)] == list(sample.answers)


@dataclasses.dataclass
class RetrievalResult:
    """Per-cell exact-match accuracy of a grid, and every sample's reply."""

    task: Task
    tokenizer: str
    lengths: list[int]
    depths: list[float]
    samples: int
    seed: int
    accuracy: np.ndarray  # [len(lengths), len(depths)]
    records: list[dict]  # per sample: length, depth, prompt_tokens, answers, reply, correct

    @property
    def mean_accuracy(self) -> float:
        return float(self.accuracy.mean())

    def summary(self) -> dict:
        """The JSON-able result without the per-sample records."""
        return {"task": dataclasses.asdict(self.task), "tokenizer": self.tokenizer, "lengths": self.lengths,
                "depths": self.depths, "samples_per_cell": self.samples, "seed": self.seed,
                "accuracy": self.accuracy.round(6).tolist(), "mean_accuracy": round(self.mean_accuracy, 6)}

    def to_dict(self) -> dict:
        return {**self.summary(), "records": self.records}

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


GenerateFn = Callable[[list[list[int]]], Sequence[str]]


def evaluate(generate_fn: GenerateFn, tok: Tokenizer, task: Task, lengths: Sequence[int],
             depths: Sequence[float], samples: int = 4, *, seed: int = 0, batch_size: int = 8,
             progress: Callable[[int], None] | None = None) -> RetrievalResult:
    """Runs the grid through ``generate_fn(prompts) -> replies`` (lists of ids in, text out) and scores it.

    Each batch holds prompts of one requested length (little padding); ``progress(n)`` is called after each
    batch with the number of prompts it held.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    grid = make_grid(tok, task, lengths, depths, samples, seed)
    per_length = len(depths) * samples
    correct = np.zeros(len(grid), bool)
    records = []
    for start in range(0, len(grid), per_length):
        cell_samples = grid[start : start + per_length]
        for first in range(0, per_length, batch_size):
            batch = cell_samples[first : first + batch_size]
            replies = list(generate_fn([s.tokens for s in batch]))
            if len(replies) != len(batch) or not all(isinstance(r, str) for r in replies):
                raise DataError(f"generate_fn must return one str per prompt: got {len(replies)} replies "
                                f"for {len(batch)} prompts")
            for sample, reply in zip(batch, replies):
                ok = is_correct(reply, sample, task)
                correct[len(records)] = ok
                records.append({"length": sample.length, "depth": sample.depth, "prompt_tokens": len(sample.tokens),
                                "answers": list(sample.answers), "reply": reply, "correct": bool(ok)})
            if progress is not None:
                progress(len(batch))
    accuracy = correct.reshape(len(lengths), len(depths), samples).mean(axis=-1)
    return RetrievalResult(task, tok.name, lengths, depths, samples, seed, accuracy, records)


def model_generate_fn(params, cfg: ModelConfig, tok: Tokenizer, max_new_tokens: int, *, mesh=None) -> GenerateFn:
    """A ``generate_fn`` decoding greedily with ``llama_jax.generate`` over the tokenizer's ids (a model's vocabulary
    may be larger: the tiny preset's 512 hold the byte tokenizer's 264); replies end before the stop token."""

    def run(prompts: list[list[int]]) -> list[str]:
        outs = generate.generate(params, cfg, prompts, max_new_tokens, stop_ids=tok.stop_ids, mesh=mesh,
                                 vocab_size=tok.vocab_size)
        return [tok.decode(itertools.takewhile(lambda t: t not in tok.stop_ids, ids)) for ids in outs]

    return run


def checkpoint_generate_fn(path: str, task: Task, max_length: int, *, tokenizer: str | None = None,
                           max_new_tokens: int | None = None) -> tuple[GenerateFn, Tokenizer]:
    """A greedy ``generate_fn`` and its tokenizer for any checkpoint ``llama_jax.checkpoint.load`` reads, checked
    to hold prompts of ``max_length`` tokens; the checkpoint's tokenizer unless ``tokenizer`` is given, and
    ``max_new_tokens`` by default from ``default_max_new_tokens``."""
    params, cfg, tok = generate.load_model(path, tokenizer)
    max_new_tokens = max_new_tokens or default_max_new_tokens(tok, task)
    if max_length + max_new_tokens > cfg.max_seq_len:
        raise ConfigError(f"length {max_length} + {max_new_tokens} new tokens exceeds the model's max_seq_len "
                          f"{cfg.max_seq_len} ({path})")
    return model_generate_fn(params, cfg, tok, max_new_tokens), tok


def evaluate_checkpoint(path: str, task: Task, lengths: Sequence[int], depths: Sequence[float], samples: int = 4,
                        *, tokenizer: str | None = None, max_new_tokens: int | None = None, seed: int = 0,
                        batch_size: int = 8, progress: Callable[[int], None] | None = None) -> RetrievalResult:
    """``evaluate`` with ``checkpoint_generate_fn``'s model."""
    check_grid(lengths, depths, samples)
    generate_fn, tok = checkpoint_generate_fn(path, task, max(lengths), tokenizer=tokenizer,
                                              max_new_tokens=max_new_tokens)
    return evaluate(generate_fn, tok, task, lengths, depths, samples, seed=seed, batch_size=batch_size,
                    progress=progress)
