"""Every key of an experiment config, with its default; configs/<stage>/*.py start from here.

Any key can be overridden on the command line: ``--config.optimizer.peak_lr=3e-4`` is an error,
``--config.schedule.peak_lr=3e-4`` is right (keys are checked; unknown ones are rejected).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from llama_jax import config as config_lib
from llama_jax.data import batches as data
from llama_jax.errors import ConfigError


def pretrain_config(preset: str, **model_overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"  # which stage's loss and batches: pretrain, sft, reward, dpo (llama_jax.train.loop.STAGES)
    c.run_dir = ""  # where checkpoints/, metrics.jsonl and tb/ go (required)
    c.init_from = ""  # start from these weights (llama_jax run/step dir, HF dir, Meta dir) unless run_dir resumes
    c.seed = 0  # parameter init and the step RNG
    # Every ModelConfig field, from the preset, so each can be overridden (rope_scaling is a dict or None).
    c.model = config_lib.get(preset, **model_overrides).to_dict()
    c.mesh = ""  # e.g. "data=2,fsdp=4,tensor=8" or "pipeline=4,fsdp=-1" (with pipeline.schedule); "": all on fsdp
    # Every data key with its default (llama_jax.data.batches.DEFAULTS); sources: format (text | jsonl | tokens |
    # shakespeare; chat | preference), path (file, dir or glob), weight, split (text), text_key (jsonl).
    c.data = dict(data.DEFAULTS, sources=[dict(format="jsonl", path="", weight=1.0, split="file", text_key="text")])
    c.pipeline = dict(  # how the mesh's `pipeline` axis runs the layers (llama_jax.parallel.pipeline): pretrain, sft
        schedule="none",  # "none" (needs pipeline=1) | "gpipe" | "circular"
        microbatches=1,  # per forward/backward (each grad_accum microbatch is split again into this many)
        circular_repeats=2,  # circular: rounds of the pipeline ring per microbatch (blocks of L / (ranks x this))
    )
    c.optimizer = dict(
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
        clip_norm=1.0,  # global gradient norm clip (0: off)
        decay_embeddings=False,  # see llama_jax.optim for why the embedding is not decayed by default
        grad_accum=1,  # microbatches per data batch (a ramp point with batches=k accumulates k times as many)
        z_loss=0.0,  # coefficient of mean(logsumexp^2)
        loss_chunk=8192,  # vocabulary columns per cross-entropy chunk (0: whole vocabulary at once)
    )
    c.schedule = dict(
        peak_lr=3e-4, warmup_steps=2000, decay_steps=100_000,
        min_lr_ratio=0.01,  # cosine ends at peak * this (Llama 3: 1%)
        anneal_steps=0,  # final linear decay to 0 over this many steps before total_steps
        total_steps=100_000,  # the schedule's end
        # Batch / sequence ramp: [dict(start_tokens, seq_len, batches)]; seq_len divides data.seq_len, a step
        # takes `batches` data batches. [] means data.seq_len and one batch throughout.
        ramp=[],
    )
    c.train = dict(
        steps=0,  # stop this invocation at this step (0: schedule.total_steps); resume continues from there
        on_nonfinite="skip",  # a step with non-finite loss/gradient is never applied: "skip" (counted) or "halt"
    )
    c.checkpoint = dict(every=1000, keep_last=3, keep_every=0, async_save=True)
    # Long-context extension (llama_jax.train.long_context): phases of growing sequence length, one run.
    c.long_context = dict(
        start_step=0,  # the step the first phase begins at; before it: data.seq_len, the ramp, the base schedule
        # [dict(seq_len, steps | tokens, batch_tokens | batch_size, lr, end_lr, warmup_steps, context_parallel,
        # grad_accum, weights, whole_documents)]: see llama_jax.train.long_context. [] means no extension.
        phases=[],
        gate=dict(  # at the end of each phase longer than data.seq_len
            action="off",  # "off" | "warn" (log, go on) | "stop" (checkpoint, then an error)
            max_loss_increase=0.02,  # held-out loss at data.seq_len: at most this much (relative) above its value
            #                          before the first longer phase
            task="passkey",  # retrieval prompts (llama_jax.eval.retrieval): "passkey" | "needle"
            min_retrieval=0.9,  # greedy exact-match accuracy at the phase's length
            depths=[0.0, 0.25, 0.5, 0.75, 1.0],  # where the needle sits in the prompts
            samples=2,  # prompts per depth
        ),
    )
    c.logging = dict(
        every=10,  # steps per metrics line (loss etc. averaged over them)
        eval_every=1000,  # steps between held-out evaluations (0: never)
        eval_batches=8,  # batches per evaluation (the same ones each time)
        peak_tflops=0.0,  # per-device peak for MFU; 0 measures a float32 matmul at start
        progress=True,  # tqdm bar
    )
    c.lock()  # a config file or flag that names a key not declared here is an error, not a new key
    return c


def sft_config(preset: str, **model_overrides) -> ml_collections.ConfigDict:
    """SFT (Llama 3, section 4.1.3): the pretraining keys with the paper's fine-tuning defaults."""
    c = pretrain_config(preset, **model_overrides)
    c.stage = "sft"
    c.data.sources = [dict(format="chat", path="", weight=1.0)]  # JSONL chats (llama_jax.data.chat)
    c.data.update(seq_len=8192, batch_size=64, holdout_every=100)
    # AdamW at 1e-5, linear warmup then cosine; weight decay as in pretraining (optimizer section unchanged).
    c.schedule.update(peak_lr=1e-5, warmup_steps=100, decay_steps=9000, total_steps=9000)
    c.checkpoint.update(every=500)
    c.logging.update(eval_every=500)
    return c


def reward_config(preset: str, **model_overrides) -> ml_collections.ConfigDict:
    """Reward model (Llama 3, section 4.1.2): a pretrained checkpoint (init_from) plus a scalar head, Bradley-Terry on
    preference pairs. Llama 3 gives no hyperparameters; these are Llama 2's (section 3.2.2): learning rate 1e-5,
    cosine down to 10%, warmup 3% of the steps, 512 pairs per batch, one epoch."""
    c = pretrain_config(preset, **model_overrides)
    c.stage = "reward"
    c.data.sources = [dict(format="preference", path="", weight=1.0)]  # JSONL pairs (llama_jax.data.preference)
    c.data.update(seq_len=4096, batch_size=512, holdout_every=100)
    c.schedule.update(peak_lr=1e-5, warmup_steps=30, decay_steps=1000, total_steps=1000, min_lr_ratio=0.1)
    c.checkpoint.update(every=200)
    c.logging.update(eval_every=200)
    with c.unlocked():  # the stage's own section, declared here once
        c.reward = dict(
            packed=False,  # the prompt and all its replies in one row of data.seq_len tokens (the paper's trick)
            edited=True,  # rank edited > chosen > rejected where a record has an edited reply
        )
    return c


def dpo_config(preset: str, **model_overrides) -> ml_collections.ConfigDict:
    """DPO (Llama 3, section 4.1.4): from the SFT checkpoint (init_from), which is also the frozen reference."""
    c = pretrain_config(preset, **model_overrides)
    c.stage = "dpo"
    c.data.sources = [dict(format="preference", path="", weight=1.0)]
    c.data.update(seq_len=4096, batch_size=64, holdout_every=100)
    c.schedule.update(peak_lr=1e-5, warmup_steps=50, decay_steps=2000, total_steps=2000)  # the paper's lr
    c.checkpoint.update(every=500)
    c.logging.update(eval_every=500)
    with c.unlocked():  # the stage's own section, declared here once
        c.dpo = dict(
            beta=0.1,  # the paper's
            nll_coef=0.2,  # + coef x the chosen reply's per-token NLL (the paper's 0.2; 0: off)
            mask_formatting=True,  # formatting tokens out of the DPO term's log-probs (the paper's)
            reference="model",  # "model": a frozen copy of init_from; "precomputed": log-probs in the data
        )
    return c


def _int_at_least(low: int) -> tuple[type, Callable[[Any], bool], str]:
    return int, lambda v: v >= low, f"an integer >= {low}"


def _real(test: Callable[[float], bool], expected: str) -> tuple[type, Callable[[Any], bool], str]:
    return float, test, f"a number {expected}"


# The range of every count and ratio key, checked when a run is built (``check_ranges``), so a bad value is a
# ConfigError naming its key before anything is read, compiled or written. Keys a config lacks are skipped.
RANGES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "seed": _int_at_least(0),
    "data.seq_len": _int_at_least(1),
    "data.batch_size": _int_at_least(1),
    "data.seed": _int_at_least(0),
    "data.holdout_every": _int_at_least(0),
    "optimizer.b1": _real(lambda v: 0 <= v < 1, "in [0, 1)"),
    "optimizer.b2": _real(lambda v: 0 <= v < 1, "in [0, 1)"),
    "optimizer.eps": _real(lambda v: v > 0, "> 0"),
    "optimizer.weight_decay": _real(lambda v: v >= 0, ">= 0"),
    "optimizer.clip_norm": _real(lambda v: v >= 0, ">= 0 (0: off)"),
    "optimizer.grad_accum": _int_at_least(1),
    "optimizer.z_loss": _real(lambda v: v >= 0, ">= 0"),
    "optimizer.loss_chunk": _int_at_least(0),
    "schedule.peak_lr": _real(lambda v: v >= 0, ">= 0"),
    "schedule.warmup_steps": _int_at_least(0),
    "schedule.decay_steps": _int_at_least(1),
    "schedule.min_lr_ratio": _real(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "schedule.anneal_steps": _int_at_least(0),
    "schedule.total_steps": _int_at_least(1),
    "train.steps": _int_at_least(0),
    "checkpoint.every": _int_at_least(1),
    "checkpoint.keep_last": _int_at_least(1),
    "checkpoint.keep_every": _int_at_least(0),
    "long_context.start_step": _int_at_least(0),
    "long_context.gate.max_loss_increase": _real(lambda v: v >= 0, ">= 0"),
    "long_context.gate.min_retrieval": _real(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "long_context.gate.samples": _int_at_least(1),
    "logging.every": _int_at_least(1),
    "logging.eval_every": _int_at_least(0),
    "logging.eval_batches": _int_at_least(1),
    "logging.peak_tflops": _real(lambda v: v >= 0, ">= 0 (0: measure)"),
    "dpo.beta": _real(lambda v: v > 0, "> 0"),
    "dpo.nll_coef": _real(lambda v: v >= 0, ">= 0 (0: off)"),
}


def check_ranges(config) -> None:
    """ConfigError naming the first key of ``RANGES`` whose value is of the wrong type or out of range, or a pair
    of keys that do not fit together."""
    for key, (kind, test, expected) in RANGES.items():
        found, value = _lookup(config, key)
        if not found:
            continue
        number = isinstance(value, int) if kind is int else isinstance(value, int | float)
        if isinstance(value, bool) or not number or not test(value):
            raise ConfigError(f"config key {key} = {value!r}: expected {expected}")
    rows, accum = config.data.batch_size, config.optimizer.grad_accum
    if rows % accum:
        raise ConfigError(f"data.batch_size ({rows}) must be a multiple of optimizer.grad_accum ({accum}): each "
                          "microbatch takes batch_size / grad_accum rows")


def _lookup(config, key: str) -> tuple[bool, Any]:
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False, None
        node = node[part]
    return True, node
