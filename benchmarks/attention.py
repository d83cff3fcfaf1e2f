"""Attention forward and forward + backward: the dense path against the fused kernels, on any backend.

    python benchmarks/attention.py                 # this backend's shapes and kernels (GPU: 1B/8B-like, bf16)
    python benchmarks/attention.py --shapes tiny --impls dense,pallas-interpret --iters 2
    python benchmarks/attention.py --pallas-blocks 128x64,64x64,128x128   # block sizes to try on a GPU

Inputs per shape: rows packed with random documents in natural order (lengths up to T/2, the last one cut at
the row's end; the first row ends in 10% padding), q [B, T, N, H], k/v [B, T, K, H]. The timed step is
``jit(grad(sum(out * c)))`` over q, k, v (c random, zero on padding queries, whose outputs differ by design
between kernels) and ``jit(attend)`` for the forward alone; median and best of ``--iters`` runs after
a compile. Per kernel: compile seconds, ms, useful TFLOP/s (12 * H FLOPs per visible (query, key) pair and head:
4 forward, 8 backward; recomputation is not counted), XLA's temporary memory for the compiled step, and the
largest difference of output and gradients from the dense path's, relative to the dense values' largest.
A kernel that fails to compile or run is reported as such and the run goes on. Implementations:

    dense             llama_jax.ops.attention's attention ([B, K, T, G, S] float32 scores)
    pallas:BQxBK      ops.flash_attention compiled (GPU)  | pallas-interpret  the same in interpret mode (CPU)
    splash            ops.splash_attention (TPU)          | splash-interpret  interpret mode (CPU)
    cudnn             ops.cudnn_attention: jax.nn.dot_product_attention, cuDNN, dense document mask (GPU)

No network, no input: fit for an unattended run. The last line of stdout is one JSON object: every result and,
per shape, each kernel's forward + backward speed-up over dense (median times).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.ops import flash_attention as fa
from llama_jax.ops.attention import attention_mask, dot_product_attention

SHAPES = {  # name: (batch, length, heads, kv heads, head dim)
    "tiny": (2, 256, 4, 2, 32),
    "1b-2k": (4, 2048, 32, 8, 64),
    "1b-8k": (1, 8192, 32, 8, 64),
    "8b-4k": (2, 4096, 32, 8, 128),
}
DEFAULTS = {  # backend: (shapes, implementations, dtype)
    "gpu": ("1b-2k,8b-4k,1b-8k", "dense,pallas,cudnn", "bfloat16"),
    "tpu": ("1b-2k,8b-4k,1b-8k", "dense,splash", "bfloat16"),
    "cpu": ("tiny", "dense,pallas-interpret,splash-interpret", "float32"),
}


def packed_rows(batch: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """positions, segment_ids [B, T]: random documents in natural order, the first row ending in padding."""
    rng = np.random.default_rng(seed)
    positions, segments = np.zeros((batch, length), np.int32), np.zeros((batch, length), np.int32)
    for row in range(batch):
        end = int(length * 0.9) if row == 0 else length
        start, doc = 0, 1
        while start < end:
            size = min(int(rng.integers(1, length // 2 + 1)), end - start)
            positions[row, start:start + size] = np.arange(size)
            segments[row, start:start + size] = doc
            start, doc = start + size, doc + 1
    return positions, segments


def attention_fn(impl: str, positions, segments):
    """attend(q, k, v) -> out for an implementation name."""
    vectors = (positions, segments, positions, segments)
    if impl == "dense":
        mask = attention_mask(*vectors)
        return lambda q, k, v: dot_product_attention(q, k, v, mask)
    if impl.startswith("pallas"):
        blocks = {}
        if ":" in impl:
            block_q, block_k = impl.split(":")[1].split("x")
            blocks = {"block_q": int(block_q), "block_k": int(block_k)}
        return functools.partial(fa.flash_attention, q_positions=positions, q_segment_ids=segments,
                                 k_positions=positions, k_segment_ids=segments,
                                 interpret=impl == "pallas-interpret", **blocks)
    if impl.startswith("splash"):
        return lambda q, k, v: fa.splash_attention(q, k, v, *vectors, interpret=impl == "splash-interpret")
    if impl == "cudnn":
        return lambda q, k, v: fa.cudnn_attention(q, k, v, *vectors, natural_order=True)
    raise SystemExit(f"error: unknown implementation {impl!r}")


def timed(fn, args, iters: int) -> tuple[float, list[float], object, int | None]:
    """(compile seconds, run seconds per iteration, last result, temporary bytes) of jit(fn)(*args)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    result = jax.block_until_ready(compiled(*args))  # first run: allocation, autotuning
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        result = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, times, result, temp


def relative_difference(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def weighted_sum(attend, cotangent, q, k, v):
    return jnp.sum(attend(q, k, v).astype(jnp.float32) * cotangent)


def measure_shape(name: str, impls: list[str], dtype, iters: int) -> list[dict]:
    batch, length, heads, kv_heads, head_dim = SHAPES[name]
    positions, segments = packed_rows(batch, length)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
    k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim), dtype) for key in keys[1:3])
    real = jnp.asarray(segments > 0)[:, :, None, None]
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32) * real
    mask = np.asarray(attention_mask(positions, segments, positions, segments))
    visible = int(np.sum(mask & (segments > 0)[:, :, None]))
    flops = 12 * head_dim * heads * visible
    results, dense = [], None
    for impl in impls:
        attend = attention_fn(impl, positions, segments)
        grad = jax.grad(functools.partial(weighted_sum, attend, cotangent), argnums=(0, 1, 2))
        row = {"shape": name, "impl": impl, "batch": batch, "length": length, "heads": heads, "kv_heads": kv_heads,
               "head_dim": head_dim, "dtype": jnp.dtype(dtype).name}
        try:
            fwd_compile, fwd_times, out, _ = timed(attend, (q, k, v), iters)
            step_compile, step_times, grads, temp = timed(grad, (q, k, v), iters)
        except Exception as error:  # one failing kernel must not end an unattended run
            traceback.print_exc(file=sys.stderr)
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            results.append(row)
            print(f"{name:>6} {impl:>18} | failed: {row['error']}", flush=True)
            continue
        median = statistics.median(step_times)
        row.update(compile_s=round(fwd_compile + step_compile, 2), fwd_ms=round(1e3 * statistics.median(fwd_times), 3),
                   fwd_bwd_ms=round(1e3 * median, 3), fwd_bwd_best_ms=round(1e3 * min(step_times), 3),
                   tflops=float(f"{flops / median / 1e12:.3g}"), temp_gb=None if temp is None else round(temp / 1e9, 3))
        if impl == "dense":
            dense = (out, grads)
        elif dense is not None:
            row["rel_diff"] = {"out": relative_difference(out * real, dense[0] * real),
                               **{n: relative_difference(g, w) for n, g, w in zip(("dq", "dk", "dv"), grads, dense[1])}}
        results.append(row)
        diff = max(row["rel_diff"].values()) if "rel_diff" in row else 0.0
        print(f"{name:>6} {impl:>18} | {row['compile_s']:>8.1f} {row['fwd_ms']:>10.2f} {row['fwd_bwd_ms']:>12.2f} "
              f"{row['tflops']:>8.3g} {row['temp_gb'] if temp is not None else float('nan'):>8.3f} {diff:>9.1e}",
              flush=True)
    return results


def main() -> None:
    backend = jax.default_backend()
    shapes, impls, dtype = DEFAULTS.get(backend, DEFAULTS["cpu"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=shapes, help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--impls", default=impls, help="comma-separated implementations (see the docstring)")
    parser.add_argument("--pallas-blocks", default="128x64,64x64", help="block_q x block_k list for 'pallas'")
    parser.add_argument("--dtype", default=dtype, choices=("bfloat16", "float32"))
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    impl_list = []
    for impl in args.impls.split(","):
        impl_list += [f"pallas:{b}" for b in args.pallas_blocks.split(",")] if impl == "pallas" else [impl]
    if impl_list[0] != "dense":
        impl_list.insert(0, "dense")  # the baseline of every ratio and difference
    device = jax.devices()[0]
    machine = f"{getattr(device, 'device_kind', backend)} ({backend}), jax {jax.__version__}"
    print(machine, file=sys.stderr)
    print(f"{'shape':>6} {'impl':>18} | {'compile s':>8} {'fwd ms':>10} {'fwd+bwd ms':>12} {'TFLOP/s':>8} "
          f"{'temp GB':>8} {'rel diff':>9}")
    results = []
    for shape in args.shapes.split(","):
        results += measure_shape(shape, impl_list, jnp.dtype(args.dtype), args.iters)
    speedups = {}
    for row in results:
        base = next((r for r in results if r["shape"] == row["shape"] and r["impl"] == "dense"), None)
        if row["impl"] != "dense" and "error" not in row and base is not None and "error" not in base:
            speedups[f"{row['shape']}/{row['impl']}"] = round(base["fwd_bwd_ms"] / row["fwd_bwd_ms"], 3)
    print(json.dumps({"machine": machine, "dtype": args.dtype, "speedup_vs_dense": speedups, "results": results}))


if __name__ == "__main__":
    main()
