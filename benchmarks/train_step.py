"""Train-step throughput: our jitted step against transformers' PyTorch Llama step, same machine, same run.

    python benchmarks/train_step.py            # ~125M params, batch 4 x 512, float32 (several minutes on CPU)
    python benchmarks/train_step.py --quick    # a tiny model: a smoke run in seconds

Both sides do the same work per step: forward, backward, global-norm clip 1.0, AdamW (0.9, 0.95, eps 1e-8,
decay 0.1) on float32 parameters. Steps alternate between the two in rounds. Each side's fastest step is
the headline (tokens/s, ratio, fraction of peak): load from other processes only ever adds time, and it does
not hit both alike (torch's OpenMP threads suffer more from oversubscription than XLA's pool), so medians
on a shared machine measure the load. Medians are printed too. The machine's float32 peak is the best of
five [2048, 2048] matmuls in jax and in torch (the better of the two is "peak"), and each step's GFLOP/s
(``ModelConfig.flops_per_token``, attention included) is reported as a fraction of it. Our bfloat16-compute
step (float32 master weights) is timed too. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import optim, sharding
from llama_jax.config import ModelConfig
from llama_jax.train import create_state, make_train_step, state_shardings
from llama_jax.train.pretrain import make_loss_fn

DEFAULT = dict(vocab_size=32_000, dim=768, num_layers=12, num_heads=12, num_kv_heads=4, ffn_dim=2048)
QUICK = dict(vocab_size=512, dim=128, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=256)


def matmul_peak(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of-n float32 matmul FLOP/s in jax and torch."""
    import torch

    x = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t = torch.ones(size, size)
    torch.mm(t, t)
    best = {"jax": float("inf"), "torch": float("inf")}
    for _ in range(repeats):
        start = time.perf_counter()
        f(x).block_until_ready()
        best["jax"] = min(best["jax"], time.perf_counter() - start)
        start = time.perf_counter()
        torch.mm(t, t)
        best["torch"] = min(best["torch"], time.perf_counter() - start)
    return {k: 2 * size**3 / v for k, v in best.items()}


def ours(cfg: ModelConfig, batch: dict, loss_chunk: int | None):
    """A step closure on one device; returns a function running one step and blocking on its result."""
    mesh = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
    tx = optim.adamw(1e-4)
    state = create_state(cfg, tx, mesh, seed=0)
    step = make_train_step(make_loss_fn(cfg, chunk_size=loss_chunk), tx, mesh, state_shardings(cfg, tx, mesh))
    batch = sharding.shard_batch(batch, mesh)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        return float(metrics["loss"])

    return run


def pytorch(cfg: ModelConfig, tokens: np.ndarray):
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.ffn_dim,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False, attn_implementation="sdpa")
    net = transformers.LlamaForCausalLM(hf).float().train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = torch.from_numpy(tokens.astype(np.int64))

    def run():
        opt.zero_grad(set_to_none=True)
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    return run


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and batch: a smoke run")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per side (default 5)")
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
    parser.add_argument("--no-scan", action="store_true", help="unroll the layers instead of nn.scan")
    parser.add_argument("--loss-chunk", type=int, default=0, help="vocab chunk of the loss (0: whole vocab)")
    parser.add_argument("--skip-bf16", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count())
    shape = QUICK if args.quick else DEFAULT
    batch_size, seq = args.batch or (2 if args.quick else 4), args.seq or (64 if args.quick else 512)
    rounds = args.rounds or 5
    cfg = ModelConfig(**shape, rope_theta=10_000.0, max_seq_len=max(seq, 2048), remat=args.remat,
                      scan_layers=not args.no_scan)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(batch_size, seq + 1)).astype(np.int32)
    # Same work as the PyTorch side, which predicts tokens[1:] from tokens[:-1] of a [B, T] input.
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch_size, seq), np.int32),
             "segment_ids": np.ones((batch_size, seq), np.int32),
             "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch_size, seq)).copy()}

    peak = matmul_peak()
    sides = {"ours_f32": ours(cfg, batch, args.loss_chunk or None), "torch_f32": pytorch(cfg, tokens[:, :-1])}
    if not args.skip_bf16:
        sides["ours_bf16"] = ours(cfg.replace(dtype="bfloat16"), batch, args.loss_chunk or None)
    first_loss = {name: run() for name, run in sides.items()}  # compile / warm up
    times = {name: [] for name in sides}
    for _ in range(rounds):
        for name, run in sides.items():
            times[name].append(timed(run))

    flops_per_step = cfg.flops_per_token(seq) * batch_size * seq
    machine_peak = max(peak.values())
    results = {}
    for name, ts in times.items():
        step_s = min(ts)
        results[name] = {"step_s": round(step_s, 4), "tokens_per_s": round(batch_size * seq / step_s, 1),
                         "gflops": round(flops_per_step / step_s / 1e9, 1),
                         "fraction_of_peak": round(flops_per_step / step_s / machine_peak, 3),
                         "median_step_s": round(statistics.median(ts), 4), "first_loss": round(first_loss[name], 4)}
    print(f"model: {cfg.num_params() / 1e6:.1f}M params, batch {batch_size} x {seq}, "
          f"{flops_per_step / 1e9:.1f} GFLOP per step; remat={cfg.remat} scan={cfg.scan_layers} "
          f"loss_chunk={args.loss_chunk or 'none'}")
    print(f"float32 matmul peak: jax {peak['jax'] / 1e9:.0f} GFLOP/s, torch {peak['torch'] / 1e9:.0f} GFLOP/s")
    for name, r in results.items():
        print(f"{name:10s} {r['tokens_per_s']:9.1f} tokens/s  {r['gflops']:7.1f} GFLOP/s  "
              f"{100 * r['fraction_of_peak']:5.1f}% of peak   (best of {rounds}, median {r['median_step_s']} s: "
              f"{[round(t, 2) for t in times[name]]})")
    ratio = results["ours_f32"]["tokens_per_s"] / results["torch_f32"]["tokens_per_s"]
    median_ratio = results["torch_f32"]["median_step_s"] / results["ours_f32"]["median_step_s"]
    print(f"ours / torch (float32 tokens/s): {ratio:.3f} (best steps), {median_ratio:.3f} (median steps)")
    print(json.dumps({
        "ours": results["ours_f32"], "baseline": results["torch_f32"], "ratio": round(ratio, 3),
        "median_ratio": round(median_ratio, 3),
        "ours_bf16": results.get("ours_bf16"),
        "config": {**shape, "batch": batch_size, "seq": seq, "remat": cfg.remat, "scan": cfg.scan_layers,
                   "loss_chunk": args.loss_chunk or None, "params": cfg.num_params()},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg": os.getloadavg(), "jax": jax.__version__, "torch": torch.__version__,
                    "peak_gflops": {k: round(v / 1e9, 1) for k, v in peak.items()}},
    }))


if __name__ == "__main__":
    main()
