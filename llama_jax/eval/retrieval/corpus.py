"""Training corpora for retrieval: passkey documents with their answers, and copy drills.

    write_training_corpus("passkey.jsonl", tok, 10_000, min_length=64, max_length=256)
    write_copy_corpus("copy.jsonl", 20_000)

``write_training_corpus`` writes JSON Lines {"text": ...} (``llama_jax.data`` format ``jsonl``): each document is a
base-format prompt (``tasks.make_sample``) followed by its answer (" 71432."), of prompt length drawn from
[min_length, max_length] and depth from [0, 1], so a small model can learn retrieval at short lengths and be
evaluated at longer ones with the same prompt format. Train with ``data.add_bos=True``: evaluation prompts start
with <|begin_of_text|> (``Task.bos``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llama_jax.errors import ConfigError
from llama_jax.eval.retrieval.tasks import Task, make_sample
from llama_jax.tokenizer import Tokenizer


def training_documents(tok: Tokenizer, count: int, min_length: int, max_length: int, *,
                       task: Task | None = None, seed: int = 0) -> Iterator[str]:
    """Texts of base-format prompts (lengths uniform in [min_length, max_length], depths in [0, 1]) + answers."""
    task = task or Task("passkey")
    if task.prompt_format != "base":
        raise ConfigError("training documents are base-format prompts with their answers; got prompt_format="
                          f"{task.prompt_format!r}")
    if not 1 <= min_length <= max_length:
        raise ConfigError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    for index in range(count):
        rng = np.random.default_rng([int(seed), 1, index])
        length, depth = int(rng.integers(min_length, max_length + 1)), float(rng.random())
        sample = make_sample(tok, task, length, depth, [int(seed), 1, index, 1])
        start = 1 if task.bos else 0  # llama_jax.data adds <|begin_of_text|> itself (add_bos)
        yield tok.decode(sample.tokens[start:]) + sample.completion()


def write_training_corpus(path: str | Path, tok: Tokenizer, count: int, min_length: int, max_length: int, *,
                          task: Task | None = None, seed: int = 0) -> dict:
    """Writes ``count`` training documents as JSON Lines {"text": ...}; returns a summary."""
    task = task or Task("passkey")
    _write_texts(path, training_documents(tok, count, min_length, max_length, task=task, seed=seed))
    return {"path": str(path), "documents": count, "task": dataclasses.asdict(task), "tokenizer": tok.name,
            "min_length": min_length, "max_length": max_length, "seed": seed}


_COPY_ALPHABET = list("0123456789abcdefghijklmnopqrstuvwxyz")


def copy_documents(count: int, *, seed: int = 0) -> Iterator[str]:
    """Random strings said again and again ("k3x 90qz | k3x 90qz | k3x 90qz"), 2 to ~200 characters per copy:
    everything after the first copy is predictable only by copying from earlier in the text, the skill retrieval
    rests on (an induction circuit). The tiny byte model picks it up from these in a few thousand steps and not
    from passkey documents alone, whose few answer digits are too rare a signal (README, "Long context")."""
    for index in range(count):
        rng = np.random.default_rng([int(seed), 2, index])
        words = ["".join(rng.choice(_COPY_ALPHABET, size=int(rng.integers(3, 8)))) for _ in range(rng.integers(1, 12))]
        text = " ".join(words)
        yield " | ".join([text] * int(rng.integers(2, 2 + 200 // (len(text) + 2))))


def write_copy_corpus(path: str | Path, count: int, *, seed: int = 0) -> dict:
    """Writes ``count`` ``copy_documents`` as JSON Lines {"text": ...}; returns a summary."""
    _write_texts(path, copy_documents(count, seed=seed))
    return {"path": str(path), "documents": count, "seed": seed}


def _write_texts(path: str | Path, texts: Iterator[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
