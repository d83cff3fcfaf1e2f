"""The analytic memory model of a train step (and of serving): per-device bytes from shapes alone, term by term.

    b = memory.train_budget(config.get("llama3.1-8b", remat="full"), "fsdp=64", seq=8192, batch=64, backend="tpu")
    b.total, b.terms          # {"params": ..., "opt_state": ..., "grads": ..., "saved_activations": ..., ...}
    memory.inference_budget(config.get("llama3.1-405b"), tensor=8, batch=1, context=8192, weight_dtype="fp8")

It models ``llama_jax.train``'s pretraining step (AdamW, the chunked loss, dense attention, the pipeline
schedules) on the mesh's shards. Every term is what that step holds at its peak, per device:
  * ``params``: each leaf's shard under the rules table (``pipeline`` splits the layers; embedding and LM head
    are on every pipeline rank); ``opt_state``: AdamW's two moments (param dtype); ``grads``: one more copy of the
    params, and with gradient accumulation their float32 running sum (``grad_accumulator``);
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

from llama_jax import model, sharding
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


def _itemsize(dtype: str) -> int:
    return np.dtype(jax.numpy.dtype(dtype)).itemsize


def _local_fraction(spec, shape, sizes: dict[str, int]) -> float:
    """Elements of one shard / elements of the array, for a PartitionSpec of mesh axes."""
    local = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        local *= -(-dim // math.prod(sizes[a] for a in axes))
    return local / max(math.prod(shape), 1)


def param_bytes(cfg: ModelConfig, sizes: dict[str, int]) -> tuple[float, float]:
    """(bytes of a device's layer shards, bytes of its other shards: embedding, LM head, final norm)."""
    shapes, logical = model.param_shapes(cfg), model.logical_axes(cfg)
    layers = outer = 0.0
    for (path, shape), names in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(
            logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        spec = nn.logical_to_mesh_axes(tuple(names), sharding.LOGICAL_RULES)
        nbytes = math.prod(shape.shape) * shape.dtype.itemsize * _local_fraction(spec, shape.shape, sizes)
        if jax.tree_util.keystr(path).startswith("['layers']"):
            layers += nbytes
        else:
            outer += nbytes
    return layers, outer


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
    saved = score_saved + heads + backend.ffn_saved * f * a + backend.embed_saved * d
    if remat == "none":
        return saved, max(score_backward - score_saved, 0.0) + backend.ffn_backward * f * a + backend.embed_backward * d
    carry = d * a  # the scanned block's input
    rematted = score_backward + heads + backend.ffn_rematted * f * a + backend.embed_rematted * d
    if remat == "full":
        return carry, rematted
    dots = heads + (n + k) * h * a + 3 * f * a + 2 * d * a + n * keys * 4  # matmul outputs (dots_saveable)
    return carry + dots, max(rematted - dots, 0.0)


def _layer_weight_bytes(cfg: ModelConfig, sizes: dict[str, int]) -> float:
    """One layer's weights as the compute sees them: gathered over fsdp, still split over tensor."""
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    per_layer = (cfg.num_params() - embeddings - cfg.dim) / cfg.num_layers
    return per_layer * _itemsize(cfg.dtype) / sizes["tensor"]


def train_budget(cfg: ModelConfig, mesh: str | dict[str, int], seq: int, batch: int, *, remat: str | None = None,
                 backend: str = "tpu", attention: str = "dense", grad_accum: int = 1, schedule: str = "none",
                 microbatches: int = 1, circular_repeats: int = 2, loss_chunk: int | None = 8192) -> TrainBudget:
    """Per-device bytes of the pretraining step on ``batch`` rows of ``seq`` tokens (see the module docstring).

    ``grad_accum``: forward/backward passes per step (the batch split into that many); ``schedule``,
    ``microbatches``, ``circular_repeats``: the pipeline over the mesh's ``pipeline`` axis (``parallel.pipeline``);
    ``attention``: "dense" (this model) or "flash" (a fused kernel that keeps no scores, for comparison).
    """
    sizes = mesh if isinstance(mesh, dict) else sharding.parse_mesh(mesh, mesh_device_count(mesh))
    sizes = {axis: sizes.get(axis, 1) for axis in sharding.MESH_AXES}
    remat = cfg.remat if remat is None else remat
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if attention not in ("dense", "flash"):
        raise ConfigError(f"attention must be 'dense' or 'flash', got {attention!r}")
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
    layer_params, outer_params = param_bytes(cfg, sizes)
    params = layer_params + outer_params
    rows = batch // dp // grad_accum  # rows of one forward/backward pass on this device
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
    # LM head's chunk gathered over fsdp with its gradient.
    loss = loss_tokens * (2 * vocab_chunk * 4 + 2 * cfg.dim * 4) + 2 * cfg.dim * vocab_chunk * a
    gathered = 2 * _layer_weight_bytes(cfg, sizes) if sizes["fsdp"] > 1 else 0.0
    terms = {
        "params": params, "opt_state": 2 * params, "grads": params,
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
    step_flops = per_token * batch * seq
    return TrainBudget(terms=terms, model_flops_per_token=per_token, step_flops=step_flops,
                       step_flops_per_device=step_flops * (1 + recompute) / devices,
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
