"""Will it fit, and how much work is it? Per-device memory and FLOPs for any preset on any mesh.

    python -m llama_jax.plan --model llama3.1-8b --mesh fsdp=8 --seq 4096 --batch 8            # analytic
    python -m llama_jax.plan --model llama3.1-8b --mesh fsdp=8 --seq 4096 --batch 8 --aot      # + XLA's figures
    python -m llama_jax.plan --config configs/pretrain/llama3_8b.py --config.mesh=fsdp=64     # the run you train
    python -m llama_jax.plan --table4                     # the Llama 3 paper's 405B layouts on H100 80 GB
    python -m llama_jax.plan --config configs/pretrain/llama3_8b_long_context.py [--aot]   # one row per stage
    python -m llama_jax.plan --model llama3.1-405b --inference --tensor 8 --weights fp8 --context 8192

Analytic training budget, per device (bytes), for the train step of ``llama_jax.train``:
  * params: each leaf's shard under LOGICAL_RULES (fsdp splits embed, tensor splits heads / mlp / vocab);
    with pipeline stages (analytic only; our mesh has no pipeline axis) a device holds L / pp layers and the
    larger of embedding and LM head;
  * gradients: one more copy of the params; AdamW state: two more (optax keeps moments in the param dtype);
  * activations: what the backward pass keeps (``_saved_per_token``) for the local tokens: rows / (data x
    fsdp) x length / sequence, for all layers (with pp stages, 1F1B keeps pp microbatches of L / pp
    layers in flight on the first stage: the same L layers' worth), plus one layer's full working set
    (recomputed or in flight) and the chunked loss.
AOT mode lowers and compiles that real train step with abstract inputs on a simulated CPU mesh and reports
XLA's ``memory_analysis`` (arguments + outputs - aliased + temporaries) and ``cost_analysis`` FLOPs; nothing
is allocated. Those figures come from XLA's CPU backend: fusion and buffer reuse differ on GPU / TPU. Above all,
XLA:CPU computes bfloat16 in float32 and keeps float32 copies of the stacked bf16 weights and of every saved
activation, so for bf16 models with remat="none" its figure runs ~1.5x a GPU's (1B, fsdp=4,tensor=2, seq 512:
5.9 GB vs 3.9 GB analytic; the same model in float32 agrees within 1%). Compare float32 configs like for like.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np

from llama_jax import cli, config, model, optim, sharding
from llama_jax.config import ModelConfig
from llama_jax.data.packing import BATCH_KEYS
from llama_jax.errors import ConfigError
from llama_jax.train import long_context, pretrain, step

GB = 1e9
H100_BYTES = 80e9  # H100 SXM HBM3 (the paper's GPUs); reported as "fits" against this

# The Llama 3 paper's Table 4 (405B, BF16, H100): TP x CP x PP x DP (DP is FSDP-style), seq, batch per DP rank.
TABLE4 = (
    dict(gpus=8192, tp=8, cp=1, pp=16, dp=64, seq=8192, batch_per_dp=32, tflops=430),
    dict(gpus=16384, tp=8, cp=1, pp=16, dp=128, seq=8192, batch_per_dp=16, tflops=400),
    dict(gpus=16384, tp=8, cp=16, pp=16, dp=8, seq=131072, batch_per_dp=16, tflops=380),
)


def _itemsize(dtype: str) -> int:
    return np.dtype(jax.numpy.dtype(dtype)).itemsize


@dataclasses.dataclass(frozen=True)
class TrainBudget:
    """Per-device bytes of one train step, and its FLOPs."""

    params: float
    grads: float
    opt_state: float
    activations: float
    model_flops_per_token: float  # 6 N + attention (cfg.flops_per_token): the MFU numerator
    step_flops: float  # model FLOPs of the whole step, all devices
    step_flops_per_device: float  # ... including remat recomputation, per device

    @property
    def total(self) -> float:
        return self.params + self.grads + self.opt_state + self.activations


def _local_fraction(spec, shape, sizes: dict[str, int]) -> float:
    """Elements of one shard / elements of the array, for a PartitionSpec of mesh axes."""
    local = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        local *= -(-dim // math.prod(sizes[a] for a in axes))
    return local / max(math.prod(shape), 1)


def param_bytes_per_device(cfg: ModelConfig, mesh: dict[str, int], pp: int = 1) -> float:
    """Bytes of the parameter shard a device holds (the most loaded pipeline stage when pp > 1)."""
    shapes, logical = model.param_shapes(cfg), model.logical_axes(cfg)
    layers, outer = 0.0, []
    for (path, shape), names in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(
            logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        spec = nn.logical_to_mesh_axes(tuple(names), sharding.LOGICAL_RULES)
        nbytes = math.prod(shape.shape) * shape.dtype.itemsize * _local_fraction(spec, shape.shape, mesh)
        if "layers" in jax.tree_util.keystr(path):
            layers += nbytes
        else:
            outer.append(nbytes)
    # One stage holds ceil(L / pp) layers; the first the embedding, the last the head and final norm.
    return layers * math.ceil(cfg.num_layers / pp) / cfg.num_layers + (sum(outer) if pp == 1 else max(outer))


def _saved_per_token(cfg: ModelConfig, mesh: dict[str, int], seq: int, remat: str,
                     attention: str = "dense") -> tuple[float, float]:
    """(bytes one layer keeps for backward per local token under ``remat``, bytes of one layer's backward
    working set per token). Mirrors model.Block: dense attention materialises [heads, keys] scores per query;
    their backward holds float32 scores, probabilities' and scores' gradients and the compute-dtype probs.
    ``attention="flash"`` models a fused kernel instead (a float32 logsumexp per head and query, tiles only)."""
    a = _itemsize(cfg.dtype)
    tp = mesh["tensor"]
    d, h = cfg.dim, cfg.resolved_head_dim
    n, k, f = cfg.num_heads / tp, cfg.num_kv_heads / tp, cfg.ffn_dim / tp
    norms = 2 * d * 4 + 2 * d * a  # float32 norm inputs and normed outputs, both norms
    qkv = (n + 2 * k) * h * a
    attention_out = n * h * a + d * a
    ffn = 3 * f * a + d * a  # gate, up, silu(gate) * up; down's output
    scores, score_grads = (n * seq * (4 + a), n * seq * 2 * 4) if attention == "dense" else (n * 4, 0.0)
    kept = norms + 2 * qkv + scores + attention_out + ffn  # q / k before and after rope
    working = kept + score_grads
    if remat == "none":
        return kept, working - kept
    carry = d * a  # the scanned block input
    if remat == "full":
        return carry, working
    dots = qkv + scores * 4 / (4 + a) + attention_out + 3 * f * a  # matmul outputs (dots_saveable)
    return carry + dots, working - dots


def _gathered_bytes(cfg: ModelConfig, mesh: dict[str, int]) -> float:
    """Transient copies: one layer's weights gathered over fsdp and its gradient before the reduce-scatter, plus
    an allowance of a tensor-split [V, D] table and gradient. The lookup and the chunked loss never gather the
    table whole; the allowance covers about what the AdamW update's temporaries and the non-finite guard's copies
    take on XLA:CPU, where the peak can come after the backward pass (they are not modelled one by one)."""
    a = _itemsize(cfg.param_dtype)
    layer = (cfg.num_params() - cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)) / cfg.num_layers
    return 2 * a * (cfg.vocab_size * cfg.dim + layer) / mesh["tensor"]


def train_budget(cfg: ModelConfig, mesh: str | dict[str, int], seq: int, batch: int, *, pp: int = 1,
                 remat: str | None = None, attention: str = "dense", microbatch_rows: int | None = None,
                 ) -> TrainBudget:
    """Analytic per-device budget of a train step on ``batch`` rows of ``seq`` tokens (see module docstring).

    ``microbatch_rows``: rows per DP rank in one forward/backward (default: all of them without pipelining,
    one with pp > 1). ``attention``: "dense" (this model) or "flash" (a fused kernel, as the paper used).
    """
    sizes = mesh if isinstance(mesh, dict) else sharding.parse_mesh(mesh, _mesh_product(mesh))
    remat = cfg.remat if remat is None else remat
    rows = sizes["data"] * sizes["fsdp"]
    if batch % rows or seq % sizes["sequence"]:
        raise ConfigError(f"batch {batch} / seq {seq} do not divide over data x fsdp = {rows}, "
                          f"sequence = {sizes['sequence']}")
    params = param_bytes_per_device(cfg, sizes, pp)
    # Local tokens of one microbatch: with pp stages, 1F1B keeps pp microbatches of L / pp layers in flight on
    # the first stage, as much as all L layers of one microbatch, so the formula is the same either way.
    if microbatch_rows is None:
        microbatch_rows = batch // rows if pp == 1 else 1
    if attention not in ("dense", "flash"):
        raise ConfigError(f"attention must be 'dense' or 'flash', got {attention!r}")
    tokens = microbatch_rows * seq // sizes["sequence"]
    saved, working = _saved_per_token(cfg, sizes, seq, remat, attention)
    loss = tokens * (cfg.dim * 4 + 3 * min(cfg.vocab_size, 8192) / sizes["tensor"] * 4)  # f32 hidden, logit chunk
    activations = tokens * (saved * cfg.num_layers + working) + loss + _gathered_bytes(cfg, sizes)
    devices = math.prod(sizes.values()) * pp
    per_token = cfg.flops_per_token(seq)
    recompute = {"none": 0.0, "full": 1 / 3, "dots": 0.0, "dots_no_batch": 0.0}[remat]  # one more forward
    step = per_token * batch * seq
    return TrainBudget(params=params, grads=params, opt_state=2 * params, activations=activations,
                       model_flops_per_token=per_token, step_flops=step,
                       step_flops_per_device=step * (1 + recompute) / devices)


def _mesh_product(spec: str) -> int:
    return math.prod(int(p.split("=")[1]) for p in spec.split(",") if p.strip() and p.split("=")[1].strip() != "-1")


@dataclasses.dataclass(frozen=True)
class InferenceBudget:
    weights: float
    kv_cache: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache


def inference_budget(cfg: ModelConfig, *, tensor: int, batch: int, context: int,
                     weights: str = "bf16") -> InferenceBudget:
    """Per-device bytes to serve ``cfg`` split ``tensor`` ways: weights (bf16, or the paper's FP8: SwiGLU
    kernels e4m3 with a float32 scale per output channel, first and last layers kept bf16) and a bf16 KV cache
    for ``batch`` sequences of ``context`` tokens."""
    if weights not in ("bf16", "fp8"):
        raise ConfigError(f"weights must be 'bf16' or 'fp8', got {weights!r}")
    d, f, layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    total = cfg.num_params() * 2.0
    if weights == "fp8":
        quantized = layers - 2
        # gate/up [D, F] -> F scales, down [F, D] -> D scales: 3 D F bytes instead of 6 D F, plus the scales.
        total -= quantized * (3 * d * f * (2 - 1) - (2 * f + d) * 4)
    kv_heads_per_device = max(cfg.num_kv_heads / tensor, 1)  # beyond K devices, kv heads are replicated
    kv = 2 * layers * batch * context * kv_heads_per_device * cfg.resolved_head_dim * 2
    return InferenceBudget(weights=total / tensor, kv_cache=kv)


# --- AOT: lower and compile the real train step on a simulated mesh ---------------------------------------


def aot_train_step(cfg: ModelConfig, mesh_spec: str, seq: int, batch: int) -> dict[str, float]:
    """Compiles ``llama_jax.train``'s step (AdamW, chunked next-token loss) with abstract inputs on the current
    devices (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=64); returns XLA's per-device figures."""
    mesh = sharding.make_mesh(mesh_spec)
    tx = optim.adamw(1e-4)
    train_step = step.make_train_step(pretrain.make_loss_fn(cfg), tx, mesh, step.state_shardings(cfg, tx, mesh))
    token = jax.ShapeDtypeStruct((batch, seq), np.int32, sharding=sharding.batch_sharding(mesh))
    abstract_state = step.abstract_state(cfg, tx, mesh)
    with sharding.activate(mesh):
        compiled = train_step.jitted.lower(abstract_state, {k: token for k in BATCH_KEYS}).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    return {"bytes_per_device": float(peak), "argument_bytes": float(mem.argument_size_in_bytes),
            "temp_bytes": float(mem.temp_size_in_bytes), "flops_per_device": float(cost.get("flops", 0.0)),
            "backend": jax.default_backend(), "devices": len(mesh.devices.flat)}


def long_context_rows(c, *, aot: bool = False) -> list[dict]:
    """One row per stage of experiment config ``c``'s ``long_context.stages``: the stage's mesh, a microbatch of its
    rows (rows / grad_accum) at its length, the analytic budget and with ``aot`` the compiled step's figures.
    Attention is modelled as the model runs it: the fused kernel for ``model.attention="flash"`` without context
    parallelism or with ``model.context_parallel="all_gather"``, dense blocks under the ring."""
    cfg = ModelConfig.from_dict(c.model.to_dict())
    plan = long_context.parse(c, cfg)
    devices = _mesh_product(c.mesh) if c.mesh and "-1" not in c.mesh else jax.device_count()
    rows, compiled_steps = [], {}
    for s in plan.stages:
        sizes = plan.mesh_sizes(s.index, devices)
        fused = sizes["sequence"] == 1 or cfg.context_parallel == "all_gather"
        attention = "flash" if cfg.attention == "flash" and fused else "dense"
        microbatch = s.rows // s.grad_accum
        b = train_budget(cfg, sizes, s.seq_len, microbatch, attention=attention)
        row = {"stage": s.index, "seq_len": s.seq_len, "steps": s.steps, "rows": s.rows, "grad_accum": s.grad_accum,
               "mesh": sizes, "attention": attention, "params_gb": b.params / GB,
               "grads_opt_gb": (b.grads + b.opt_state) / GB, "activations_gb": b.activations / GB,
               "total_gb": b.total / GB, "fits_80gb": b.total <= H100_BYTES}
        if aot:
            shape = (s.seq_len, microbatch, tuple(sizes.items()))
            if shape not in compiled_steps:  # stages of one shape (the annealing) share one compile
                cli.log(f"compiling stage {s.index}'s step ({microbatch} x {s.seq_len} tokens on {sizes}) ...")
                compiled_steps[shape] = aot_train_step(cfg, ",".join(f"{k}={v}" for k, v in sizes.items()),
                                                       s.seq_len, microbatch)
            compiled = compiled_steps[shape]
            row.update(aot_gb=compiled["bytes_per_device"] / GB, aot_argument_gb=compiled["argument_bytes"] / GB,
                       aot_devices=compiled["devices"], aot_backend=compiled["backend"])
        rows.append(row)
    return rows


def _print_long_context(rows: list[dict]) -> None:
    print("long-context stages: GB per device of one microbatch's step (analytic; 'compiled': XLA's figure)")
    print(" | ".join(("stage", "seq", "rows x accum", "mesh", "attention", "params GB", "grad+opt GB", "act GB",
                      "total GB", "fits 80 GB", "compiled GB")))
    for r in rows:
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
        print(" | ".join([str(r["stage"]), str(r["seq_len"]), f"{r['rows']} x {r['grad_accum']}", mesh,
                          r["attention"], f"{r['params_gb']:.1f}", f"{r['grads_opt_gb']:.1f}",
                          f"{r['activations_gb']:.1f}", f"{r['total_gb']:.1f}", "yes" if r["fits_80gb"] else "NO",
                          f"{r['aot_gb']:.1f}" if "aot_gb" in r else "-"]))


# --- Reports -------------------------------------------------------------------------------------------


def table4_rows(cfg: ModelConfig | None = None) -> list[dict]:
    """The paper's 405B layouts as our mesh (fsdp = DP, tensor = TP, sequence = CP) + analytic pipeline."""
    cfg = cfg or config.get("llama3.1-405b", remat="full")
    rows = []
    for row in TABLE4:
        mesh = {"data": 1, "fsdp": row["dp"], "tensor": row["tp"], "sequence": row["cp"]}
        b = train_budget(cfg, mesh, row["seq"], row["batch_per_dp"] * row["dp"], pp=row["pp"])
        flash = train_budget(cfg, mesh, row["seq"], row["batch_per_dp"] * row["dp"], pp=row["pp"], attention="flash")
        tokens = row["batch_per_dp"] * row["dp"] * row["seq"]
        rows.append({**row, "tokens_per_batch": tokens, "gb_per_device": b.total / GB,
                     "params_gb": b.params / GB, "opt_grads_gb": (b.grads + b.opt_state) / GB,
                     "activations_gb": b.activations / GB, "fits_80gb": b.total <= H100_BYTES,
                     "flash_gb_per_device": flash.total / GB, "flash_fits_80gb": flash.total <= H100_BYTES,
                     "step_flops": b.step_flops, "model_flops_per_token": b.model_flops_per_token,
                     "step_seconds_at_paper_tflops": b.step_flops / (row["gpus"] * row["tflops"] * 1e12)})
    return rows


def _print_table4(rows: list[dict]) -> None:
    print("Llama 3.1 405B, paper Table 4 layouts (bf16 params, AdamW, remat=full, 1-row microbatches), "
          "GB per device vs H100 80 GB; 'dense' = this model's attention, 'flash' = a fused kernel")
    head = ("GPUs", "TP", "CP", "PP", "DP", "seq", "tok/batch", "params GB", "grad+opt GB", "act GB (dense)",
            "total GB (dense)", "fits", "total GB (flash)", "fits", "step FLOPs", "FLOPs/token", "s/step @paper")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([f"{r['gpus']}", f"{r['tp']}", f"{r['cp']}", f"{r['pp']}", f"{r['dp']}", f"{r['seq']}",
                          f"{r['tokens_per_batch'] / 1e6:.1f}M", f"{r['params_gb']:.1f}", f"{r['opt_grads_gb']:.1f}",
                          f"{r['activations_gb']:.1f}", f"{r['gb_per_device']:.1f}",
                          "yes" if r["fits_80gb"] else "NO", f"{r['flash_gb_per_device']:.1f}",
                          "yes" if r["flash_fits_80gb"] else "NO", f"{r['step_flops']:.3e}",
                          f"{r['model_flops_per_token']:.3e}", f"{r['step_seconds_at_paper_tflops']:.1f}"]))


parser = cli.parser("python -m llama_jax.plan", __doc__.split("\n")[0], config=True)
parser.add_argument("--model", default="llama3.1-8b", help="preset name (llama_jax.config.PRESETS); with --config, "
                                                           "the config's model")
parser.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=4,tensor=8,sequence=1 (default: fsdp=8, or the "
                                                 "config's mesh)")
parser.add_argument("--pp", type=int, default=1, help="pipeline stages (analytic only)")
parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 8192, or the config's longest)")
parser.add_argument("--batch", type=int, default=None, help="global rows per forward/backward (default: one per DP "
                                                            "rank, or the config's batch / grad_accum)")
parser.add_argument("--remat", default=None, help="override the model's remat policy")
parser.add_argument("--attention", default="dense", choices=("dense", "flash"), help="attention memory model")
parser.add_argument("--aot", action="store_true", help="also compile the train step on a simulated CPU mesh")
parser.add_argument("--table4", action="store_true", help="the paper's 405B layouts")
parser.add_argument("--inference", action="store_true", help="serving memory instead of training")
parser.add_argument("--weights", default="bf16", choices=("bf16", "fp8"))
parser.add_argument("--tensor", type=int, default=8, help="inference: devices the weights are split over")
parser.add_argument("--context", type=int, default=8192, help="inference: KV cache length")
parser.add_argument("--json", action="store_true", help="print only the JSON result")


def _experiment(args: argparse.Namespace) -> tuple[ModelConfig, str, int, int | None]:
    """(model config, mesh spec, seq, rows per forward/backward) from the flags or the experiment config."""
    if args.config is None:
        cfg = config.get(args.model)
        return cfg, args.mesh or "fsdp=8", args.seq or 8192, args.batch
    c = args.config
    cfg = ModelConfig.from_dict(c.model.to_dict())
    ramp = optim.parse_ramp(list(c.schedule.ramp), int(c.data.seq_len))
    seq = args.seq or max(stage.seq_len for stage in ramp)
    rows = int(c.data.batch_size) * int(c.data.seq_len) // seq // int(c.optimizer.grad_accum)
    return cfg, args.mesh or c.mesh or "fsdp=-1", seq, args.batch or rows


def run(args: argparse.Namespace) -> dict | list:
    if args.table4:
        rows = table4_rows()
        if not args.json:
            _print_table4(rows)
        return {"table4": rows}
    if args.config is not None and list(args.config.long_context.stages) and not args.inference and not args.seq:
        rows = long_context_rows(args.config, aot=args.aot)
        if not args.json:
            _print_long_context(rows)
        return {"long_context_stages": rows}
    cfg, mesh_spec, seq, batch = _experiment(args)
    if args.remat:
        cfg = cfg.replace(remat=args.remat)
    if args.inference:
        bf16 = inference_budget(cfg, tensor=args.tensor, batch=args.batch or 1, context=args.context)
        chosen = inference_budget(cfg, tensor=args.tensor, batch=args.batch or 1, context=args.context,
                                  weights=args.weights)
        result = {"model": args.model, "weights": args.weights, "tensor": args.tensor,
                  "weights_gb_per_device": chosen.weights / GB, "kv_gb_per_device": chosen.kv_cache / GB,
                  "total_gb_per_device": chosen.total / GB, "fits_80gb": chosen.total <= H100_BYTES,
                  "bf16_total_gb_per_device": bf16.total / GB}
    else:
        devices = _mesh_product(mesh_spec) if "-1" not in mesh_spec else None
        sizes = sharding.parse_mesh(mesh_spec, devices or jax.device_count())
        batch = batch or sizes["data"] * sizes["fsdp"]
        b = train_budget(cfg, sizes, seq, batch, pp=args.pp, attention=args.attention)
        result = {"model": args.model if args.config is None else args.config.model.to_dict(), "mesh": sizes,
                  "pp": args.pp, "seq": seq, "batch": batch, "remat": cfg.remat, "params_gb": b.params / GB,
                  "grads_gb": b.grads / GB, "opt_state_gb": b.opt_state / GB, "activations_gb": b.activations / GB,
                  "total_gb": b.total / GB, "fits_80gb": b.total <= H100_BYTES,
                  "model_flops_per_token": b.model_flops_per_token, "step_flops": b.step_flops,
                  "step_flops_per_device": b.step_flops_per_device}
        if args.aot:
            if args.pp != 1:
                raise ConfigError("--aot compiles the real step, which has no pipeline axis: use --pp 1")
            aot = aot_train_step(cfg, ",".join(f"{k}={v}" for k, v in sizes.items()), seq, batch)
            result.update({f"aot_{k.replace('bytes', 'gb')}": v / GB if "bytes" in k else v for k, v in aot.items()})
    if not args.json:
        print("\n".join(f"{k}: {v}" for k, v in result.items()))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


def _simulated_devices(argv: list[str]) -> int | None:
    """Devices --aot needs simulated on the CPU: the --mesh (or --config.mesh) flag's product (XLA reads the flag at
    backend start)."""
    for i, arg in enumerate(argv):
        spec = (arg.split("=", 1)[1] if arg.startswith(("--mesh=", "--config.mesh=")) else argv[i + 1]
                if arg in ("--mesh", "--config.mesh") else None)
        if spec and "-1" not in spec:
            return _mesh_product(spec)
    return None


if __name__ == "__main__":
    count = _simulated_devices(sys.argv) if "--aot" in sys.argv else None
    if count and "device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    raise SystemExit(main())
