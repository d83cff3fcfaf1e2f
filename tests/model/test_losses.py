"""Chunked cross-entropy against NumPy formulas, and packed-document training against per-document losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import config, model
from llama_jax.data import rows_to_batch
from llama_jax.losses import chunked_cross_entropy, cross_entropy, next_token_loss
from llama_jax.train.pretrain import make_loss_fn


def numpy_cross_entropy(hidden, head, targets):
    """Per-token NLL, and its gradients w.r.t. hidden and head for the loss sum(nll), in float64."""
    hidden, head = np.asarray(hidden, np.float64), np.asarray(head, np.float64)
    logits = hidden @ head
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    dlogits = np.exp(log_probs)
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(dlogits, targets[..., None], -1) - 1, -1)
    return nll, dlogits @ head.T, np.einsum("btd,btv->dv", hidden, dlogits)


@pytest.mark.parametrize("chunk", [8, 13, 37, None])
def test_chunked_cross_entropy_matches_numpy(chunk):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 5, 16)).astype(np.float32)
    head = rng.normal(size=(16, 37)).astype(np.float32)  # 37 columns: no chunk size above divides it but 37
    targets = rng.integers(0, 37, size=(2, 5))
    nll, grad_hidden, grad_head = numpy_cross_entropy(hidden, head, targets)
    ours, _ = chunked_cross_entropy(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), chunk)
    np.testing.assert_allclose(ours, nll, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda h, w: chunked_cross_entropy(h, w, jnp.asarray(targets), chunk)[0].sum(), (0, 1))(
        jnp.asarray(hidden), jnp.asarray(head))
    np.testing.assert_allclose(grads[0], grad_hidden, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[1], grad_head, rtol=1e-4, atol=1e-5)


def test_chunked_equals_unchunked_on_large_logits():
    """Logits of size ~50 would overflow a naive exp; the online logsumexp must not care."""
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(3, 7, 32)) * 4, jnp.float32)
    head = jnp.asarray(rng.normal(size=(32, 300)) * 2, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 300, size=(3, 7)))
    full = cross_entropy(hidden @ head, targets)
    chunked = chunked_cross_entropy(hidden, head, targets, 64)
    for a, b in zip(full, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_mask_and_z_loss():
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(2, 6, 8)).astype(np.float32)
    head = rng.normal(size=(8, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 6))
    mask = np.array([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    nll, _, _ = numpy_cross_entropy(hidden, head, targets)
    logits = hidden.astype(np.float64) @ head
    log_z = np.log(np.exp(logits).sum(-1))
    expected_ce = (nll * mask).sum() / mask.sum()
    expected_z = (log_z**2 * mask).sum() / mask.sum()
    loss, metrics = next_token_loss(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), jnp.asarray(mask),
                                    chunk_size=4, z_loss=1e-3)
    np.testing.assert_allclose(metrics["cross_entropy"], expected_ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["z_loss"], expected_z, rtol=1e-5)
    np.testing.assert_allclose(loss, expected_ce + 1e-3 * expected_z, rtol=1e-5)


def test_packed_row_equals_separate_documents():
    """Two documents packed into one row (segment ids, restarting positions, padding) give the same loss and
    gradients as each document run on its own, with the loss weighted by its token count."""
    cfg = config.get("tiny", num_layers=2)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.1, jnp.float32), model.param_shapes(cfg))
    doc_a, doc_b = rng.integers(0, 256, 9), rng.integers(0, 256, 6)
    pad = 4
    packed = {
        "tokens": np.concatenate([doc_a, doc_b, np.zeros(pad, int)])[None],
        "tokens_segment_ids": np.array([[1] * 9 + [2] * 6 + [0] * pad]),
        "tokens_positions": np.array([list(range(9)) + list(range(6)) + [0] * pad]),
    }
    batch = {k: jnp.asarray(v) for k, v in rows_to_batch(packed).items()}
    assert batch["loss_mask"].sum() == 8 + 5  # one target fewer than tokens per document
    loss_fn = make_loss_fn(cfg, chunk_size=100)
    packed_loss, packed_grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None)[0]))(params)

    def document_nll_sum(p, doc):
        logits = model.Llama(cfg).apply({"params": p}, jnp.asarray(doc[:-1])[None])
        return cross_entropy(logits, jnp.asarray(doc[1:])[None])[0].sum()

    def separate(p):
        return (document_nll_sum(p, doc_a) + document_nll_sum(p, doc_b)) / 13

    separate_loss, separate_grads = jax.jit(jax.value_and_grad(separate))(params)
    np.testing.assert_allclose(packed_loss, separate_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(separate_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
