"""Training data: document, chat and preference sources, packing into [B, T] rows, the resumable batches
(batches.py: sources -> packed [B, T] batches), and prompt records for sampling."""

from llama_jax.data.batches import (
    KINDS,
    BatchIterator,
    make_batches,
    make_source,
    merge_states,
    record_counts,
    source_kind,
    source_spec,
)
from llama_jax.data.chat import ChatSource, EncodedChat, encode_chat
from llama_jax.data.packing import BATCH_KEYS, concat_batches, rows_to_batch, split_rows
from llama_jax.data.preference import PAIR_KEYS, REPLIES, EncodedPair, PreferenceSource, encode_pair
from llama_jax.data.prompts import PromptRecord, read_prompts
from llama_jax.data.sources import JsonlSource, TextSource, TokenSource, shakespeare_texts

__all__ = [
    "BATCH_KEYS", "KINDS", "PAIR_KEYS", "REPLIES", "BatchIterator", "ChatSource", "EncodedChat", "EncodedPair",
    "JsonlSource", "PreferenceSource", "PromptRecord", "TextSource", "TokenSource", "concat_batches", "encode_chat",
    "encode_pair", "make_batches", "make_source", "merge_states", "read_prompts", "record_counts", "rows_to_batch",
    "shakespeare_texts", "source_kind", "source_spec", "split_rows",
]
