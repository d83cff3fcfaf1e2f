"""Prompt-only records -> token-id prompts with stable ids, in file order: what a sampling command batches over.

    prompts, skipped = read_prompts("prompts.jsonl", tokenizer)
    prompts[0].id, prompts[0].ids      # "prompts.jsonl:1" (or the record's "id"), the templated prompt's ids
    ids = encode_prompt(tokenizer, prompt_messages("Hi"))    # (from data.chat) a prompt built in code

Records (JSON Lines, one per line; other fields are ignored): {"prompt": str | [messages], "id": str | int}.
The prompt is checked as ``data.chat.prompt_messages`` says (a string is one user message; messages end with a
user or ipython message) and encoded with the assistant's generation header at its end. A record's id is its
"id" field, or else "<file name>:<line>"; ids must be unique over the files read together, so a rerun can tell
which prompts it has done. Records are read in file order (files as ``sources.expand_paths`` orders them);
malformed ones raise DataError naming file and line, or with ``on_error="skip"`` are left out and listed in
``skipped`` ("file:line" -> why).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llama_jax.data.chat import encode_prompt, prompt_messages
from llama_jax.data.sources import JsonlSource
from llama_jax.errors import DataError
from llama_jax.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptRecord:
    id: str  # the record's "id", or "<file name>:<line>"
    messages: list[dict]  # the prompt as checked messages
    ids: list[int]  # encode_dialog(messages, add_generation_prompt=True)
    where: str  # "file:line"


class PromptSource(JsonlSource):
    """Prompt records of JSON Lines files (see the module docstring); item i is a PromptRecord, or None if skipped."""

    def __init__(self, paths: str | Sequence[str], tokenizer: Tokenizer, *, on_error: str = "raise"):
        super().__init__(paths, on_error=on_error)
        self.tokenizer = tokenizer

    def parse(self, record, where: str) -> PromptRecord:
        if not isinstance(record, Mapping) or "prompt" not in record:
            raise DataError('a prompt record is a JSON object with a "prompt" field')
        record_id = record.get("id")
        if record_id is None:
            path, line = where.rsplit(":", 1)
            record_id = f"{Path(path).name}:{line}"
        elif isinstance(record_id, (str, int)) and not isinstance(record_id, bool):
            record_id = str(record_id)
        else:
            raise DataError(f"the record's id is {record_id!r}; expected a string or an integer")
        messages = prompt_messages(record["prompt"])
        return PromptRecord(record_id, messages, encode_prompt(self.tokenizer, messages), where)


def read_prompts(paths: str | Sequence[str], tokenizer: Tokenizer, *,
                 on_error: str = "raise") -> tuple[list[PromptRecord], dict[str, str]]:
    """Every usable prompt record of the files, in order, and the skipped ones ("file:line" -> why)."""
    source = PromptSource(paths, tokenizer, on_error=on_error)
    prompts, seen = [], {}
    for i in range(len(source)):
        prompt = source[i]
        if prompt is None:
            continue
        if prompt.id in seen:
            raise DataError(f"{prompt.where}: prompt id {prompt.id!r} is already used at {seen[prompt.id]}; ids "
                            "must be unique for a rerun to know which prompts are done")
        seen[prompt.id] = prompt.where
        prompts.append(prompt)
    return prompts, dict(source.skipped)
