"""The long-context recipe at toy scale: the tiny model pretrained at 256 tokens, then extended to 2,048 in phases.

    python configs/pretrain/tiny_long_context.py runs/passkey-data          # writes the corpora (once)
    python -m llama_jax.train --config configs/pretrain/tiny_long_context.py:runs/passkey-data \\
        --config.train.steps=5000                                            # the base run at 256 tokens
    python -m llama_jax.eval.retrieval --checkpoint runs/tiny-long --lengths 256,2040 --max-new-tokens 8   # before
    python -m llama_jax.train --config configs/pretrain/tiny_long_context.py:runs/passkey-data   # 512, 1024, 2048
    python -m llama_jax.eval.retrieval --checkpoint runs/tiny-long --lengths 256,512,1024,2040 --max-new-tokens 8 \\
        --plot passkey.png                                                   # prompts + 8 new tokens: 2,048

The directory after ':' holds the corpora, which running this file writes (deterministic; the config itself writes
nothing): passkey prompts of 170 to 250 tokens with
their answers and copy drills (``eval.retrieval.copy_documents``) for the base run, and for each phase passkey
prompts that fit its rows, which the phases keep whole (``whole_documents``: cut at a row's end, a needle and its
question land in different rows). The base run mixes them with the Shakespeare plays ($LLAMA_JAX_SHAKESPEARE), the
natural text of the held-out loss the gates watch. The byte model has to learn to copy a 5-digit key from wherever
it sits (an induction circuit): from passkey documents alone it did not in 800 steps; with the copy drills it does
between steps 2,100 and 3,300. The phases keep 2,048 tokens per step and run with gates that warn; what they reach,
and the variants that did less, are in docs/experiments/long-context-toy.md.
"""

import sys
from pathlib import Path

from llama_jax.eval.retrieval import write_copy_corpus, write_training_corpus
from llama_jax.tokenizer import ByteTokenizer
from llama_jax.train.defaults import pretrain_config

BASE_STEPS = 5000
CORPORA = {  # name: writer(path)
    "passkey_short.jsonl": lambda path: write_training_corpus(path, ByteTokenizer(), 20_000, 170, 250, seed=19),
    # One source per phase, of prompts that fit its rows whole (a split document teaches no retrieval).
    "passkey_512.jsonl": lambda path: write_training_corpus(path, ByteTokenizer(), 2000, 256, 500, seed=5),
    "passkey_1024.jsonl": lambda path: write_training_corpus(path, ByteTokenizer(), 1500, 500, 1010, seed=10),
    "passkey_2048.jsonl": lambda path: write_training_corpus(path, ByteTokenizer(), 1000, 1536, 2040, seed=20),
    "copy.jsonl": lambda path: write_copy_corpus(path, 20_000, seed=9),
}


def write_corpora(data_dir: str) -> None:
    """Writes the corpora ``get_config(data_dir)`` reads, those not there yet."""
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for name, write in CORPORA.items():
        if not (directory / name).exists():  # written whole, then renamed: a stopped write leaves no corpus
            write(directory / f"{name}.partial")
            (directory / f"{name}.partial").rename(directory / name)


def get_config(data_dir: str = "runs/passkey-data"):
    directory = Path(data_dir)
    c = pretrain_config("tiny")
    c.run_dir = "runs/tiny-long"
    c.data.tokenizer = "byte"
    c.data.sources = [
        dict(format="shakespeare", path="", weight=0.15, split="paragraphs"),
        dict(format="jsonl", path=str(directory / "passkey_short.jsonl"), weight=0.5, text_key="text"),
        dict(format="jsonl", path=str(directory / "copy.jsonl"), weight=0.5, text_key="text"),
        *(dict(format="jsonl", path=str(directory / f"passkey_{n}.jsonl"), weight=0.0, text_key="text")
          for n in (512, 1024, 2048)),
    ]
    c.data.update(seq_len=256, batch_size=8, add_bos=True, holdout_every=20)
    c.schedule.update(peak_lr=2e-3, warmup_steps=30, decay_steps=BASE_STEPS, total_steps=BASE_STEPS,
                      min_lr_ratio=0.1)
    c.long_context.start_step = BASE_STEPS
    # Weights: shakespeare, short passkey, copy, passkey at 512, 1024, 2048 tokens.
    c.long_context.phases = [dict(seq_len=n, steps=steps, lr=3e-4, end_lr=7.5e-5, warmup_steps=5, weights=weights,
                                  whole_documents=True)
                             for n, steps, weights in ((512, 80, [0.4, 0.25, 0.25, 1, 0, 0]),
                                                       (1024, 240, [0.4, 0.25, 0.25, 0.3, 1, 0]),
                                                       (2048, 720, [0.4, 0.25, 0.25, 0.2, 0.3, 1]))]
    c.long_context.gate.update(action="warn", min_retrieval=0.8, max_loss_increase=0.05, samples=2)
    c.train.steps = 0  # 0: to the end of the last phase
    c.checkpoint.update(every=100, keep_last=2)
    c.logging.update(every=20, eval_every=200, eval_batches=4, peak_tflops=0.1)
    return c


if __name__ == "__main__":
    write_corpora(sys.argv[1] if len(sys.argv) > 1 else "runs/passkey-data")
