"""The pretraining stage: next-token cross-entropy on packed documents.

Batch layout (built by ``llama_jax.data``): int32 [B, T] arrays ``tokens``, ``targets`` (next tokens),
``loss_mask`` (1 where the target is in the same document), ``segment_ids`` (document within a row,
0 = padding; attention never crosses documents), ``positions`` (restart at 0 per document).
"""

from __future__ import annotations

import jax.numpy as jnp

from llama_jax import data, model
from llama_jax.config import ModelConfig
from llama_jax.losses import next_token_loss
from llama_jax.parallel import pipeline
from llama_jax.train.step import LossFn, Stage


def make_loss_fn(cfg: ModelConfig, *, chunk_size: int | None = 8192, z_loss: float = 0.0,
                 run_layers: pipeline.RunLayers | None = None) -> LossFn:
    """``loss_fn(params, batch, rng, frozen) -> (loss, metrics)``; the LM head runs in vocabulary chunks.
    ``run_layers``: a pipeline schedule for the block stack (``pipeline.make_run_layers``; None: the plain scan)."""
    network = model.Llama(cfg)

    def loss_fn(params, batch, rng, frozen=None):
        del frozen  # nothing frozen
        hidden = network.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                               output="hidden", run_layers=run_layers, rngs=model.dropout_rngs(rng))  # [B, T, D]
        head = model.lm_head_kernel(params, cfg).astype(jnp.dtype(cfg.dtype))  # [D, V]
        return next_token_loss(hidden, head, batch["targets"], batch["loss_mask"], chunk_size=chunk_size,
                               z_loss=z_loss, precision=cfg.resolved_matmul_precision)

    return loss_fn


def loss_fn_from_config(cfg: ModelConfig, config, run_layers: pipeline.RunLayers | None = None) -> LossFn:
    """The loss with the experiment config's chunking and z-loss (``config.loss``) and pipeline schedule."""
    return make_loss_fn(cfg, chunk_size=config.loss.vocab_chunk or None, z_loss=config.loss.z_loss,
                        run_layers=run_layers)


def _batches(config, tokenizer, split: str):
    return data.make_batches(config.data, tokenizer, split=split, kind="documents")


STAGE = Stage(name="pretrain", make_loss_fn=loss_fn_from_config, make_batches=_batches)
