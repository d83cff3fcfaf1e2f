"""Compile the real train step for devices you do not have, and read what the compiler allocates.

    devices = aot.topology_devices("v5p:4x4x4")     # 64 compile-only v5p chips; needs libtpu (pip install ".[tpu]")
    report = aot.compile_train_step(cfg, sharding.make_mesh("fsdp=64", devices), seq=8192, batch=64)
    report.total_bytes, report.capacity_bytes, report.compile_seconds

``topology_devices`` asks libtpu for a topology's compile-only devices (``jax.experimental.topologies``): nothing
runs, no TPU is needed, and XLA's TPU compiler lays out the program exactly as on the pod, so its
``memory_analysis`` is the TPU's own. Without a topology the step compiles for the devices jax has (a simulated
CPU mesh: ``XLA_FLAGS=--xla_force_host_platform_device_count=N``), whose XLA:CPU figures differ from an
accelerator's (other fusion; bfloat16 computed in float32).

GPUs: ``topology_devices("h100:8", slices=hosts)`` gives compile-only H100s from jax's CUDA plugin
(``jax-cuda12-plugin``, which needs neither a GPU nor a CUDA driver to compile), described to XLA by
``H100_TARGET``; the figures are XLA:GPU's buffer assignment, compiled without autotuning.

FLOPs: ``cost_analysis`` counts the body of a loop once, and the step has loops (the scanned layers, the
vocabulary chunks of the loss, the pipeline's ticks), so ``flops`` is far below the step's work; use
``ModelConfig.flops_per_token`` for model FLOPs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import topologies

from llama_jax import optim, sharding
from llama_jax.config import LoRA, ModelConfig
from llama_jax.data.packing import BATCH_KEYS
from llama_jax.errors import ConfigError
from llama_jax.experiment import DPO, Adapters, Experiment, Loss
from llama_jax.parallel import pipeline
from llama_jax.train import build, dpo, step
from llama_jax.train.adapters import with_adapters
from llama_jax.train.step import Stage


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: float  # per chip, from the vendor's documentation
    platform: str  # "tpu" or "gpu"
    dims: int  # TPU: how many numbers its torus has; GPU: 1 (GPUs per host)
    chip_config: str = "default"  # libtpu's: "megacore" makes a v4 / v5p chip's two TensorCores one device


CHIPS = {
    "v4": Chip(32 * 2**30, "tpu", 3, "megacore"),  # 32 GiB HBM2
    "v5e": Chip(16e9, "tpu", 2),  # 16 GB HBM2
    "v5p": Chip(95e9, "tpu", 3, "megacore"),  # 95 GB HBM2e
    "v6e": Chip(32e9, "tpu", 2),  # 32 GB HBM
    "h100": Chip(80e9, "gpu", 1),  # H100 SXM, 80 GB HBM3
}

# XLA:GPU's description of an H100 SXM (the CUDA device properties it would query from the chip): 132 SMs of
# compute capability 9.0, 228 KiB shared memory per SM (227 KiB per block opt-in), 50 MiB L2, 80 GB HBM3 at
# 3.35 TB/s, 1.98 GHz boost clock; CUDA 12.8 and cuDNN 9 as jax-cuda12-plugin 0.10.2 is built against.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024  threads_per_warp: 32  shared_memory_per_block: 49152
  shared_memory_per_core: 233472  threads_per_core_limit: 2048  core_count: 132  fpus_per_core: 128
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000  l2_cache_size: 52428800  clock_rate_ghz: 1.98
  device_memory_size: 80000000000  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
    """``"v5p:4x4x4"`` -> ("v5p", (4, 4, 4)); ``"h100:8"`` (GPUs per host) -> ("h100", (8,)). Raises ConfigError
    naming the accepted chips."""
    match = re.fullmatch(r"(\w+):(\d+(?:x\d+)*)", topology.strip())
    if not match or match[1] not in CHIPS:
        raise ConfigError(f"topology {topology!r}: expected <chip>:<AxB[xC]> with chip one of {sorted(CHIPS)}, "
                          "e.g. v5p:4x4x4, v6e:8x8 or h100:8 (GPUs per host)")
    shape = tuple(int(d) for d in match[2].split("x"))
    chip = CHIPS[match[1]]
    if len(shape) != chip.dims:
        raise ConfigError(f"topology {topology!r}: " + (f"{match[1]} chips form a {chip.dims}D torus"
                                                         if chip.platform == "tpu" else "give the GPUs per host"))
    return match[1], shape


def topology_devices(topology: str, slices: int = 1) -> list:
    """Compile-only devices of ``slices`` TPU slices (or GPU hosts) of ``topology``, one per chip. TPUs need
    libtpu; GPUs jax's CUDA plugin (no GPU, no CUDA driver)."""
    name, shape = parse_topology(topology)
    if CHIPS[name].platform == "gpu":
        if importlib.util.find_spec("jax_cuda12_plugin") is None:
            raise ConfigError(f"compiling for {topology} needs jax's CUDA plugin: pip install "
                              "'jax-cuda12-plugin==0.10.2' (no GPU needed)")
        desc = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET,
                                            topology=f"1x{slices}x{shape[0]}")
        return list(desc.devices)
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"compiling for {topology} needs libtpu: pip install 'jax[tpu]==0.10.2' (or the "
                          "llama_jax[tpu] extra)")
    # libtpu takes a machine-wide lock meant for real TPU chips; compile-only devices use none, so several
    # planners (or test processes) may run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        chip_config_name=CHIPS[name].chip_config, chips_per_host_bounds=(2, 2, 1),
                                        num_slices=slices)
    return list(desc.devices)


@dataclasses.dataclass(frozen=True)
class Report:
    """Per-device figures of one compiled train step."""

    argument_bytes: float  # train state shard + batch shard
    output_bytes: float
    alias_bytes: float  # outputs written in place of donated arguments (the new state)
    temp_bytes: float  # the compiler's peak of everything else (activations, gradients, collectives' buffers)
    flops: float  # cost_analysis: loop bodies counted once (see the module docstring)
    compile_seconds: float
    platform: str
    device_kind: str
    devices: int
    capacity_bytes: float | None  # the chip's HBM (TPU topologies); None when unknown
    pipeline_ticks: int | None  # trip count of the compiled pipeline loop (None without one)
    refused: bool  # the compiler refused: its temporaries exceed the chip (temp_bytes is what it said it needs)

    @property
    def total_bytes(self) -> float:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


def _capacity(device) -> float | None:
    kind = device.device_kind.lower()
    names = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5": "v5p", "tpu v6 lite": "v6e",
             "nvidia h100 80gb hbm3": "h100"}
    return CHIPS[names[kind]].hbm_bytes if kind in names else None


def _pipeline_ticks(hlo: str) -> int | None:
    """The trip count of the compiled pipeline loop (the forward one; the backward runs as many): the compiler's
    ``known_trip_count`` where it records one (XLA:CPU, XLA:GPU), else the bound its condition compares the
    counter with (TPU; a scan counts from 0 in steps of 1)."""
    computations = {block.split(" ", 1)[0].lstrip("%"): block for block in hlo.split("\n\n")}
    counts = []
    for line in re.findall(rf'[^\n]* while\([^\n]*op_name="[^"]*{pipeline.TICKS_SCOPE}/while"[^\n]*', hlo):
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        condition = re.search(r"condition=%?([\w.\-]+)", line)
        bound = re.search(r"s32\[\][^\n]* constant\((\d+)\)", computations.get(condition[1], "")) if condition else None
        if known or bound:
            counts.append(int((known or bound)[1]))
    return max(counts) if counts else None


def _stage(cfg: ModelConfig, stage: str, reference: bool, loss_chunk: int | None, base_dtype: str
           ) -> tuple[Stage, Experiment]:
    """``llama_jax.train``'s stage as ``build`` sets it up for ``cfg`` (with ``cfg.lora``: wrapped by
    ``train.adapters.with_adapters``, the base frozen and stored as ``base_dtype``), and the experiment config its
    loss reads."""
    adapters = cfg.lora or LoRA()
    exp = Experiment(stage=stage, model=cfg.replace(lora=None), init_from="(compiled, never read)",
                     loss=Loss(vocab_chunk=loss_chunk or 0),
                     lora=Adapters(rank=cfg.lora.rank if cfg.lora else 0, alpha=adapters.alpha,
                                   targets=adapters.targets, rslora=adapters.rslora,
                                   base="float" if base_dtype == "param" else base_dtype),
                     dpo=DPO(reference="model" if reference else "precomputed") if stage == "dpo" else None)
    chosen = build.STAGES[stage]
    if chosen.configure is not None:
        chosen = chosen.configure(exp)
    return (chosen if cfg.lora is None else with_adapters(chosen, cfg, exp)), exp


def _batch(stage: str, reference: bool, batch: int, seq: int, mesh) -> dict:
    """Abstract batch arrays of the training stage (DPO: ``batch`` pairs, each reply [batch, seq])."""
    token = jax.ShapeDtypeStruct((batch, seq), np.int32, sharding=sharding.batch_sharding(mesh))
    if stage != "dpo":
        return {k: token for k in BATCH_KEYS}
    reply = {k: token for k in dpo.ROW_KEYS}
    if not reference:  # precomputed: the reference's log-probs come with the data
        reply["reference_logps"] = jax.ShapeDtypeStruct((batch, seq), np.float32, sharding=token.sharding)
    return {"chosen": reply, "rejected": reply}


def compile_train_step(cfg: ModelConfig, mesh, seq: int, batch: int, *, grad_accum: int = 1, schedule: str = "none",
                       microbatches: int = 1, circular_repeats: int = 2, loss_chunk: int | None = 8192,
                       stage: str = "pretrain", reference: bool = True, base_dtype: str = "param") -> Report:
    """Lowers and compiles ``llama_jax.train``'s step of the named training stage (AdamW with clipping, the chunked
    loss, gradient accumulation over ``grad_accum`` passes, the pipeline schedule; with ``cfg.lora`` the adapters'
    step, the base in ``TrainState.frozen``; DPO on ``batch`` pairs, its reference a model or, without
    ``reference``, precomputed; ``base_dtype``: how an adapter run's base is stored) for ``mesh``'s devices with
    abstract inputs; nothing is allocated."""
    tx = optim.adamw(1e-4, clip_norm=1.0)
    run_layers = pipeline.make_run_layers(cfg, mesh, schedule=schedule, microbatches=microbatches,
                                          circular_repeats=circular_repeats)
    the_stage, exp = _stage(cfg, stage, reference, loss_chunk, base_dtype)
    loss_fn = the_stage.make_loss_fn(cfg, exp, run_layers)
    state = step.abstract_state(cfg, tx, mesh, the_stage)
    train_step = step.make_train_step(loss_fn, tx, mesh, jax.tree.map(lambda a: a.sharding, state),
                                      microbatch_tokens=batch * seq // grad_accum)
    if batch % (mesh.shape["data"] * mesh.shape["fsdp"]) or seq % mesh.shape["sequence"]:
        raise ConfigError(f"batch {batch} / seq {seq} do not divide over data x fsdp = "
                          f"{mesh.shape['data'] * mesh.shape['fsdp']}, sequence = {mesh.shape['sequence']}")
    batch_arrays = _batch(stage, reference, batch, seq, mesh)
    device = mesh.devices.flat[0]
    common = dict(compile_seconds=0.0, platform=device.platform, device_kind=device.device_kind,
                  devices=math.prod(mesh.devices.shape), capacity_bytes=_capacity(device))
    start = time.perf_counter()
    try:
        with sharding.activate(mesh):
            compiled = train_step.jitted.lower(state, batch_arrays).compile()
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program whose temporaries exceed the chip's HBM, and says how much it needs.
        needed = re.search(r"memory required for HLO temporaries \(([\d.]+)G\)", str(e))
        if needed is None:
            raise
        common["compile_seconds"] = time.perf_counter() - start
        arguments = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                        for x in jax.tree.leaves((state, batch_arrays)))
        return Report(argument_bytes=float(arguments), output_bytes=0.0, alias_bytes=0.0,
                      temp_bytes=float(needed[1]) * 2**30, flops=0.0, pipeline_ticks=None, refused=True, **common)
    common["compile_seconds"] = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}  # None from some backends
    return Report(argument_bytes=float(mem.argument_size_in_bytes), output_bytes=float(mem.output_size_in_bytes),
                  alias_bytes=float(mem.alias_size_in_bytes), temp_bytes=float(mem.temp_size_in_bytes),
                  flops=float(cost.get("flops", 0.0)), refused=False,
                  pipeline_ticks=_pipeline_ticks(compiled.as_text()) if schedule != "none" else None, **common)


def mesh_for(spec: str | Mapping[str, int], topology: str | None = None, slices: int = 1):
    """The mesh ``spec`` over a topology's compile-only devices, or over jax's own devices without one."""
    devices = topology_devices(topology, slices) if topology else jax.devices()
    return sharding.make_mesh(spec, devices)
