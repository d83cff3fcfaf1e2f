"""Will it fit, and how much work is it? Per-device memory and FLOPs of a train step on any mesh, analytic and
compiled for the real chips.

    python -m llama_jax.plan --model llama3.1-8b --mesh fsdp=64 --seq 8192 --batch 64            # analytic
    python -m llama_jax.plan --model llama3.1-8b --mesh fsdp=64 --seq 8192 --batch 64 --aot --topology v5p:4x4x4
    python -m llama_jax.plan --config configs/pretrain/llama3_8b.py --aot --topology v5p:8x8x8   # the run you train
    python -m llama_jax.plan --table4 --aot --topology v5p:16x16x16   # the paper's 405B layouts, compiled for v5p
    python -m llama_jax.plan --config configs/pretrain/llama3_8b_long_context.py [--aot]   # one row per phase
    python -m llama_jax.plan --model llama3.1-405b --inference --tensor 8 --weight-dtype fp8 --context 8192

The analytic figure is ``llama_jax.plan.memory``'s term by term (the JSON result names every one). ``--aot`` lowers
and compiles the real train step (``llama_jax.plan.aot``) and adds the compiler's own per-device figures: with
``--topology`` for that TPU slice (``--slices`` for multi-slice) through libtpu's compile-only devices, without one
for simulated CPU devices (one per mesh position); ``--topology h100:8 --slices 8`` compiles for 64 H100s the same
way (jax's CUDA plugin, no GPU). Pipelines: a ``pipeline`` axis in ``--mesh`` and ``--pipeline
gpipe|circular --microbatches M [--repeats R]``; the compiled report gives the pipeline loop's trip count and
the bubble it implies, and its per-device memory is every pipeline rank's (one SPMD program).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import jax

from llama_jax import cli, config, experiment, sharding
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.plan import aot, memory
from llama_jax.train import build, phases

GB = 1e9
H100_BYTES = 80e9  # H100 SXM HBM3 (the paper's GPUs)

# The Llama 3 paper's Table 4 (405B, BF16, H100): TP x CP x PP x DP (DP is FSDP-style), seq, batch per DP rank.
# Our schedule for each (the paper's is interleaved 1F1B, which llama_jax does not have): circular with 8 rounds of
# one layer per pipeline rank, 16 one-row microbatches per pass and gradient accumulation over the rest of the batch.
TABLE4 = (
    dict(gpus=8192, tp=8, cp=1, pp=16, dp=64, seq=8192, batch_per_dp=32, tflops=430, grad_accum=2),
    dict(gpus=16384, tp=8, cp=1, pp=16, dp=128, seq=8192, batch_per_dp=16, tflops=400, grad_accum=1),
    dict(gpus=16384, tp=8, cp=16, pp=16, dp=8, seq=131072, batch_per_dp=16, tflops=380, grad_accum=1),
)
TABLE4_PIPELINE = dict(schedule="circular", microbatches=16, circular_repeats=8)
# 126 layers do not split over 16 pipeline ranks (the paper gives the first and last rank one layer less, which one
# stacked `layers` axis cannot express), so the compiled rows use 128: 1.6% more parameters, said in the table.
TABLE4_LAYERS = 128
# What the compiler's FLOPs figure is not (printed next to it, and in --json).
FLOPS_CAVEAT = ("cost_analysis counts each loop body once (the scanned layers, the loss's vocabulary chunks, the "
                "pipeline's ticks), so it is far below the step's work: model FLOPs come from "
                "ModelConfig.flops_per_token")


def plan_train(cfg: ModelConfig, mesh_spec: str, seq: int, batch: int, *, backend: str, attention: str = "dense",
               grad_accum: int = 1, pipeline: dict | None = None, loss_chunk: int | None = 8192,
               compile_on: tuple[str | None, int] | None = None, stage: str = "pretrain", reference: bool = True,
               base_dtype: str = "param") -> dict:
    """The analytic budget (and with ``compile_on=(topology, slices)`` the compiled step's figures) as one dict
    of GB and counts. The training stage, reference, base_dtype and cfg.lora: as ``memory.train_budget`` takes them."""
    pipeline = pipeline or dict(schedule="none", microbatches=1, circular_repeats=2)
    sizes = sharding.parse_mesh(mesh_spec, memory.mesh_device_count(mesh_spec))
    b = memory.train_budget(cfg, sizes, seq, batch, backend=backend, attention=attention, grad_accum=grad_accum,
                            loss_chunk=loss_chunk, stage=stage, reference=reference, base_dtype=base_dtype, **pipeline)
    lora = cfg.lora and {"rank": cfg.lora.rank, "targets": list(cfg.lora.targets), "base_dtype": base_dtype}
    result = {"stage": stage, "mesh": sizes, "seq": seq, "batch": batch, "grad_accum": grad_accum, "remat": cfg.remat,
              "pipeline": pipeline, "lora": lora, "backend": backend, "analytic_gb": b.total / GB,
              "terms_gb": {k: v / GB for k, v in b.terms.items()}, "pipeline_ticks": b.pipeline_ticks,
              "bubble": b.bubble, "model_flops_per_token": b.model_flops_per_token, "step_flops": b.step_flops,
              "step_flops_per_device": b.step_flops_per_device}
    if compile_on is not None:
        topology, slices = compile_on
        mesh = aot.mesh_for(mesh_spec, topology, slices)
        cli.log(f"compiling the train step for {topology or 'the local devices'} ({mesh.devices.size} devices)")
        report = aot.compile_train_step(cfg, mesh, seq, batch, grad_accum=grad_accum, loss_chunk=loss_chunk,
                                        stage=stage, reference=reference, base_dtype=base_dtype, **pipeline)
        capacity = report.capacity_bytes
        result["compiled"] = {
            "device_kind": report.device_kind, "devices": report.devices, "total_gb": report.total_bytes / GB,
            "argument_gb": report.argument_bytes / GB, "temp_gb": report.temp_bytes / GB,
            "capacity_gb": None if capacity is None else capacity / GB,
            "fits": None if capacity is None else report.total_bytes <= capacity,
            "compile_seconds": report.compile_seconds, "pipeline_ticks": report.pipeline_ticks,
            "refused_by_compiler": report.refused,
            "bubble": None if report.pipeline_ticks is None else (sizes["pipeline"] - 1) / report.pipeline_ticks,
            "flops_loop_bodies_once": report.flops, "flops_caveat": FLOPS_CAVEAT,
        }
        result["analytic_over_compiled"] = b.total / report.total_bytes
    return result


# --- Table 4 ----------------------------------------------------------------------------------------------


def long_context_rows(args: argparse.Namespace, c) -> list[dict]:
    """One plan per phase of experiment config ``c``'s ``long_context.phases`` (``plan_train``: analytic, and with
    ``--aot`` compiled): the phase's length, rows, gradient accumulation and mesh (``sequence`` = its CP degree).
    Attention is modelled as the model runs it: the fused kernel for ``model.attention="flash"`` without context
    parallelism or with ``model.context_parallel="all_gather"``, dense blocks under the ring."""
    cfg = ModelConfig.from_dict(c.model.to_dict())
    if args.remat:
        cfg = cfg.replace(remat=args.remat)
    mesh_spec = args.mesh or c.mesh or "fsdp=-1"
    _, extension = build.plan_phases(experiment.from_config(c), cfg,
                                     base_mesh=sharding.parse_mesh(mesh_spec, _devices(args, mesh_spec)))
    backend = args.backend or (_backend_of(args.topology) if args.topology
                               else jax.default_backend() if args.aot else "gpu")
    chunk = int(c.loss.vocab_chunk) or None
    rows, compiled = [], {}
    for s in extension.phases:  # numbered as the run numbers them (after the base run's phases)
        sizes = s.mesh
        spec = ",".join(f"{k}={v}" for k, v in sizes.items())
        fused = sizes["sequence"] == 1 or cfg.context_parallel == "all_gather"
        attention = "flash" if cfg.attention == "flash" and fused else "dense"
        key = (s.seq_len, s.rows, s.grad_accum, spec)
        if key not in compiled:  # phases of one shape (the annealing) share one plan and compile
            if args.aot:
                cli.log(f"phase {s.index}: {s.rows} x {s.seq_len} tokens in {s.grad_accum} pass(es) on {spec}")
            compiled[key] = plan_train(cfg, spec, s.seq_len, s.rows, backend=backend, attention=attention,
                                       grad_accum=s.grad_accum, pipeline=dict(c.pipeline), loss_chunk=chunk,
                                       compile_on=(args.topology, args.slices) if args.aot else None)
        planned = compiled[key]
        rows.append({"phase": s.index, "seq_len": s.seq_len, "steps": s.end_step - s.start_step, "rows": s.rows,
                     "attention": attention,
                     **planned, "fits_80gb": planned["analytic_gb"] * GB <= H100_BYTES})
    return rows


def _print_long_context(rows: list[dict]) -> None:
    compiled = "compiled" in rows[0]
    print(f"long-context phases, per device ({rows[0]['backend']} profile; 'compiled': the compiler's figure)")
    head = ["phase", "seq", "rows", "accum", "mesh", "attention", "params", "saved act.", "analytic", "fits 80 GB"]
    table = [head + (["compiled"] if compiled else [])]
    for r in rows:
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
        cells = [str(r["phase"]), f"{r['seq_len']:,}", str(r["rows"]), str(r["grad_accum"]), mesh, r["attention"],
                 _gb(r["terms_gb"]["params"]), _gb(r["terms_gb"]["saved_activations"]), _gb(r["analytic_gb"]),
                 "yes" if r["fits_80gb"] else "NO"]
        table.append(cells + ([_gb(r["compiled"]["total_gb"])] if compiled else []))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


def table4_rows(topology: str | None = None) -> list[dict]:
    """The paper's 405B layouts as our mesh (fsdp = DP, tensor = TP, sequence = CP, pipeline = PP), for the 128-layer
    stand-in: the analytic budget and, with ``topology`` (one TPU slice, repeated to the paper's chip count), the
    compiled step."""
    cfg = config.get("llama3.1-405b", remat="full", num_layers=TABLE4_LAYERS)
    chips = None if topology is None else math.prod(aot.parse_topology(topology)[1])
    backend = "gpu" if topology is None else _backend_of(topology)  # the paper's chips are H100s
    rows = []
    for row in TABLE4:
        spec = f"pipeline={row['pp']},fsdp={row['dp']},tensor={row['tp']},sequence={row['cp']}"
        batch = row["batch_per_dp"] * row["dp"]
        if chips is not None and row["gpus"] % chips:
            raise ConfigError(f"{row['gpus']} chips are not a whole number of {topology} slices")
        compile_on = None if chips is None else (topology, row["gpus"] // chips)
        planned = plan_train(cfg, spec, row["seq"], batch, backend=backend, grad_accum=row["grad_accum"],
                             pipeline=TABLE4_PIPELINE, compile_on=compile_on)
        flash = memory.train_budget(cfg, spec, row["seq"], batch, backend=backend, attention="flash",
                                    grad_accum=row["grad_accum"], **TABLE4_PIPELINE)
        rows.append({**row, "num_layers": TABLE4_LAYERS, "tokens_per_batch": batch * row["seq"], **planned,
                     "fits_80gb": planned["analytic_gb"] * GB <= H100_BYTES, "flash_gb": flash.total / GB})
    return rows


def _backend_of(topology: str) -> str:
    return aot.CHIPS[aot.parse_topology(topology)[0]].platform


def _print_table4(rows: list[dict]) -> None:
    compiled = "compiled" in rows[0]
    chip, capacity = ((rows[0]["compiled"]["device_kind"], rows[0]["compiled"]["capacity_gb"]) if compiled
                      else ("H100", H100_BYTES / GB))
    print(f"Llama 3.1 405B ({TABLE4_LAYERS}-layer stand-in), the paper's Table 4 layouts, per device: bf16, AdamW, "
          "remat full, dense attention, circular pipeline 8 rounds x 16 microbatches, gradient accumulation to 16M "
          f"tokens; analytic with the {rows[0]['backend']} profile, fits = within {chip}'s {capacity:.0f} GB")
    head = ["GPUs", "TP", "CP", "PP", "DP", "seq", "accum", "analytic", "fits", "with a flash kernel"]
    if compiled:
        head += [f"compiled for {chip}", "analytic/compiled", "fits", "compile", "bubble"]
    table = [head]
    for r in rows:
        cells = [f"{r[k]:,}" for k in ("gpus", "tp", "cp", "pp", "dp", "seq", "grad_accum")]
        cells += [_gb(r["analytic_gb"]), "yes" if r["analytic_gb"] <= capacity else "NO", _gb(r["flash_gb"])]
        if compiled:
            c = r["compiled"]
            cells += [_gb(c["total_gb"]) + (" (refused)" if c["refused_by_compiler"] else ""),
                      f"{r['analytic_over_compiled']:.2f}", "yes" if c["fits"] else "NO",
                      f"{c['compile_seconds']:.0f} s", "-" if c["bubble"] is None else f"{c['bubble']:.1%}"]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


# --- Command line -----------------------------------------------------------------------------------------


parser = cli.parser("python -m llama_jax.plan", __doc__, config=True)
parser.add_argument("--model", default="llama3.1-8b", help="preset name (llama_jax.config.PRESETS); with --config, "
                                                           "the config's model")
cli.add_mesh(parser)  # default: fsdp=8 without --config, else the config's mesh
parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 8192, or the config's longest)")
parser.add_argument("--batch", type=int, default=None, help="global rows per step (default: one per DP rank, or the "
                                                            "config's)")
parser.add_argument("--grad-accum", type=int, default=None, help="forward/backward passes per step")
parser.add_argument("--remat", default=None, help="override the model's remat policy")
parser.add_argument("--pipeline", default=None, choices=("none", "gpipe", "circular"),
                    help="schedule for the mesh's pipeline axis (default: the config's, else none)")
parser.add_argument("--microbatches", type=int, default=None, help="pipeline microbatches per pass")
parser.add_argument("--repeats", type=int, default=None, help="circular: rounds of the pipeline ring")
parser.add_argument("--attention", default="dense", choices=("dense", "flash"),
                    help="analytic attention memory: this model's dense scores, or a fused kernel's for comparison")
parser.add_argument("--backend", default=None, choices=sorted(memory.BACKENDS),
                    help="compiler the analytic model assumes (default: the --topology's or --aot's, else gpu)")
parser.add_argument("--aot", action="store_true", help="also compile the real train step (nothing runs)")
parser.add_argument("--topology", default=None,
                    help="compile for this TPU slice, e.g. v5p:4x4x4, v4:4x4x8, v5e:16x16, v6e:8x8 (needs libtpu: "
                         "pip install '.[tpu]'), or H100 hosts of N GPUs, h100:8 (needs jax-cuda12-plugin)")
parser.add_argument("--slices", type=int, default=1, help="TPU slices (or GPU hosts) joined over the data-center "
                                                          "network")
parser.add_argument("--table4", action="store_true", help="the paper's 405B layouts")
parser.add_argument("--inference", action="store_true", help="serving memory instead of training")
parser.add_argument("--weight-dtype", default="bf16", choices=memory.WEIGHT_DTYPES,
                    help="inference: bf16, or the paper's fp8 SwiGLU kernels")
parser.add_argument("--tensor", type=int, default=8, help="inference: devices the weights are split over")
parser.add_argument("--context", type=int, default=8192, help="inference: KV cache length")
parser.add_argument("--stage", default="pretrain", choices=memory.STAGES,
                    help="which stage's step (dpo: --batch counts preference pairs, and a reference model is kept); "
                         "with --config, the config's (a reward stage is priced as pretrain)")
parser.add_argument("--lora-rank", type=int, default=0, metavar="R",
                    help="low-rank adapters of rank R over a frozen base (0: every parameter trains); with --config, "
                         "--config.lora.rank")
parser.add_argument("--lora-targets", default=",".join(config.LORA_TARGETS), metavar="NAMES",
                    help="comma-separated projections the adapters adapt; with --config, --config.lora.targets")
parser.add_argument("--base-dtype", default="param", choices=memory.BASE_DTYPES,
                    help="how an adapter run's frozen base is stored: param (its param_dtype), nf4 (QLoRA: 4.127 bits "
                         "a parameter) or int8 (per output channel); analytic only when quantized")
parser.add_argument("--json", action="store_true", help="print only the JSON result (no table above it)")
cli.deprecate(parser, renamed={"--weights": "--weight-dtype"})


def _experiment(args: argparse.Namespace) -> tuple[ModelConfig, str, int, int | None, int, dict, int | None, str,
                                                 bool]:
    """(model config with its adapters, mesh spec, seq, rows per step, grad_accum, pipeline, loss chunk, stage,
    whether DPO keeps a reference model) from the flags or the config file."""
    if args.config is None:
        cfg, mesh, seq, rows, accum = config.get(args.model), args.mesh or "fsdp=8", args.seq or 8192, args.batch, 1
        pipe, chunk = dict(schedule="none", microbatches=1, circular_repeats=2), 8192
        stage, reference = args.stage, True
        if args.lora_rank:
            cfg = cfg.replace(lora=config.LoRA(rank=args.lora_rank, targets=tuple(args.lora_targets.split(","))))
    else:
        c, typed = args.config, experiment.from_config(args.config)
        for flag, default, key in (("lora_rank", 0, "lora.rank"), ("lora_targets", ",".join(config.LORA_TARGETS),
                                                                    "lora.targets"), ("stage", "pretrain", "stage")):
            if getattr(args, flag) != default:
                raise ConfigError(f"--{flag.replace('_', '-')} is the flag without --config; with it, set "
                                  f"--config.{key}")
        cfg = typed.model.replace(lora=typed.lora.spec())
        stage = typed.stage if typed.stage in memory.STAGES else "pretrain"  # reward: priced as pretraining's
        reference = typed.stage != "dpo" or typed.dpo.reference == "model"
        ramp = phases.parse_ramp(list(c.schedule.ramp), int(c.data.seq_len))
        seq = args.seq or max(point.seq_len for point in ramp)
        rows = args.batch or int(c.data.batch_size) * int(c.data.seq_len) // seq
        mesh, accum, pipe = args.mesh or c.mesh or "fsdp=-1", int(c.optimizer.grad_accum), dict(c.pipeline)
        chunk = int(c.loss.vocab_chunk) or None
    if args.grad_accum:
        accum = args.grad_accum
    for flag, key in (("pipeline", "schedule"), ("microbatches", "microbatches"), ("repeats", "circular_repeats")):
        if getattr(args, flag) is not None:
            pipe[key] = getattr(args, flag)
    return cfg, mesh, seq, rows, accum, pipe, chunk, stage, reference


def _devices(args: argparse.Namespace, mesh_spec: str) -> int:
    if args.topology:
        return math.prod(aot.parse_topology(args.topology)[1]) * args.slices
    return memory.mesh_device_count(mesh_spec) if "-1" not in mesh_spec else jax.device_count()


def run(args: argparse.Namespace) -> dict:
    if args.topology:
        aot.parse_topology(args.topology)
    if args.table4:
        rows = table4_rows(args.topology if args.aot else None)
        if not args.json:
            _print_table4(rows)
        return {"table4": rows}
    if args.config is not None and list(args.config.long_context.phases) and not args.inference and not args.seq:
        rows = long_context_rows(args, args.config)
        if not args.json:
            _print_long_context(rows)
        return {"long_context_phases": rows}
    cfg, mesh_spec, seq, batch, accum, pipe, chunk, stage, reference = _experiment(args)
    if args.remat:
        cfg = cfg.replace(remat=args.remat)
    if args.inference:
        bf16 = memory.inference_budget(cfg, tensor=args.tensor, batch=args.batch or 1, context=args.context)
        chosen = memory.inference_budget(cfg, tensor=args.tensor, batch=args.batch or 1, context=args.context,
                                         weight_dtype=args.weight_dtype)
        result = {"model": args.model, "weight_dtype": args.weight_dtype, "tensor": args.tensor,
                  "weights_gb_per_device": chosen.weights / GB, "kv_gb_per_device": chosen.kv_cache / GB,
                  "total_gb_per_device": chosen.total / GB, "fits_80gb": chosen.total <= H100_BYTES,
                  "bf16_total_gb_per_device": bf16.total / GB}
    else:
        sizes = sharding.parse_mesh(mesh_spec, _devices(args, mesh_spec))
        spec = ",".join(f"{k}={v}" for k, v in sizes.items())
        batch = batch or sizes["data"] * sizes["fsdp"] * accum
        backend = args.backend or (_backend_of(args.topology) if args.topology
                                   else jax.default_backend() if args.aot else "gpu")
        result = {"model": args.model if args.config is None else cfg.to_dict(),
                  **plan_train(cfg, spec, seq, batch, backend=backend, attention=args.attention, grad_accum=accum,
                               pipeline=pipe, loss_chunk=chunk, stage=stage, reference=reference,
                               base_dtype=args.base_dtype,
                               compile_on=(args.topology, args.slices) if args.aot else None)}
        result["fits_80gb"] = result["analytic_gb"] * GB <= H100_BYTES
    if not args.json:
        print("\n".join(_inference_lines(result) if args.inference else _train_lines(result)))
    return result


def _gb(value: float) -> str:
    return f"{value:,.1f} GB"


def _fits(total_gb: float, capacity_gb: float, chip: str) -> str:
    return ("fits" if total_gb <= capacity_gb else "does NOT fit") + f" in {chip}'s {capacity_gb:,.0f} GB"


def _train_lines(r: dict) -> list[str]:
    """The plan as a person reads it: the layout, each term, the totals against the chip, FLOPs with caveats."""
    mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "one device"
    pipe = r["pipeline"]
    rows = "pairs" if r["stage"] == "dpo" else "rows"
    lines = [f"train step: seq {r['seq']:,} x {r['batch']:,} {rows} ({r['grad_accum']} pass(es)), remat "
             f"{r['remat']}, mesh {mesh}" + ("" if pipe["schedule"] == "none" else
                                             f", {pipe['schedule']} pipeline x {pipe['microbatches']} microbatches"
                                             f" (bubble {r['bubble']:.1%})")
             + ("" if r["stage"] == "pretrain" else f", {r['stage']} stage")]
    if r["lora"]:
        lines.append(f"adapters: rank {r['lora']['rank']} on {', '.join(r['lora']['targets'])}; the base frozen at "
                     + {"param": "its param_dtype", "nf4": "NF4 (QLoRA)", "int8": "int8"}[r["lora"]["base_dtype"]]
                     + ("; DPO's reference is that base, the adapters off" if r["stage"] == "dpo" else ""))
    compiled = r.get("compiled")
    lines.append(f"per device, analytic ({r['backend']} profile):")
    lines += [f"  {name:<20} {_gb(gb):>12}" for name, gb in r["terms_gb"].items() if gb > 0]
    chip, capacity = ((compiled["device_kind"], compiled["capacity_gb"]) if compiled and compiled["capacity_gb"]
                      else ("an H100", H100_BYTES / GB))
    lines.append(f"  {'total':<20} {_gb(r['analytic_gb']):>12}  {_fits(r['analytic_gb'], capacity, chip)}")
    if r["remat"] == "none" and r["analytic_gb"] > capacity:
        lines.append("  remat 'none' keeps every layer's activations; the paper's layouts use --remat full")
    if compiled:
        where = f"{compiled['devices']:,} x {compiled['device_kind']}"
        lines.append(f"compiled for {where} in {compiled['compile_seconds']:.0f} s"
                     + (" (refused by the compiler: it needs more than the chip has)"
                        if compiled["refused_by_compiler"] else "") + ":")
        lines.append(f"  arguments {_gb(compiled['argument_gb'])}, temporaries {_gb(compiled['temp_gb'])}, total "
                     f"{_gb(compiled['total_gb'])}"
                     + (f"  {_fits(compiled['total_gb'], capacity, chip)}" if compiled["capacity_gb"] else ""))
        lines.append(f"  analytic / compiled = {r['analytic_over_compiled']:.2f}")
        if compiled["bubble"] is not None:
            lines.append(f"  pipeline loop: {compiled['pipeline_ticks']} ticks, bubble {compiled['bubble']:.1%}")
        lines.append(f"  compiled FLOPs per device: {compiled['flops_loop_bodies_once']:.3g} (caveat: "
                     f"{FLOPS_CAVEAT})")
    lines.append(f"model FLOPs: {r['model_flops_per_token']:.3g} per token, {r['step_flops_per_device']:.3g} per "
                 "device per step (remat recomputation included)")
    return lines


def _inference_lines(r: dict) -> list[str]:
    return [f"{r['model']} inference, {r['weight_dtype']} weights over {r['tensor']} devices, per device: weights "
            f"{_gb(r['weights_gb_per_device'])} + KV cache {_gb(r['kv_gb_per_device'])} = "
            f"{_gb(r['total_gb_per_device'])}, {_fits(r['total_gb_per_device'], H100_BYTES / GB, 'an H100')} "
            f"(bf16 weights: {_gb(r['bf16_total_gb_per_device'])})"]


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)

