"""Training data: document sources, packing into [B, T] rows, the resumable batch pipeline."""

from llama_jax.data.packing import BATCH_KEYS, concat_batches, rows_to_batch, split_rows
from llama_jax.data.pipeline import BatchIterator, make_batches, make_source, merge_states
from llama_jax.data.sources import JsonlSource, TextSource, TokenSource, shakespeare_texts

__all__ = [
    "BATCH_KEYS", "BatchIterator", "JsonlSource", "TextSource", "TokenSource", "concat_batches", "make_batches",
    "make_source", "merge_states", "rows_to_batch", "shakespeare_texts", "split_rows",
]
