"""SFT of Llama 3.1 8B from Meta's or Hugging Face's weights (a recipe for a GPU/TPU pod, not this CPU).

    python -m llama_jax.convert --checkpoint Meta-Llama-3.1-8B/ --to llama_jax --out ckpt/llama3.1-8b   # optional
    python -m llama_jax.train --config 'configs/sft/llama3_8b.py:/data/chats/*.jsonl' \\
        --config.init_from=Meta-Llama-3.1-8B/ --config.run_dir=runs/sft-8b

init_from takes the Meta directory, the Hugging Face one or a llama_jax checkpoint alike. The paper (section
4.1.3): learning rate 1e-5, 8.5K-9K steps, loss on the assistant's tokens only; chats packed into 8K rows.
"""

from llama_jax.train.defaults import sft_config


def get_config(data_path: str = ""):
    c = sft_config("llama3.1-8b", remat="full")
    c.data.tokenizer = "llama3"
    c.data.sources = [dict(format="chat", path=data_path, weight=1.0)]
    c.data.update(seq_len=8192, batch_size=64, holdout_every=200)
    c.mesh = "fsdp=-1"
    c.optimizer.grad_accum = 4
    c.loss.vocab_chunk = 8192
    c.schedule.update(peak_lr=1e-5, warmup_steps=100, decay_steps=9000, total_steps=9000)
    c.checkpoint.update(every=500, keep_last=3)
    c.logging.update(every=10, eval_every=500, eval_batches=16, peak_tflops=989.0)  # H100 dense bf16
    return c
