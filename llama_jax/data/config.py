"""``config.data``: every key of the data layer with its default and range, declared once (``sections``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from llama_jax.sections import BOOLEAN, Section, at_least, one_of, option


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    key: ClassVar[str] = "data"

    tokenizer: str = option("llama3", "llama3 | byte | path of a tokenizer.model")
    sources: tuple = option((), "[{format, path, weight, ...}]: format text | jsonl | tokens | shakespeare | chat | "
                                "preference; path a file, directory or glob (see llama_jax.data)")
    seq_len: int = option(8192, "tokens per row: the longest sequence of the run (the ramp may cut rows shorter)",
                          at_least(1))
    batch_size: int = option(512, "rows per data batch, all processes together", at_least(1))
    seed: int = option(0, "document order", at_least(0))
    add_bos: bool = option(True, "documents: <|begin_of_text|> before each (EOS always ends one)", BOOLEAN)
    on_error: str = option("raise", "malformed records: raise (file:line) or skip (counted)", one_of("raise", "skip"))
    holdout_every: int = option(1000, "every n-th record of each source is the eval split (0: none)", at_least(0))
    document_mask: bool = option(True, "documents: attention within each document of a row (False: the whole row)",
                                 BOOLEAN)
    whole_documents: bool = option(False, "documents: one that fits in a row is never cut (it opens the next row)",
                                   BOOLEAN)
