"""Llama 3.1 8B pretraining with the paper's long-context extension: 8K, then 16K, 32K, 64K, 96K and 128K, one run.

    python -m llama_jax.plan --config configs/pretrain/llama3_8b_long_context.py --config.mesh=tensor=8,fsdp=64
    python -m llama_jax.train --config 'configs/pretrain/llama3_8b_long_context.py:/data/web/*.jsonl' \\
        --config.run_dir=gs://...
    # or from an 8K checkpoint: --config.init_from=... --config.long_context.start_step=0

The base run is configs/pretrain/llama3_8b.py (8K rows, 4M-token steps, 1M steps). The Llama 3 paper (section
3.4.2) extends the context at the end of pretraining "in six stages" from 8K to 128K with ~800B tokens, moving on
once short-context quality has recovered and needle-in-a-haystack is solved at the new length (the gates here, set
to stop the run), RoPE theta 500,000 from the start (nothing changes RoPE per phase), then anneals over the last 40M
tokens at 128K with the learning rate falling linearly to 0. It gives neither their lengths nor their tokens:
here the lengths are 16K, 32K, 64K, 96K and 128K, the 800B tokens split evenly over them, 4M tokens per step (96K:
32 rows, 3.1M tokens); the phases keep the base schedule's floor, 3e-6.

Layout, for 512 H100s of 80 GB (tensor=8 x 64 data ranks; other counts: change the context-parallel degrees so that
each step's rows fill the data ranks): one row per data rank per microbatch, the fused attention kernel
(``model.attention="flash"``), under context parallelism as the paper does it, keys and values all-gathered
(``model.context_parallel="all_gather"``). The context-parallel degree covers what the rows do not: 256 rows of 16K
need no CP (4 microbatches), 32 rows of 96K and 128K need CP 2 to fill 64 ranks. The planner gives 6 to 22 GB per GPU
for every phase (``llama_jax.plan`` above, its gpu profile). With dense attention under a ring instead, the scores
each layer keeps for its backward pass grow with the square of the length: plan such a layout before choosing it.
"""

import runpy
from pathlib import Path

PHASE_TOKENS = 160e9  # 800B tokens over five lengths
PHASES = (  # seq_len, rows per step, context-parallel degree, microbatches per step
    (16_384, 256, 1, 4), (32_768, 128, 1, 2), (65_536, 64, 1, 1), (98_304, 32, 2, 1), (131_072, 32, 2, 1))


def get_config(data_path: str = ""):
    c = runpy.run_path(str(Path(__file__).with_name("llama3_8b.py")))["get_config"](data_path)
    c.model.update(attention="flash", context_parallel="all_gather")
    c.mesh = "tensor=8,fsdp=-1"
    c.long_context.start_step = c.schedule.total_steps  # after the 8K run
    c.long_context.phases = [dict(seq_len=seq_len, batch_size=rows, tokens=PHASE_TOKENS, context_parallel=cp,
                                  grad_accum=accum) for seq_len, rows, cp, accum in PHASES]
    c.long_context.phases.append(dict(seq_len=131_072, batch_size=32, tokens=40e6, context_parallel=2, grad_accum=1,
                                      lr=3e-6, end_lr=0.0))  # the paper's annealing
    c.long_context.gate.update(action="stop", task="needle", min_retrieval=0.9, max_loss_increase=0.02)
    return c
