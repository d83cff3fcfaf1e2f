"""The tiny reward model in seconds on a CPU: tests, CI and `make posttrain-demo`.

    python -m llama_jax.train --config configs/reward/tiny.py:prefs.jsonl --config.init_from=runs/demo \\
        --config.run_dir=/tmp/rm

The argument after ':' is the preference JSONL file(s) (``llama_jax.data.preference``); byte tokenizer, ``tiny``
preset. ``--config.reward.packed=true`` puts each record in one row (rows of 128 tokens hold a short prompt and
its replies; longer records are errors, or skips with data.on_error=skip).
"""

from llama_jax.train.defaults import reward_config


def get_config(data_path: str = ""):
    c = reward_config("tiny")
    c.data.tokenizer = "byte"
    c.data.sources = [dict(format="preference", path=data_path, weight=1.0)]
    c.data.update(seq_len=128, batch_size=16, holdout_every=10)
    c.schedule.update(peak_lr=1e-3, warmup_steps=10, decay_steps=200, total_steps=200)
    c.checkpoint.update(every=100, keep_last=2)
    c.logging.update(every=10, eval_every=100, eval_batches=8, peak_tflops=0.1)
    c.loss.vocab_chunk = 0
    return c
