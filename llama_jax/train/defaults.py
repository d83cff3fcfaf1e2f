"""The paper's recipe for each stage, on top of the experiment config's defaults (``llama_jax.experiment``, where
every key is declared with its range); configs/<stage>/*.py start from these.

Any key can be overridden on the command line: ``--config.optimizer.peak_lr=3e-4`` is an error,
``--config.schedule.peak_lr=3e-4`` is right (keys are checked; unknown ones are rejected).
"""

from __future__ import annotations

import ml_collections

from llama_jax import experiment


def pretrain_config(preset: str, **model_overrides) -> ml_collections.ConfigDict:
    """Pretraining on JSONL documents (``data.sources``' first entry is where they are)."""
    c = experiment.config_dict(preset, "pretrain", **model_overrides)
    c.data.sources = [dict(format="jsonl", path="", weight=1.0, split="file", text_key="text")]
    return c


def sft_config(preset: str, **model_overrides) -> ml_collections.ConfigDict:
    """SFT (Llama 3, section 4.1.3): AdamW at 1e-5, linear warmup then cosine; weight decay as in pretraining."""
    c = experiment.config_dict(preset, "sft", **model_overrides)
    c.data.sources = [dict(format="chat", path="", weight=1.0)]  # JSONL chats (llama_jax.data.chat)
    c.data.update(seq_len=8192, batch_size=64, holdout_every=100)
    c.schedule.update(peak_lr=1e-5, warmup_steps=100, decay_steps=9000, total_steps=9000)
    c.checkpoint.update(every=500)
    c.logging.update(eval_every=500)
    return c


def reward_config(preset: str, **model_overrides) -> ml_collections.ConfigDict:
    """Reward model (Llama 3, section 4.1.2): a pretrained checkpoint (init_from) plus a scalar head, Bradley-Terry on
    preference pairs. Llama 3 gives no hyperparameters; these are Llama 2's (section 3.2.2): learning rate 1e-5,
    cosine down to 10%, warmup 3% of the steps, 512 pairs per batch, one epoch."""
    c = experiment.config_dict(preset, "reward", **model_overrides)
    c.data.sources = [dict(format="preference", path="", weight=1.0)]  # JSONL pairs (llama_jax.data.preference)
    c.data.update(seq_len=4096, batch_size=512, holdout_every=100)
    c.schedule.update(peak_lr=1e-5, warmup_steps=30, decay_steps=1000, total_steps=1000, min_lr_ratio=0.1)
    c.checkpoint.update(every=200)
    c.logging.update(eval_every=200)
    return c


def dpo_config(preset: str, **model_overrides) -> ml_collections.ConfigDict:
    """DPO (Llama 3, section 4.1.4): from the SFT checkpoint (init_from), which is also the frozen reference."""
    c = experiment.config_dict(preset, "dpo", **model_overrides)
    c.data.sources = [dict(format="preference", path="", weight=1.0)]
    c.data.update(seq_len=4096, batch_size=64, holdout_every=100)
    c.schedule.update(peak_lr=1e-5, warmup_steps=50, decay_steps=2000, total_steps=2000)  # the paper's lr
    c.checkpoint.update(every=500)
    c.logging.update(eval_every=500)
    return c
