"""The low-rank update of an adapted projection (LoRA, Hu et al. 2021), as PEFT computes it.

    y = x W + scale (dropout(x) A) B        # A [in dims, r], B [r, out dims]; scale alpha / r (rsLoRA: / sqrt(r))

``model`` declares A and B beside the kernels they adapt; this is the arithmetic. A starts as PEFT draws it
(``kaiming_uniform_(a=sqrt(5))`` of its [r, in] matrix: U(-1 / sqrt(in), 1 / sqrt(in))) and B at zero, so an
adapted network starts equal to its base. Dropout (PEFT's ``lora_dropout``) drops the adapter path's input
only, x * mask / (1 - p), and only when a key is given: training steps, never evaluation or generation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LoRA


def a_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def update(x: jax.Array, a: jax.Array, b: jax.Array, lora: LoRA, contracted: int, dtype, precision: str | None,
           dropout_key: jax.Array | None = None) -> jax.Array:
    """scale (x A) B [..., out dims]: x's last ``contracted`` dims against A's first ones."""
    if dropout_key is not None and lora.dropout > 0:
        keep = jax.random.bernoulli(dropout_key, 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
    low = jnp.tensordot(x, a.astype(dtype), axes=contracted, precision=precision)  # [B, T, r]
    return jnp.tensordot(low, (lora.scale * b).astype(dtype), axes=1, precision=precision)
