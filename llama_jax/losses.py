"""Losses: next-token cross-entropy on final hidden states (over vocabulary chunks), and the preference losses of
post-training (DPO, Bradley-Terry).

A [B, T, 128256] float32 logits tensor is 0.5 GiB per 1K tokens, and its gradient as much again. Here the
LM head is applied one vocabulary chunk at a time inside a ``lax.scan`` with an online logsumexp; each
chunk's body is rematerialised (``jax.checkpoint``), so neither pass ever holds more than [B, T, chunk]
logits. The result equals the plain log-softmax to float32 rounding. With one chunk (``chunk_size=None`` or
>= V) it is the plain log-softmax of one matmul, whose logits the backward pass keeps instead of recomputing.
The LM head's matmuls run at the caller's ``precision`` (``ModelConfig.resolved_matmul_precision``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Plain reference: logits [B, T, V] -> (negative log-likelihood of targets [B, T], logsumexp [B, T])."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk_size: int | None = 8192,
                          precision: str | None = None) -> tuple[jax.Array, jax.Array]:
    """hidden [B, T, D] @ head [D, V] -> (nll [B, T], logsumexp [B, T]) float32, ``chunk_size`` columns at a time.

    ``chunk_size=None`` (or >= V): one plain matmul and log-softmax. Otherwise C = ceil(V / chunk_size) chunks of
    ceil(V / C) columns; when C does not divide V the padding columns are masked out of the logsumexp. ``precision``:
    the matmuls' ``precision=`` ("highest", "high", or None for the backend's default).
    """
    vocab = head.shape[1]
    if chunk_size is None or chunk_size >= vocab:
        # One chunk: a plain matmul whose logits the backward pass keeps; a rematerialised scan of one step
        # would recompute them (~8% more FLOPs per step for a 125M model with a 32K vocabulary).
        logits = jnp.einsum("BTD,DV->BTV", hidden, head, preferred_element_type=jnp.float32, precision=precision)
        return cross_entropy(logits, targets)
    num_chunks = -(-vocab // chunk_size)
    chunk = -(-vocab // num_chunks)  # the most even split: no padding when num_chunks divides V (128256 = 16 x 8016)
    # Strided chunks: chunk c holds vocabulary columns c, c + C, c + 2C, ... A contiguous block of the vocabulary
    # axis (a tensor-parallel shard of the head) then stays a contiguous block of every chunk, so each device
    # computes logits for its own shard only; contiguous chunks would gather the whole head onto every device.
    head = jnp.pad(head, ((0, 0), (0, num_chunks * chunk - vocab)))
    head_chunks = head.reshape(head.shape[0], chunk, num_chunks).transpose(2, 0, 1)  # [C, D, chunk]
    batch_shape = targets.shape
    target_chunk, target_column = targets % num_chunks, targets // num_chunks

    @jax.checkpoint
    def step(carry, xs):
        running_max, running_sum, target_logit = carry  # each [B, T]
        index, w = xs
        logits = jnp.einsum("BTD,DV->BTV", hidden, w, preferred_element_type=jnp.float32, precision=precision)
        logits = jnp.where(jnp.arange(chunk) * num_chunks + index < vocab, logits, -jnp.inf)  # padding columns
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(-1)
        picked = jnp.take_along_axis(logits, target_column[..., None], axis=-1)[..., 0]
        target_logit = target_logit + jnp.where(target_chunk == index, picked, 0.0)
        return (new_max, running_sum, target_logit), None

    init = (jnp.full(batch_shape, -jnp.inf, jnp.float32), jnp.zeros(batch_shape, jnp.float32),
            jnp.zeros(batch_shape, jnp.float32))
    (running_max, running_sum, target_logit), _ = jax.lax.scan(step, init, (jnp.arange(num_chunks), head_chunks))
    log_z = running_max + jnp.log(running_sum)
    return log_z - target_logit, log_z


def next_token_loss(hidden: jax.Array, head: jax.Array, targets: jax.Array, loss_mask: jax.Array, *,
                    chunk_size: int | None = 8192, z_loss: float = 0.0,
                    precision: str | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy over positions where ``loss_mask`` is 1, plus ``z_loss * mean(logsumexp^2)``.

    The z-loss (PaLM) keeps the softmax normaliser near 1, which keeps bfloat16 logits well conditioned.
    Returns (loss, metrics); metrics hold the cross-entropy without the z-loss term, and ``loss_weight``, the
    number of target tokens averaged (gradient accumulation weights microbatches by it).
    """
    nll, log_z = chunked_cross_entropy(hidden, head, targets, chunk_size, precision)
    mask = loss_mask.astype(jnp.float32)
    tokens = mask.sum()
    denominator = jnp.maximum(tokens, 1.0)
    ce = (nll * mask).sum() / denominator
    loss = ce
    metrics = {"cross_entropy": ce, "loss_weight": tokens}
    if z_loss:
        z = (log_z**2 * mask).sum() / denominator
        loss = loss + z_loss * z
        metrics["z_loss"] = z
    return loss, metrics


def dpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array, reference_chosen_logps: jax.Array,
             reference_rejected_logps: jax.Array, beta: float = 0.1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Direct preference optimisation (Rafailov et al. 2023) on per-pair log-probs of whole replies, each [B].

    Returns (losses, chosen_rewards, rejected_rewards), each [B]: a reward is ``beta * (policy - reference)``, the
    log-ratio DPO treats as an implicit reward, and the loss ``-log sigmoid(chosen_reward - rejected_reward)``.
    """
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    return -jax.nn.log_sigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def bradley_terry_loss(better_scores: jax.Array, worse_scores: jax.Array) -> jax.Array:
    """Reward-model loss [B]: ``-log sigmoid(better - worse)``, without Llama 2's margin term (Llama 3 removed it)."""
    return -jax.nn.log_sigmoid(better_scores - worse_scores)
