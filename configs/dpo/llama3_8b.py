"""DPO of Llama 3.1 8B from an SFT checkpoint (a recipe for a GPU/TPU pod, not this CPU).

    python -m llama_jax.train --config 'configs/dpo/llama3_8b.py:/data/prefs/latest/*.jsonl' \\
        --config.init_from=runs/sft-8b --config.run_dir=runs/dpo-8b

The paper's DPO: learning rate 1e-5, beta 0.1, formatting tokens masked out of the DPO term, + 0.2 x the chosen
reply's NLL; the reference is the SFT checkpoint the policy starts from (a frozen copy, sharded like the policy;
or ``--config.dpo.reference=precomputed`` with a column from ``python -m llama_jax.posttrain.reference_logps``).
The paper gives no batch size or step count for DPO: these are ours.
"""

from llama_jax.train.defaults import dpo_config


def get_config(data_path: str = ""):
    c = dpo_config("llama3.1-8b", remat="full")
    c.data.tokenizer = "llama3"
    c.data.sources = [dict(format="preference", path=data_path, weight=1.0)]
    c.data.update(seq_len=8192, batch_size=64, holdout_every=100)
    c.mesh = "fsdp=-1"
    c.optimizer.grad_accum = 8
    c.loss.vocab_chunk = 8192
    c.schedule.update(peak_lr=1e-5, warmup_steps=50, decay_steps=2000, total_steps=2000)
    c.checkpoint.update(every=500, keep_last=3)
    c.logging.update(every=10, eval_every=500, eval_batches=16, peak_tflops=989.0)  # H100 dense bf16
    return c
