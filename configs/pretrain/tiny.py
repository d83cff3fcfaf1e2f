"""The tiny model on a few seconds of CPU: tests and CI.

    python -m llama_jax.train --config configs/pretrain/tiny.py:/path/to/corpus.txt --config.run_dir=/tmp/tiny

The optional argument after ':' is a text file / directory / glob to train on (one document per
blank-line-separated paragraph); without it, the Shakespeare plays from $LLAMA_JAX_SHAKESPEARE.
"""

from llama_jax.train.defaults import pretrain_config


def get_config(data_path: str = ""):
    c = pretrain_config("tiny")
    c.data.tokenizer = "byte"
    c.data.sources = [dict(format="text" if data_path else "shakespeare", path=data_path, weight=1.0,
                           split="paragraphs", text_key="text")]
    c.data.update(seq_len=64, batch_size=8, add_bos=False, holdout_every=10)
    c.schedule.update(peak_lr=3e-3, warmup_steps=5, decay_steps=40, total_steps=40)
    c.train.steps = 20
    c.checkpoint.update(every=10, keep_last=2)
    c.logging.update(every=1, eval_every=10, eval_batches=2, peak_tflops=0.1)
    c.optimizer.loss_chunk = 128
    return c
