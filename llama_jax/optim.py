"""The Llama 3 optimiser: AdamW with global-norm clipping, the warmup + cosine schedule (the batch ramp: train.phases).

    schedule = lr_schedule(peak_lr=8e-5, warmup_steps=8_000, decay_steps=1_200_000)   # 405B recipe
    tx = adamw(schedule)                                    # betas (0.9, 0.95), eps 1e-8, decay 0.1, clip 1.0

Weight decay applies to the weight matrices of attention, feed-forward and the (untied) LM head, not to
RMSNorm scales (a decayed scale just fights the norm it multiplies) and not to the embedding table (a
row is only updated when its token occurs, while decay shrinks every row every step, so rare tokens'
embeddings would decay towards zero). ``decay_embeddings=True`` decays the embedding too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llama_jax.errors import ConfigError


def lr_schedule(peak_lr: float, warmup_steps: int, decay_steps: int, min_lr_ratio: float = 0.01,
                anneal_steps: int = 0, total_steps: int | None = None) -> optax.Schedule:
    """Learning rate at a step: linear warmup 0 -> peak over ``warmup_steps``, cosine peak -> peak * min_lr_ratio
    until step ``decay_steps``, then constant; with ``anneal_steps`` the last that many steps before
    ``total_steps`` (default ``decay_steps``) fall linearly from wherever the curve is to exactly 0.
    """
    if not 0 <= warmup_steps < decay_steps:
        raise ConfigError(f"need 0 <= warmup_steps ({warmup_steps}) < decay_steps ({decay_steps})")
    total_steps = decay_steps if total_steps is None else total_steps
    if anneal_steps < 0 or anneal_steps > total_steps:
        raise ConfigError(f"anneal_steps ({anneal_steps}) must lie in [0, total_steps={total_steps}]")
    min_lr = peak_lr * min_lr_ratio

    def base(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = peak_lr * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
        cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warmup, cosine)

    if not anneal_steps:
        return base
    anneal_start = total_steps - anneal_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        fraction_left = jnp.clip((total_steps - step) / anneal_steps, 0.0, 1.0)
        return jnp.where(step < anneal_start, base(step), base(anneal_start) * fraction_left)

    return schedule


def decay_mask(params, decay_embeddings: bool = False):
    """True at the leaves AdamW decays: everything but norm scales (and the embedding, unless asked)."""

    def decays(path, _):
        # Dict keys only: a leaf boxed with its logical axes (flax's Partitioned) adds an attribute key `.value`.
        names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        if any(n.endswith("norm") for n in names):
            return False
        return decay_embeddings or names[-1] != "embedding"

    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(schedule: optax.Schedule | float, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          weight_decay: float = 0.1, clip_norm: float | None = 1.0,
          decay_embeddings: bool = False) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled decay, scaled by the learning rate as in PyTorch/optax)."""
    opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=lambda p: decay_mask(p, decay_embeddings))
    return opt if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), opt)
