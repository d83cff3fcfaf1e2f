"""Sources -> documents of token ids -> packed [B, T] batches: deterministic, resumable, and the same global
batch whatever the number of processes.

    it = make_batches(config.data, tokenizer)        # endless training stream of this process's rows
    batch = next(it)                                 # dict of int32 [B_local, T] arrays (packing.BATCH_KEYS)
    state = merge_states(all_processes_states)       # JSON-able; saved in checkpoints as data_state.json
    it.set_state(state)                              # on any number of processes: exactly the batches that follow

Each of the ``batch_size`` rows of the global batch is its own stream (see ``streams``): row ``r`` reads
positions r, r + B, r + 2B, ... of each source's document order (training: the source's documents minus every
``holdout_every``-th, shuffled with the seed anew each epoch, endlessly; eval: the held-out ones, once), picks
each next document's source by weight with a hash of (seed, r, draw), tokenizes it with EOS after it, and
packs documents into rows of ``seq_len + 1`` tokens, a document that does not fit going on in the row's next
batch. So batch ``k`` is a function of the data config alone, and process ``p`` of ``P`` builds only rows
[p B / P, (p + 1) B / P) of it, reading only those rows' documents. This is levanter's topology-independent
idea with one virtual shard per row; sharding by row rather than by process is what lets a run resume on
another number of hosts: a row's whole state is a few counters (documents drawn, tokens of the current
document emitted, documents taken per source, and of them those truncated and dropped), so ``get_state`` gives
this process's rows, ``merge_states`` joins every process's into one global state, and ``set_state`` takes its
own rows out of a global state.

Records cut to fit a row and records dropped are counted per source in that state (``streams``):
``record_counts(global_state)`` gives {"data/truncated/<i>": n, "data/dropped/<i>": n} for source ``i``, what the
training loop shows in its banner and every metrics line; ``BatchIterator.reports()`` gives, once each, a line
naming the first record of a source that this process cut and the first it dropped, for the loop to log.

The eval split is one pass over the held-out documents; a row whose documents run out is padding (segment 0,
no loss) until every row has run out, and then the stream ends. To end at the same batch in every process,
a process whose own rows have all run out reads the other rows' documents (tokenizing, not packing them) to
learn whether the pass goes on; this happens only at the end of a full pass.

Chat (SFT) and preference sources go through the same streams, states and splits; only how a row is filled
and what a batch holds differ (``DocumentRows`` here, ``chat.ChatRows``, ``preference.PairRows``): a row takes
whole chats while they fit, or exactly one preference record.

The data config (``config.data``; see configs/pretrain/tiny.py):
    tokenizer       "byte" | "llama3" | path of a tokenizer.model
    sources         list of {format, path, weight (of the mixture; 0: not read), ...}, all of one kind (``KINDS``):
      documents     format "text" (split: "file" | "paragraphs"), "jsonl" (text_key), "tokens" (.npy id streams),
                    "shakespeare" (path optional): packed documents, the batch of ``packing.BATCH_KEYS``
      chat          format "chat": chat records (``data.chat``), SFT batches with the same keys, loss_mask = the
                    assistant's tokens
      preference    format "preference": preference records (``data.preference``), a batch of sub-batches
                    "chosen", "rejected", "edited" (layout in ``data.preference``)
    seq_len         tokens per row (the longest sequence of the run)
    batch_size      rows per batch, all processes together (a multiple of the process count)
    seed, on_error ("raise" | "skip"), holdout_every (0: no eval split): every kind
    add_bos         documents only: chats and prompts start with <|begin_of_text|> by their template
    document_mask   documents only: True (the paper's), attention stays within each document of a packed row;
                    False, a row is one sequence (segment id 1, positions 0..T-1 across the row), so attention
                    crosses documents: the ablation of plain causal packing. The targets counted are the same.
    whole_documents documents only: False (grain's concat-then-split), rows are cut wherever they end; True, a
                    document that fits in a row but not in what is left of the current one opens the next row, the
                    rest of the current one being padding (longer documents are still cut). For long-context
                    phases, whose documents are as long as the rows: cut, a needle is parted from its question.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from llama_jax.data import sources as sources_lib
from llama_jax.data.chat import ChatRows, ChatSource
from llama_jax.data.config import DataConfig
from llama_jax.data.packing import rows_to_batch
from llama_jax.data.preference import REPLIES, PairRows, PreferenceSource
from llama_jax.data.streams import RowStream, SourceOrder, Split, pack_rows
from llama_jax.errors import ConfigError, DataError

FORMATS = ("text", "jsonl", "tokens", "shakespeare")  # documents
DEFAULTS = DataConfig().to_dict()  # every key of ``config.data`` and its default (llama_jax.data.config)
KINDS = {"documents": FORMATS, "chat": ("chat",), "preference": ("preference",)}
# ``PATH[:FORMAT]`` without a format: by file extension; .jsonl by the shape of its first record (see source_spec).
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".npy": "tokens"}


def source_spec(text: str) -> dict:
    """One ``data.sources`` entry from ``PATH[:FORMAT]`` (a file, directory or glob), as ``--data`` takes it.

    FORMAT is one of ``text``, ``jsonl``, ``tokens``, ``chat``, ``preference``; without it the extension decides
    (.txt / .md: text, one document per blank-line-separated paragraph; .npy: tokens; .jsonl: chat when the first
    record has "messages" or "prompt" + "completion", preference when it has "chosen" + "rejected", else jsonl
    documents with their "text" field).

        source_spec("corpus/*.txt")     # {"format": "text", "path": "corpus/*.txt", "split": "paragraphs", ...}
        source_spec("chats.jsonl")      # {"format": "chat", "path": "chats.jsonl", "weight": 1.0}
    """
    path, _, fmt = text.rpartition(":")
    known = [f for fs in KINDS.values() for f in fs if f != "shakespeare"]
    if not path or fmt not in known:
        path, fmt = text, ""
    if not path:
        raise ConfigError("--data needs a path: PATH[:FORMAT]")
    fmt = fmt or _infer_format(path)
    spec = {"format": fmt, "path": path, "weight": 1.0}
    if fmt == "text":
        spec["split"] = "paragraphs"
    if fmt == "jsonl":
        spec["text_key"] = "text"
    return spec


def _infer_format(path: str) -> str:
    files = sources_lib.expand_paths(path)
    suffixes = sorted({f.suffix.lower() for f in files})
    formats = sorted({EXTENSIONS.get(s, "?") for s in suffixes})
    if len(formats) != 1 or formats[0] == "?":
        raise ConfigError(f"cannot tell the data format of {path!r} from its file extension(s) {suffixes}; "
                          f"name it: {path}:FORMAT with FORMAT one of text, jsonl, tokens, chat, preference")
    return _jsonl_kind(files[0]) if formats[0] == "jsonl" else formats[0]


def _jsonl_kind(file: Path) -> str:
    """"chat", "preference" or "jsonl" from the keys of the file's first record."""
    with open(file, "rb") as f:
        first = next((line for line in f if line.strip()), None)
    try:
        record = json.loads(first) if first is not None else {}
    except json.JSONDecodeError as e:
        raise DataError(f"{file}: the first record is not JSON ({e})") from None
    keys = set(record) if isinstance(record, dict) else set()
    if "messages" in keys or {"prompt", "completion"} <= keys:
        return "chat"
    if {"chosen", "rejected"} <= keys:
        return "preference"
    return "jsonl"


def make_source(spec: Mapping, *, vocab_size: int, eos_id: int, on_error: str = "raise") -> Sequence:
    """One document source from its config entry (see the module docstring)."""
    fmt, path = spec.get("format", "text"), spec.get("path", "")
    if fmt not in FORMATS:
        raise ConfigError(f"data source format {fmt!r} unknown; expected one of {FORMATS}")
    if fmt == "shakespeare":
        return sources_lib.TextSource([str(p) for p in sources_lib.shakespeare_texts(path or None)],
                                      split=spec.get("split", "file"))
    if not path:
        raise ConfigError(f"data source {dict(spec)} needs a path")
    if fmt == "text":
        return sources_lib.TextSource(path, split=spec.get("split", "file"))
    if fmt == "jsonl":
        return sources_lib.JsonlSource(path, text_key=spec.get("text_key", "text"), on_error=on_error)
    return sources_lib.TokenSource(path, vocab_size=vocab_size, eos_id=eos_id)


def source_kind(data_cfg: Mapping) -> str:
    """The kind of data ``data_cfg.sources`` hold: "documents", "chat" or "preference" (one kind per config)."""
    formats = [s.get("format", "text") for s in data_cfg["sources"]]
    kinds = {kind for f in formats for kind, kind_formats in KINDS.items() if f in kind_formats}
    unknown = [f for f in formats if not any(f in kind_formats for kind_formats in KINDS.values())]
    if unknown:
        raise ConfigError(f"data source format {unknown[0]!r} unknown; expected one of "
                          f"{[f for fs in KINDS.values() for f in fs]}")
    if len(kinds) != 1:
        raise ConfigError(f"data.sources mix formats {formats} of kinds {sorted(kinds)}: their batches differ, so "
                          "one config's sources are all documents, all chat or all preference")
    return kinds.pop()


class DocumentRows:
    """Pretraining rows: the stream's documents concatenated and cut into rows of ``seq_len + 1`` tokens.

    ``document_mask=False`` makes each row one sequence for attention (segment id 1 on every real token, positions
    counting along the row), while ``loss_mask`` still leaves out the first token of each next document, so both
    settings score the same targets."""

    def __init__(self, seq_len: int, document_mask: bool = True, whole_documents: bool = False):
        self.length, self.document_mask, self.whole_documents = seq_len + 1, document_mask, whole_documents

    def take(self, stream: RowStream) -> list[np.ndarray]:
        if not self.whole_documents:
            return stream.take(self.length)
        pieces, left = [], self.length
        while left and (document := stream.current()) is not None:
            rest = len(document) - stream.offset
            if pieces and left < rest <= self.length:
                break  # it fits in a row of its own: padding here, and it opens the next row whole
            pieces += stream.take(min(left, rest))
            left -= len(pieces[-1])
        return pieces

    def batch(self, rows: Sequence[Sequence[np.ndarray]]) -> dict[str, np.ndarray]:
        batch = rows_to_batch(pack_rows(rows, self.length))
        if not self.document_mask:
            real = batch["segment_ids"] > 0  # padding only ever ends a row
            batch["segment_ids"] = real.astype(np.int32)
            batch["positions"] = np.where(real, np.arange(real.shape[1], dtype=np.int32), 0)
        return batch


_HEADER = ("split", "batch_size", "seq_len", "step")  # what every process's state must agree on


class BatchIterator:
    """Rows ``rows`` of every global batch of one split, with a JSON-able state (see the module docstring).

    ``layout`` fills a row from its stream (``take``) and makes the batch of the rows (``batch``):
    ``DocumentRows`` (default), ``chat.ChatRows`` or ``preference.PairRows``.
    """

    def __init__(self, split: Split, *, name: str, rows: range, seq_len: int, endless: bool, layout=None):
        self.split, self.name, self.rows, self.seq_len, self.endless = split, name, rows, seq_len, endless
        self.layout = layout or DocumentRows(seq_len)
        self.sources = split.sources
        self.step = 0  # batches produced
        self._streams = [RowStream(split, r) for r in rows]
        # Eval: the other processes' rows, followed (each up to the step it was last checked at) to find the end.
        self._others: dict[int, RowStream] = {}
        self._others_at: dict[int, int] = {}
        self._reported: set[tuple[int, str]] = set()  # (source, "truncated" | "dropped") already in reports()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = [self.layout.take(stream) for stream in self._streams]
        if not self.endless and not any(rows) and not self._others_go_on():
            raise StopIteration
        self.step += 1
        return self.layout.batch(rows)

    def _others_go_on(self) -> bool:
        """Whether any other process's row still has tokens for this step (eval: the pass ends for all at once)."""
        for row in range(self.split.num_rows):
            if row in self.rows:
                continue
            if row not in self._others:
                self._others[row], self._others_at[row] = RowStream(self.split, row), 0
            while self._others_at[row] < self.step:
                self.layout.take(self._others[row])
                self._others_at[row] += 1
            if self._others[row].current() is not None:
                return True
        return False

    def get_state(self) -> dict:
        """This process's rows: ``merge_states`` of every process's state is the global state."""
        return {"split": self.name, "batch_size": self.split.num_rows, "seq_len": self.seq_len, "step": self.step,
                "rows": {str(r): s.get_state() for r, s in zip(self.rows, self._streams)}}

    def set_state(self, state: Mapping) -> None:
        """Resumes from a global state (``merge_states``), saved by any number of processes."""
        if "rows" not in state:
            raise DataError("the data state holds no per-row positions (it was written by an older llama_jax, "
                            f"keys {sorted(state)}); the data position cannot be resumed from it")
        expected = {"split": self.name, "batch_size": self.split.num_rows, "seq_len": self.seq_len}
        for key, value in expected.items():
            if state.get(key) != value:
                raise DataError(f"the data state has {key}={state.get(key)!r}, this stream {key}={value!r}: "
                                "resuming would not reproduce the data order")
        missing = [r for r in self.rows if str(r) not in state["rows"]]
        if missing:
            raise DataError(f"the data state lacks rows {missing[:8]} of this process's rows {self.rows.start}.."
                            f"{self.rows.stop - 1}; pass the state merged from every process (merge_states)")
        for row, stream in zip(self.rows, self._streams):
            stream.set_state(state["rows"][str(row)])
        self.step = int(state["step"])
        self._others, self._others_at = {}, {}
        for key, row_state in state["rows"].items():
            if int(key) not in self.rows and not self.endless:
                self._others[int(key)] = RowStream(self.split, int(key))
                self._others[int(key)].set_state(row_state)
                self._others_at[int(key)] = self.step

    def reports(self) -> list[str]:
        """Lines not yet returned naming, per source, the first record this process cut to fit a row and the first it
        dropped (``record_counts`` counts every one)."""
        lines = []
        for i, (name, source) in enumerate(zip(self.split.names, self.sources)):
            dropped = next(iter(getattr(source, "skipped", {}).items()), None)
            firsts = {"truncated": getattr(source, "first_truncated", None),
                      "dropped": dropped and f"{dropped[0]}: {dropped[1]}"}
            for kind, first in firsts.items():
                if first and (i, kind) not in self._reported:
                    self._reported.add((i, kind))
                    lines.append(f"data source {name}: first {kind} record {first} (every one counts in "
                                 f"data/{kind}/{i})")
        return lines

    @property
    def skipped(self) -> list[str]:
        """file:line of malformed records met so far by this process (on_error="skip"): in its rows, and for eval
        also in the rows it followed to find the end of the pass."""
        return sorted(w for s in self.sources for w in getattr(s, "skipped", ()))


def record_counts(state: Mapping) -> dict[str, int]:
    """Records truncated and dropped so far per source, summed over the rows of a global state (``merge_states``):
    {"data/truncated/<i>": n, "data/dropped/<i>": n} for each source ``i`` of the stream."""
    rows = [list(row) for row in state["rows"].values()]
    sources = (len(rows[0]) - 2) // 3
    counts = {}
    for i in range(sources):
        counts[f"data/truncated/{i}"] = sum(row[2 + sources + i] for row in rows)
        counts[f"data/dropped/{i}"] = sum(row[2 + 2 * sources + i] for row in rows)
    return counts


def merge_states(states: Sequence[Mapping]) -> dict:
    """The global data state from every process's ``get_state()`` (any order): what a checkpoint keeps. Keys
    besides the header and rows (a wrapper's, e.g. the training phases') must agree and are kept."""
    if not states:
        raise DataError("merge_states needs the state of at least one process")
    header = {k: v for k, v in states[0].items() if k != "rows"} | {k: states[0].get(k) for k in _HEADER}
    rows: dict[str, list[int]] = {}
    for state in states:
        if "rows" not in state:
            raise DataError(f"a data state without per-row positions (keys {sorted(state)}) cannot be merged")
        differing = {k: (header.get(k), state.get(k)) for k in set(header) | set(state) - {"rows"}
                     if state.get(k) != header.get(k)}
        if differing:
            raise DataError(f"the processes' data states disagree on {differing}: they are not of one stream")
        rows.update(state["rows"])
    missing = sorted(set(range(header["batch_size"])) - {int(r) for r in rows})
    if missing:
        raise DataError(f"the merged data state lacks rows {missing[:8]} of {header['batch_size']}: "
                        "a process's state is missing")
    return header | {"rows": {str(r): list(rows[str(r)]) for r in range(header["batch_size"])}}


def split_orders(sources: Sequence[Sequence], *, split: str, holdout_every: int, seed: int,
                 names: Sequence[str] | None = None) -> list[SourceOrder]:
    """Each source's document order for ``split``: every ``holdout_every``-th document is held out for eval;
    training shuffles the rest (source ``i`` with seed ``seed + i``), anew each epoch. ``names`` say which source
    an error is about (default "source i")."""
    if split == "eval" and holdout_every <= 0:
        raise ConfigError("an eval split needs data.holdout_every > 0")
    orders = []
    for i, source in enumerate(sources):
        name = names[i] if names is not None else f"source {i}"
        if len(source) == 0:
            raise DataError(f"data source {name} holds no documents (empty files, or only blank lines)")
        ids = np.arange(len(source))
        if holdout_every > 0:
            held_out = ids % holdout_every == 0
            ids = ids[held_out] if split == "eval" else ids[~held_out]
        if len(ids) == 0:
            raise DataError(f"the {split} split of data source {name} ({len(source)} documents, every "
                            f"data.holdout_every={holdout_every}-th held out) is empty")
        orders.append(SourceOrder(ids, shuffle_seed=seed + i if split == "train" else None))
    return orders


def make_batches(data_cfg: Mapping, tokenizer, *, split: str = "train", seq_len: int | None = None,
                 batch_size: int | None = None, process_index: int | None = None,
                 process_count: int | None = None, kind: str | None = None,
                 reference: Mapping | None = None, edited: bool = True) -> BatchIterator:
    """The batch stream of this process (rows [p B / P, (p + 1) B / P) of every global batch) for ``split``.

    Training streams are endless; eval streams end after one pass over the held-out documents. ``kind``
    ("documents", "chat" or "preference"), when given, is the kind of data the caller reads: sources of
    another kind are a ConfigError. ``reference`` (preference data): read precomputed reference log-probs into
    the batches (``data.preference``). ``edited`` (preference data): read the records' edited replies; False
    ignores them (a stage that ranks none, as DPO): neither encoded nor checked, and the batches hold no "edited"
    rows.
    """
    if split not in ("train", "eval"):
        raise ConfigError(f"split must be 'train' or 'eval', got {split!r}")
    data_cfg = DataConfig.from_dict(data_cfg)  # unknown keys and bad values name the key
    specs = list(data_cfg["sources"])
    if not specs:
        raise ConfigError("data.sources is empty")
    data_kind = source_kind(data_cfg)
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if kind is not None and kind != data_kind:
        raise ConfigError(f"this stage reads {kind} data, but data.sources are {data_kind} (formats "
                          f"{[s.get('format', 'text') for s in specs]}); {kind} sources have format "
                          f"{' or '.join(repr(f) for f in KINDS[kind])}")
    data_cfg = data_cfg.replace(seq_len=seq_len or data_cfg.seq_len, batch_size=batch_size or data_cfg.batch_size)
    seq_len, batch_size = data_cfg.seq_len, data_cfg.batch_size
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is outside 0..{process_count - 1}")
    if batch_size % process_count:
        raise ConfigError(f"data.batch_size ({batch_size}) must be a multiple of the process count ({process_count})")
    seed = data_cfg.seed
    weights = [float(s.get("weight", 1.0)) for s in specs]
    if any(not w >= 0 for w in weights) or not any(weights):
        raise ConfigError(f"data source weights must be >= 0 and not all 0, got {weights}")
    specs, weights = [s for s, w in zip(specs, weights) if w > 0], [w for w in weights if w > 0]  # 0: not read
    on_error = data_cfg["on_error"]
    document_mask = data_cfg["document_mask"]
    if not document_mask and data_kind != "documents":
        raise ConfigError(f"data.document_mask=False applies to packed documents only; these sources are {data_kind} "
                          "data, whose rows keep each record to itself")
    whole_documents = data_cfg["whole_documents"]
    if whole_documents and data_kind != "documents":
        raise ConfigError(f"data.whole_documents=True applies to packed documents only; {data_kind} rows always "
                          "keep their records whole")
    if data_kind == "documents":
        sources = [make_source(s, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, on_error=on_error)
                   for s in specs]
        layout = DocumentRows(seq_len, document_mask, whole_documents)
        tokenize = _document_tokenizer(tokenizer, bool(data_cfg["add_bos"]))
    elif data_kind == "chat":
        sources = [ChatSource(_path(s), tokenizer, max_tokens=seq_len + 1, on_error=on_error) for s in specs]
        layout, tokenize = ChatRows(seq_len), _encoded
    else:
        sources = [PreferenceSource(_path(s), tokenizer, seq_len=seq_len, on_error=on_error, reference=reference,
                                    edited=edited) for s in specs]
        replies = REPLIES if edited else REPLIES[:2]
        layout, tokenize = PairRows(seq_len, tokenizer, reference=reference is not None, replies=replies), _encoded
    names = [f"{i} ({s.get('format', 'text')} {s.get('path') or '(default corpus)'})" for i, s in enumerate(specs)]
    orders = split_orders(sources, split=split, holdout_every=int(data_cfg["holdout_every"]), seed=seed, names=names)
    per_process = batch_size // process_count
    rows = range(process_index * per_process, (process_index + 1) * per_process)
    return BatchIterator(Split(sources, orders, weights, tokenize, num_rows=batch_size, seed=seed, names=names),
                         name=split, rows=rows, seq_len=seq_len, endless=split == "train", layout=layout)


def _document_tokenizer(tokenizer, add_bos: bool):
    eos = tokenizer.eos_id

    def tokenize(doc) -> np.ndarray | None:
        if doc is None:  # a malformed record that on_error="skip" let through
            return None
        if isinstance(doc, str):
            return np.asarray(tokenizer.encode(doc, bos=add_bos, eos=True), np.int32)
        return doc if doc[-1] == eos else np.append(doc, np.int32(eos))

    return tokenize


def _encoded(record):
    """Chat and preference sources hand out encoded records (or None): nothing is left to tokenize."""
    return record


def _path(spec: Mapping) -> str:
    if not spec.get("path"):
        raise ConfigError(f"data source {dict(spec)} needs a path")
    return spec["path"]
