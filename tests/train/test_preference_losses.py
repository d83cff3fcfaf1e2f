"""DPO and Bradley-Terry against NumPy formulas; the shared-prefix attention rule against a loop over pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import sharding
from llama_jax.errors import ConfigError
from llama_jax.losses import bradley_terry_loss, dpo_loss
from llama_jax.ops import attention, context_parallel, flash_attention


def log_sigmoid(x):
    x = np.asarray(x, np.float64)
    return -np.logaddexp(0.0, -x)  # log(1 / (1 + e^-x)), stable both ways


def test_dpo_loss_matches_the_formula():
    # Pairs: margin 0 (policy == reference), small margins either way, a large margin each way.
    policy_chosen = np.array([-10.0, -12.0, -9.0, -5.0, -400.0], np.float32)
    policy_rejected = np.array([-20.0, -11.5, -14.0, -300.0, -6.0], np.float32)
    reference_chosen = np.array([-10.0, -12.5, -10.0, -6.0, -5.0], np.float32)
    reference_rejected = np.array([-20.0, -11.0, -13.0, -7.0, -6.0], np.float32)
    for beta in (0.1, 0.5):
        chosen_rewards = beta * (policy_chosen.astype(np.float64) - reference_chosen)
        rejected_rewards = beta * (policy_rejected.astype(np.float64) - reference_rejected)
        expected = -log_sigmoid(chosen_rewards - rejected_rewards)
        losses, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                            beta=beta)
        np.testing.assert_allclose(chosen, chosen_rewards, rtol=1e-6)
        np.testing.assert_allclose(rejected, rejected_rewards, rtol=1e-6)
        np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-7)
        assert float(losses[0]) == pytest.approx(np.log(2), abs=1e-7)  # margin 0
        assert np.all(np.isfinite(np.asarray(losses)))  # large margins: no overflow either way
    assert float(dpo_loss(*(jnp.float32(x) for x in (-1.0, -2.0, -1.0, -2.0)))[0]) == np.float32(np.log(2))


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    grads = jax.grad(lambda c, r: dpo_loss(c, r, jnp.zeros(1), jnp.zeros(1))[0].sum(), (0, 1))(
        jnp.zeros(1), jnp.zeros(1))
    np.testing.assert_allclose(grads, [[-0.05], [0.05]], rtol=1e-6)  # -beta * sigmoid(0), +beta * sigmoid(0)


def test_bradley_terry_matches_the_formula_with_three_responses():
    rng = np.random.default_rng(0)
    edited, chosen, rejected = (rng.normal(size=6).astype(np.float32) * 3 for _ in range(3))
    chosen[0], rejected[0] = 1.5, 1.5  # margin 0
    edited[1], rejected[1] = 60.0, -60.0  # a large margin
    pairs = [(chosen, rejected), (edited, chosen), (edited, rejected)]
    for better, worse in pairs:
        np.testing.assert_allclose(bradley_terry_loss(better, worse), -log_sigmoid(better.astype(np.float64) - worse),
                                   rtol=1e-5, atol=1e-7)
    three = np.mean([bradley_terry_loss(b, w) for b, w in pairs], axis=0)
    expected = np.mean([-log_sigmoid(b.astype(np.float64) - w) for b, w in pairs], axis=0)
    np.testing.assert_allclose(three, expected, rtol=1e-5)
    assert float(bradley_terry_loss(np.float32(1.5), np.float32(1.5))) == np.float32(np.log(2))


def mask_by_loops(q_pos, q_seg, k_pos, k_seg):
    """The rule of ops.attention written out pair by pair."""
    b, t, s = q_pos.shape[0], q_pos.shape[1], k_pos.shape[1]
    out = np.zeros((b, t, s), bool)
    for i in range(b):
        for x in range(t):
            for y in range(s):
                same = q_seg[i, x] == k_seg[i, y]
                shared_prefix = k_seg[i, y] < 0 and q_seg[i, x] > 0
                out[i, x, y] = (same or shared_prefix) and k_pos[i, y] <= q_pos[i, x]
    return out


def test_shared_prefix_rule():
    # Row 0: the reward model's packed row: prompt (segment -1), two replies at the prompt's next positions, padding.
    # Row 1: ordinary packed documents: no negative id, so the plain document rule.
    seg = np.array([[-1, -1, -1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 2, 2, 2, 2, 0, 0]])
    pos = np.array([[0, 1, 2, 3, 4, 3, 4, 5, 0], [0, 1, 2, 0, 1, 2, 3, 0, 0]])
    mask = np.asarray(attention.attention_mask(pos, seg, pos, seg))
    np.testing.assert_array_equal(mask, mask_by_loops(pos, seg, pos, seg))
    assert mask[0, 5, :3].all() and not mask[0, 5, 3:5].any()  # reply 2 sees the prompt, not reply 1
    assert not mask[0, 1, 3:].any()  # the prompt sees no reply
    assert not mask[0, 8, :8].any() and not mask[0, :8, 8].any()  # padding and real tokens never meet
    plain = (seg[1][:, None] == seg[1][None, :]) & (pos[1][None, :] <= pos[1][:, None])
    np.testing.assert_array_equal(mask[1], plain)


def test_fused_kernels_refuse_shared_prefix_rows():
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    seg = jnp.array([[-1] * 8 + [1] * 8])
    pos = jnp.concatenate([jnp.arange(8), jnp.arange(8, 16)])[None]
    with pytest.raises(ConfigError, match="negative segment ids"):
        flash_attention.flash_attention(q, q, q, pos, seg, pos, seg, interpret=True)
    with pytest.raises(ConfigError, match="negative segment ids"):
        flash_attention.cudnn_attention(q, q, q, pos, seg, pos, seg, implementation="xla")
    under_jit = jax.jit(lambda s: flash_attention.cudnn_attention(q, q, q, pos, s, pos, s, implementation="xla"))
    assert np.isnan(np.asarray(under_jit(seg))).all()
    assert not np.isnan(np.asarray(under_jit(jnp.ones_like(seg)))).any()


def reward_rows(rows=4, length=32, seed=0):
    """Packed reward-model rows: a prompt (segment -1), 2-3 replies at positions from the prompt's end, padding."""
    rng = np.random.default_rng(seed)
    seg, pos = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
    for row in range(rows):
        prompt = rng.integers(3, 10)
        seg[row, :prompt], pos[row, :prompt] = -1, np.arange(prompt)
        at = prompt
        for reply in range(1, rng.integers(3, 5)):
            n = rng.integers(2, 7)
            seg[row, at:at + n], pos[row, at:at + n] = reply, np.arange(prompt, prompt + n)
            at += n
        pos[row, at:] = np.arange(length - at)  # padding: segment 0
    return pos, seg


def test_context_parallel_attention_follows_the_shared_prefix_rule():
    """Ring attention builds each block's mask with the one rule: on 4 sequence shards it equals dense attention
    under the mask written out pair by pair."""
    pos, seg = reward_rows()
    r = np.random.default_rng(1)
    q, k, v = (r.standard_normal(shape, np.float32) for shape in ((4, 32, 4, 8), (4, 32, 2, 8), (4, 32, 2, 8)))
    mask = mask_by_loops(pos, seg, pos, seg)
    kk, vv = np.repeat(k, 2, axis=2).astype(np.float64), np.repeat(v, 2, axis=2).astype(np.float64)
    scores = np.where(mask[:, None], np.einsum("btnh,bsnh->bnts", q.astype(np.float64), kk) / np.sqrt(8), -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bnts,bsnh->btnh", probs / probs.sum(-1, keepdims=True), vv)
    with sharding.activate(sharding.make_mesh("sequence=4,data=2")):
        ring = jax.jit(lambda *a: context_parallel.attention(*a, impl="ring"))(q, k, v, pos, seg)
    np.testing.assert_allclose(np.asarray(ring), expected, rtol=1e-5, atol=1e-5)
