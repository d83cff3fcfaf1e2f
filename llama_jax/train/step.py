"""The train state and the one generic train step every stage (pretrain, SFT, DPO, reward) shares.

    state = create_state(cfg, tx, mesh, seed=0)
    train_step = make_train_step(loss_fn, tx, mesh, state, schedule=schedule)
    state, metrics = train_step(state, batch)      # batch: dict of [B, T] arrays (numpy or sharded)

A stage supplies only ``loss_fn(params, batch, rng) -> (loss, metrics)``. Gradient accumulation, clipping
(inside ``tx``), the non-finite guard and the learning-rate metric live here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from llama_jax import model, sharding
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
LOSS_WEIGHT = "loss_weight"  # optional loss_fn metric: how many items its mean loss averages (see _accumulate)


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped non-finite steps included)
    params: Any  # the model's parameter tree
    opt_state: Any  # optax state
    rng: jax.Array  # uint32 [2] base key; step s uses fold_in(rng, s)


def _boxed_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state whose parameter leaves (and so the optimizer's moments of them) carry their logical axes."""
    params_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    params = model.Llama(cfg).init(params_key, jnp.zeros((1, 1), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh) -> TrainState:
    """NamedShardings of every state leaf, from the logical axes of the abstract state itself: parameters and
    the optimizer moments of them as the rules say, everything else (step, counts, rng) replicated."""
    boxed = jax.eval_shape(lambda: _boxed_state(cfg, tx, 0))
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    sharding.check_divisible(nn.meta.unbox(boxed), shardings)
    return shardings


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh) -> TrainState:
    """The state as ShapeDtypeStructs with shardings: restore targets, AOT lowering. Allocates nothing."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda: _boxed_state(cfg, tx, 0)))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        state_shardings(cfg, tx, mesh))


def create_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, seed: int = 0) -> TrainState:
    """A fresh state, each leaf created directly in its shards (no full copy on any one device)."""
    return jax.jit(lambda: nn.meta.unbox(_boxed_state(cfg, tx, seed)), out_shardings=state_shardings(cfg, tx, mesh))()


def _split_microbatches(batch: dict, count: int) -> dict:
    """[B, ...] -> [count, B / count, ...], microbatch i = rows i, i + count, ...: every device keeps a share of
    every microbatch (rows are sharded in contiguous blocks)."""

    def split(x):
        if x.shape[0] % count:
            raise ConfigError(f"batch of {x.shape[0]} rows does not split into {count} microbatches")
        return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def _accumulate(grad_fn, params, microbatches: dict, rng: jax.Array, count: int):
    """Loss, metrics and gradients over ``count`` microbatches, as if the batch had been one.

    When the loss_fn reports a ``loss_weight`` metric (its loss is a mean over that many items, e.g. target
    tokens), microbatches are weighted by it, so the result equals the whole batch's token mean exactly.
    """

    def step(carry, xs):
        index, micro = xs
        (loss, aux), grads = grad_fn(params, micro, jax.random.fold_in(rng, index))
        weight = aux.get(LOSS_WEIGHT, jnp.float32(1.0))
        weighted = jax.tree.map(lambda x: x.astype(jnp.float32) * weight,
                                (loss, {k: v for k, v in aux.items() if k != LOSS_WEIGHT}, grads))
        return jax.tree.map(jnp.add, carry, (weighted, weight)), None

    first = jax.tree.map(lambda x: x[0], microbatches)
    (loss, aux), grads = jax.eval_shape(grad_fn, params, first, rng)
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
    gradient is not finite leaves params and optimizer state untouched and reports ``skipped = 1``.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        rows, length = jax.tree.leaves(batch)[0].shape[:2]
        count = 1 if microbatch_tokens is None else max(rows * length // microbatch_tokens, 1)
        if count == 1:
            (loss, aux), grads = grad_fn(state.params, batch, rng)
        else:
            loss, aux, grads = _accumulate(grad_fn, state.params, _split_microbatches(batch, count), rng, count)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state))
        metrics = {
            "loss": loss, **aux, "grad_norm": grad_norm, "update_norm": optax.global_norm(updates),
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


def make_eval_step(loss_fn: LossFn, mesh, params_sharding) -> Callable[[Any, dict], dict]:
    """``eval_step(params, batch) -> metrics`` (the loss and the loss_fn's metrics), jitted on ``mesh``."""

    def eval_fn(params, batch):
        loss, aux = loss_fn(params, batch, jax.random.PRNGKey(0))
        return {"loss": loss, **aux}

    jitted = jax.jit(eval_fn, in_shardings=(params_sharding, sharding.batch_sharding(mesh)))

    def eval_step(params, batch: dict) -> dict:
        if isinstance(jax.tree.leaves(batch)[0], np.ndarray):
            batch = sharding.shard_batch(batch, mesh)
        with sharding.activate(mesh):
            return jitted(params, batch)

    return eval_step
