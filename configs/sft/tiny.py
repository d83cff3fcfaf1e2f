"""SFT of the tiny model on a JSONL file of chats, in seconds on a laptop CPU: tests and CI.

    python -m llama_jax.train --config configs/sft/tiny.py:chats.jsonl --config.init_from=runs/demo \\
        --config.run_dir=/tmp/sft-tiny

Byte tokenizer (the tiny preset's vocabulary holds its 264 ids); chats packed into rows of 256 bytes.
"""

from llama_jax.train.defaults import sft_config


def get_config(data_path: str = ""):
    c = sft_config("tiny")
    c.data.tokenizer = "byte"
    c.data.sources = [dict(format="chat", path=data_path, weight=1.0)]
    c.data.update(seq_len=256, batch_size=8, holdout_every=10)
    c.schedule.update(peak_lr=1e-3, warmup_steps=10, decay_steps=200, total_steps=200)
    c.checkpoint.update(every=50, keep_last=2)
    c.logging.update(every=10, eval_every=50, eval_batches=2, peak_tflops=0.1)
    c.loss.vocab_chunk = 0
    return c
