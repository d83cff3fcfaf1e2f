"""The train state, what a stage is, and the one generic train step every stage (pretrain, SFT, reward, DPO) shares.

    state = create_state(cfg, tx, mesh, seed=0, stage=stage)          # or params=... to start from weights
    train_step = make_train_step(loss_fn, tx, mesh, state_shardings(cfg, tx, mesh, stage), schedule=schedule)
    state, metrics = train_step(state, batch)      # batch: dict of [B, T] arrays (numpy or sharded)

A stage supplies ``loss_fn(params, batch, rng, frozen) -> (loss, metrics)``, its batches, the parameters it adds to
a Llama tree (a reward head) and the ones it keeps frozen beside it (DPO's reference). A batch holds the rows its
loss runs through the model and no others: the loop counts their tokens for throughput and MFU. Gradient accumulation,
clipping (inside ``tx``), the non-finite guard and the learning-rate metric live here, once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util

from llama_jax import model, sharding
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError

# (params, batch, rng, frozen); rng: the step's key (dropout), None in evaluation
LossFn = Callable[[Any, dict, jax.Array | None, Any], tuple[jax.Array, dict]]
LOSS_WEIGHT = "loss_weight"  # optional loss_fn metric: how many items its mean loss averages (see _accumulate)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: a loss and a batch maker on the shared loop, step and checkpoint format."""

    name: str
    make_loss_fn: Callable[[ModelConfig, Any, Any], LossFn]  # (model config, experiment config, the pipeline's
    #                                                          run_layers or None for the plain scan) -> loss_fn
    make_batches: Callable[[Any, Any, str], Iterator[dict]]  # (experiment config, tokenizer, "train" | "eval")
    extra_params: Callable[[ModelConfig, jax.Array], dict] | None = None  # leaves a Llama tree lacks, boxed with
    #                                                                        their logical axes (a reward head)
    frozen: Callable[[dict], Any] | None = None  # what the stage reads but never trains, from the starting
    #                                              parameters (DPO's reference: a copy of the policy's)
    trained: Callable[[dict], dict] | None = None  # the part of the starting parameters that trains (None: all;
    #                                                with adapters, the adapters and the stage's own leaves)
    configure: Callable[[Any], Stage] | None = None  # the stage as an experiment config sets it up (DPO keeps no
    #                                                  reference copy when its log-probs come precomputed)
    flops_factor: float = 1.0  # a step's FLOPs per token of its batch, in units of the model's forward + backward
    #                            pass (ModelConfig.flops_per_token): 4/3 when a frozen reference adds a forward pass


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped non-finite steps included)
    params: Any  # the trained tree: a Llama's parameters, plus the stage's extra leaves
    opt_state: Any  # optax state
    rng: jax.Array  # uint32 [2] base key; step s uses fold_in(rng, s)
    frozen: Any = None  # parameters the loss reads but nothing trains, sharded like params, not in opt_state


def _starting_state(cfg: ModelConfig, seed: int, stage: Stage | None) -> TrainState:
    """A fresh state holding every starting parameter in params (the stage's extra leaves included), boxed with
    their logical axes; no optimizer state yet (``_partition``)."""
    params_key, extra_key, rng = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = model.boxed_params(cfg, params_key)
    if stage is not None and stage.extra_params is not None:
        params = {**params, **stage.extra_params(cfg, extra_key)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, rng=rng)


def _partition(state: TrainState, tx: optax.GradientTransformation, stage: Stage | None) -> TrainState:
    """``state`` whose params are every starting parameter -> what trains in params (with a fresh optimizer state
    for it), what the stage reads but never trains in frozen."""
    params = state.params
    frozen = stage.frozen(params) if stage is not None and stage.frozen is not None else None
    trained = stage.trained(params) if stage is not None and stage.trained is not None else params
    return state.replace(params=trained, opt_state=tx.init(trained), frozen=frozen)


def _boxed_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, stage: Stage | None) -> TrainState:
    """A fresh state whose parameter leaves (and so the optimizer's moments and the frozen copies of them) carry
    their logical axes."""
    return _partition(_starting_state(cfg, seed, stage), tx, stage)


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, stage: Stage | None = None
                    ) -> TrainState:
    """NamedShardings of every state leaf, from the logical axes of the abstract state itself: parameters, the
    optimizer moments and frozen copies of them as the rules say, everything else (step, counts, rng) replicated."""
    boxed = jax.eval_shape(lambda: _boxed_state(cfg, tx, 0, stage))
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    sharding.check_divisible(nn.meta.unbox(boxed), shardings)
    return shardings


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, stage: Stage | None = None
                   ) -> TrainState:
    """The state as ShapeDtypeStructs with shardings: restore targets, AOT lowering. Allocates nothing."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda: _boxed_state(cfg, tx, 0, stage)))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        state_shardings(cfg, tx, mesh, stage))


def create_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, seed: int = 0, *,
                 stage: Stage | None = None, params: dict | None = None) -> TrainState:
    """A fresh state (step 0, fresh optimizer), each leaf created directly in its shards (no full copy on any one
    device). ``params``: a Llama tree to start from (e.g. ``checkpoint.load``'s), cast to cfg.param_dtype; the
    stage's extra leaves are initialised and its frozen tree derived from these starting parameters."""

    def build(start):
        state = nn.meta.unbox(_starting_state(cfg, seed, stage))
        if start is not None:  # over the fresh leaves, path by path (a run's adapters and extra leaves stay fresh)
            fresh = traverse_util.flatten_dict(state.params, sep="/")
            started = {k: v.astype(fresh[k].dtype) for k, v in traverse_util.flatten_dict(start, sep="/").items()}
            state = state.replace(params=traverse_util.unflatten_dict(fresh | started, sep="/"))
        return _partition(state, tx, stage)

    if params is not None:
        model.check_params(params, cfg.replace(lora=None))  # a Llama tree: a run's adapters start fresh
    return jax.jit(build, out_shardings=state_shardings(cfg, tx, mesh, stage))(params)


def _split_microbatches(batch: dict, count: int) -> dict:
    """[B, ...] -> [count, B / count, ...], microbatch i = rows i, i + count, ...: every device keeps a share of
    every microbatch (rows are sharded in contiguous blocks)."""

    def split(x):
        if x.shape[0] % count:
            raise ConfigError(f"batch of {x.shape[0]} rows does not split into {count} microbatches")
        return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def _accumulate(grad_fn, params, frozen, microbatches: dict, rng: jax.Array, count: int):
    """Loss, metrics and gradients over ``count`` microbatches, as if the batch had been one.

    When the loss_fn reports a ``loss_weight`` metric (its loss is a mean over that many items, e.g. target
    tokens), microbatches are weighted by it, so the result equals the whole batch's token mean exactly.
    """

    def step(carry, xs):
        index, micro = xs
        (loss, aux), grads = grad_fn(params, micro, jax.random.fold_in(rng, index), frozen)
        weight = aux.get(LOSS_WEIGHT, jnp.float32(1.0))
        weighted = jax.tree.map(lambda x: x.astype(jnp.float32) * weight,
                                (loss, {k: v for k, v in aux.items() if k != LOSS_WEIGHT}, grads))
        return jax.tree.map(jnp.add, carry, (weighted, weight)), None

    first = jax.tree.map(lambda x: x[0], microbatches)
    (loss, aux), grads = jax.eval_shape(grad_fn, params, first, rng, frozen)
    weighted_aux = {k: v for k, v in aux.items() if k != LOSS_WEIGHT}
    # Sums in float32 (bfloat16 gradients would lose the small microbatches' share); the result in grads' dtype.
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (loss, weighted_aux, grads))
    (total, weight), _ = jax.lax.scan(step, (zeros, jnp.float32(0.0)), (jnp.arange(count), microbatches))
    mean = jax.tree.map(lambda x: x / jnp.maximum(weight, 1e-30), total)
    loss, aux_mean, grads = jax.tree.map(lambda x, like: x.astype(like.dtype), mean, (loss, weighted_aux, grads))
    if LOSS_WEIGHT in aux:
        aux_mean[LOSS_WEIGHT] = weight
    return loss, aux_mean, grads


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh, state_sharding: TrainState, *,
                    schedule: optax.Schedule | None = None, microbatch_tokens: int | None = None,
                    donate: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted ``train_step(state, batch) -> (state, metrics)`` on ``mesh``.

    ``microbatch_tokens``: accumulate gradients over microbatches of this many tokens (None: one pass);
    the count follows from each batch's shape, so batch-size ramps just recompile. A step whose loss or
    gradient is not finite leaves params and optimizer state untouched and reports ``skipped = 1`` (and
    ``update_norm = 0``: no update is computed).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        rows, length = jax.tree.leaves(batch)[0].shape[:2]
        count = 1 if microbatch_tokens is None else max(rows * length // microbatch_tokens, 1)
        if count == 1:
            (loss, aux), grads = grad_fn(state.params, batch, rng, state.frozen)
        else:
            loss, aux, grads = _accumulate(grad_fn, state.params, state.frozen, _split_microbatches(batch, count),
                                           rng, count)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply_update(_):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            update_norm = optax.global_norm(updates).astype(jnp.float32)  # bfloat16 for bfloat16 parameters
            return optax.apply_updates(state.params, updates), opt_state, update_norm

        def skip_update(_):
            return state.params, state.opt_state, jnp.zeros((), jnp.float32)

        # lax.cond, not jnp.where over every leaf: a select reads old and new parameters and both Adam moments
        # and made XLA copy the donated state on entry (3.5 GB a step for a 125M model on XLA:CPU).
        params, opt_state, update_norm = jax.lax.cond(finite, apply_update, skip_update, None)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {
            "loss": loss, **aux, "grad_norm": grad_norm, "update_norm": update_norm,
            "param_norm": optax.global_norm(new_state.params), "skipped": 1 - finite.astype(jnp.int32),
        }
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, metrics

    batch_spec = sharding.batch_sharding(mesh)
    jitted = jax.jit(step_fn, in_shardings=(state_sharding, batch_spec), out_shardings=(state_sharding, None),
                     donate_argnums=(0,) if donate else ())

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if isinstance(jax.tree.leaves(batch)[0], np.ndarray):
            batch = sharding.shard_batch(batch, mesh)
        with sharding.activate(mesh):
            return jitted(state, batch)

    train_step.jitted = jitted
    return train_step


def make_eval_step(loss_fn: LossFn, mesh, state_sharding: TrainState) -> Callable[[TrainState, dict], dict]:
    """``eval_step(state, batch) -> metrics`` (the loss and the loss_fn's metrics), jitted on ``mesh``."""

    def eval_fn(params, frozen, batch):
        loss, aux = loss_fn(params, batch, None, frozen)  # no key: evaluation drops nothing
        return {"loss": loss, **aux}

    jitted = jax.jit(eval_fn, in_shardings=(state_sharding.params, state_sharding.frozen,
                                            sharding.batch_sharding(mesh)))

    def eval_step(state: TrainState, batch: dict) -> dict:
        if isinstance(jax.tree.leaves(batch)[0], np.ndarray):
            batch = sharding.shard_batch(batch, mesh)
        with sharding.activate(mesh):
            return jitted(state.params, state.frozen, batch)

    return eval_step
