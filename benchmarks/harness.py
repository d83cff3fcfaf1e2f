"""What the benchmarks share: one process per side, alternated, with the spread of what they measured; the chip's
published peak, a matmul measured in the same run, peak memory, and a description of the machine.

    from harness import alternate, spread        # benchmarks/ is on sys.path when a script in it runs
    runs = alternate(__file__, {"ours": ["--side", "ours"], "torch": ["--side", "torch"]}, alternations=3)
    spread([r["step_s"] for r in runs["ours"]])  # {"best": ..., "median": ..., "worst": ..., "n": ...}

Why a process per side: jax and torch in one process share the cores and each other's idle thread pools (OpenMP
workers spin after a parallel region; XLA's pool too), so whichever runs second pays for the first. Alternating
the sides several times, and reversing their order every other round, spreads the load of other jobs over both.
The frameworks are imported inside the functions that need them, so each side's process imports only its own.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from llama_jax import config
from llama_jax.config import ModelConfig

# Dense (no sparsity) bfloat16 peak FLOP/s per chip, from the vendors' data sheets; matched in this order against
# the device name the framework reports (e.g. "NVIDIA H100 80GB HBM3"), so more specific names come first.
PUBLISHED_BF16_PEAK = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12),
    ("L40S", 362e12), ("L4", 121e12), ("B200", 2250e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
)
GB = 1e9
SHAPES = {  # benchmark shapes beside config.PRESETS (which --preset also takes)
    "125m": ModelConfig(vocab_size=32_000, dim=768, num_layers=12, num_heads=12, num_kv_heads=4, ffn_dim=2048,
                        rope_theta=10_000.0, max_seq_len=2048),
    "quick": ModelConfig(vocab_size=512, dim=128, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=256,
                         rope_theta=10_000.0, max_seq_len=2048),
}


def model_config(preset: str, layers: int | None = None, seq: int = 0, **changes) -> ModelConfig:
    """A benchmark shape or a llama_jax preset with ``layers`` layers (to fit one chip), room for ``seq`` tokens,
    and fields changed."""
    base = SHAPES[preset] if preset in SHAPES else config.get(preset)
    if layers:
        changes["num_layers"] = layers
    return base.replace(max_seq_len=max(base.max_seq_len, seq), **changes)


def preset_help() -> str:
    return f"{', '.join(SHAPES)} or a llama_jax preset ({', '.join(config.PRESETS)})"


def published_peak(device_name: str) -> float | None:
    """The chip's published dense bf16 FLOP/s, or None (CPUs, unknown chips)."""
    return next((peak for key, peak in PUBLISHED_BF16_PEAK if key in device_name), None)


def _described(backend: str, name: str, **more) -> dict:
    peak = published_peak(name)
    return {"backend": backend, "device": name, "published_bf16_peak_tflops": peak and peak / 1e12, **more}


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"best": min(values), "median": statistics.median(values), "worst": max(values), "n": len(values)}


def machine() -> dict:
    """The host as the parent process sees it (no framework imported): CPU model, cores, load, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version()}


def run_child(script: str, args: Sequence[str], timeout: float | None = None) -> dict:
    """Runs ``python script args`` and returns the JSON object on the last line of its stdout (stderr passes on)."""
    command = [sys.executable, script, *args]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise RuntimeError(f"exit status {done.returncode}; stdout ended: {lines[-3:]}")
    return json.loads(lines[-1])


def alternate(script: str, sides: Mapping[str, Sequence[str]], alternations: int,
              time_limit: float | None = None) -> dict[str, list[dict]]:
    """Runs each side's process ``alternations`` times, in order then reversed, round after round. Each result
    gets the load average seen just before its process started (``load_before``). A process that fails, or would
    run past ``time_limit`` seconds from now (all processes together), gives ``{"error": ...}`` and the rest go on."""
    deadline = None if time_limit is None else time.monotonic() + time_limit
    results = {name: [] for name in sides}
    for round_index in range(alternations):
        order = list(sides) if round_index % 2 == 0 else list(sides)[::-1]
        for name in order:
            load = os.getloadavg()[0]
            print(f"[{round_index + 1}/{alternations}] {name} (load {load:.2f})", file=sys.stderr, flush=True)
            left = None if deadline is None else deadline - time.monotonic()
            try:
                if left is not None and left <= 0:
                    raise TimeoutError("no time left")
                result = run_child(script, sides[name], left)
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                print(f"{name} failed: {e}", file=sys.stderr, flush=True)
                result = {"error": f"{type(e).__name__}: {e}"[:500]}
            result["load_before"] = round(load, 2)
            results[name].append(result)
    return results


def succeeded(runs: Sequence[dict]) -> list[dict]:
    """The runs that did not fail (see ``alternate``)."""
    return [r for r in runs if "error" not in r]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def host_peak_rss_gb() -> float:
    """This process's peak resident memory (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


# --- jax side ------------------------------------------------------------------------------------------------


def jax_device() -> dict:
    import jax  # imported here: the torch side's process must not load jax (see the module docstring)

    device = jax.devices()[0]
    name = device.device_kind if device.platform != "cpu" else f"cpu ({machine()['cpu']})"
    return _described(device.platform, name, jax=jax.__version__)


def jax_matmul_peak(dtype: str, precision: str | None, size: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of a [size, size] @ [size, size] jax matmul in ``dtype`` at ``precision``."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda a: jnp.matmul(a, a, precision=precision))
    matmul(x).block_until_ready()
    return 2 * size**3 / min(timed(lambda: matmul(x).block_until_ready()) for _ in range(repeats))


def jax_peak_memory_gb() -> float | None:
    """The device's peak bytes in use (accelerators), else the process's peak RSS (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / GB
    return host_peak_rss_gb()


# --- torch side ----------------------------------------------------------------------------------------------


def torch_device() -> tuple[str, dict]:
    """("cuda" or "cpu", a description of it): torch runs where a GPU is, as jax does."""
    import torch  # imported here: the jax side's process must not load torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        where = "cuda"
    else:
        name, where = f"cpu ({machine()['cpu']})", "cpu"
    return where, _described(where, name, torch=torch.__version__, threads=torch.get_num_threads(),
                             cuda_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)


def torch_sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def torch_matmul_peak(device: str, dtype: str, size: int, repeats: int = 5) -> float:
    import torch

    x = torch.ones(size, size, dtype=getattr(torch, dtype), device=device)
    torch.mm(x, x)
    torch_sync(device)

    def run():
        torch.mm(x, x)
        torch_sync(device)

    return 2 * size**3 / min(timed(run) for _ in range(repeats))


def torch_peak_memory_gb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / GB if device == "cuda" else host_peak_rss_gb()
