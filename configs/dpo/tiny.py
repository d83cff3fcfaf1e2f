"""DPO of the tiny model in seconds on a CPU: tests, CI and `make posttrain-demo`.

    python -m llama_jax.train --config configs/dpo/tiny.py:prefs.jsonl --config.init_from=/tmp/sft \\
        --config.run_dir=/tmp/dpo

The argument after ':' is the preference JSONL file(s); init_from (the SFT checkpoint) is also the frozen
reference. The paper's beta (0.1), NLL coefficient (0.2) and formatting mask; a learning rate far above the
paper's 1e-5, which suits an 8B model and 9K steps, not a tiny one and a hundred.
"""

from llama_jax.train.defaults import dpo_config


def get_config(data_path: str = ""):
    c = dpo_config("tiny")
    c.data.tokenizer = "byte"
    c.data.sources = [dict(format="preference", path=data_path, weight=1.0)]
    c.data.update(seq_len=128, batch_size=16, holdout_every=10)
    c.schedule.update(peak_lr=3e-4, warmup_steps=10, decay_steps=200, total_steps=200)
    c.checkpoint.update(every=100, keep_last=2)
    c.logging.update(every=10, eval_every=100, eval_batches=8, peak_tflops=0.1)
    c.loss.vocab_chunk = 0
    return c
