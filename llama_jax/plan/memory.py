"""The analytic memory model of a train step (and of serving): per-device bytes from shapes alone, term by term.

    b = memory.train_budget(config.get("llama3.1-8b", remat="full"), "fsdp=64", seq=8192, batch=64, backend="tpu")
    b.total, b.terms          # {"params": ..., "opt_state": ..., "grads": ..., "saved_activations": ..., ...}
    memory.inference_budget(config.get("llama3.1-405b"), tensor=8, batch=1, context=8192, weight_dtype="fp8")

It models ``llama_jax.train``'s step (AdamW, the chunked loss, dense attention, the pipeline schedules; DPO's pairs
and reference; low-rank adapters) on the mesh's shards. Every term is what that step holds at its peak, per device:
  * ``params``: each trained leaf's shard under the rules table (``pipeline`` splits the layers; embedding and LM
    head are on every pipeline rank); ``opt_state``: AdamW's two moments (param dtype); ``grads``: one more copy of
    the params, and with gradient accumulation their float32 running sum (``grad_accumulator``);
  * ``frozen``: what the step reads but never trains (``TrainState.frozen``): DPO's reference copy, or with
    adapters (``cfg.lora``: then ``params`` are the adapters alone) the base at its storage width (param_dtype,
    QLoRA's NF4 or int8: ``BASE_DTYPES``), which is also DPO's reference (the adapters off: no second copy);
  * ``saved_activations``: what the backward pass keeps of each layer's forward (all of a block's intermediates
    with remat "none", its input with "full"), for every local layer and every microbatch in flight (a pipeline
    keeps them for all its ticks, bubble included);
  * ``layer_backward``: one layer's backward (with remat, its forward recomputed first) or ``loss_backward``:
    the chunked loss's logits and their gradient, whichever is larger: they do not overlap;
  * ``gathered_weights``: a layer's weights gathered over fsdp and its gradient before the reduce-scatter;
  * ``pipeline_buffers``: the microbatches' inputs / outputs that pipeline rank 0 keeps, and the embedding's output;
  * ``table_copies``: copies of the embedding / LM head shards some backends hold at the peak;
  * ``stack_copy``, ``compiler_overhead``: the backend's arena beyond the live buffers (``Backend``).

Backends differ in which attention intermediates they materialise (``Backend``); each profile's numbers come
from that compiler's own buffer assignment (``XLA_FLAGS=--xla_dump_to``) of this step, and tests/parallel/test_plan.py
checks the model against compiled steps (XLA:CPU always, TPU topologies when libtpu is installed).
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import numpy as np

from llama_jax import lora, model, sharding
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.parallel import pipeline


@dataclasses.dataclass(frozen=True)
class Backend:
    """Which of a block's intermediates a compiler keeps, as counts of buffers per local token: scores in bytes per
    [query, key] pair, SwiGLU buffers in [mlp] vectors of the compute dtype, model-dim buffers in bytes per
    element of [embed]. "saved": kept from the forward for the backward with remat "none"; "backward": alive
    while one layer runs backward beyond those (with remat "full": everything its recomputed forward needs)."""

    score_saved: float
    score_backward: float
    ring_score_saved: float  # score_saved of ring attention (context parallelism), all its blocks
    ffn_saved: float
    ffn_backward: float
    ffn_rematted: float
    embed_saved: float
    embed_backward: float
    embed_rematted: float
    float32_activations: bool  # keeps bfloat16 activations as float32 (XLA:CPU computes bfloat16 in float32)
    table_copies: float  # copies of the embedding and LM head shards alive at the peak (update temporaries)
    stack_copy: float  # share of the saved activations the arena holds again (the scans' stacked outputs)
    overhead: float  # arena size / modelled live bytes (alignment, packing)


BACKENDS = {
    # XLA:CPU (jax 0.10.2), from its buffer assignment of the tiny model's step: per layer two float32 score
    # buffers (masked scores, probabilities) kept and two float32 gradients in the backward; ring attention's
    # online softmax keeps ~15 bytes per pair (scores, exponentials and mask of every block); SwiGLU's gate, up,
    # silu's three intermediates and their product; the block input, the post-attention sum and both norms'
    # float32 input and output. A rematerialised layer holds all of them again plus the gradients. Half a copy of
    # the embedding / LM head shards at the peak (2.5 before the step's non-finite guard became one lax.cond:
    # XLA:CPU then copied the donated state on entry).
    "cpu": Backend(score_saved=8.0, score_backward=8.0, ring_score_saved=15.0, ffn_saved=6, ffn_backward=2,
                   ffn_rematted=8, embed_saved=24, embed_backward=8, embed_rematted=32, float32_activations=True,
                   table_copies=0.5, stack_copy=0.0, overhead=1.0),
    # TPU (libtpu 0.0.42), from the buffer assignment of the 8B step on v5p (remat "full", seq 8,192): a
    # rematerialised layer's backward holds one float32 score buffer and the compute-dtype probabilities, SwiGLU's
    # gate and up and their gradients, and about six model-dim vectors. memory_analysis then reports 14-33% more
    # than that buffer assignment's live peak; the last two numbers are fitted to three compiles (8B fsdp=64, 70B
    # tensor=8 x fsdp=32, 405B circular pipeline over 16 ranks; all seq 8,192), which they match within 5%: more the
    # larger the stacked activations (a scan's output stack and its initial copy can both be live). The remat
    # "none" counts are XLA:CPU's, not checked against a TPU compile.
    "tpu": Backend(score_saved=8.0, score_backward=6.0, ring_score_saved=15.0, ffn_saved=6, ffn_backward=2,
                   ffn_rematted=4, embed_saved=24, embed_backward=8, embed_rematted=12, float32_activations=False,
                   table_copies=0.0, stack_copy=0.35, overhead=1.08),
    # XLA:GPU (jax-cuda12-plugin 0.10.2, H100, compiled without a GPU), from the 8B step's buffer assignment: the
    # same live buffers as the TPU's, but the arena keeps separate slots for two float32 and two bfloat16 score
    # buffers of the rematerialised layer (12 bytes per pair). Remat "none" counts as XLA:CPU's, not checked.
    "gpu": Backend(score_saved=8.0, score_backward=12.0, ring_score_saved=15.0, ffn_saved=6, ffn_backward=2,
                   ffn_rematted=4, embed_saved=24, embed_backward=8, embed_rematted=12, float32_activations=False,
                   table_copies=0.0, stack_copy=0.0, overhead=1.0),
}

WEIGHT_DTYPES = ("bf16", "fp8")  # how served weights are stored (inference_budget)
# How an adapter run's frozen base is stored (train_budget's base_dtype): at the model's param_dtype, or its
# projections' kernels as QLoRA's NF4 or int8 with a float32 scale per output channel.
BASE_DTYPES = ("param", "nf4", "int8")
# NF4 as QLoRA stores it (Dettmers et al. 2023; bitsandbytes): a 4-bit code per weight, an 8-bit scale per block of
# 64 weights and a float32 scale per 256 of those (double quantization): 4.127 bits a parameter.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
# The quantizable projections (paths under "layers/") and how many of their kernel's dims after the layer axis are
# inputs (model._adapted's ``contracted``); the rest are the output channels.
PROJECTIONS = {"attention/query": 1, "attention/key": 1, "attention/value": 1, "attention/out": 2,
               "feed_forward/gate": 1, "feed_forward/up": 1, "feed_forward/down": 1}
STAGES = ("pretrain", "sft", "dpo")  # the steps priced (sft is pretraining's step on masked targets)


def _itemsize(dtype: str) -> int:
    return np.dtype(jax.numpy.dtype(dtype)).itemsize


def _local_fraction(spec, shape, sizes: dict[str, int]) -> float:
    """Elements of one shard / elements of the array, for a PartitionSpec of mesh axes."""
    local = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        local *= -(-dim // math.prod(sizes[a] for a in axes))
    return local / max(math.prod(shape), 1)


def _shards(cfg: ModelConfig, sizes: dict[str, int]):
    """(path "layers/attention/query", shape, dtype, elements of a device's shard / elements) of every leaf."""
    shapes, logical = model.param_shapes(cfg), model.logical_axes(cfg)
    for (path, shape), names in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(
            logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        spec = nn.logical_to_mesh_axes(tuple(names), sharding.LOGICAL_RULES)
        name = "/".join(str(key.key) for key in path)
        yield name, shape.shape, shape.dtype, _local_fraction(spec, shape.shape, sizes)


def param_bytes(cfg: ModelConfig, sizes: dict[str, int]) -> tuple[float, float]:
    """(bytes of a device's layer shards, bytes of its other shards: embedding, LM head, final norm)."""
    layers = outer = 0.0
    for path, shape, dtype, local in _shards(cfg, sizes):
        nbytes = math.prod(shape) * dtype.itemsize * local
        if path.startswith("layers/"):
            layers += nbytes
        else:
            outer += nbytes
    return layers, outer


def stored_bytes(path: str, shape: tuple[int, ...], itemsize: int, base_dtype: str = "param") -> float:
    """Bytes of a frozen base leaf stored as ``base_dtype`` (``BASE_DTYPES``): the projections' kernels quantized,
    every other leaf (embedding, LM head, norms) at its own width, as QLoRA keeps them."""
    kernel = path.removeprefix("layers/")
    if base_dtype == "param" or kernel not in PROJECTIONS:
        return math.prod(shape) * itemsize
    if base_dtype == "nf4":
        return math.prod(shape) * NF4_BITS / 8
    outputs = math.prod(shape) / math.prod(shape[1:1 + PROJECTIONS[kernel]])  # layers x output channels
    return math.prod(shape) + 4 * outputs  # int8, and a float32 scale per output channel


def adapter_param_bytes(cfg: ModelConfig, sizes: dict[str, int], base_dtype: str = "param"
                        ) -> tuple[float, float, float]:
    """(bytes of a device's trained layer shards, of its trained other shards, of its frozen shards). Without
    adapters everything trains; with ``cfg.lora`` only the adapters (all in the layers) do, and the base is frozen,
    stored as ``base_dtype``."""
    if base_dtype not in BASE_DTYPES:
        raise ConfigError(f"base_dtype must be one of {BASE_DTYPES}, got {base_dtype!r}")
    if cfg.lora is None:
        if base_dtype != "param":
            raise ConfigError(f"a {base_dtype} base needs adapters (a LoRA rank): only a frozen base is stored "
                              "quantized")
        return (*param_bytes(cfg, sizes), 0.0)
    adapters = frozen = 0.0
    for path, shape, dtype, local in _shards(cfg, sizes):
        if lora.is_adapter(path):
            adapters += math.prod(shape) * dtype.itemsize * local
        else:
            frozen += stored_bytes(path, shape, dtype.itemsize, base_dtype) * local
    return adapters, 0.0, frozen


@dataclasses.dataclass(frozen=True)
class TrainBudget:
    """Per-device bytes of one train step by term (see the module docstring), and its FLOPs."""

    terms: dict[str, float]
    model_flops_per_token: float  # 6 N + attention (cfg.flops_per_token): the MFU numerator
    step_flops: float  # model FLOPs of the whole step, all devices
    step_flops_per_device: float  # ... including remat recomputation, per device
    pipeline_ticks: int | None  # forward ticks of the pipeline schedule (None without one)
    bubble: float  # share of those ticks a pipeline rank idles

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def params(self) -> float:
        return self.terms["params"]

    @property
    def opt_state(self) -> float:
        return self.terms["opt_state"]


def _per_token(cfg: ModelConfig, sizes: dict[str, int], keys: int, remat: str, backend: Backend,
               attention: str) -> tuple[float, float]:
    """(bytes one layer saves for the backward per local token under ``remat``, bytes one layer's backward holds
    per local token beyond them). ``keys``: keys each query attends over (all of them: ring attention visits
    every block). Mirrors model.Block with the backend's counts (``Backend``)."""
    a = 4 if backend.float32_activations else _itemsize(cfg.dtype)
    tp = sizes["tensor"]
    d, h = cfg.dim, cfg.resolved_head_dim
    n, k, f = cfg.num_heads / tp, cfg.num_kv_heads / tp, cfg.ffn_dim / tp
    ring = sizes["sequence"] > 1
    if attention == "flash":  # a fused kernel keeps a float32 logsumexp per head and query, no scores
        score_saved = score_backward = n * 4
    else:
        score_saved = n * keys * (backend.ring_score_saved if ring else backend.score_saved)
        score_backward = n * keys * backend.score_backward
    heads = 2 * (n + k) * h * a  # q, k, v and the attention output
    # Adapters: each adapted projection's rank-r x A, and its update x A B (as wide as the projection's output,
    # added into it: kept only where the policy saves matmul outputs).
    widths = {"query": n * h, "key": k * h, "value": k * h, "out": d, "gate": f, "up": f, "down": d}
    targets = cfg.lora.targets if cfg.lora else ()
    lows = len(targets) * cfg.lora.rank * a if cfg.lora else 0.0
    updates = sum(widths[t] for t in targets) * a
    saved = score_saved + heads + backend.ffn_saved * f * a + backend.embed_saved * d + lows
    if remat == "none":
        return saved, max(score_backward - score_saved, 0.0) + backend.ffn_backward * f * a + backend.embed_backward * d
    carry = d * a  # the scanned block's input
    rematted = score_backward + heads + backend.ffn_rematted * f * a + backend.embed_rematted * d + lows
    if remat == "full":
        return carry, rematted
    dots = heads + (n + k) * h * a + 3 * f * a + 2 * d * a + n * keys * 4 + lows + updates  # matmul outputs
    return carry + dots, max(rematted - dots, 0.0)


def _layer_weight_bytes(cfg: ModelConfig, sizes: dict[str, int]) -> float:
    """One layer's weights as the compute sees them: gathered over fsdp, still split over tensor."""
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    per_layer = (cfg.num_params() - embeddings - cfg.dim) / cfg.num_layers
    return per_layer * _itemsize(cfg.dtype) / sizes["tensor"]


def train_budget(cfg: ModelConfig, mesh: str | dict[str, int], seq: int, batch: int, *, remat: str | None = None,
                 backend: str = "tpu", attention: str = "dense", grad_accum: int = 1, schedule: str = "none",
                 microbatches: int = 1, circular_repeats: int = 2, loss_chunk: int | None = 8192,
                 stage: str = "pretrain", reference: bool = True, base_dtype: str = "param") -> TrainBudget:
    """Per-device bytes of the training step on ``batch`` rows of ``seq`` tokens (see the module docstring).

    ``grad_accum``: forward/backward passes per step (the batch split into that many); ``schedule``,
    ``microbatches``, ``circular_repeats``: the pipeline over the mesh's ``pipeline`` axis (``parallel.pipeline``);
    ``attention``: "dense" (this model) or "flash" (a fused kernel that keeps no scores, for comparison).
    The training stage: "dpo" takes ``batch`` preference pairs (both replies through the model at once) and, with
    ``reference``, keeps a frozen reference model; the other stages are priced as pretraining's step.
    With ``cfg.lora`` only the adapters train (params, their moments and gradients) and the base is ``frozen`` at
    ``base_dtype`` (``BASE_DTYPES``); DPO's reference is then that base with the adapters off: no second copy.
    """
    sizes = mesh if isinstance(mesh, dict) else sharding.parse_mesh(mesh, mesh_device_count(mesh))
    sizes = {axis: sizes.get(axis, 1) for axis in sharding.MESH_AXES}
    remat = cfg.remat if remat is None else remat
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if attention not in ("dense", "flash"):
        raise ConfigError(f"attention must be 'dense' or 'flash', got {attention!r}")
    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got {stage!r}")
    prof = BACKENDS[backend]
    dp, ranks = sizes["data"] * sizes["fsdp"], sizes["pipeline"]
    if batch % (dp * grad_accum) or seq % sizes["sequence"]:
        raise ConfigError(f"batch {batch} / seq {seq} do not divide over data x fsdp = {dp} x grad_accum = "
                          f"{grad_accum}, sequence = {sizes['sequence']}")
    repeats = circular_repeats if schedule == "circular" else 1
    if schedule == "none" and ranks > 1:
        raise ConfigError(f"the mesh has pipeline={ranks}: give a pipeline schedule")
    pipeline.check(cfg, ranks, schedule, microbatches, circular_repeats)  # what the pipeline itself refuses
    a = 4 if prof.float32_activations else _itemsize(cfg.dtype)
    layer_params, outer_params, frozen = adapter_param_bytes(cfg, sizes, base_dtype)
    params = layer_params + outer_params
    if stage == "dpo" and reference and cfg.lora is None:
        frozen = params  # the reference: a copy of the starting weights
    rows_per_example = 2 if stage == "dpo" else 1  # DPO: a pair's chosen and rejected rows
    rows = batch // dp // grad_accum * rows_per_example  # rows of one forward/backward pass on this device
    length = seq // sizes["sequence"]
    saved, backward = _per_token(cfg, sizes, seq, remat, prof, attention)
    if schedule == "none":
        ticks, bubble, tokens, layers_saved = None, 0.0, rows * length, cfg.num_layers
        loss_tokens = rows * length
        pipeline_buffers = 0.0
    else:
        if rows % microbatches:
            raise ConfigError(f"{rows} rows per pass do not split into {microbatches} pipeline microbatches")
        ticks = microbatches * repeats + ranks - 1
        bubble = pipeline.bubble_fraction(ranks, microbatches, repeats)
        tokens = rows // microbatches * length  # one microbatch
        layers_saved = ticks * cfg.num_layers // (ranks * repeats)
        loss_tokens = rows * length // (ranks if length % ranks == 0 else 1)
        pipeline_buffers = 2 * rows * length * cfg.dim * a  # rank 0's slots, and the embedding's output
    vocab_chunk = min(cfg.vocab_size, loss_chunk or cfg.vocab_size) / sizes["tensor"]
    # Logits of one vocabulary chunk and their gradient (float32), the final hidden states (float32), and the
    # LM head's chunk gathered over fsdp with its gradient (none with adapters: the head is frozen).
    trains_weights = 1 if cfg.lora is None else 0
    loss = loss_tokens * (2 * vocab_chunk * 4 + 2 * cfg.dim * 4) + (1 + trains_weights) * cfg.dim * vocab_chunk * a
    gathered = (1 + trains_weights) * _layer_weight_bytes(cfg, sizes) if sizes["fsdp"] > 1 else 0.0
    terms = {
        "params": params, "frozen": frozen, "opt_state": 2 * params, "grads": params,
        "saved_activations": layers_saved * tokens * saved,
        "layer_backward": tokens * backward, "loss_backward": loss,
        "gathered_weights": gathered, "pipeline_buffers": pipeline_buffers,
        "table_copies": prof.table_copies * outer_params,
        # With accumulation, the gradients' running sum (float32) beside each pass's gradients.
        "grad_accumulator": params * 4 / _itemsize(cfg.param_dtype) if grad_accum > 1 else 0.0,
    }
    # The layers' and the loss's backward run one after the other: only the larger is alive at the peak.
    terms["layer_backward"], terms["loss_backward"] = ((terms["layer_backward"], 0.0) if tokens * backward >= loss
                                                       else (0.0, loss))
    terms["stack_copy"] = prof.stack_copy * terms["saved_activations"]
    terms["compiler_overhead"] = (prof.overhead - 1) * sum(terms.values())
    devices = math.prod(sizes.values())
    per_token = cfg.flops_per_token(seq)
    recompute = {"none": 0.0, "full": 1 / 3, "dots": 0.0, "dots_no_batch": 0.0}[remat]  # one more forward
    # In forward + backward passes (as Stage.flops_factor): no weight gradients of a frozen base (a third less), a
    # DPO reference's forward pass (a third more).
    factor = 1 - (1 / 3 if cfg.lora else 0) + (1 / 3 if stage == "dpo" and reference else 0)
    tokens_per_step = batch * rows_per_example * seq
    return TrainBudget(terms=terms, model_flops_per_token=per_token, step_flops=factor * per_token * tokens_per_step,
                       step_flops_per_device=(factor + recompute) * per_token * tokens_per_step / devices,
                       pipeline_ticks=ticks, bubble=bubble)


def mesh_device_count(spec: str) -> int:
    """The devices a mesh spec names: the product of its sizes, an axis of -1 (the rest) counted as 1. A malformed
    spec counts what it can; ``sharding.parse_mesh`` then says what is wrong with it."""
    return math.prod(int(size) for size in re.findall(r"=\s*(-?\d+)", spec) if int(size) != -1)


@dataclasses.dataclass(frozen=True)
class InferenceBudget:
    """Per-device bytes of serving a model."""

    weights: float
    kv_cache: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache


def inference_budget(cfg: ModelConfig, *, tensor: int, batch: int, context: int,
                     weight_dtype: str = "bf16") -> InferenceBudget:
    """Per-device bytes to serve ``cfg`` split ``tensor`` ways: weights (bf16, or the paper's FP8: SwiGLU
    kernels e4m3 with a float32 scale per output channel, first and last layers kept bf16) and a bf16 KV cache
    for ``batch`` sequences of ``context`` tokens."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    d, f, layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    total = cfg.num_params() * 2.0
    if weight_dtype == "fp8":
        quantized = layers - 2
        # gate/up [D, F] -> F scales, down [F, D] -> D scales: 3 D F bytes instead of 6 D F, plus the scales.
        total -= quantized * (3 * d * f * (2 - 1) - (2 * f + d) * 4)
    kv_heads_per_device = max(cfg.num_kv_heads / tensor, 1)  # beyond K devices, kv heads are replicated
    kv = 2 * layers * batch * context * kv_heads_per_device * cfg.resolved_head_dim * 2
    return InferenceBudget(weights=total / tensor, kv_cache=kv)
