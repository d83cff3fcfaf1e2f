"""A Llama 3.1 8B reward model from the pretrained weights (a recipe for a GPU/TPU pod, not this CPU).

    python -m llama_jax.train --config 'configs/reward/llama3_8b.py:/data/prefs/*.jsonl' \\
        --config.init_from=Meta-Llama-3.1-8B/ --config.run_dir=runs/rm-8b

The paper trains the reward model on top of the pretrained checkpoint, on all preference data so far, with
Bradley-Terry and no margin term; the rest (learning rate 1e-5, cosine to 10%, 3% warmup, 512 pairs per batch,
one epoch) is Llama 2's recipe (``defaults.reward_config``). Packed rows: the prompt once and its replies, in 8K.
"""

from llama_jax.train.defaults import reward_config


def get_config(data_path: str = ""):
    c = reward_config("llama3.1-8b", remat="full")
    c.data.tokenizer = "llama3"
    c.data.sources = [dict(format="preference", path=data_path, weight=1.0)]
    c.data.update(seq_len=8192, batch_size=512, holdout_every=100)
    c.reward.packed = True
    c.mesh = "fsdp=-1"
    c.optimizer.grad_accum = 16
    c.loss.vocab_chunk = 8192
    c.schedule.update(peak_lr=1e-5, warmup_steps=30, decay_steps=1000, total_steps=1000, min_lr_ratio=0.1)
    c.checkpoint.update(every=200, keep_last=3)
    c.logging.update(every=10, eval_every=200, eval_batches=16, peak_tflops=989.0)  # H100 dense bf16
    return c
