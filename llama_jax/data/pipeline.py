"""Sources -> documents of token ids -> packed [B, T] batches, deterministic and resumable (grain).

    it = make_batches(config.data, tokenizer)        # endless training stream of this process's rows
    batch = next(it)                                 # dict of int32 [B_local, T] arrays (packing.BATCH_KEYS)
    state = it.get_state()                           # JSON-able; saved in checkpoints as data_state.json
    it.set_state(state)                              # resumes with exactly the batches that would have followed

Per source: hold out every ``holdout_every``-th document for the eval split, shuffle the rest with the
seed (a new order each epoch), repeat forever, take every ``process_count``-th document from
``process_index`` (multi-host: each process reads only its own documents), tokenize with EOS after each
document. Several sources are mixed by weight; the packer then concatenates documents and cuts rows of
``seq_len + 1`` tokens (grain's ConcatThenSplitIterDataset), and rows are batched.

The data config (``config.data``; see configs/pretrain/tiny.py):
    tokenizer       "byte" | "llama3" | path of a tokenizer.model
    sources         list of {format: text|jsonl|tokens|shakespeare, path, weight, split, text_key}
    seq_len         tokens per row (the longest sequence of the run)
    batch_size      rows per batch, all processes together
    seed, add_bos, on_error ("raise" | "skip"), holdout_every (0: no eval split)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import grain
import grain.experimental
import jax
import numpy as np

from llama_jax.data import sources as sources_lib
from llama_jax.data.packing import rows_to_batch
from llama_jax.errors import ConfigError, DataError

FORMATS = ("text", "jsonl", "tokens", "shakespeare")


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


class BatchIterator:
    """Batches of one process, with grain's iterator state as a JSON-able dict."""

    def __init__(self, dataset: grain.IterDataset, sources: list[Sequence]):
        self._iter = iter(dataset)
        self.sources = sources

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        return json.loads(json.dumps(self._iter.get_state()))  # tuples -> lists: what a JSON file gives back

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state)

    @property
    def skipped(self) -> list[str]:
        """file:line of malformed records skipped so far (on_error="skip")."""
        return sorted(w for s in self.sources for w in getattr(s, "skipped", ()))


def document_dataset(source: Sequence, tokenize, *, split: str, holdout_every: int, seed: int,
                     process_index: int, process_count: int) -> grain.IterDataset:
    """Documents of one source as {"tokens": int32 [n]} elements: this split, shuffled, this process's share."""
    if split == "eval" and holdout_every <= 0:
        raise ConfigError("an eval split needs data.holdout_every > 0")
    ids = np.arange(len(source))
    if holdout_every > 0:
        held_out = ids % holdout_every == 0
        ids = ids[held_out] if split == "eval" else ids[~held_out]
    if len(ids) == 0:
        raise DataError(f"the {split} split of a source with {len(source)} documents is empty")
    docs = grain.MapDataset.source(ids)
    if split == "train":
        docs = docs.shuffle(seed=seed).repeat(None)
    docs = docs.slice(slice(process_index, None, process_count))
    docs = docs.map(lambda i: tokenize(source[int(i)]))
    return docs.filter(lambda d: d is not None).to_iter_dataset()


def make_batches(data_cfg: Mapping, tokenizer, *, split: str = "train", seq_len: int | None = None,
                 batch_size: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> BatchIterator:
    """The batch stream of this process (``batch_size / process_count`` rows each) for ``split``.

    Training streams are endless; eval streams end after one pass over the held-out documents.
    """
    seq_len = seq_len or data_cfg["seq_len"]
    batch_size = batch_size or data_cfg["batch_size"]
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ConfigError(f"data.batch_size ({batch_size}) must be a multiple of the process count ({process_count})")
    add_bos = bool(data_cfg.get("add_bos", False))
    eos, vocab = tokenizer.eos_id, tokenizer.vocab_size

    def tokenize(doc) -> dict[str, np.ndarray] | None:
        if doc is None:  # a malformed record that on_error="skip" let through
            return None
        if isinstance(doc, str):
            ids = np.asarray(tokenizer.encode(doc, bos=add_bos, eos=True), np.int32)
        else:
            ids = doc if doc[-1] == eos else np.append(doc, np.int32(eos))
        return {"tokens": ids}

    specs = list(data_cfg["sources"])
    if not specs:
        raise ConfigError("data.sources is empty")
    sources = [make_source(s, vocab_size=vocab, eos_id=eos, on_error=data_cfg.get("on_error", "raise"))
               for s in specs]
    streams = [
        document_dataset(src, tokenize, split=split, holdout_every=int(data_cfg.get("holdout_every", 0)),
                         seed=int(data_cfg.get("seed", 0)) + i, process_index=process_index,
                         process_count=process_count)
        for i, src in enumerate(sources)
    ]
    weights = [float(s.get("weight", 1.0)) for s in specs]
    if any(w <= 0 for w in weights):
        raise ConfigError(f"data source weights must be positive, got {weights}")
    docs = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, weights)
    rows = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"tokens": seq_len + 1})
    batches = rows.batch(batch_size // process_count, drop_remainder=True).map(rows_to_batch)
    return BatchIterator(batches, sources)
