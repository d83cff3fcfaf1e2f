"""The long-context recipe at toy scale: the tiny model pretrained at 256 tokens, then extended to 2,048 in stages.

    python -m llama_jax.train --config configs/pretrain/tiny_long_context.py:runs/passkey-data \\
        --config.train.steps=800                                             # the base run at 256 tokens
    python -m llama_jax.eval.retrieval --checkpoint runs/tiny-long --lengths 256,2040 --max-new-tokens 8   # before
    python -m llama_jax.train --config configs/pretrain/tiny_long_context.py:runs/passkey-data   # 512, 1024, 2048
    python -m llama_jax.eval.retrieval --checkpoint runs/tiny-long --lengths 256,512,1024,2040 --max-new-tokens 8 \\
        --plot passkey.png                                                   # prompts + 8 new tokens: 2,048

The directory after ':' receives two passkey corpora on first use (``eval.retrieval.write_training_corpus``,
deterministic): prompts of 170 to 250 tokens with their answers for the base run, and of 256 to 2,040 tokens for
the long stages (each fits the longest rows whole). The base run mixes the short passkey documents with the
Shakespeare plays ($LLAMA_JAX_SHAKESPEARE), the natural text whose held-out loss at 256 tokens the gates watch;
the long passkey source has weight 0 there and is weighted up in the stages. The byte model has to learn to copy
a 5-digit key from wherever it sits (an induction circuit); measured so far (README, "Long context"), 800 base
steps are not enough for it to do so even at 256 tokens, so this recipe does not yet demonstrate the extension.
The stages keep 2,048 tokens per step and run with gates that warn.
"""

from pathlib import Path

from llama_jax.eval.retrieval import write_training_corpus
from llama_jax.tokenizer import ByteTokenizer
from llama_jax.train.defaults import pretrain_config

BASE_STEPS = 800
CORPORA = {"passkey_short.jsonl": (4000, 170, 250), "passkey_long.jsonl": (1500, 256, 2040)}  # count, lengths


def get_config(data_dir: str = "runs/passkey-data"):
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for name, (count, low, high) in CORPORA.items():
        if not (directory / name).exists():  # written whole, then renamed: a stopped write leaves no corpus
            write_training_corpus(directory / f"{name}.partial", ByteTokenizer(), count, low, high, seed=len(name))
            (directory / f"{name}.partial").rename(directory / name)
    c = pretrain_config("tiny")
    c.run_dir = "runs/tiny-long"
    c.data.tokenizer = "byte"
    c.data.sources = [
        dict(format="shakespeare", path="", weight=0.25, split="paragraphs"),
        dict(format="jsonl", path=str(directory / "passkey_short.jsonl"), weight=1.0, text_key="text"),
        dict(format="jsonl", path=str(directory / "passkey_long.jsonl"), weight=0.0, text_key="text"),
    ]
    c.data.update(seq_len=256, batch_size=8, add_bos=True, holdout_every=20)
    c.schedule.update(peak_lr=3e-3, warmup_steps=30, decay_steps=BASE_STEPS, total_steps=BASE_STEPS,
                      min_lr_ratio=0.1)
    c.long_context.start_step = BASE_STEPS
    c.long_context.stages = [dict(seq_len=n, steps=steps, lr=1e-3, end_lr=3e-4, warmup_steps=5, weights=[0.25, 0.5, 1])
                             for n, steps in ((512, 40), (1024, 40), (2048, 80))]
    c.long_context.gate.update(action="warn", min_retrieval=0.8, max_loss_increase=0.05, samples=2)
    c.train.steps = 0  # 0: to the end of the last stage
    c.checkpoint.update(every=100, keep_last=2)
    c.logging.update(every=20, eval_every=200, eval_batches=4, peak_tflops=0.1)
    return c
