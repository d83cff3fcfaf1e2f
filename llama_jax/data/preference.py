"""Preference records -> one row per reply, for the reward-model and DPO stages.

    source = PreferenceSource("prefs/*.jsonl", tokenizer, seq_len=4096)   # a Sequence, like every data source
    pair = encode_pair(tokenizer, {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, seq_len=4096)

Records (JSON Lines, one per line; other fields are ignored):
    {"prompt": str | [messages], "chosen": reply, "rejected": reply, "edited": reply (optional; null = none)}
    The paper's order is edited > chosen > rejected. Only a stage that ranks edited replies reads them (the reward
    model's; ``edited=False`` ignores the field, as DPO does, so it is neither encoded nor checked). A prompt is a
    string (one user message) or messages ending with a user or ipython message; a reply is a string, an assistant
    message, or messages that start and end with the assistant's (a tool call, its ipython result, the answer).
    Messages and their order: ``data.chat``.

Token ids: the templated prompt (``encode_dialog(prompt, add_generation_prompt=True)``) followed by each reply's
ids, joined as token lists (never by re-tokenising joined text), so every reply of a record has the same prompt
part by construction. Each sequence fits in ``seq_len`` tokens, one fewer than a pretraining row holds, so that
its last token is an input and has a hidden state to score. When the prompt and the longest reply do not fit,
the prompt loses tokens from its start (after <|begin_of_text|>), but never its last message or the generation
header: a reply is only worth training on next to the turn it answers. Then the replies are cut at their end.
A record cut either way is kept (``EncodedPair.cut`` says what was cut; counted per source as
``data/truncated/<i>``, the first logged by the training loop): a cut reply still ranks, on its first tokens.

A record is malformed (DataError naming file and line, or counted in ``skipped`` with ``on_error="skip"``) when
a field is missing or ill-formed, a reply is empty (no non-blank assistant content), two replies read are identical
(before or after truncation: the pair carries no preference, and a reward model's Bradley-Terry term on it is ln 2
whatever the weights), the prompt's last message and generation header leave no room for a reply (the
prompt fills the row), or a reply loses every trained token to truncation. So no row reaches a loss with an
empty mask, except padding.

Batch layout (``PairRows.batch``; what the stages read):
    {"chosen": rows, "rejected": rows, "edited": rows}; row b of each is the same record. No "edited" sub-batch
    when the stage reads no edited replies (``make_batches(edited=False)``).
    rows: dict of int32 [B, T] arrays, one sequence per row (segment 1, then padding with segment 0):
      tokens, targets, segment_ids, positions   as in pretraining (targets are next tokens; positions from 0)
      loss_mask    1 on targets that are reply tokens the assistant writes: content (<|python_tag|> included) and
                   closing token; not headers or tool output inside a reply of several messages
      dpo_mask     loss_mask with the formatting tokens (<|start_header_id|>, <|end_header_id|>, <|eom_id|>,
                   <|eot_id|>, by the tokenizer's special ids) switched off: the paper's DPO log-prob mask
      score_mask   1 at exactly one input position per row: the reply's last token (its closing <|eot_id|>, or
                   the last token kept when truncation cut it), whose hidden state a reward model scores
      reference_logps   (float32; only when the batches are made with ``reference``) the reference model's
                   log-prob of the reply at the row's score position, 0 elsewhere: a sum over T reads it
    The prompt part (tokens before the first target with loss_mask 1) is identical in the three sub-batches.
    "edited" rows of records without an edited reply, and every row of a padding row (the end of an eval pass),
    are all zeros: every mask 0.

Precomputed reference log-probs (DPO without a reference model in memory): a record may carry the column
    "reference_logps": {"checkpoint": {...}, "tokenizer": sha256, "seq_len": int,
                        "chosen": {"dpo_mask": float, "loss_mask": float}, "rejected": {...}, "edited": {...}}
the sums of the reference model's log-probs over each reply's dpo_mask and loss_mask targets, computed from these
rows (so with this tokenizer and seq_len) by the checkpoint named (``checkpoint.identity``); ``reference_column``
writes it. Sources made with ``reference`` ({"mask": "dpo_mask" | "loss_mask", "checkpoint": identity}) require it
on every record, with that tokenizer, seq_len and checkpoint, else the record is malformed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from llama_jax.data.chat import check_order, encode_prompt, encode_reply, prompt_messages, reply_messages
from llama_jax.data.packing import rows_to_batch
from llama_jax.data.sources import JsonlSource
from llama_jax.data.streams import RowStream, pack_rows
from llama_jax.errors import DataError
from llama_jax.tokenizer import Tokenizer

REPLIES = ("chosen", "rejected", "edited")
PAIR_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "dpo_mask", "score_mask")
FORMATTING_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>")
REFERENCE_COLUMN = "reference_logps"
REFERENCE_MASKS = ("dpo_mask", "loss_mask")


@dataclass(frozen=True)
class EncodedPair:
    """The ids and assistant mask (int32 [n]) of prompt + reply for each reply of one record."""

    replies: dict[str, tuple[np.ndarray, np.ndarray]]
    prompt_len: int  # tokens of the (possibly truncated) prompt, shared by every reply
    reference_logps: dict[str, float] | None = None  # per reply: the precomputed reference log-prob, if read
    cut: str = ""  # what was cut to fit the row ("": nothing)

    def __len__(self) -> int:
        return max(len(ids) for ids, _ in self.replies.values())


def encode_pair(tokenizer: Tokenizer, record: Mapping, *, seq_len: int, edited: bool = True) -> EncodedPair:
    """One preference record, checked, encoded and truncated to ``seq_len`` tokens (see the module docstring).
    ``edited``: read the edited reply, if any; False ignores it."""
    if not isinstance(record, Mapping):
        raise DataError(f"a preference record is a JSON object, got {type(record).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise DataError(f'a preference record needs "prompt", "chosen" and "rejected"; it has no "{key}"')
    prompt = prompt_messages(record["prompt"])
    replies = {}
    for name in REPLIES:
        if name == "edited" and (not edited or record.get(name) is None):
            continue
        reply = reply_messages(record[name], f"reply {name!r}")
        if not any(m["content"].strip() for m in reply if m["role"] == "assistant"):
            raise DataError(f"reply {name!r} is empty")
        check_order(prompt + reply)
        replies[name] = encode_reply(tokenizer, reply)
    _refuse_identical(replies, "")

    prompt_ids = encode_prompt(tokenizer, prompt)
    full_prompt = len(prompt_ids)
    # The last message and the generation header stay: the prompt is cut only between <|begin_of_text|> and them.
    kept_end = len(tokenizer.encode_message(prompt[-1])[0]) + len(tokenizer.encode_header("assistant"))
    excess = len(prompt_ids) + max(len(ids) for ids, _ in replies.values()) - seq_len
    if excess > 0:
        cut = min(excess, len(prompt_ids) - 1 - kept_end)
        prompt_ids = prompt_ids[:1] + prompt_ids[1 + cut:]
    room = seq_len - len(prompt_ids)
    if room < 1:
        raise DataError(f"the prompt fills the row: its last message and the generation header take "
                        f"{len(prompt_ids) - 1} tokens after <|begin_of_text|>, leaving no room for a reply in "
                        f"{seq_len} tokens")
    cut = [f"prompt cut from {full_prompt} to {len(prompt_ids)} tokens"] if len(prompt_ids) < full_prompt else []
    cut += [f"reply {name!r} cut from {len(ids)} to {room} tokens" for name, (ids, _) in replies.items()
            if len(ids) > room]
    replies = {name: (ids[:room], trained[:room]) for name, (ids, trained) in replies.items()}
    for name, (_, trained) in replies.items():
        if not any(trained):
            raise DataError(f"reply {name!r} loses every trained token to truncation to {seq_len} tokens")
    _refuse_identical(replies, f" after truncation to {seq_len} tokens")
    encoded = {name: (np.asarray(prompt_ids + ids, np.int32), np.asarray([0] * len(prompt_ids) + trained, np.int32))
               for name, (ids, trained) in replies.items()}
    return EncodedPair(encoded, len(prompt_ids), cut=", ".join(cut))


def _refuse_identical(replies: Mapping[str, tuple[list[int], list[int]]], when: str) -> None:
    names = list(replies)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if replies[a][0] == replies[b][0]:
                raise DataError(f"replies {a!r} and {b!r} are identical{when}: the pair carries no preference")


def reference_column(checkpoint: Mapping, tokenizer: Tokenizer, seq_len: int,
                     logps: Mapping[str, Mapping[str, float]]) -> dict:
    """The ``reference_logps`` column of one record: ``logps[reply][mask]`` for each encoded reply and mask."""
    return {"checkpoint": dict(checkpoint), "tokenizer": tokenizer.sha256, "seq_len": seq_len,
            **{name: {mask: float(sums[mask]) for mask in REFERENCE_MASKS} for name, sums in logps.items()}}


def read_reference(record: Mapping, pair: EncodedPair, reference: Mapping, tokenizer: Tokenizer,
                   seq_len: int) -> dict[str, float]:
    """Each reply's reference log-prob over ``reference["mask"]``, from a record's column, checked against how
    these rows are made (tokenizer, seq_len) and the reference checkpoint expected."""
    column = record.get(REFERENCE_COLUMN)
    if not isinstance(column, Mapping):
        raise DataError(f'the record has no "{REFERENCE_COLUMN}" column; precompute it with python -m '
                        "llama_jax.posttrain.reference_logps")
    expected = {"tokenizer": tokenizer.sha256, "seq_len": seq_len, "checkpoint": dict(reference["checkpoint"])}
    for key, value in expected.items():
        if column.get(key) != value:
            made = column.get(key)
            steps = (made.get("step"), value.get("step")) if key == "checkpoint" and isinstance(made, dict) else ()
            if None not in steps and len(set(steps)) == 2:
                # A run directory as init_from resolves to its newest step: that run saved another since.
                raise DataError(f"{REFERENCE_COLUMN} was computed with step {made.get('step')} ({made.get('path')}); "
                                f"init_from now resolves to step {value.get('step')} ({value.get('path')}): set "
                                f"init_from to step {made.get('step')}'s directory, or compute the column again")
            raise DataError(f"{REFERENCE_COLUMN} was computed with {key}={made!r}; these rows need "
                            f"{value!r}: compute the column again")
    try:
        return {name: float(column[name][reference["mask"]]) for name in pair.replies}
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{REFERENCE_COLUMN} lacks a {reference['mask']} log-prob for a reply of "
                        f"{sorted(pair.replies)}") from None


class PreferenceSource(JsonlSource):
    """Preference records of JSON Lines files, encoded for rows of ``seq_len`` tokens (see the module docstring).
    Records that cannot be used raise DataError naming file and line, or are counted in ``skipped``
    (``on_error="skip"``). ``reference``: read the precomputed reference log-probs too (module docstring).
    ``edited``: read the edited replies (False: ignore them, for a stage that ranks none)."""

    def __init__(self, paths: str | Sequence[str], tokenizer: Tokenizer, *, seq_len: int, on_error: str = "raise",
                 reference: Mapping | None = None, edited: bool = True):
        super().__init__(paths, on_error=on_error)
        self.tokenizer, self.seq_len, self.reference, self.edited = tokenizer, seq_len, reference, edited
        if reference is not None and reference.get("mask") not in REFERENCE_MASKS:
            raise DataError(f"reference mask must be one of {REFERENCE_MASKS}, got {reference.get('mask')!r}")

    def parse(self, record, where: str) -> EncodedPair:
        pair = encode_pair(self.tokenizer, record, seq_len=self.seq_len, edited=self.edited)
        if pair.cut:
            self.first_truncated = self.first_truncated or f"{where}: {pair.cut}"
        if self.reference is None:
            return pair
        logps = read_reference(record, pair, self.reference, self.tokenizer, self.seq_len)
        return dataclasses.replace(pair, reference_logps=logps)


class PairRows:
    """Preference rows: one record per row of every sub-batch (see the module docstring for the layout), a sub-batch
    for each of ``replies`` (a stage that ranks no edited reply runs none of their rows)."""

    def __init__(self, seq_len: int, tokenizer: Tokenizer, *, reference: bool = False,
                 replies: Sequence[str] = REPLIES):
        self.seq_len, self.reference, self.replies = seq_len, reference, tuple(replies)
        self.formatting = np.array([tokenizer.special_id(t) for t in FORMATTING_TOKENS], np.int32)

    def take(self, stream: RowStream) -> list[EncodedPair]:
        return stream.take_whole(self.seq_len, max_documents=1)

    def batch(self, rows: Sequence[Sequence[EncodedPair]]) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for name in self.replies:
            sequences = [[row[0].replies[name]] if row and name in row[0].replies else [] for row in rows]
            length = self.seq_len + 1  # rows_to_batch's layout: T inputs, T targets
            batch = rows_to_batch(pack_rows([[ids for ids, _ in s] for s in sequences], length))
            trained = pack_rows([[t for _, t in s] for s in sequences], length)["tokens"]
            batch["loss_mask"] *= trained[:, 1:]
            batch["dpo_mask"] = batch["loss_mask"] * ~np.isin(batch["targets"], self.formatting)
            batch["score_mask"] = np.zeros_like(batch["tokens"])
            for i, s in enumerate(sequences):
                if s:
                    batch["score_mask"][i, len(s[0][0]) - 1] = 1
            if self.reference:
                logps = [row[0].reference_logps[name] if row and name in row[0].replies else 0.0 for row in rows]
                batch["reference_logps"] = batch["score_mask"] * np.asarray(logps, np.float32)[:, None]
            out[name] = batch
        return out
