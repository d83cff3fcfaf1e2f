"""Packed rows -> the batch contract, and the reshapes of the sequence-length ramp.

The packer (``streams.pack_rows``, laid out like grain's concat-then-split packer) emits rows of T + 1 tokens
with per-document segment ids (from 1) and positions (from 0). Inputs are the first T tokens, targets the
last T, so no token is lost between rows except one target per row. A target counts only when it belongs to
the same document as its input: the EOS that ends a document is predicted; the first token of the next
document is not.
"""

from __future__ import annotations

import numpy as np

from llama_jax.errors import DataError

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def rows_to_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packer output [B, T + 1] (``tokens``, ``tokens_segment_ids``, ``tokens_positions``) -> batch [B, T]."""
    tokens, segments = packed["tokens"], packed["tokens_segment_ids"]
    same_document = (segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] != 0)
    return {
        "tokens": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "loss_mask": same_document.astype(np.int32),
        "segment_ids": segments[:, :-1].astype(np.int32),
        "positions": packed["tokens_positions"][:, :-1].astype(np.int32),
    }


def split_rows(batch: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """[B, T] -> [B * T / seq_len, seq_len]: each row cut into consecutive windows.

    Exact for next-token training: targets were shifted before the cut, a window attends only within
    itself, and positions keep counting within a document (RoPE is relative, so only the shorter
    context differs). This is how the paper's 4K -> 8K sequence-length ramp reuses one 8K data stream.
    """
    if any(isinstance(v, dict) for v in batch.values()):
        raise DataError(f"cannot split rows of a batch of sub-batches {sorted(batch)} into windows: a preference "
                        "row is one record, and a window would cut its reply from its prompt")
    b, t = batch["tokens"].shape
    if t % seq_len:
        raise DataError(f"cannot split rows of {t} tokens into windows of {seq_len}")
    return {k: v.reshape(b * t // seq_len, seq_len) for k, v in batch.items()}


def concat_batches(batches: list[dict]) -> dict:
    """[B, T] batches -> one [len(batches) * B, T] batch (several data batches make one ramped-up step); the
    sub-batches of preference batches alike.

    Rows are interleaved: row r of every batch, then row r + 1 of every batch. Each process holds a block of
    rows of the data batches, so this order makes its share of the step a block of the step's rows as well:
    the step's global batch is the same whatever the number of processes.
    """
    if len(batches) == 1:
        return batches[0]
    return {k: concat_batches([b[k] for b in batches]) if isinstance(v, dict)
            else np.stack([b[k] for b in batches], axis=1).reshape(-1, *v.shape[1:]) for k, v in batches[0].items()}
