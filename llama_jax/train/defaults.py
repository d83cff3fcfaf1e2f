"""Every key of a pretraining experiment config, with its default; configs/pretrain/*.py start from here.

Any key can be overridden on the command line: ``--config.optimizer.peak_lr=3e-4`` is an error,
``--config.schedule.peak_lr=3e-4`` is right (keys are checked; unknown ones are rejected).
"""

from __future__ import annotations

import ml_collections

from llama_jax import config as config_lib


def pretrain_config(preset: str, **model_overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = ""  # where checkpoints/, metrics.jsonl and tb/ go (required)
    c.seed = 0  # parameter init and the step RNG
    # Every ModelConfig field, from the preset, so each can be overridden (rope_scaling is a dict or None).
    c.model = config_lib.get(preset, **model_overrides).to_dict()
    c.mesh = ""  # e.g. "data=2,fsdp=4,tensor=8" or "stage=4,fsdp=-1" (with pipeline.schedule); "": all on fsdp
    c.data = dict(
        tokenizer="llama3",  # "llama3" | "byte" | path of a tokenizer.model
        # Each: format (text | jsonl | tokens | shakespeare), path (file, dir or glob), weight (mixture),
        # split (text: "file" or "paragraphs"), text_key (jsonl).
        sources=[dict(format="jsonl", path="", weight=1.0, split="file", text_key="text")],
        seq_len=8192,  # tokens per packed row: the longest sequence of the run (the ramp may cut rows shorter)
        batch_size=512,  # rows per data batch, all processes together
        seed=0,  # document shuffling
        add_bos=True,  # <|begin_of_text|> before each document (EOS always ends one)
        on_error="raise",  # malformed jsonl records: "raise" (file:line) or "skip" (counted)
        holdout_every=1000,  # every n-th document of each source is the eval split (0: none)
    )
    c.pipeline = dict(  # how the mesh's `stage` axis runs the layers (llama_jax.pipeline)
        schedule="none",  # "none" (needs stage=1) | "gpipe" | "circular"
        microbatches=1,  # per forward/backward (each grad_accum microbatch is split again into this many)
        circular_repeats=2,  # circular: rounds of the stage ring per microbatch (blocks of L / (stages x this))
    )
    c.optimizer = dict(
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
        clip_norm=1.0,  # global gradient norm clip (0: off)
        decay_embeddings=False,  # see llama_jax.optim for why the embedding is not decayed by default
        grad_accum=1,  # microbatches per data batch (a ramp stage with batches=k accumulates k times as many)
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
    c.logging = dict(
        every=10,  # steps per metrics line (loss etc. averaged over them)
        eval_every=1000,  # steps between held-out evaluations (0: never)
        eval_batches=8,  # batches per evaluation (the same ones each time)
        peak_tflops=0.0,  # per-device peak for MFU; 0 measures a float32 matmul at start
        progress=True,  # tqdm bar
    )
    return c
