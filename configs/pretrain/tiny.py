"""The tiny model on a few seconds of CPU: tests and CI.

    python -m llama_jax.train --config configs/pretrain/tiny.py:/path/to/corpus.txt --config.run_dir=/tmp/tiny

The optional argument after ':' is a file / directory / glob to train on, read by its extension
(``llama_jax.data.source_spec``: .txt one document per blank-line-separated paragraph, .jsonl by its records'
"text", .npy token ids); without it, the Shakespeare plays from $LLAMA_JAX_SHAKESPEARE.
"""

from llama_jax.data import source_spec
from llama_jax.train.defaults import pretrain_config


def get_config(data_path: str = ""):
    c = pretrain_config("tiny")
    c.data.tokenizer = "byte"
    c.data.sources = [source_spec(data_path) if data_path else dict(format="shakespeare", path="", weight=1.0,
                                                                    split="paragraphs")]
    c.data.update(seq_len=64, batch_size=8, add_bos=False, holdout_every=10)
    c.schedule.update(peak_lr=3e-3, warmup_steps=5, decay_steps=40, total_steps=40)
    c.train.steps = 20
    c.checkpoint.update(every=10, keep_last=2)
    c.logging.update(every=1, eval_every=10, eval_batches=2, peak_tflops=0.1)
    c.loss.vocab_chunk = 128
    return c
