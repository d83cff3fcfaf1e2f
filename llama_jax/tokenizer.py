"""Tokenizers: the Llama 3 tiktoken BPE, a byte-level fallback, and the Llama 3 chat format.

    tok = get_tokenizer("llama3")           # the tokenizer.model shipped in the llama-models package
    ids = tok.encode("Hello world!", bos=True)
    ids, mask = tok.encode_dialog([{"role": "user", "content": "Hi"}], add_generation_prompt=True)

Both tokenizers share one API (`Tokenizer`). Special tokens are spelled like Llama 3's ("<|eot_id|>").
Text that merely *contains* a special token's spelling is encoded as ordinary text unless the caller
allows that special (`allowed_special`), so user input can never inject a turn boundary into a dialog.

Special ids of the Llama 3.1 tokenizer (128,000 BPE ranks, then 256 specials):
    128000 <|begin_of_text|>    128001 <|end_of_text|>     128004 <|finetune_right_pad_id|>
    128006 <|start_header_id|>  128007 <|end_header_id|>   128008 <|eom_id|>   128009 <|eot_id|>
    128010 <|python_tag|>
and every other slot <|reserved_special_token_N|>, N counting up from 0 over the free slots (128002 -> 0,
128003 -> 1, 128005 -> 2, 128011 -> 3, ..., 128255 -> 247), as in the Llama 3.1 release. (llama-models
0.3.0 names 128005 <|step_id|> and 128011 <|image|> for later models and numbers the reserved ones from
128012; the ids that matter are the same.)
"""

from __future__ import annotations

import abc
import base64
import binascii
import hashlib
import importlib.resources
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import tiktoken

from llama_jax.errors import DataError, TokenizerError

# Llama 3's pre-tokenization regex (the cl100k pattern): splits text into the pieces BPE merges within.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RANKS = 128_000
LLAMA3_NUM_SPECIALS = 256
# Specials with a meaning, by offset from the first special id; the other offsets are reserved.
LLAMA3_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",  # end of message: the model expects a tool result next
    9: "<|eot_id|>",  # end of turn
    10: "<|python_tag|>",  # starts a tool call
}
# <|end_of_text|>, <|eom_id|>, <|eot_id|>: where generation stops (the default of llama_jax.generate).
LLAMA3_STOP_IDS = tuple(LLAMA3_NUM_RANKS + offset for offset in (1, 8, 9))

# tiktoken panics on single calls over ~400k characters, and its BPE slows down badly on long runs of
# whitespace or non-whitespace (openai/tiktoken#195), so long text goes through it in pieces.
_MAX_CHARS_PER_CALL = 400_000
_MAX_RUN = 25_000
# A whole run of more than _MAX_RUN whitespace or non-whitespace characters (anchored at the run start).
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{_MAX_RUN + 1},}}|(?<!\s)\s{{{_MAX_RUN + 1},}}")

ROLES = ("system", "user", "assistant", "ipython")

AllowedSpecial = Literal["all"] | Collection[str]


def _spelling(name: str) -> str:
    """A special token's spelling from its spelling or bare name: "eot_id" -> "<|eot_id|>"."""
    return name if name.startswith("<|") else f"<|{name}|>"


class Tokenizer(abc.ABC):
    """What every tokenizer offers: text <-> ids, the special ids, and the Llama 3 chat format.

    Subclasses set `name`, `sha256` (identity recorded in checkpoints), `vocab_size` and `special_tokens`
    (spelling -> id), and implement `_encode_ordinary` and `decode`.
    """

    name: str
    sha256: str
    vocab_size: int
    special_tokens: Mapping[str, int]

    @abc.abstractmethod
    def _encode_ordinary(self, text: str) -> list[int]:
        """Ids of text with no special tokens recognised in it."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids (specials are written out); bytes that are not valid UTF-8 become U+FFFD."""

    @abc.abstractmethod
    def token_bytes(self) -> list[bytes]:
        """The bytes of every ordinary id, indexed by id (ids 0 .. len - 1; the special ids follow them)."""

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, allowed_special: AllowedSpecial = ()
    ) -> list[int]:
        """Ids of text, optionally framed by <|begin_of_text|> / <|end_of_text|>.

        Spellings of special tokens in text are ordinary text, except those named in `allowed_special`
        ("all", or spellings or bare names such as {"<|eot_id|>"} or "eot_id"), which become special ids.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: what Python makes of undecodable bytes, or a "\ud800"
            raise TokenizerError(f"text holds a lone surrogate {text[e.start]!r} at character {e.start}: not valid "
                                 "Unicode, so it cannot be encoded (undecodable input bytes?)") from None
        ids = [self.bos_id] if bos else []
        allowed = self._allowed_specials(allowed_special)
        if allowed:
            splitter = re.compile("|".join(re.escape(s) for s in sorted(allowed)))
            start = 0
            for match in splitter.finditer(text):
                ids += self._encode_ordinary(text[start : match.start()])
                ids.append(self.special_tokens[match.group()])
                start = match.end()
            text = text[start:]
        ids += self._encode_ordinary(text)
        if eos:
            ids.append(self.eos_id)
        return ids

    def _allowed_specials(self, allowed_special: AllowedSpecial) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if isinstance(allowed_special, str):  # one name, not a collection of characters
            allowed_special = (allowed_special,)
        allowed = {_spelling(s) for s in allowed_special}
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise TokenizerError(f"allowed_special names tokens the {self.name} tokenizer lacks: {sorted(unknown)}")
        return allowed

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids {bad[:5]} are outside the {self.name} vocabulary [0, {self.vocab_size})")
        return ids

    def special_id(self, name: str) -> int:
        """Id of a special token, by spelling ("<|eot_id|>") or bare name ("eot_id")."""
        spelling = _spelling(name)
        if spelling not in self.special_tokens:
            raise TokenizerError(f"the {self.name} tokenizer has no special token {spelling}")
        return self.special_tokens[spelling]

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["<|end_of_text|>"]

    @property
    def eot_id(self) -> int:
        return self.special_tokens["<|eot_id|>"]

    @property
    def eom_id(self) -> int:
        return self.special_tokens["<|eom_id|>"]

    @property
    def pad_id(self) -> int:
        return self.special_tokens["<|finetune_right_pad_id|>"]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: end of turn, end of message (tool call), end of text."""
        return (self.eot_id, self.eom_id, self.eos_id)

    def encode_header(self, role: str) -> list[int]:
        """<|start_header_id|>{role}<|end_header_id|>\\n\\n, each part encoded on its own as Meta does."""
        if role not in ROLES:
            raise DataError(f"unknown chat role {role!r}; expected one of {ROLES}")
        return [
            self.special_tokens["<|start_header_id|>"],
            *self._encode_ordinary(role),
            self.special_tokens["<|end_header_id|>"],
            *self._encode_ordinary("\n\n"),
        ]

    def encode_message(self, message: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        """One turn's ids and its assistant mask (1 on an assistant's content and closing token)."""
        role, content = message.get("role"), message.get("content")
        header = self.encode_header(role)
        if not isinstance(content, str):
            raise DataError(f"{role} message content must be a str, got {type(content).__name__}")
        tool_call = bool(message.get("tool_call", False))
        if tool_call and role != "assistant":
            raise DataError(f"only assistant messages can be tool calls, got tool_call on a {role} message")
        body = [self.special_tokens["<|python_tag|>"]] if tool_call else []
        body += self._encode_ordinary(content)
        body.append(self.eom_id if tool_call else self.eot_id)
        trained = 1 if role == "assistant" else 0
        return header + body, [0] * len(header) + [trained] * len(body)

    def encode_dialog(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """A dialog in the Llama 3 chat format, and a mask that is 1 exactly on the tokens SFT trains on.

        Format: <|begin_of_text|> then per message
        <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>. An assistant message with
        "tool_call": True is <|python_tag|>{content}<|eom_id|> instead. `add_generation_prompt` appends an
        assistant header for the model to continue from. Content is never parsed for special tokens.
        """
        ids, mask = [self.bos_id], [0]
        for message in messages:
            message_ids, message_mask = self.encode_message(message)
            ids += message_ids
            mask += message_mask
        if add_generation_prompt:
            header = self.encode_header("assistant")
            ids += header
            mask += [0] * len(header)
        return ids, mask


class Llama3Tokenizer(Tokenizer):
    """The Llama 3 / 3.1 tiktoken BPE read from a tokenizer.model file (default: llama-models' copy)."""

    name = "llama3"

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_model_path()
        data = _read_file(self.path)
        self.sha256 = hashlib.sha256(data).hexdigest()
        ranks = _parse_ranks(data, self.path)
        self._ranks = ranks
        self.special_tokens = _llama3_specials()
        self.vocab_size = LLAMA3_NUM_RANKS + LLAMA3_NUM_SPECIALS
        self._encoding = tiktoken.Encoding(
            name=f"llama3-{self.sha256[:12]}",
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=dict(self.special_tokens),
        )

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _pieces(text):
            ids += self._encoding.encode_ordinary(piece)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(self._check_ids(ids), errors="replace")

    def token_bytes(self) -> list[bytes]:
        return sorted(self._ranks, key=self._ranks.__getitem__)


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes of the text, then Llama 3's named specials: 264 ids in all.

    Needs no file and fits small test models (the `tiny` preset's vocabulary of 512).
    """

    name = "byte"
    SPECIALS = (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|finetune_right_pad_id|>",
    )

    def __init__(self):
        self.special_tokens = {spelling: 256 + i for i, spelling in enumerate(self.SPECIALS)}
        self.vocab_size = 256 + len(self.SPECIALS)
        # No file to hash: hash the id table, so a checkpoint notices if it ever changes.
        table = "\n".join(f"{i}\t{s}" for s, i in self.special_tokens.items())
        self.sha256 = hashlib.sha256(f"byte\n{table}".encode()).hexdigest()
        self._spelling_of = {i: s for s, i in self.special_tokens.items()}

    def _encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)]

    def decode(self, ids: Iterable[int]) -> str:
        # Bytes between specials are decoded together, so multi-byte characters survive.
        parts, pending = [], bytearray()
        for i in self._check_ids(ids):
            if i < 256:
                pending.append(i)
                continue
            parts += [pending.decode("utf-8", errors="replace"), self._spelling_of[i]]
            pending.clear()
        parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)


def get_tokenizer(name_or_path: str | Path = "llama3") -> Tokenizer:
    """A tokenizer by name: "llama3" (llama-models' tokenizer.model), "byte", or a tokenizer.model path."""
    if name_or_path == "llama3":
        return Llama3Tokenizer()
    if name_or_path == "byte":
        return ByteTokenizer()
    return Llama3Tokenizer(name_or_path)


def from_identity(identity: Mapping[str, Any] | None, override: str | Path | None = None) -> Tokenizer | None:
    """The tokenizer a checkpoint records (``{"name", "sha256"}``, as ``checkpoint.load`` reports it), checked
    against its sha256; ``override`` (a name or path, e.g. a command's ``--tokenizer``) wins; None if neither."""
    if override is not None:
        return get_tokenizer(override)
    if not identity:
        return None
    tok = get_tokenizer(identity["name"])
    if identity.get("sha256") and identity["sha256"] != tok.sha256:
        raise TokenizerError(f"the checkpoint was made with a {identity['name']!r} tokenizer of sha256 "
                             f"{identity['sha256'][:12]}..., but the one found here has {tok.sha256[:12]}...; pass the "
                             "tokenizer.model it was trained with (--tokenizer PATH)")
    return tok


def default_model_path() -> Path:
    """The tokenizer.model inside the installed llama-models package (read in place, never copied)."""
    try:
        package = importlib.resources.files("llama_models")
    except ModuleNotFoundError:
        raise TokenizerError(
            "the Llama 3 tokenizer file comes from the llama-models package: "
            "pip install llama-models (or pip install 'llama_jax[tokenizer]'), or pass the path of a tokenizer.model"
        ) from None
    return Path(str(package / "llama3" / "tokenizer.model"))


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e.strerror or e}") from e


def _parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    """The BPE ranks of a tiktoken file: one "<base64 token> <rank>" per line, ranks 0..127,999."""
    ranks = {}
    for line_no, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(
                f"{path}, line {line_no}: expected '<base64 token> <rank>', got {line[:80]!r}"
            ) from None
    if sorted(ranks.values()) != list(range(LLAMA3_NUM_RANKS)):
        raise TokenizerError(
            f"{path}: expected the {LLAMA3_NUM_RANKS:,} distinct ranks 0..{LLAMA3_NUM_RANKS - 1} of the Llama 3 "
            f"tokenizer, got {len(ranks):,} tokens"
        )
    return ranks


def _llama3_specials() -> dict[str, int]:
    specials, reserved = {}, 0
    for offset in range(LLAMA3_NUM_SPECIALS):
        spelling = LLAMA3_NAMED_SPECIALS.get(offset)
        if spelling is None:
            spelling, reserved = f"<|reserved_special_token_{reserved}|>", reserved + 1
        specials[spelling] = LLAMA3_NUM_RANKS + offset
    return specials


def _pieces(text: str) -> Iterator[str]:
    """Consecutive slices of text that tiktoken handles quickly and safely.

    Text is cut every <= 400k characters just before a space or tab that follows a non-space: no
    pre-token spans such a point, so the ids equal those of the uncut text. Only runs longer than 25k
    characters of (non-)whitespace are cut inside, which is what Meta's reference tokenizer does too.
    """
    start = 0
    while len(text) - start > _MAX_CHARS_PER_CALL:
        end = _safe_cut(text, start + _MAX_CHARS_PER_CALL // 2, start + _MAX_CHARS_PER_CALL)
        yield from _split_long_runs(text[start:end])
        start = end
    yield from _split_long_runs(text[start:])


def _safe_cut(text: str, lo: int, hi: int) -> int:
    """The last index in (lo, hi] that starts a space/tab run after a non-space, else hi."""
    end = hi
    while True:
        cut = max(text.rfind(" ", lo, end), text.rfind("\t", lo, end))
        if cut <= lo:
            return hi
        if not text[cut - 1].isspace():  # str.isspace covers every char the regex's \s matches
            return cut
        end = cut


def _split_long_runs(text: str) -> Iterator[str]:
    start = 0
    for run in _LONG_RUN.finditer(text):
        for cut in range(run.start() + _MAX_RUN, run.end(), _MAX_RUN):
            yield text[start:cut]
            start = cut
    yield text[start:]
