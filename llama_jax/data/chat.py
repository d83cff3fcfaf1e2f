"""Chat records -> token ids with the assistant mask, and SFT rows packed with whole chats.

    source = ChatSource("chats/*.jsonl", tokenizer, max_tokens=8193)   # a Sequence, like every data source
    chat = source[0]                       # EncodedChat: ids, and trained (1 on what the assistant writes)
    ids, trained = encode_chat(tokenizer, {"prompt": "2 + 2?", "completion": "4"})    # one record, no file

Records (JSON Lines, one per line; other top-level fields such as "id" are ignored):
    {"messages": [{"role": "system" | "user" | "assistant" | "ipython", "content": str}, ...]}
        An assistant tool call is {"role": "assistant", "content": "...", "tool_call": true} (encoded as
        <|python_tag|>content<|eom_id|>); tool output is the "ipython" role. Messages hold no other keys, so a
        per-turn field the format does not know (a weight, HF's structured "tool_calls") is an error, not ignored.
    {"prompt": str | [messages], "completion": str | assistant message | [messages]}
        One turn: a string prompt is a user message, a string completion the assistant's reply. Only the
        completion is trained (the prompt is context, even if it holds assistant turns).

Order (``check_order``): an optional system message first; the first other message is a user's; then
    user       after the system message, a user or an assistant message (Llama 3.1's custom-tool prompt puts the
               tool definitions in a user message of their own, before the question)
    assistant  after a user or an ipython message
    ipython    after an assistant message: a tool call, flagged or not (a custom tool's JSON call ends with
               <|eot_id|> like any reply, so it carries no flag)
and after a flagged tool call (which ends with <|eom_id|>) only ipython. A chat ends with an assistant message.

Trained tokens: the tokenizer's assistant mask (``Tokenizer.encode_dialog``), i.e. each assistant message's
content (<|python_tag|> included) and its closing <|eot_id|> / <|eom_id|>, by position, never by token value.

Rows (``ChatRows``): whole chats, as many as fit in seq_len + 1 tokens, then padding (segment 0); the chat that
does not fit opens the row's next batch. Chats are never split across rows: a chat longer than the row is cut
at its end when read (``EncodedChat.cut`` says how much; counted per source as ``data/truncated/<i>``, the first
logged by the training loop), and dropped (in ``skipped`` and ``data/dropped/<i>``, whatever ``on_error`` says) if
no trained token survives. A cut chat is kept, as TRL's SFT truncation keeps it: what fits still teaches the
replies it holds, though the last one lost its closing <|eot_id|> (the model is not taught to stop there); when
the count is more than a few, raise ``data.seq_len`` or shorten the chats. The batch has the pretraining keys;
``loss_mask[t] = 1`` iff target ``t`` is a trained token of the same chat as token ``t``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from llama_jax.data.packing import rows_to_batch
from llama_jax.data.sources import JsonlSource
from llama_jax.data.streams import RowStream, pack_rows
from llama_jax.errors import DataError
from llama_jax.tokenizer import ROLES, Tokenizer

MESSAGE_KEYS = ("role", "content", "tool_call")

# role -> the kinds of message it may follow (None: it opens the chat). A message's kind is its role, or
# "tool call" for an assistant message with "tool_call": true.
_MAY_FOLLOW = {
    "system": {None},
    "user": {None, "system", "user", "assistant"},
    "assistant": {"user", "ipython"},
    "ipython": {"assistant", "tool call"},
}


def _kind(message: Mapping) -> str:
    return "tool call" if message.get("tool_call") else message["role"]


def check_message(message, index: int) -> dict:
    """One message's shape: an object with a known role, string content and an optional boolean tool_call."""
    if not isinstance(message, Mapping):
        raise DataError(f"message {index} is {type(message).__name__}, not an object")
    unknown = sorted(set(message) - set(MESSAGE_KEYS))
    if unknown:
        raise DataError(f"message {index} has key(s) {unknown}; a message holds only {list(MESSAGE_KEYS)} (a tool "
                        "call is an assistant message with \"tool_call\": true, tool output the \"ipython\" role)")
    role = message.get("role")
    if role not in ROLES:
        hint = ' (tool output is the "ipython" role)' if role == "tool" else ""
        raise DataError(f"message {index} has role {role!r}; expected one of {list(ROLES)}{hint}")
    if not isinstance(message.get("content"), str):
        raise DataError(f"message {index} ({role}) has content of type {type(message.get('content')).__name__}, "
                        "not a string")
    tool_call = message.get("tool_call", False)
    if not isinstance(tool_call, bool):
        raise DataError(f"message {index} has tool_call {tool_call!r}; expected true or false")
    if tool_call and role != "assistant":
        raise DataError(f"message {index} is a {role} message with tool_call: only assistant messages make calls")
    return dict(message)


def check_messages(value, what: str = "messages") -> list[dict]:
    """A non-empty list of well-formed messages (``check_message``)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{what} must be a non-empty list of messages, got {_describe(value)}")
    return [check_message(m, i) for i, m in enumerate(value)]


def check_order(messages: Sequence[Mapping]) -> None:
    """Raises DataError unless each message may follow the one before it (see the module docstring)."""
    previous = None
    for i, message in enumerate(messages):
        if previous not in _MAY_FOLLOW[message["role"]]:
            after = "at the start" if previous is None else f"after {_a(previous)} message"
            raise DataError(f"message {i} ({_kind(message)}) cannot come {after}: a chat is an optional system "
                            "message, then user and assistant turns, ipython only right after an assistant's call")
        previous = _kind(message)


def prompt_messages(value) -> list[dict]:
    """A prompt: a string (one user message) or messages in order, ending where the assistant speaks next."""
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else check_messages(value, "prompt")
    check_order(messages)
    if messages[-1]["role"] not in ("user", "ipython"):
        raise DataError(f"the prompt ends with {_a(_kind(messages[-1]))} message; it must end with a user or ipython "
                        "message, for the assistant to answer")
    return messages


def reply_messages(value, what: str = "reply") -> list[dict]:
    """A reply: a string, an assistant message, or messages that start and end with the assistant's."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = check_messages([value] if isinstance(value, Mapping) else value, what)
    if messages[0]["role"] != "assistant" or messages[-1]["role"] != "assistant":
        raise DataError(f"{what} must start and end with an assistant message, got roles "
                        f"{[m['role'] for m in messages]}")
    check_order([{"role": "user", "content": ""}, *messages])  # a reply follows a prompt ending with a user turn
    return messages


def encode_reply(tokenizer: Tokenizer, reply: Sequence[Mapping]) -> tuple[list[int], list[int]]:
    """Ids and assistant mask of reply messages that follow a prompt's generation header: the first message's own
    header is that one, so it is left out."""
    ids, trained = [], []
    for i, message in enumerate(reply):
        message_ids, message_trained = tokenizer.encode_message(message)
        skip = len(tokenizer.encode_header(message["role"])) if i == 0 else 0
        ids += message_ids[skip:]
        trained += message_trained[skip:]
    return ids, trained


def encode_prompt(tokenizer: Tokenizer, prompt: Sequence[Mapping]) -> list[int]:
    """A checked prompt's ids, ending with the assistant's generation header (nothing in it is trained)."""
    return tokenizer.encode_dialog(prompt, add_generation_prompt=True)[0]


def encode_chat(tokenizer: Tokenizer, record: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(ids, trained) of one chat record, int32 [n] each; see the module docstring for the shapes and order."""
    if not isinstance(record, Mapping):
        raise DataError(f"a chat record is a JSON object, got {_describe(record)}")
    has_messages, has_pair = "messages" in record, "prompt" in record or "completion" in record
    if has_messages == has_pair:
        raise DataError('a chat record holds either "messages" or "prompt" and "completion"; got keys '
                        f"{sorted(record)}")
    if has_messages:
        messages = check_messages(record["messages"])
        check_order(messages)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("the chat has no assistant message: nothing in it would be trained")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"the chat ends with {_a(messages[-1]['role'])} message; it must end with the assistant's "
                            "(nothing after it would be trained)")
        ids, trained = tokenizer.encode_dialog(messages)
    else:
        for key in ("prompt", "completion"):
            if key not in record:
                raise DataError(f'a prompt/completion record has no "{key}" field')
        prompt = prompt_messages(record["prompt"])
        reply = reply_messages(record["completion"], "completion")
        check_order(prompt + reply)
        prompt_ids = encode_prompt(tokenizer, prompt)
        reply_ids, reply_trained = encode_reply(tokenizer, reply)
        ids, trained = prompt_ids + reply_ids, [0] * len(prompt_ids) + reply_trained
    return np.asarray(ids, np.int32), np.asarray(trained, np.int32)


@dataclass(frozen=True)
class EncodedChat:
    """A chat's ids and assistant mask (int32 [n]); ``len`` is its number of tokens."""

    ids: np.ndarray
    trained: np.ndarray
    cut: str = ""  # how the chat was cut to fit a row ("": whole)

    def __len__(self) -> int:
        return len(self.ids)


class ChatSource(JsonlSource):
    """Chat records of JSON Lines files, encoded and cut to ``max_tokens`` (the row length): see the module
    docstring. Malformed records raise DataError naming file and line, or are counted in ``skipped``
    (``on_error="skip"``); chats whose trained tokens all lie past ``max_tokens`` are always counted there."""

    def __init__(self, paths: str | Sequence[str], tokenizer: Tokenizer, *, max_tokens: int,
                 on_error: str = "raise"):
        super().__init__(paths, on_error=on_error)
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def parse(self, record, where: str) -> EncodedChat | None:
        ids, trained = encode_chat(self.tokenizer, record)
        if len(ids) > self.max_tokens:
            if not trained[:self.max_tokens].any():
                self.skipped[where] = (f"dropped: no trained token of this chat of {len(ids)} tokens lies within "
                                       f"the row's {self.max_tokens}")
                return None
            lost, closing = int(trained[self.max_tokens:].sum()), self.tokenizer.decode(ids[-1:])
            cut = (f"a chat of {len(ids)} tokens cut to the row's {self.max_tokens}: {lost} of its "
                   f"{int(trained.sum())} trained tokens lost, the closing {closing} among them")
            self.first_truncated = self.first_truncated or f"{where}: {cut}"
            return EncodedChat(ids[:self.max_tokens], trained[:self.max_tokens], cut)
        return EncodedChat(ids, trained)


class ChatRows:
    """SFT rows: whole chats, as many as fit in ``seq_len + 1`` tokens (see the module docstring)."""

    def __init__(self, seq_len: int):
        self.length = seq_len + 1

    def take(self, stream: RowStream) -> list[EncodedChat]:
        return stream.take_whole(self.length)

    def batch(self, rows: Sequence[Sequence[EncodedChat]]) -> dict[str, np.ndarray]:
        batch = rows_to_batch(pack_rows([[c.ids for c in row] for row in rows], self.length))
        trained = pack_rows([[c.trained for c in row] for row in rows], self.length)["tokens"]
        batch["loss_mask"] *= trained[:, 1:]  # same chat as the input (rows_to_batch) and trained
        return batch


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "ai" else f"a {kind}"  # an assistant, an ipython; a user, a system


def _describe(value) -> str:
    return "an empty list" if value == [] else f"{type(value).__name__} {str(value)[:40]!r}"
