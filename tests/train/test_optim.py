"""The Llama 3 schedule at the paper's numbers, AdamW against a NumPy AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import optim
from llama_jax.errors import ConfigError


def test_schedule_matches_the_405b_recipe():
    """Spec: peak 8e-5, linear warmup 8,000 steps, cosine to 8e-7 over 1,200,000 steps."""
    lr = optim.lr_schedule(8e-5, warmup_steps=8_000, decay_steps=1_200_000)
    np.testing.assert_allclose(lr(0), 0.0)
    np.testing.assert_allclose(lr(4_000), 4e-5, rtol=1e-6)
    np.testing.assert_allclose(lr(8_000), 8e-5, rtol=1e-6)  # warmup end = peak
    middle = (8_000 + 1_200_000) // 2  # cosine half way: the mean of peak and floor
    np.testing.assert_allclose(lr(middle), (8e-5 + 8e-7) / 2, rtol=1e-5)
    np.testing.assert_allclose(lr(1_200_000), 8e-7, rtol=1e-5)  # final = min = 1% of peak
    np.testing.assert_allclose(lr(1_500_000), 8e-7, rtol=1e-5)
    steps = np.arange(8_000, 1_200_001, 10_000)
    assert np.all(np.diff(np.asarray(jax.vmap(lr)(steps))) < 0)  # strictly decreasing after warmup


def test_final_anneal_to_zero():
    lr = optim.lr_schedule(1.0, warmup_steps=10, decay_steps=1_000, anneal_steps=100, total_steps=1_100)
    start = float(optim.lr_schedule(1.0, warmup_steps=10, decay_steps=1_000)(1_000))
    np.testing.assert_allclose(lr(999), optim.lr_schedule(1.0, 10, 1_000)(999), rtol=1e-6)
    np.testing.assert_allclose(lr(1_000), start, rtol=1e-6)
    np.testing.assert_allclose(lr(1_050), start / 2, rtol=1e-5)
    np.testing.assert_allclose(lr(1_100), 0.0, atol=1e-12)


def test_schedule_rejects_bad_steps():
    with pytest.raises(ConfigError, match="warmup_steps"):
        optim.lr_schedule(1e-3, warmup_steps=100, decay_steps=50)


def numpy_adamw(params, grads, lr, decay, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, clip=1.0):
    """One AdamW step from zero moments, written from the paper's formulas (PyTorch's decoupled decay)."""
    norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
    scale = min(1.0, clip / norm)
    out = {}
    for k, p in params.items():
        g = grads[k] * scale
        m, v = (1 - b1) * g, (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1), v / (1 - b2)
        out[k] = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + (wd * p if decay[k] else 0))
    return out


def test_adamw_step_matches_numpy_and_decay_mask():
    rng = np.random.default_rng(0)
    shapes = {"embedding": (8, 4), "final_norm": {"scale": (4,)},
              "layers": {"attention": {"query": (2, 4, 2, 2)}, "ffn_norm": {"scale": (2, 4)}}, "lm_head": (4, 8)}
    params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 3, params)  # norm > 1: clipped
    mask = optim.decay_mask(params)
    assert mask == {"embedding": False, "final_norm": {"scale": False}, "lm_head": True,
                    "layers": {"attention": {"query": True}, "ffn_norm": {"scale": False}}}
    assert optim.decay_mask(params, decay_embeddings=True)["embedding"]

    tx = optim.adamw(1e-2)
    updates, _ = tx.update(grads, tx.init(params), params)
    ours = jax.tree.map(lambda p, u: p + u, params, updates)
    flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    expected = numpy_adamw(flat(params), flat(grads), 1e-2, flat(mask))
    for k, v in flat(ours).items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_adamw_on_device_arrays():
    params = {"w": jnp.ones((3, 3))}
    tx = optim.adamw(optim.lr_schedule(1e-3, 2, 10))
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.full((3, 3), 0.1)}, state, params)
    np.testing.assert_allclose(updates["w"], 0.0)  # step 0 of the warmup has learning rate 0
