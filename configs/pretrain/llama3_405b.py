"""Llama 3.1 405B pretraining, the paper's recipe (a cluster-scale config: run it on a few thousand chips).

    python -m llama_jax.train --config 'configs/pretrain/llama3_405b.py:/data/mix/*.jsonl' --config.run_dir=...

From "The Llama 3 Herd of Models" (section 3.4): AdamW, peak LR 8e-5, linear warmup 8,000 steps, cosine
decay to 8e-7 over 1,200,000 steps, the last 40M tokens annealed linearly to 0 (3 steps of 16M tokens);
batches of 4M tokens at sequence 4,096, then 8M tokens at 8,192 after 252M tokens, then 16M tokens after
2.87T tokens. The data stream is one of 4M-token batches of 8K rows (512 x 8192); the ramp cuts them into
4K rows, then takes 2, then 4 of them per step. Weight decay 0.1, clip 1.0, betas (0.9, 0.95) as in Llama 2.
Parallelism: the paper runs TP 8 x PP 16 x DP (FSDP). llama_jax's pipeline (config.pipeline, a `pipeline` mesh
axis) needs the 126 layers split equally over its ranks (2, 3, 6, 7, 9, 14 or 18 of them; the paper's 16 are
uneven), so this config keeps tensor=8 and FSDP over the rest; `python -m llama_jax.plan --table4` shows PP 16.
"""

from llama_jax.train.defaults import pretrain_config


def get_config(data_path: str = ""):
    c = pretrain_config("llama3.1-405b", remat="full")
    c.data.tokenizer = "llama3"
    c.data.sources = [dict(format="jsonl", path=data_path, weight=1.0, split="file", text_key="text")]
    c.data.update(seq_len=8192, batch_size=512, add_bos=True, holdout_every=10_000)
    c.mesh = "tensor=8,fsdp=-1"
    c.optimizer.grad_accum = 1
    c.loss.update(vocab_chunk=8192, z_loss=0.0)
    c.schedule.update(peak_lr=8e-5, warmup_steps=8_000, decay_steps=1_200_000, min_lr_ratio=0.01,
                      anneal_steps=3, total_steps=1_200_000)
    c.schedule.ramp = [dict(start_tokens=0, seq_len=4096, batches=1),
                       dict(start_tokens=252e6, seq_len=8192, batches=2),
                       dict(start_tokens=2.87e12, seq_len=8192, batches=4)]
    c.checkpoint.update(every=500, keep_last=3, keep_every=10_000)
    c.logging.update(every=10, eval_every=2000, eval_batches=16, peak_tflops=989.0)  # H100 dense bf16
    return c
