"""Row streams: each row of the global batch is its own deterministic stream of packed documents.

    split = Split(sources, orders, weights, tokenize, num_rows=8, seed=0)
    stream = RowStream(split, row=3)
    pieces = stream.take(65)         # token arrays (whole or partial documents) filling one row of 65 tokens
    chats = stream.take_whole(65)    # or: whole documents only, as many as fit (chats are never split)
    state = stream.get_state()       # [draws, offset, taken, truncated, dropped per source]: counters resume it

Stream ``r`` of ``num_rows`` (B):
- Each source's documents are read in an order (``SourceOrder``): training shuffles them with the seed, anew
  each epoch, endlessly; eval reads the held-out documents once, in file order.
- Stream ``r`` owns positions ``r, r + B, r + 2B, ...`` of every source's order, so within an epoch no two
  streams share a document, and a stream needs no other stream's progress to know its next document.
- Its j-th document comes from a source drawn with probability proportional to the weights (among the sources
  it still has documents of), using a hash of (seed, r, j) rather than shared random state, so a draw is the
  same in whichever process makes it.
- Documents are tokenized (EOS after each), concatenated and cut into rows; a document that does not fit goes on
  in the stream's next row, with positions restarting at 0 (as grain's concat-then-split packer does).
- Records are counted per source as the stream finishes them: ``truncated``, chats and preference records cut to
  fit a row (their ``cut`` says how; packed documents are cut into rows by design and never count), and
  ``dropped``, records that read as None (malformed and skipped, or unusable). The counts are part of the state, so
  they survive a resume, and each row counts only its own records, so their sum over the rows (``record_counts``)
  is the same on any number of processes.

Why not one grain dataset per row: a row's whole position is these counters, where a grain iterator's state is
a nest of its transformations' states, and grain's per-element overhead made the former grain-based version
take 190 ms of host time for a 64 x 1024 batch of Shakespeare bytes (this: 5 ms; 13 s vs 0.5 s at 512 x 8192).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from llama_jax.errors import DataError

_MASK64 = (1 << 64) - 1
_CACHED_EPOCHS = 4  # permutations kept per source: streams drift apart by at most a few epochs of small sources


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, row: int, draw: int) -> float:
    """A number in [0, 1), a pure function of (seed, row, draw)."""
    return (_mix64(_mix64(_mix64(seed & _MASK64) ^ row) ^ draw) >> 11) / 2.0**53


class SourceOrder:
    """The order in which one source's documents (``ids``, indices into the source) are read.

    With ``shuffle_seed`` the order is endless: epoch ``e`` is a permutation of ``ids`` drawn from
    (shuffle_seed, e). Without it, ``ids`` are read once, as given.
    """

    def __init__(self, ids: np.ndarray, *, shuffle_seed: int | None = None):
        self.ids = np.asarray(ids)
        self.shuffle_seed = shuffle_seed
        self._permutations: dict[int, np.ndarray] = {}

    def has(self, position: int) -> bool:
        return self.shuffle_seed is not None or position < len(self.ids)

    def __getitem__(self, position: int) -> int:
        if self.shuffle_seed is None:
            return int(self.ids[position])
        epoch, index = divmod(position, len(self.ids))
        permutation = self._permutations.get(epoch)
        if permutation is None:
            if len(self._permutations) >= _CACHED_EPOCHS:
                del self._permutations[min(self._permutations)]
            permutation = np.random.default_rng((self.shuffle_seed, epoch)).permutation(len(self.ids))
            self._permutations[epoch] = permutation
        return int(self.ids[permutation[index]])


class Split:
    """What every row stream of one split shares: sources, their orders and weights, the tokenizer, the seed."""

    def __init__(self, sources: Sequence[Sequence], orders: Sequence[SourceOrder], weights: Sequence[float],
                 tokenize: Callable[[object], np.ndarray | None], *, num_rows: int, seed: int,
                 names: Sequence[str] | None = None):
        self.sources, self.orders, self.weights = list(sources), list(orders), [float(w) for w in weights]
        self.tokenize, self.num_rows, self.seed = tokenize, num_rows, seed
        self.names = list(names) if names is not None else [f"source {i}" for i in range(len(self.sources))]
        self.documents = sum(len(o.ids) for o in self.orders)

    def nothing_usable(self) -> bool:
        """Whether every record of the split is known to read as None (sources that track ``unusable`` indices)."""
        return all(hasattr(source, "unusable") and set(order.ids.tolist()) <= source.unusable
                   for source, order in zip(self.sources, self.orders))

    def skip_report(self) -> str:
        """Per source: how many records were skipped as malformed or unusable (by this process), with an example."""
        lines = []
        for name, source, order in zip(self.names, self.sources, self.orders):
            skipped = getattr(source, "skipped", {})
            example = next(iter(skipped.items()), None)
            lines.append(f"{name}: {len(skipped)} record(s) skipped of {len(order.ids)} in this split"
                         + (f", e.g. {example[0]}: {example[1]}" if example else ""))
        return "; ".join(lines)


class RowStream:
    """The packed documents of one row of the global batch (see the module docstring)."""

    def __init__(self, split: Split, row: int):
        self.split, self.row = split, row
        self.draws = 0  # documents started (or skipped as malformed) so far
        self.offset = 0  # tokens of the current document already emitted
        self.taken = [0] * len(split.sources)  # documents finished (or skipped) per source
        self.truncated = [0] * len(split.sources)  # of them, records cut to fit a row
        self.dropped = [0] * len(split.sources)  # of them, records that read as None
        self._tokens: np.ndarray | None = None  # the current document, once read
        self._source = -1

    def get_state(self) -> list[int]:
        return [self.draws, self.offset, *self.taken, *self.truncated, *self.dropped]

    def set_state(self, state: Sequence[int]) -> None:
        n = len(self.taken)
        if len(state) not in (2 + n, 2 + 3 * n):
            raise DataError(f"data state of row {self.row} is {list(state)}; expected [draws, offset] and three counts "
                            f"per source (taken, truncated, dropped; {n} sources)")
        values = [int(x) for x in state]
        self.draws, self.offset, self.taken = values[0], values[1], values[2:2 + n]
        # A state saved before records were counted holds only the taken counts: counting starts at the resume.
        self.truncated, self.dropped = values[2 + n:2 + 2 * n] or [0] * n, values[2 + 2 * n:] or [0] * n
        self._tokens = None

    def take(self, length: int) -> list[np.ndarray]:
        """Up to ``length`` next tokens, as one array per document piece; fewer only when the stream ends."""
        pieces = []
        while length:
            tokens = self.current()
            if tokens is None:
                break
            piece = tokens[self.offset:self.offset + length]
            pieces.append(piece)
            length -= len(piece)
            self.offset += len(piece)
            if self.offset >= len(tokens):
                self._finish_document()
        return pieces

    def take_whole(self, length: int, max_documents: int | None = None) -> list:
        """The next documents, whole, while the next one fits in what is left of ``length`` tokens (at most
        ``max_documents``): the rest of the row stays empty and the document that did not fit opens the next row.
        Such streams' tokenizers truncate documents to ``length``, so one always fits in an empty row."""
        documents = []
        while max_documents is None or len(documents) < max_documents:
            document = self.current()
            if document is None or len(document) > length:
                if document is not None and not documents:
                    raise DataError(f"row {self.row}: a document of {len(document)} tokens cannot fit in a row of "
                                    f"{length}; it should have been truncated when it was tokenized")
                break
            documents.append(document)
            length -= len(document)
            self._finish_document()
        return documents

    def current(self) -> np.ndarray | None:
        """Tokens of the document being read (read and tokenized on first use); None once the stream has ended."""
        unreadable = 0
        while self._tokens is None:
            source = self._choose_source()
            if source is None:
                return None
            position = self.row + self.split.num_rows * self.taken[source]
            document = self.split.sources[source][self.split.orders[source][position]]
            tokens = self.split.tokenize(document)
            self._source = source
            if tokens is None or len(tokens) == 0:  # a malformed record that on_error="skip" let through
                self.dropped[source] += 1
                self._finish_document()
                unreadable += 1
                # A row reads 1 / num_rows of each epoch, so a long run of skips alone proves nothing; once it is as
                # long as the split, check whether every record of the split has been found unusable.
                if unreadable % max(self.split.documents, 1) == 0 and self.split.nothing_usable():
                    raise DataError(f"the data cannot make progress: none of the {self.split.documents} records of "
                                    f"the split is usable (row {self.row} skipped {unreadable} in a row). "
                                    f"{self.split.skip_report()}")
                continue
            self._tokens = tokens
        return self._tokens

    def _finish_document(self) -> None:
        if getattr(self._tokens, "cut", ""):  # chats and preference records say how they were cut
            self.truncated[self._source] += 1
        self.taken[self._source] += 1
        self.draws += 1
        self.offset = 0
        self._tokens = None

    def _choose_source(self) -> int | None:
        split = self.split
        left = [s for s, order in enumerate(split.orders)
                if order.has(self.row + split.num_rows * self.taken[s])]
        if len(left) <= 1:
            return left[0] if left else None
        threshold = uniform(split.seed, self.row, self.draws) * sum(split.weights[s] for s in left)
        for s in left:
            threshold -= split.weights[s]
            if threshold < 0:
                return s
        return left[-1]


def pack_rows(rows: Sequence[Sequence[np.ndarray]], length: int) -> dict[str, np.ndarray]:
    """Document pieces of each row -> [R, length] ``tokens``, ``tokens_segment_ids`` (from 1; 0 = padding) and
    ``tokens_positions`` (from 0 in each piece): the layout ``packing.rows_to_batch`` reads."""
    tokens = np.zeros((len(rows), length), np.int32)
    segment_ids = np.zeros((len(rows), length), np.int32)
    positions = np.zeros((len(rows), length), np.int32)
    for i, pieces in enumerate(rows):
        if not pieces:
            continue
        lengths = np.array([len(p) for p in pieces])
        n = int(lengths.sum())
        tokens[i, :n] = np.concatenate(pieces)
        segment_ids[i, :n] = np.repeat(np.arange(1, len(pieces) + 1), lengths)
        positions[i, :n] = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return {"tokens": tokens, "tokens_segment_ids": segment_ids, "tokens_positions": positions}
