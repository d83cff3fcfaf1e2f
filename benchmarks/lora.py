"""Train-step throughput with low-rank adapters against full fine-tuning of the same model, on the same device,
each in its own process, the two alternated.

    python benchmarks/lora.py                         # CPU: ~125M params, batch 4 x 256, float32 (~3 min on 2 cores)
    python benchmarks/lora.py --preset quick --steps 2 --alternations 1              # a smoke run in seconds
    python benchmarks/lora.py --preset llama3.2-1b --batch 4 --seq 2048 --dtype bfloat16 --remat full   # one GPU

Both sides run ``llama_jax.train``'s SFT step (forward, backward, global-norm clip 1.0, AdamW) on the same random
rows, one document per row, float32 parameters. ``full`` trains every parameter; ``lora`` is the step ``build``
makes with ``config.lora.rank > 0`` (``train.adapters.with_adapters``): the base frozen in ``TrainState.frozen``,
rank ``--rank`` adapters on every projection trained. An adapter step skips the base's weight gradients (about a
third of the work) and the optimizer's update of every base leaf, and adds the small rank-r matmuls.

Reported per side: tokens/s of the best and of the median step over all its processes and the spread of step times
(harness.spread), compile time and peak memory (on a CPU: the process's peak RSS). ``ratio``: lora / full, best steps
and median steps. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import harness
import numpy as np

from llama_jax import config
from llama_jax.config import ModelConfig

SIDES = ("lora", "full")


def model_config(args: argparse.Namespace) -> ModelConfig:
    return harness.model_config(args.preset, args.layers, args.seq, param_dtype="float32", dtype=args.dtype,
                                remat=args.remat)


def side(args: argparse.Namespace, cfg: ModelConfig, name: str) -> dict:
    """One side's process: build, compile, time ``--steps`` steps."""
    # Imported here: the parent process only starts children and must not hold a backend's threads (harness.py).
    import jax

    from llama_jax import optim, sharding
    from llama_jax.experiment import Adapters, Experiment, Loss
    from llama_jax.train import create_state, make_train_step, sft, state_shardings
    from llama_jax.train.adapters import with_adapters

    exp = Experiment(stage="sft", model=cfg, init_from="(a fresh base: nothing is read)",
                     loss=Loss(vocab_chunk=args.loss_chunk), lora=Adapters(rank=args.rank if name == "lora" else 0))
    cfg = cfg.replace(lora=exp.lora.spec())
    stage = sft.STAGE if cfg.lora is None else with_adapters(sft.STAGE, cfg, exp)
    mesh = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
    tx = optim.adamw(1e-4, clip_norm=1.0)
    state = create_state(cfg, tx, mesh, seed=0, stage=stage)
    train_step = make_train_step(stage.make_loss_fn(cfg, exp, None), tx, mesh, state_shardings(cfg, tx, mesh, stage))
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = sharding.shard_batch({
        "tokens": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": np.ones_like(rows[:, 1:]),
        "segment_ids": np.ones_like(rows[:, 1:]),
        "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy()}, mesh)
    start = time.perf_counter()
    with sharding.activate(mesh):
        compiled = train_step.jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def step() -> float:
        holder["state"], metrics = compiled(holder["state"], batch)
        return float(metrics["loss"])

    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    trained = sum(x.size for x in jax.tree.leaves(holder["state"].params))
    return {"side": name, "step_s": [harness.timed(step) for _ in range(args.steps)], "compile_s": compile_s,
            "first_loss": first_loss, "trained_params": trained, "peak_memory_gb": harness.jax_peak_memory_gb(),
            "device": harness.jax_device()}


def summarize(runs: list[dict], tokens: int) -> dict:
    ok = harness.succeeded(runs)
    if not ok:
        return {"error": [r["error"] for r in runs]}
    s = harness.spread([t for r in ok for t in r["step_s"]])
    return {"tokens_per_s": round(tokens / s["best"], 1), "median_tokens_per_s": round(tokens / s["median"], 1),
            "step_s": {k: round(v, 4) for k, v in s.items()},
            "process_best_step_s": [round(min(r["step_s"]), 4) for r in ok], "failed": len(runs) - len(ok),
            "trained_params": ok[0]["trained_params"], "first_loss": round(ok[0]["first_loss"], 4),
            "compile_s": round(min(r["compile_s"] for r in ok), 1),
            "peak_memory_gb": round(max(r["peak_memory_gb"] for r in ok), 2), "device": ok[0]["device"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="125m", help=harness.preset_help())
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count (fit one chip)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (parameters and AdamW stay float32)")
    p.add_argument("--remat", default="none", choices=config.REMAT_POLICIES)
    p.add_argument("--rank", type=int, default=16, help="the adapters' rank (every projection adapted)")
    p.add_argument("--loss-chunk", type=int, default=0, help="vocabulary chunk of the loss (0: whole vocabulary)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per process (after the compile)")
    p.add_argument("--alternations", type=int, default=3, help="processes per side, the sides alternated")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for all processes together; a process past it is stopped and reported as failed")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a side's own process
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.alternations < 1 or args.rank < 1:
        p.error("--warmup, --steps, --alternations, --rank >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = model_config(args)
    if args.side:  # one side's process: its result on the last line
        print(json.dumps(side(args, cfg, args.side)))
        return
    argv = sys.argv[1:] if argv is None else list(argv)
    machine_start = harness.machine()
    runs = harness.alternate(__file__, {name: [*argv, "--side", name] for name in SIDES}, args.alternations,
                             args.time_limit)
    tokens = args.batch * args.seq
    sides = {name: summarize(r, tokens) for name, r in runs.items()}
    ratio = median_ratio = None
    if not any("error" in s for s in sides.values()):
        ratio = round(sides["lora"]["tokens_per_s"] / sides["full"]["tokens_per_s"], 3)
        median_ratio = round(sides["lora"]["median_tokens_per_s"] / sides["full"]["median_tokens_per_s"], 3)
    print(f"{args.preset} ({cfg.num_params() / 1e6:.0f}M params, {cfg.num_layers} layers), batch {args.batch} x "
          f"{args.seq}, {cfg.dtype} compute, remat {cfg.remat}; LoRA rank {args.rank} on every projection vs full "
          "fine-tuning")
    for name, s in sides.items():
        if "error" in s:
            print(f"{name:>5}: failed: {s['error']}")
            continue
        print(f"{name:>5}: {s['tokens_per_s']:>10.1f} tok/s best, {s['median_tokens_per_s']:>10.1f} median; step s "
              f"{s['step_s']}; {s['trained_params'] / 1e6:.2f}M trained; {s['peak_memory_gb']} GB; compile "
              f"{s['compile_s']} s")
    if ratio is not None:
        print(f"lora / full: {ratio} (best steps), {median_ratio} (median steps)")
    print(json.dumps({
        "benchmark": "lora", "ratio": ratio, "median_ratio": median_ratio, "sides": sides,
        "config": {"preset": args.preset, "layers": cfg.num_layers, "params": cfg.num_params(), "batch": args.batch,
                   "seq": args.seq, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "remat": cfg.remat,
                   "rank": args.rank, "loss_chunk": args.loss_chunk or None, "steps": args.steps,
                   "alternations": args.alternations},
        "machine": {"start": machine_start, "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
    }))


if __name__ == "__main__":
    main()
