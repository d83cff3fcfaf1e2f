"""The model with the fused attention kernel (attention="flash"; Pallas's interpreter on CPU) equals the dense model:
logits and gradients on packed rows with padding, GQA groups 1 and 4, one device and a sharded mesh, and training on
CPU with the default attention is exactly the dense path; an older config's attention="auto" reads as "dense"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import config, model, sharding
from llama_jax.train import pretrain


def packed_batch(cfg, rows=2, length=48, seed=0):
    """Rows of 1-3 documents then padding (segment 0), positions restarting per document."""
    rng = np.random.default_rng(seed)
    segments, positions = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
    for r in range(rows):
        start = 0
        for doc in range(1, rng.integers(2, 5)):
            size = int(rng.integers(5, 15))
            segments[r, start:start + size], positions[r, start:start + size] = doc, np.arange(size)
            start += size
    tokens = rng.integers(0, cfg.vocab_size, (rows, length)).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)
    loss_mask = ((segments > 0) & (np.roll(segments, -1, axis=1) == segments)).astype(np.int32)
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segments, positions=positions)


@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.slow  # 59 s on 2 busy cores
def test_flash_model_equals_dense_model(kv_heads):
    dense = config.get("tiny", num_layers=2, num_heads=4, num_kv_heads=kv_heads, attention="dense")
    flash = dense.replace(attention="flash")
    params = model.init_params(dense, jax.random.key(0))
    batch = packed_batch(dense)
    real = batch["segment_ids"] > 0

    def logits(cfg):
        return np.asarray(model.Llama(cfg).apply({"params": params}, batch["tokens"], batch["positions"],
                                                 batch["segment_ids"]))

    np.testing.assert_allclose(logits(flash)[real], logits(dense)[real], atol=2e-5, rtol=1e-5)

    def grads(cfg):
        return jax.grad(lambda p: pretrain.make_loss_fn(cfg, chunk_size=None)(p, batch, None)[0])(params)

    for got, want in zip(jax.tree.leaves(grads(flash)), jax.tree.leaves(grads(dense))):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4)


@pytest.mark.slow  # 46 s on 2 busy cores
def test_flash_runs_per_shard_on_a_mesh():
    dense = config.get("tiny", num_layers=1, attention="dense")
    params = model.init_params(dense, jax.random.key(1))
    batch = packed_batch(dense, rows=4, length=32, seed=3)
    mesh = sharding.make_mesh("fsdp=2,tensor=2", devices=jax.devices()[:4])

    def loss(cfg):
        fn = pretrain.make_loss_fn(cfg, chunk_size=None)
        with sharding.activate(mesh):
            sharded = jax.device_put(params, model.param_shardings(cfg, mesh))
            return jax.jit(jax.value_and_grad(lambda p, b: fn(p, b, None)[0]))(sharded, sharding.shard_batch(batch,
                                                                                                           mesh))

    (want, want_grads), (got, got_grads) = loss(dense), loss(dense.replace(attention="flash"))
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-4)


def test_the_default_is_the_dense_path_and_old_auto_reads_as_dense(capsys):
    cfg = config.get("tiny", num_layers=1)
    assert cfg.attention == "dense" and model.attention_impl(cfg, cached=False) == "dense"
    old = config.ModelConfig.from_dict({**cfg.to_dict(), "attention": "auto"})  # older configs and metadata
    assert old == cfg
    assert capsys.readouterr().err == 'deprecated: ModelConfig.attention "auto" -> use "dense"\n'
    with pytest.raises(config.ConfigError, match="attention must be one of"):
        cfg.replace(attention="auto")
    assert model.attention_impl(cfg.replace(attention="flash"), cached=True) == "dense"  # decode steps stay dense
    params = model.init_params(cfg, jax.random.key(2))
    tokens = jnp.arange(12)[None] % cfg.vocab_size
    np.testing.assert_array_equal(model.Llama(old).apply({"params": params}, tokens),
                                  model.Llama(cfg.replace(attention="dense")).apply({"params": params}, tokens))
