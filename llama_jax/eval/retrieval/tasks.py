"""Retrieval prompts: needle in a haystack, multi-needle and passkey, at a requested length and needle depth.

    task = Task("passkey")                                   # or Task("needle"), Task("multi", needles=4, ask="all")
    sample = make_sample(get_tokenizer("byte"), task, length=1024, depth=0.5, seed=0)
    sample.tokens, sample.answers, sample.needle_spans
    grid = make_grid(tok, task, lengths=[256, 1024], depths=[0, 0.5, 1], samples=4)   # what ``evaluate`` asks

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
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from llama_jax.errors import ConfigError
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


def check_grid(lengths: Sequence[int], depths: Sequence[float], samples: int) -> None:
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
    check_grid([length], [depth], 1)
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
    check_grid(lengths, depths, samples)
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
    return [make_sample(tok, task, length, depth, _cell_seed(seed, length, depth, index))
            for length in lengths for depth in depths for index in range(samples)]


def _cell_seed(seed: int, length: int, depth: float, index: int) -> list[int]:
    # The leading 0 separates evaluation prompts from training documents (1), which share the seed.
    return [int(seed), 0, int(length), round(depth * 1_000_000), index]


def default_max_new_tokens(tok: Tokenizer, task: Task) -> int:
    """Room for the longest possible answer plus 8 tokens; chat replies may first restate the question."""
    keys = sorted(KEYS, key=len, reverse=True)[: task.needles if task.ask == "all" else 1]
    longest = max(WORDS, key=len) if task.value == "word" else "9" * _DIGITS[task.kind]
    answer = " " + _join([longest] * len(keys)) + "."
    if task.prompt_format == "chat":
        answer = task.answer_prefix(keys) + answer
    return len(tok.encode(answer)) + 8
