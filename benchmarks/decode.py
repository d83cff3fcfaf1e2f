"""Prefill and decode tokens/s of ``llama_jax.generate`` against transformers' ``generate`` on the same device, each
side in its own process, the sides alternated.

    python benchmarks/decode.py                          # CPU: ~125M params, float32, batch 1, 8, 32
    python benchmarks/decode.py --preset tiny --batches 1,8 --alternations 1 --repeats 2      # seconds
    python benchmarks/decode.py --preset llama3.2-1b --dtype bfloat16 --prompt 128 --new-tokens 128 \\
        --alternations 1                                 # one GPU

Sides: ``ours`` (``generate.generate`` on the per-layer inference tree, KV cache donated to a jitted step),
``static`` (transformers' ``generate`` with a ``StaticCache`` sized prompt + new tokens, reset between calls; on
CUDA transformers compiles its decoding step with torch.compile, as it does by default for a static cache) and
``dynamic`` (its default ``DynamicCache``, eager). Weights are each library's own random initialisation of the same
config (the speed does not depend on their values); greedy, no early stop, ``--dtype`` weights and compute.

Both libraries are timed the same way, through their public generate: t(1) = generate 1 new token (prefill + first
sample), t(N) = generate N new tokens; prefill tokens/s = B * prompt / t(1), decode tokens/s = B * (N - 1) /
(t(N) - t(1)). Per process: one warm-up round (compiles), then the best of ``--repeats``; across the processes of a
side the best t(1) and t(N) are reported, with the spread of the processes' decode tokens/s. The last line of stdout
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import harness
import numpy as np

from llama_jax import config
from llama_jax.config import ModelConfig

SIDES = ("ours", "static", "dynamic")


def prompts(cfg: ModelConfig, batch: int, length: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length))


def best_times(run, batches: list[int], new_tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    """{batch: {"t1": s, "tn": s}}: ``run(batch, n)`` generates n tokens; a warm-up round, then best of repeats."""
    times = {}
    for batch in batches:
        for n in (1, new_tokens):
            run(batch, n)  # warm-up: compiles this shape
        best = {"t1": float("inf"), "tn": float("inf")}
        for _ in range(repeats):
            for key, n in (("t1", 1), ("tn", new_tokens)):
                best[key] = min(best[key], harness.timed(lambda b=batch, n=n: run(b, n)))
        times[str(batch)] = best
    return times


def ours(args: argparse.Namespace, cfg: ModelConfig) -> dict:
    # Imported here, not at the top: the torch sides' processes must not load jax (see harness.py).
    import jax

    from llama_jax import model
    from llama_jax.generate import generate, inference_layout

    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    params, cfg = inference_layout(params, cfg)

    def run(batch: int, n: int) -> None:
        generate(params, cfg, prompts(cfg, batch, args.prompt).tolist(), n, stop_ids=())

    times = best_times(run, args.batch_list, args.new_tokens, args.repeats)
    return {"side": "ours", "times": times, "device": harness.jax_device(),
            "peak_memory_gb": harness.jax_peak_memory_gb()}


def transformers_side(args: argparse.Namespace, cfg: ModelConfig, cache: str) -> dict:
    # Imported here, not at the top: the jax side's process must not load torch (see harness.py).
    import torch
    import transformers

    where, device = harness.torch_device()
    torch.manual_seed(0)
    # No special-token ids: generation never stops early, and a small vocabulary would not hold Llama 3's.
    hf_config = transformers.LlamaConfig(**{**config.to_hf(cfg), "bos_token_id": None, "eos_token_id": None})
    with torch.device(where):
        net = transformers.LlamaForCausalLM(hf_config).to(getattr(torch, cfg.dtype)).eval()
    static_caches = {}

    def run(batch: int, n: int) -> None:
        ids = torch.from_numpy(prompts(cfg, batch, args.prompt)).to(where)
        kwargs = {}
        if cache == "static":  # one cache per batch size, as long as the longest call: t(1) and t(N) share shapes
            if batch not in static_caches:
                static_caches[batch] = transformers.StaticCache(config=net.config,
                                                                max_cache_len=args.prompt + args.new_tokens)
            # transformers 5.24 renames this argument `cache` (with a warning); the old name works in 5.17 and 5.24
            kwargs["past_key_values"] = static_caches[batch]
            static_caches[batch].reset()
        with torch.no_grad():
            net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True, **kwargs)
        harness.torch_sync(where)

    times = best_times(run, args.batch_list, args.new_tokens, args.repeats)
    return {"side": cache, "times": times, "device": {**device, "transformers": transformers.__version__},
            "peak_memory_gb": harness.torch_peak_memory_gb(where)}


def rates(t1: float, tn: float, batch: int, args: argparse.Namespace) -> dict[str, float]:
    return {"prefill_tok_s": batch * args.prompt / t1, "decode_tok_s": batch * (args.new_tokens - 1) / (tn - t1)}


def summarize(runs: list[dict], args: argparse.Namespace) -> dict:
    """One side's figures over its processes that did not fail (``failed`` counts the others)."""
    ok = harness.succeeded(runs)
    if not ok:
        return {"error": [r["error"] for r in runs]}
    failed, runs = len(runs) - len(ok), ok
    out = {}
    for batch in args.batch_list:
        key = str(batch)
        best = rates(min(r["times"][key]["t1"] for r in runs), min(r["times"][key]["tn"] for r in runs), batch, args)
        per_process = [rates(r["times"][key]["t1"], r["times"][key]["tn"], batch, args)["decode_tok_s"] for r in runs]
        out[key] = {**{k: round(v, 1) for k, v in best.items()},
                    "decode_tok_s_per_process": harness.spread([round(x, 1) for x in per_process])}
    return {"batches": out, "device": runs[0]["device"], "load_before": [r["load_before"] for r in runs],
            "peak_memory_gb": round(max(r["peak_memory_gb"] for r in runs), 2), "failed": failed}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="125m", help=harness.preset_help())
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and compute")
    p.add_argument("--precision", default="auto", choices=config.MATMUL_PRECISIONS,
                   help="ours' ModelConfig.matmul_precision")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per process (after a warm-up round)")
    p.add_argument("--baselines", default="static,dynamic", help="comma-separated, of static, dynamic")
    p.add_argument("--alternations", type=int, default=2, help="processes per side, the sides alternated")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for all processes together; a process past it is stopped and reported as failed")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a side's own process
    args = p.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",")]
    unknown = set(filter(None, args.baselines.split(","))) - set(SIDES[1:])
    if unknown or args.new_tokens < 2:
        p.error(f"unknown baseline(s) {sorted(unknown)}" if unknown else "--new-tokens must be >= 2")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = harness.model_config(args.preset, args.layers, args.prompt + args.new_tokens, param_dtype=args.dtype,
                               dtype=args.dtype, matmul_precision=args.precision)
    if args.side:  # one side's process: its result on the last line
        result = ours(args, cfg) if args.side == "ours" else transformers_side(args, cfg, args.side)
        print(json.dumps(result))
        return

    argv = sys.argv[1:] if argv is None else list(argv)
    names = ["ours", *filter(None, args.baselines.split(","))]
    machine_start = harness.machine()
    runs = harness.alternate(__file__, {name: [*argv, "--side", name] for name in names}, args.alternations,
                             args.time_limit)
    sides = {name: summarize(r, args) for name, r in runs.items()}
    measured = [n for n in names if "error" not in sides[n]]
    print(f"{args.preset} ({cfg.num_params() / 1e6:.0f}M params), {cfg.dtype}, matmul precision "
          f"{cfg.resolved_matmul_precision or 'default'}, prompt {args.prompt}, {args.new_tokens} new tokens, greedy")
    for name in set(names) - set(measured):
        print(f"{name}: failed: {sides[name]['error']}")
    print(f"{'batch':>5} | {'prefill tok/s: ' + ' / '.join(measured):>40} | "
          f"{'decode tok/s: ' + ' / '.join(measured):>40}")
    ratios = {}
    for batch in map(str, args.batch_list):
        prefill = " / ".join(f"{sides[n]['batches'][batch]['prefill_tok_s']:.0f}" for n in measured)
        decode = " / ".join(f"{sides[n]['batches'][batch]['decode_tok_s']:.1f}" for n in measured)
        if "ours" in measured:
            ours_rate = sides["ours"]["batches"][batch]["decode_tok_s"]
            ratios[batch] = {n: round(ours_rate / sides[n]["batches"][batch]["decode_tok_s"], 2)
                             for n in measured if n != "ours"}
        print(f"{batch:>5} | {prefill:>40} | {decode:>40}   decode ratio {ratios.get(batch)}")
    print(json.dumps({
        "benchmark": "decode", "decode_ratio": ratios, "sides": sides,
        "config": {"preset": args.preset, "layers": cfg.num_layers, "params": cfg.num_params(), "dtype": cfg.dtype,
                   "matmul_precision": cfg.matmul_precision,
                   "resolved_matmul_precision": cfg.resolved_matmul_precision or "default", "prompt": args.prompt,
                   "new_tokens": args.new_tokens, "repeats": args.repeats, "alternations": args.alternations},
        "machine": {"start": machine_start, "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                    "median_load_before": statistics.median(r["load_before"] for v in runs.values() for r in v)},
    }))


if __name__ == "__main__":
    main()
