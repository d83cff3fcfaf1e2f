"""Train-step throughput of llama_jax against transformers' PyTorch Llama on the same device, each side in its own
process, the sides alternated.

    python benchmarks/train_step.py                      # CPU: ~125M params, batch 4 x 512, float32 (~8 min on 2 cores)
    python benchmarks/train_step.py --preset quick --steps 2 --alternations 1        # a smoke run in seconds
    python benchmarks/train_step.py --preset llama3.2-1b --batch 4 --seq 2048 --dtype bfloat16 \\
        --remat dots_no_batch --baselines torch,torch-ckpt --alternations 1          # one GPU
    python benchmarks/train_step.py --preset llama3.1-8b --layers 4 --batch 2 --seq 4096 --dtype bfloat16 \\
        --remat full --baselines torch,torch-ckpt --alternations 1

Both sides do the same work per step: forward, backward, global-norm clip 1.0, AdamW (0.9, 0.95, eps 1e-8, decay
0.1) on float32 parameters, one document per row. ``--dtype bfloat16`` computes in bfloat16 (ours:
``ModelConfig.dtype``; torch: autocast). Torch runs transformers' ``LlamaForCausalLM`` built from the same config
(``config.to_hf``) with ``sdpa`` attention, fused AdamW on CUDA and no torch.compile; ``torch-ckpt`` adds gradient
checkpointing to every layer. ``--precision`` is ours' ``ModelConfig.matmul_precision`` (auto: full float32 for a
float32 run, the fast default for bfloat16); torch keeps its own default (full float32 matmuls: TF32 off).

Each side's process (``--side``) builds its model, compiles / warms up, times ``--steps`` steps, and times a square
matmul in the run's dtype (jax: at the run's matmul precision; 2048 on a CPU, 8192 on an accelerator). The parent
runs ``--alternations`` rounds, the order of the sides reversed every other round (see harness.py for why).
Reported per side: tokens/s of the best and of the median step over all its processes, the spread of step times,
MFU (``ModelConfig.flops_per_token``, attention included) against the chip's published dense bf16 peak and against
the fastest matmul measured in the run (either framework), peak device memory (on a CPU: the process's peak RSS),
compile time (ours: lowering + XLA; torch: its first step). ``ratio``: ours / the first baseline, best steps and
median steps. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import harness
import numpy as np

from llama_jax import config
from llama_jax.config import ModelConfig

BASELINES = ("torch", "torch-ckpt")


def model_config(args: argparse.Namespace) -> ModelConfig:
    return harness.model_config(args.preset, args.layers, args.seq, param_dtype="float32", dtype=args.dtype,
                                remat=args.remat, attention=args.attention, matmul_precision=args.precision,
                                scan_layers=not args.no_scan)


def token_rows(cfg: ModelConfig, args: argparse.Namespace) -> np.ndarray:
    """[B, T + 1] random ids: inputs are [:, :-1], targets [:, 1:]."""
    return np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)


def time_steps(step, args: argparse.Namespace) -> tuple[float, list[float]]:
    """(loss of the first warm-up step, seconds of each timed step); ``step()`` returns the loss as a float."""
    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    return first_loss, [harness.timed(step) for _ in range(args.steps)]


def ours(args: argparse.Namespace, cfg: ModelConfig) -> dict:
    # Imported here, not at the top: the torch side's process must not load jax (see harness.py).
    import jax

    from llama_jax import optim, sharding
    from llama_jax.train import create_state, make_train_step, state_shardings
    from llama_jax.train.pretrain import make_loss_fn

    device = harness.jax_device()
    matmul_size = 2048 if device["backend"] == "cpu" else 8192
    matmul_peak = harness.jax_matmul_peak(cfg.dtype, cfg.resolved_matmul_precision, matmul_size)
    mesh = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
    tx = optim.adamw(1e-4)
    state = create_state(cfg, tx, mesh, seed=0)
    train_step = make_train_step(make_loss_fn(cfg, chunk_size=args.loss_chunk or None), tx, mesh,
                                 state_shardings(cfg, tx, mesh))
    rows = token_rows(cfg, args)
    batch = {"tokens": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": np.ones_like(rows[:, 1:]),
             "segment_ids": np.ones_like(rows[:, 1:]),
             "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy()}
    batch = sharding.shard_batch(batch, mesh)
    start = time.perf_counter()
    with sharding.activate(mesh):
        compiled = train_step.jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def step() -> float:
        holder["state"], metrics = compiled(holder["state"], batch)
        return float(metrics["loss"])

    first_loss, step_s = time_steps(step, args)
    return {"side": "ours", "step_s": step_s, "compile_s": compile_s, "first_loss": first_loss,
            "matmul_peak_flops": matmul_peak, "matmul": f"{matmul_size}^3 {cfg.dtype} precision "
                                                       f"{cfg.resolved_matmul_precision or 'default'}",
            "peak_memory_gb": harness.jax_peak_memory_gb(), "device": device}


def pytorch(args: argparse.Namespace, cfg: ModelConfig, checkpointing: bool) -> dict:
    # Imported here, not at the top: the jax side's process must not load torch (see harness.py).
    import torch
    import transformers

    where, device = harness.torch_device()
    matmul_peak = harness.torch_matmul_peak(where, cfg.dtype, 2048 if where == "cpu" else 8192)
    torch.manual_seed(0)
    # No special-token ids: the benchmark never stops on one, and a small vocabulary would not hold Llama 3's.
    hf_config = transformers.LlamaConfig(**{**config.to_hf(cfg), "bos_token_id": None, "eos_token_id": None},
                                         attn_implementation="sdpa")
    with torch.device(where):
        net = transformers.LlamaForCausalLM(hf_config).float().train()
    if checkpointing:  # the method's newer name where transformers has it
        getattr(net, "activation_checkpointing_enable", net.gradient_checkpointing_enable)()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=where == "cuda")
    ids = torch.from_numpy(token_rows(cfg, args)[:, :-1].astype(np.int64)).to(where)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(where, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            loss = net(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return float(loss.detach())  # waits for the device

    start = time.perf_counter()
    first_loss, step_s = time_steps(step, args)
    warmup_s = time.perf_counter() - start - sum(step_s)
    return {"side": "torch-ckpt" if checkpointing else "torch", "step_s": step_s,
            "compile_s": warmup_s / args.warmup, "first_loss": first_loss, "matmul_peak_flops": matmul_peak,
            "matmul": f"{2048 if where == 'cpu' else 8192}^3 {cfg.dtype}",
            "peak_memory_gb": harness.torch_peak_memory_gb(where), "device": {**device,
                                                                             "transformers": transformers.__version__}}


def summarize(runs: list[dict], tokens: int, flops: float, published: float | None, measured: float) -> dict:
    """One side's figures over its processes (``runs``: the ones that did not fail; ``failed`` counts the others)."""
    ok = harness.succeeded(runs)
    if not ok:
        return {"error": [r["error"] for r in runs]}
    s = harness.spread([t for r in ok for t in r["step_s"]])
    best = s["best"]
    return {
        "tokens_per_s": round(tokens / best, 1), "median_tokens_per_s": round(tokens / s["median"], 1),
        "step_s": {k: round(v, 4) for k, v in s.items()},
        "process_best_step_s": [round(min(r["step_s"]), 4) for r in ok], "failed": len(runs) - len(ok),
        "load_before": [r["load_before"] for r in ok],
        "mfu_published_peak": round(flops / best / published, 4) if published else None,
        "mfu_measured_matmul": round(flops / best / measured, 4),
        "peak_memory_gb": round(max(r["peak_memory_gb"] for r in ok), 2),
        "compile_s": round(statistics.median(r["compile_s"] for r in ok), 1),
        "first_loss": round(ok[0]["first_loss"], 4), "device": ok[0]["device"],
        "matmul": ok[0]["matmul"], "matmul_peak_tflops": round(max(r["matmul_peak_flops"] for r in ok) / 1e12, 4),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="125m", help=harness.preset_help())
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count (fit one chip)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (parameters and AdamW stay float32)")
    p.add_argument("--remat", default="none", choices=config.REMAT_POLICIES)
    p.add_argument("--attention", default="dense", choices=config.ATTENTION_IMPLS, help="ModelConfig.attention")
    p.add_argument("--precision", default="auto", choices=config.MATMUL_PRECISIONS,
                   help="ModelConfig.matmul_precision")
    p.add_argument("--no-scan", action="store_true", help="unrolled layers instead of nn.scan")
    p.add_argument("--loss-chunk", type=int, default=0, help="vocabulary chunk of the loss (0: whole vocabulary)")
    p.add_argument("--baselines", default="torch", help=f"comma-separated, of {', '.join(BASELINES)}; '' for none")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per process (after ours' compile)")
    p.add_argument("--alternations", type=int, default=3, help="processes per side, the sides alternated")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for all processes together; a process past it is stopped and reported as failed")
    p.add_argument("--side", choices=("ours", *BASELINES), help=argparse.SUPPRESS)  # a side's own process
    args = p.parse_args(argv)
    unknown = set(filter(None, args.baselines.split(","))) - set(BASELINES)
    if unknown or args.warmup < 1 or args.steps < 1 or args.alternations < 1:
        p.error(f"unknown baseline(s) {sorted(unknown)}" if unknown else "--warmup, --steps, --alternations >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = model_config(args)
    if args.side:  # one side's process: its result on the last line
        result = ours(args, cfg) if args.side == "ours" else pytorch(args, cfg, args.side == "torch-ckpt")
        print(json.dumps(result))
        return

    argv = sys.argv[1:] if argv is None else list(argv)
    names = ["ours", *filter(None, args.baselines.split(","))]
    machine_start = harness.machine()
    runs = harness.alternate(__file__, {name: [*argv, "--side", name] for name in names}, args.alternations,
                             args.time_limit)
    ok = [r for side in runs.values() for r in harness.succeeded(side)]
    if not ok:
        raise SystemExit(f"every process failed: {runs}")
    tokens, flops = args.batch * args.seq, cfg.flops_per_token(args.seq) * args.batch * args.seq
    measured = max(r["matmul_peak_flops"] for r in ok)
    published = harness.published_peak(ok[0]["device"]["device"])
    sides = {name: summarize(r, tokens, flops, published, measured) for name, r in runs.items()}

    baseline = names[1] if len(names) > 1 else None
    ratio = median_ratio = None
    if baseline and "error" not in sides["ours"] and "error" not in sides[baseline]:
        ratio = round(sides["ours"]["tokens_per_s"] / sides[baseline]["tokens_per_s"], 3)
        median_ratio = round(sides["ours"]["median_tokens_per_s"] / sides[baseline]["median_tokens_per_s"], 3)
    print(f"{args.preset} ({cfg.num_params() / 1e6:.0f}M params, {cfg.num_layers} layers), batch {args.batch} x "
          f"{args.seq}, {cfg.dtype} compute, matmul precision {cfg.resolved_matmul_precision or 'default'}, "
          f"remat {cfg.remat}, attention {cfg.attention}; {flops / 1e9:.0f} GFLOP per step")
    for name, s in sides.items():
        if "error" in s:
            print(f"{name:>10}: failed: {s['error']}")
            continue
        mfu = f"{100 * s['mfu_published_peak']:.1f}% of published peak, " if s["mfu_published_peak"] else ""
        print(f"{name:>10}: {s['tokens_per_s']:>10.1f} tok/s best, {s['median_tokens_per_s']:>10.1f} median; "
              f"{mfu}{100 * s['mfu_measured_matmul']:.1f}% of measured matmul; step s {s['step_s']}; "
              f"{s['peak_memory_gb']} GB; compile {s['compile_s']} s; its matmul {s['matmul']}: "
              f"{s['matmul_peak_tflops']:.3g} TFLOP/s")
    if ratio is not None:
        print(f"ours / {baseline}: {ratio} (best steps), {median_ratio} (median steps)")
    print(json.dumps({
        "benchmark": "train_step", "ratio": ratio, "median_ratio": median_ratio, "baseline": baseline, "sides": sides,
        "config": {"preset": args.preset, "layers": cfg.num_layers, "params": cfg.num_params(), "batch": args.batch,
                   "seq": args.seq, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "remat": cfg.remat,
                   "attention": cfg.attention, "matmul_precision": cfg.matmul_precision,
                   "resolved_matmul_precision": cfg.resolved_matmul_precision or "default", "scan": cfg.scan_layers,
                   "loss_chunk": args.loss_chunk or None, "steps": args.steps, "alternations": args.alternations},
        "measured_matmul_peak_tflops": round(measured / 1e12, 4),
        "published_bf16_peak_tflops": published and published / 1e12,
        "machine": {"start": machine_start, "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                    "xla_flags": os.environ.get("XLA_FLAGS", "")},
    }))


if __name__ == "__main__":
    main()
