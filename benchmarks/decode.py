"""Prefill and decode tokens/s of llama_jax.generate against transformers' PyTorch ``generate`` (KV cache),
same weights, same configs, measured in one run.

    python benchmarks/decode.py                      # tiny and ~125M configs, batch 1 and 8
    python benchmarks/decode.py --configs tiny --batches 1 --repeats 2

Both libraries are timed the same way, through their public generate: t(1) = generate 1 new token
(prefill + first sample), t(N) = generate N new tokens; prefill tokens/s = B * prompt / t(1), decode
tokens/s = B * (N - 1) / (t(N) - t(1)). Greedy, float32, no early stop; best of ``--repeats`` after one
warm-up round (which compiles our steps), the runs interleaved. The last line is one JSON object:
batch-1 decode on the last config.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
import torch
import transformers

from llama_jax import config, model
from llama_jax.config import ModelConfig
from llama_jax.formats.hf import params_to_hf
from llama_jax.generate import generate, inference_layout

CONFIGS = {
    "tiny": config.get("tiny"),
    "125m": ModelConfig(vocab_size=32_000, dim=768, num_layers=12, num_heads=12, num_kv_heads=4, ffn_dim=2048,
                        rope_theta=10_000.0, max_seq_len=2048),
}


def measure(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    fast, fast_cfg = inference_layout(params, cfg)  # the per-layer tree load_model gives for inference
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf(cfg))).float().eval()
    hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params_to_hf(params, cfg).items()})
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len))

    def ours(n):
        return lambda: generate(fast, fast_cfg, prompts.tolist(), n, stop_ids=())

    def theirs(n):
        ids = torch.from_numpy(prompts)

        def run():
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)
        return run

    # Interleaved repeats (ours and theirs, short and long) so load from other processes hits both alike.
    runs = {(lib, n): make(n) for lib, make in (("llama_jax", ours), ("transformers", theirs))
            for n in (1, new_tokens)}
    best = dict.fromkeys(runs, float("inf"))
    for repeat in range(repeats + 1):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            if repeat:  # the first round warms up (compiles our steps)
                best[key] = min(best[key], time.perf_counter() - start)
    result = {}
    for lib in ("llama_jax", "transformers"):
        t1, tn = best[lib, 1], best[lib, new_tokens]
        result[lib] = {"prefill_tok_s": batch * prompt_len / t1, "decode_tok_s": batch * (new_tokens - 1) / (tn - t1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,125m")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    machine = f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} {jax.default_backend()}, " \
              f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}"
    print(machine)
    print(f"{'config':>6} {'batch':>5} | {'prefill tok/s ours':>18} {'hf':>8} {'ratio':>6} | "
          f"{'decode tok/s ours':>17} {'hf':>8} {'ratio':>6}")
    headline = None
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        for batch in (int(b) for b in args.batches.split(",")):
            r = measure(cfg, batch, args.prompt, args.new_tokens, args.repeats)
            ours, hf = r["llama_jax"], r["transformers"]
            print(f"{name:>6} {batch:>5} | {ours['prefill_tok_s']:>18.0f} {hf['prefill_tok_s']:>8.0f} "
                  f"{ours['prefill_tok_s'] / hf['prefill_tok_s']:>6.2f} | {ours['decode_tok_s']:>17.0f} "
                  f"{hf['decode_tok_s']:>8.0f} {ours['decode_tok_s'] / hf['decode_tok_s']:>6.2f}", flush=True)
            if batch == 1:
                headline = {"ours": round(ours["decode_tok_s"], 1), "baseline": round(hf["decode_tok_s"], 1),
                            "ratio": round(ours["decode_tok_s"] / hf["decode_tok_s"], 2),
                            "config": f"{name}, batch 1, prompt {args.prompt}, {args.new_tokens} new tokens, "
                                      "decode tokens/s, float32, greedy",
                            "machine": machine}
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
