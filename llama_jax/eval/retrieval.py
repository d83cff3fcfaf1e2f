"""Long-context retrieval: needle in a haystack, multi-needle and passkey, over prompt lengths x needle depths.

    tok = get_tokenizer("byte")
    task = Task("passkey")                                   # or Task("needle"), Task("multi", needles=4, ask="all")
    result = evaluate(model_generate_fn(params, cfg, tok, max_new_tokens=16), tok, task,
                      lengths=[256, 1024, 2048], depths=[0, 0.25, 0.5, 0.75, 1], samples=4)
    result.accuracy                                          # [lengths, depths], exact-match accuracy per cell
    plot_heatmap(result, "passkey.png")                      # needs matplotlib: pip install "llama_jax[plots]"
    write_training_corpus("passkey.jsonl", tok, 10_000, min_length=64, max_length=256)

CLI: ``python -m llama_jax.eval.retrieval --checkpoint PATH [--tokenizer byte] --task passkey
--lengths 256,1024,2048 --depths 0,0.25,0.5,0.75,1 --samples 4 --plot out.png [--json result.json]``.

Prompts. An introduction, a haystack of filler sentences with the needle(s) inserted between sentences,
then the question. ``passkey`` (after Mohtashami & Jaggi 2023) repeats five short sentences around "The
pass key is 71432. Remember it."; ``needle`` hides "The special magic number for Paris is 4822719." (or,
with ``value="word"``, a fact: "The secret word for Paris is heron.") in varied prose; ``multi`` hides
several such needles with different keys and asks for one of them or for all. ``prompt_format="base"``
ends the prompt with the start of the answer ("... The pass key is") for a base model to continue;
``"chat"`` puts the text in one user turn of the Llama 3 dialog format and lets an instruct model reply.

Length and depth. The prompt is assembled from separately encoded pieces that each start with a space and
a letter, where the Llama 3 pre-tokenizer cuts anyway, so the ids equal the encoding of the joined text.
Filler sentences are added whole while one fits (the passkey cycle in order, the prose at random among those
that fit): a prompt has at most ``length`` tokens and is shorter by less than ``max_shortfall(tok, task)``
(22 bytes or 5 Llama 3 tokens for the passkey, 13 or 3 for prose). ``depth`` (0..1) is the fraction of the
filler tokens that precede the needle; the needle goes to the sentence boundary closest to it, so it is off
by at most half a filler sentence (coarse for short byte-level prompts: prose sentences are ~60 bytes).
In ``multi``, needle 0 sits at ``depth`` (the one asked about with ``ask="one"``) and the others at depths
drawn from the seed. Every sample is a function of (seed, length, depth, sample index) alone, so adding a
cell to a grid leaves the other cells' prompts unchanged.

Scoring (exact match). A reply's *candidates* are its runs of digits (number needles) or its words that are
in the needle vocabulary ``WORDS`` (word needles), in order. A sample is correct when the reply's first k
candidates equal the k asked values exactly, in the asked order (k = 1 except for ``ask="all"``, which asks
for every needle in the order they appear in the text). "714320", "7143" or no number at all are wrong for
71432; "The pass key is 71432." is right. A cell's accuracy is the fraction of its samples that are correct.

Training corpus. ``write_training_corpus`` writes JSON Lines {"text": ...} (``llama_jax.data`` format
``jsonl``): each document is a base-format prompt followed by its answer (" 71432."), of prompt length drawn
from [min_length, max_length] and depth from [0, 1], so a small model can learn retrieval at short lengths
and be evaluated at longer ones with the same prompt format. Train with ``data.add_bos=True``: evaluation
prompts start with <|begin_of_text|> (``Task.bos``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from llama_jax import cli, generate
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError, DataError
from llama_jax.tokenizer import Tokenizer

# The passkey filler, repeated in this order (the short, repetitive haystack of the passkey literature).
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
# The needle tasks' filler: varied, plain sentences without digits, keys or vocabulary words.
HAYSTACK_FILLER = (
    "The morning market opened early and the stalls filled with fresh bread.",
    "A narrow path wound between the hills toward the old stone bridge.",
    "Most of the houses on the street had green shutters and small gardens.",
    "The library kept its windows open on warm afternoons.",
    "Rain fell softly through the night and stopped before dawn.",
    "Children walked to school along the river, watching the boats.",
    "The baker said that the oven had been in the family for generations.",
    "A gentle wind carried the smell of pine across the valley.",
    "The town council met every week in a hall above the post office.",
    "Travellers often stopped at the inn for soup and a warm fire.",
    "The clock in the square was always a few minutes late.",
    "Farmers brought their apples and pears to the autumn fair.",
    "The lake was calm, and the mountains were reflected in the water.",
    "An old map on the wall showed roads that no longer existed.",
    "The teacher read a story aloud while the class listened quietly.",
    "Lanterns were hung along the harbour when the evenings grew dark.",
    "The garden behind the museum was planted with roses and herbs.",
    "Nobody remembered exactly when the lighthouse had been built.",
    "The train to the coast left once in the morning and once at night.",
    "Snow covered the fields for most of the winter.",
    "A painter set up an easel near the fountain and worked until sunset.",
    "The shop on the corner sold string, nails, paint and candles.",
    "The road was repaired in spring after the heavy storms.",
    "Neighbours shared tools, recipes and news over the garden fences.",
    "The choir practised in the church hall on quiet evenings.",
    "A small ferry crossed the river when the water was high.",
    "The orchard was full of blossom at the start of the season.",
    "Letters arrived late when the mountain pass was closed.",
    "The weaver sold blankets in bright colours at the summer fair.",
    "Tall trees lined the avenue that led to the railway station.",
    "The old pier creaked in the wind before the tide came in.",
    "Bells rang across the rooftops at noon every day.",
    "It was quiet.",  # short sentences top the haystack up to close to the requested length
    "Time passed.",
    "The day was mild.",
    "Birds sang.",
)
# What needles are about (needle and multi tasks), and the values of word needles.
KEYS = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Delhi", "Tokyo", "Quito", "Dakar", "Hanoi", "Lagos", "Madrid",
        "Vienna", "Dublin", "Prague", "Athens", "Berlin", "Lisbon", "Manila", "Nairobi", "Ottawa", "Seoul",
        "Sydney", "Toronto", "Warsaw", "Zurich")
WORDS = ("heron", "walrus", "otter", "falcon", "badger", "lynx", "gecko", "bison", "ferret", "jackal", "koala",
         "lemur", "marmot", "ocelot", "panda", "puffin", "raccoon", "tapir", "toucan", "weasel", "yak", "zebra",
         "beaver", "camel", "dingo", "ibis", "moose", "newt", "oriole", "quail")
_WORD_SET = frozenset(WORDS)
KINDS = ("passkey", "needle", "multi")
ASKS = ("one", "all")
VALUES = ("number", "word")
PROMPT_FORMATS = ("base", "chat")
# Passkeys have 5 digits, needle numbers 7 (no leading zero, so a value and its digit run are the same string).
_DIGITS = {"passkey": 5, "needle": 7, "multi": 7}


@dataclasses.dataclass(frozen=True)
class Task:
    """What is hidden and asked, and how the prompt is framed."""

    kind: str = "passkey"  # passkey | needle | multi
    needles: int | None = None  # multi: how many needles (default 4); passkey and needle hide one
    ask: str = "one"  # multi: "one" asks for one needle's value, "all" for every value in text order
    value: str = "number"  # needle / multi: "number" (7 digits) or "word" (from WORDS); passkey: number
    prompt_format: str = "base"  # base: the prompt ends with the start of the answer; chat: one user turn
    bos: bool = True  # base prompts start with <|begin_of_text|> (chat prompts always do)

    def __post_init__(self):
        for field, allowed in (("kind", KINDS), ("ask", ASKS), ("value", VALUES), ("prompt_format", PROMPT_FORMATS)):
            if getattr(self, field) not in allowed:
                raise ConfigError(f"task {field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.needles is None:
            object.__setattr__(self, "needles", 4 if self.kind == "multi" else 1)
        if self.kind == "multi" and not 2 <= self.needles <= len(KEYS):
            raise ConfigError(f"multi hides 2 to {len(KEYS)} needles, got needles={self.needles}")
        if self.kind != "multi" and (self.needles != 1 or self.ask != "one"):
            raise ConfigError(f"{self.kind} hides one needle and asks for it; needles/ask are for kind='multi'")
        if self.kind == "passkey" and self.value != "number":
            raise ConfigError("a passkey is a number; value='word' is for the needle and multi tasks")

    def noun(self, plural: bool = False) -> str:
        noun = "special magic number" if self.value == "number" else "secret word"
        return noun + "s" if plural else noun

    def intro(self) -> str:
        if self.kind == "passkey":
            return "A pass key is hidden in this text. Find it and remember it."
        if self.needles == 1:
            return f"A {self.noun()} is hidden in this text. Find it and remember it."
        return f"Some {self.noun(plural=True)} are hidden in this text. Find them and remember them."

    def needle(self, key: str, value: str) -> str:
        if self.kind == "passkey":
            return f"The pass key is {value}. Remember it."
        return f"The {self.noun()} for {key} is {value}."

    def question(self, keys: Sequence[str]) -> str:
        if self.kind == "passkey":
            return "What is the pass key?"
        if len(keys) == 1:
            return f"What is the {self.noun()} for {keys[0]}?"
        return f"What are the {self.noun(plural=True)} for {_join(keys)}?"

    def answer_prefix(self, keys: Sequence[str]) -> str:
        """How the answer starts: the end of a base prompt."""
        if self.kind == "passkey":
            return "The pass key is"
        if len(keys) == 1:
            return f"The {self.noun()} for {keys[0]} is"
        return f"The {self.noun(plural=True)} for {_join(keys)} are"


def _join(items: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt of a grid cell, with where its needles are and what it asks for."""

    length: int  # requested prompt length in tokens
    depth: float  # requested depth of needle 0
    tokens: list[int]  # the prompt's ids
    answers: tuple[str, ...]  # the asked values, in the asked order
    needle_spans: tuple[tuple[int, int], ...]  # [start, end) of each needle's ids in tokens; needle 0 first
    haystack_span: tuple[int, int]  # [start, end) of the filler and needles

    def completion(self) -> str:
        """The answer as a base prompt's continuation: " 71432." or " 4822719, 1377324 and 9070123."."""
        return " " + _join(self.answers) + "."


def _check_grid(lengths: Sequence[int], depths: Sequence[float], samples: int) -> None:
    if not lengths or not depths:
        raise ConfigError("the grid needs at least one length and one depth")
    for length in lengths:
        if not isinstance(length, (int, np.integer)) or length < 1:
            raise ConfigError(f"lengths must be positive ints (tokens), got {length!r}")
    for depth in depths:
        if not 0 <= depth <= 1:
            raise ConfigError(f"depths must be fractions in [0, 1], got {depth!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples per cell must be an int >= 1, got {samples!r}")


def make_sample(tok: Tokenizer, task: Task, length: int, depth: float, seed: int | Sequence[int]) -> Sample:
    """A prompt of at most ``length`` tokens (less by under one filler sentence) with needle 0 at ``depth``."""
    _check_grid([length], [depth], 1)
    rng = np.random.default_rng(seed)
    n = task.needles
    keys = [str(k) for k in rng.choice(KEYS, n, replace=False)]
    if task.value == "word":
        values = [str(w) for w in rng.choice(WORDS, n, replace=False)]
    else:
        low = 10 ** (_DIGITS[task.kind] - 1)
        values = [str(v) for v in low + rng.choice(9 * low, n, replace=False)]
    needle_depths = [depth, *rng.random(n - 1).tolist()]

    if task.prompt_format == "chat":
        head = [tok.bos_id, *tok.encode_header("user")]
    else:
        head = [tok.bos_id] if task.bos else []
    head += tok.encode(task.intro())
    needles = [tok.encode(" " + task.needle(k, v)) for k, v in zip(keys, values)]
    fixed = len(head) + sum(map(len, needles)) + _tail_length(tok, task, keys)
    sentences = _filler(tok, task, length - fixed, rng)
    if not sentences:
        raise ConfigError(f"length {length} is too short for the {task.kind} task with the {tok.name} tokenizer: "
                          f"the prompt has {fixed} tokens before any filler, and a filler sentence needs "
                          f"{min(map(len, encoded_filler(tok, task)))} more")
    bounds = np.cumsum([0] + [len(s) for s in sentences])  # filler tokens before each sentence boundary
    slots = [int(np.argmin(np.abs(bounds / bounds[-1] - d))) for d in needle_depths]
    order = sorted(range(n), key=lambda i: (slots[i], i))  # needles in text order

    tokens = list(head)
    spans: dict[int, tuple[int, int]] = {}
    for slot in range(len(sentences) + 1):
        for i in (i for i in order if slots[i] == slot):
            spans[i] = (len(tokens), len(tokens) + len(needles[i]))
            tokens += needles[i]
        if slot < len(sentences):
            tokens += sentences[slot]
    haystack = (len(head), len(tokens))
    asked = [0] if task.ask == "one" else order
    tokens += _tail(tok, task, [keys[i] for i in asked])
    return Sample(length=int(length), depth=float(depth), tokens=tokens, answers=tuple(values[i] for i in asked),
                  needle_spans=tuple(spans[i] for i in range(n)), haystack_span=haystack)


def encoded_filler(tok: Tokenizer, task: Task) -> list[list[int]]:
    """The task's filler sentences, each encoded with its leading space."""
    return [tok.encode(" " + s) for s in (PASSKEY_FILLER if task.kind == "passkey" else HAYSTACK_FILLER)]


def _filler(tok: Tokenizer, task: Task, budget: int, rng: np.random.Generator) -> list[list[int]]:
    """Encoded filler sentences of at most ``budget`` tokens in all: the passkey cycle in order while the next
    one fits, or random prose sentences among those that fit, never the same twice in a row."""
    encoded = encoded_filler(tok, task)
    chosen: list[list[int]] = []
    if task.kind == "passkey":
        for sentence in itertools.cycle(encoded):
            if len(sentence) > budget:
                return chosen
            chosen.append(sentence)
            budget -= len(sentence)
    previous = -1
    while fitting := [i for i, s in enumerate(encoded) if len(s) <= budget and i != previous]:
        previous = fitting[int(rng.integers(len(fitting)))]
        chosen.append(encoded[previous])
        budget -= len(encoded[previous])
    return chosen


def max_shortfall(tok: Tokenizer, task: Task) -> int:
    """A bound on how many tokens a prompt falls short of its requested length: filling stops only when no
    sentence fits (the next one of the passkey cycle; for prose, any but the last one used)."""
    lengths = sorted(map(len, encoded_filler(tok, task)))
    return lengths[-1] if task.kind == "passkey" else lengths[1]


def _tail(tok: Tokenizer, task: Task, keys: Sequence[str]) -> list[int]:
    """The question, then the start of the answer (base) or the end of the user turn (chat)."""
    ids = tok.encode(" " + task.question(keys))
    if task.prompt_format == "chat":
        return ids + [tok.eot_id, *tok.encode_header("assistant")]
    return ids + tok.encode(" " + task.answer_prefix(keys))


def _tail_length(tok: Tokenizer, task: Task, keys: Sequence[str]) -> int:
    """Tokens of the tail. With ask="all" the keys' text order is not known yet; any order has the same count,
    since every key is its own piece (" Paris", then "," or "?")."""
    return len(_tail(tok, task, keys if task.ask == "all" else keys[:1]))


def make_grid(tok: Tokenizer, task: Task, lengths: Sequence[int], depths: Sequence[float], samples: int,
              seed: int = 0) -> list[Sample]:
    """``samples`` prompts per (length, depth) cell, ordered by length, then depth, then sample index."""
    _check_grid(lengths, depths, samples)
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
    return [make_sample(tok, task, length, depth, _cell_seed(seed, length, depth, index))
            for length in lengths for depth in depths for index in range(samples)]


def _cell_seed(seed: int, length: int, depth: float, index: int) -> list[int]:
    # The leading 0 separates evaluation prompts from training documents (1), which share the seed.
    return [int(seed), 0, int(length), round(depth * 1_000_000), index]


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
    """A ``generate_fn`` decoding greedily with ``llama_jax.generate``; replies end before the stop token."""

    def run(prompts: list[list[int]]) -> list[str]:
        outs = generate.generate(params, cfg, prompts, max_new_tokens, stop_ids=tok.stop_ids, mesh=mesh)
        return [tok.decode(itertools.takewhile(lambda t: t not in tok.stop_ids, ids)) for ids in outs]

    return run


def default_max_new_tokens(tok: Tokenizer, task: Task) -> int:
    """Room for the longest possible answer plus 8 tokens; chat replies may first restate the question."""
    keys = sorted(KEYS, key=len, reverse=True)[: task.needles if task.ask == "all" else 1]
    longest = max(WORDS, key=len) if task.value == "word" else "9" * _DIGITS[task.kind]
    answer = " " + _join([longest] * len(keys)) + "."
    if task.prompt_format == "chat":
        answer = task.answer_prefix(keys) + answer
    return len(tok.encode(answer)) + 8


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
    _check_grid(lengths, depths, samples)
    generate_fn, tok = checkpoint_generate_fn(path, task, max(lengths), tokenizer=tokenizer,
                                              max_new_tokens=max_new_tokens)
    return evaluate(generate_fn, tok, task, lengths, depths, samples, seed=seed, batch_size=batch_size,
                    progress=progress)


def require_matplotlib():
    """matplotlib's Figure class, or a ConfigError saying how to install it."""
    try:  # matplotlib is optional (the "plots" extra); pyplot is avoided so no global backend is chosen
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'llama_jax[plots]'") from None
    return Figure


def plot_heatmap(result: RetrievalResult, path: str | Path | None = None):
    """A lengths x depths heatmap of accuracy (depth 0 at the top), saved to ``path`` when given; returns the Figure."""
    Figure = require_matplotlib()
    fig = Figure(figsize=(1.2 + 0.9 * len(result.lengths), 1.0 + 0.55 * len(result.depths)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(result.accuracy.T, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for (col, row), value in np.ndenumerate(result.accuracy):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(result.lengths)), [str(n) for n in result.lengths])
    ax.set_yticks(range(len(result.depths)), [f"{d:.0%}" for d in result.depths])
    ax.set_xlabel(f"prompt length ({result.tokenizer} tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{result.task.kind} retrieval, {result.samples} samples per cell")
    fig.colorbar(image, ax=ax, label="exact-match accuracy")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# --- Training data -----------------------------------------------------------------------------------


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
        start = 1 if task.bos else 0  # the data pipeline adds <|begin_of_text|> itself (add_bos)
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


# --- CLI ---------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return values


def _depth_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0 <= v <= 1 for v in values):  # also rejects nan
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {text!r}")
    return values


parser = cli.parser("python -m llama_jax.eval.retrieval", __doc__.split("\n")[0])
cli.add_checkpoint(parser)
parser.add_argument("--tokenizer", default=None, help="llama3 | byte | path (default: the checkpoint's)")
parser.add_argument("--task", choices=KINDS, default="passkey")
parser.add_argument("--needles", type=int, default=None, help="multi: number of needles (default 4)")
parser.add_argument("--ask", choices=ASKS, default="one", help="multi: ask for one needle or all of them")
parser.add_argument("--value", choices=VALUES, default="number", help="needle / multi: numbers or words")
parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="base",
                    help="base: the prompt ends with the answer's start; chat: a Llama 3 user turn")
parser.add_argument("--no-bos", action="store_true", help="base prompts without <|begin_of_text|>")
parser.add_argument("--lengths", type=_int_list, default=[256, 1024, 2048], help="prompt lengths in tokens")
parser.add_argument("--depths", type=_depth_list, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths")
parser.add_argument("--samples", type=int, default=4, help="prompts per (length, depth) cell")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the longest answer + 8")
parser.add_argument("--plot", default=None, help="write the heatmap to this image file (needs matplotlib)")
parser.add_argument("--json", default=None, help="write the full result, every reply included, to this file")


def run(args: argparse.Namespace) -> dict:
    task = Task(args.task, needles=args.needles, ask=args.ask, value=args.value,
                prompt_format=args.prompt_format, bos=not args.no_bos)
    _check_grid(args.lengths, args.depths, args.samples)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.plot:
        require_matplotlib()  # before the run, not after it
    generate_fn, tok = checkpoint_generate_fn(args.checkpoint, task, max(args.lengths), tokenizer=args.tokenizer,
                                              max_new_tokens=args.max_new_tokens)
    with cli.progress(total=len(args.lengths) * len(args.depths) * args.samples, desc=f"{task.kind} retrieval",
                      unit="prompt") as bar:
        result = evaluate(generate_fn, tok, task, args.lengths, args.depths, args.samples, seed=args.seed,
                          batch_size=args.batch_size, progress=bar.update)
    if args.json:
        result.save_json(args.json)
    if args.plot:
        plot_heatmap(result, args.plot)
    for length, row in zip(result.lengths, result.accuracy):
        cells = "  ".join(f"{d:.0%}: {a:.2f}" for d, a in zip(result.depths, row))
        cli.log(f"length {length}: {cells}")
    return {**result.summary(), "checkpoint": args.checkpoint, "plot": args.plot, "json": args.json}


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
