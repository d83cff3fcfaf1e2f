"""Supervised fine-tuning: next-token cross-entropy on what the assistant writes, nothing else.

Batches come from chat sources (``data.sources[*].format = "chat"``: ``{"messages": [...]}`` or
``{"prompt", "completion"}`` JSONL, see ``llama_jax.data.chat``): several whole chats packed per row with segment
ids and per-chat positions, exactly like pretraining's documents, and ``loss_mask`` = the tokenizer's assistant
mask (each assistant message's content and its closing <|eot_id|> / <|eom_id|>; never headers, system, user or
tool output). The loss is the token mean over the trained tokens of the whole batch, so packing changes nothing
and gradient accumulation weighs microbatches by their trained tokens. Defaults (``defaults.sft_config``) are the
paper's: AdamW, learning rate 1e-5, warmup then cosine, weight decay as in pretraining.
"""

from __future__ import annotations

from llama_jax import data
from llama_jax.train import pretrain
from llama_jax.train.step import Stage


def _batches(config, tokenizer, split: str):
    return data.make_batches(config.data, tokenizer, split=split, kind="chat")


STAGE = Stage(name="sft", make_loss_fn=pretrain.loss_fn_from_config, make_batches=_batches)
