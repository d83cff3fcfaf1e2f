"""Low-rank adapters: the adapted network starts equal to its base, runs W + scale A B (checked against a NumPy
projection), merges into a plain tree with the same logits, and shards like the weights it adapts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params
from flax import traverse_util

from llama_jax import lora, model, sharding
from llama_jax.config import LORA_TARGETS, LoRA, ModelConfig
from llama_jax.errors import ConfigError

CFG = ModelConfig(vocab_size=96, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48, max_seq_len=64)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 10)), jnp.int32)


def _trained(adapters, seed=3, std=0.05):
    """Adapters as training leaves them: B no longer zero."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("targets", [LORA_TARGETS, ("query", "value"), ("out", "down")])
def test_step_zero_equals_the_base_and_merged_equals_unmerged(targets):
    base = random_params(CFG)
    cfg = CFG.replace(lora=LoRA(rank=4, alpha=8.0, targets=targets))
    adapters = lora.init(cfg, jax.random.key(1))
    adapted = model.Llama(cfg).apply({"params": lora.join(base, adapters)}, TOKENS)
    np.testing.assert_array_equal(adapted, model.Llama(CFG).apply({"params": base}, TOKENS))  # B = 0: exactly
    trained = lora.join(base, _trained(adapters))
    unmerged = model.Llama(cfg).apply({"params": trained}, TOKENS)
    merged = model.Llama(CFG).apply({"params": lora.merge(trained, cfg)}, TOKENS)
    assert float(jnp.abs(unmerged - model.Llama(CFG).apply({"params": base}, TOKENS)).max()) > 1e-2  # it adapts
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)
    names = {p.split("/")[-1].removesuffix("_lora_a") for p in traverse_util.flatten_dict(adapters, sep="/")
             if p.endswith("_lora_a")}
    assert names == set(targets)


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_kernel_is_w_plus_scale_b_a_as_peft_writes_it(rslora):
    """PEFT's layout: lora_A.weight [r, in], lora_B.weight [out, r], W_eff = W + scale B A (torch's [out, in])."""
    cfg = CFG.replace(lora=LoRA(rank=4, alpha=6.0, targets=("query",), rslora=rslora))
    base, adapters = random_params(CFG), _trained(lora.init(cfg, jax.random.key(1)))
    merged = lora.merge(lora.join(base, adapters), cfg)
    d, n, h = CFG.dim, CFG.num_heads, CFG.resolved_head_dim
    scale = 6.0 / (np.sqrt(4) if rslora else 4)
    for layer in range(CFG.num_layers):
        w = np.asarray(base["layers"]["attention"]["query"][layer]).reshape(d, n * h).T  # [out, in]
        lora_a = np.asarray(adapters["layers"]["attention"]["query_lora_a"][layer]).T  # [r, in]
        lora_b = np.asarray(adapters["layers"]["attention"]["query_lora_b"][layer]).reshape(4, n * h).T  # [out, r]
        expected = (w.astype(np.float64) + scale * lora_b.astype(np.float64) @ lora_a).T.reshape(d, n, h)
        np.testing.assert_allclose(merged["layers"]["attention"]["query"][layer], expected, atol=1e-6)


def test_a_is_drawn_as_peft_draws_it_and_b_is_zero():
    cfg = ModelConfig(vocab_size=96, dim=256, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=512,
                      lora=LoRA(rank=8, targets=("query", "down")))
    adapters = lora.init(cfg, jax.random.key(0))
    for path, fan_in in (("attention/query_lora_a", 256), ("feed_forward/down_lora_a", 512)):
        a = np.asarray(traverse_util.flatten_dict(adapters["layers"], sep="/")[path])
        bound = 1 / np.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
        assert bound >= np.abs(a).max() > 0.95 * bound and abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound
        assert not np.array_equal(a[0], a[1])  # each layer its own draw
    assert all(not np.any(b) for p, b in traverse_util.flatten_dict(adapters, sep="/").items() if p.endswith("_b"))


def test_adapters_shard_as_the_weights_they_adapt():
    cfg = CFG.replace(lora=LoRA(rank=4))
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    specs = traverse_util.flatten_dict(jax.tree.map(lambda s: s.spec, model.param_shardings(cfg, mesh)), sep="/")
    assert specs["layers/attention/query_lora_a"] == jax.sharding.PartitionSpec("pipeline", "fsdp", None)
    assert specs["layers/attention/query_lora_b"] == jax.sharding.PartitionSpec("pipeline", None, "tensor", None)
    assert specs["layers/feed_forward/down_lora_a"] == jax.sharding.PartitionSpec("pipeline", "tensor", None)


def test_bad_adapter_settings_are_config_errors():
    for bad in (dict(rank=0), dict(alpha=0.0), dict(targets=("q_proj",)), dict(targets=()), dict(dropout=1.0),
                dict(dropout=-0.1)):
        with pytest.raises(ConfigError, match="LoRA"):
            LoRA(**bad)
    assert ModelConfig.from_dict(CFG.replace(lora=LoRA(rank=2)).to_dict()).lora == LoRA(rank=2)


class _Down(nn.Module):
    """The down projection's adapter path alone: [B, T, F] -> [B, T, D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        zero = jnp.zeros((*x.shape[:-1], self.cfg.dim), x.dtype)  # the projection's own output: the update alone
        return model._adapted(self, "down", zero, x, (self.cfg.ffn_dim, self.cfg.dim), ("mlp", "embed"), contracted=1)


def test_dropout_drops_the_adapter_input_as_peft_does():
    """PEFT's lora_dropout: lora_B(lora_A(dropout(x))) * scale, dropout(x) = x * mask / (1 - p) in training."""
    p, f, r = 0.5, 16, 16
    cfg = CFG.replace(ffn_dim=f, dim=16, lora=LoRA(rank=r, alpha=float(r), targets=("down",), dropout=p))  # scale 1
    key = {"dropout": jax.random.key(7)}
    identity = {"params": {"down_lora_a": jnp.eye(f), "down_lora_b": jnp.eye(r)}}
    # x = 1 through A = B = I reads the mask back: every entry 0 or 1 / (1 - p)
    revealed = np.asarray(_Down(cfg).apply(identity, jnp.ones((2, 8, f)), rngs=key))
    assert set(np.unique(revealed)) == {0.0, 1 / (1 - p)} and abs((revealed == 0).mean() - p) < 0.15
    mask = revealed != 0
    rng = np.random.default_rng(1)
    x, a, b = rng.normal(size=(2, 8, f)), rng.normal(size=(f, r)), rng.normal(size=(r, 16))
    params = {"params": {"down_lora_a": jnp.asarray(a, jnp.float32), "down_lora_b": jnp.asarray(b, jnp.float32)}}
    got = _Down(cfg).apply(params, jnp.asarray(x, jnp.float32), rngs=key)
    np.testing.assert_allclose(got, (x * mask / (1 - p)) @ a @ b * cfg.lora.scale, rtol=1e-5, atol=1e-5)
    # no key (evaluation, generation, DPO's reference): nothing dropped
    np.testing.assert_allclose(_Down(cfg).apply(params, jnp.asarray(x, jnp.float32)), x @ a @ b, rtol=1e-5, atol=1e-5)


def test_dropout_acts_only_with_a_dropout_key():
    base = random_params(CFG)
    plain_cfg = CFG.replace(lora=LoRA(rank=4, alpha=8.0))
    trained = lora.join(base, _trained(lora.init(plain_cfg, jax.random.key(1))))
    key = {"dropout": jax.random.key(5)}
    plain = model.Llama(plain_cfg).apply({"params": trained}, TOKENS)
    np.testing.assert_array_equal(model.Llama(plain_cfg).apply({"params": trained}, TOKENS, rngs=key), plain)  # p = 0
    dropping = model.Llama(CFG.replace(lora=LoRA(rank=4, alpha=8.0, dropout=0.3)))
    np.testing.assert_array_equal(dropping.apply({"params": trained}, TOKENS), plain)  # no key: eval and generation
    dropped = dropping.apply({"params": trained}, TOKENS, rngs=key)
    assert float(jnp.abs(dropped - plain).max()) > 1e-3
    np.testing.assert_array_equal(dropping.apply({"params": trained}, TOKENS, rngs=key), dropped)  # the key decides
    fresh = lora.join(base, lora.init(plain_cfg, jax.random.key(1)))  # B = 0: dropping x before A changes nothing
    np.testing.assert_array_equal(dropping.apply({"params": fresh}, TOKENS, rngs=key),
                                  model.Llama(CFG).apply({"params": base}, TOKENS))


def test_each_scanned_layer_draws_its_own_dropout_mask(monkeypatch):
    masks, draw = [], jax.random.bernoulli

    def recorded(key, p, shape):
        mask = draw(key, p, shape)
        jax.debug.callback(lambda m: masks.append(np.asarray(m)), mask)
        return mask

    monkeypatch.setattr(jax.random, "bernoulli", recorded)
    cfg = CFG.replace(lora=LoRA(rank=4, targets=("query",), dropout=0.5))
    params = lora.join(random_params(CFG), lora.init(cfg, jax.random.key(1)))
    model.Llama(cfg).apply({"params": params}, TOKENS, rngs={"dropout": jax.random.key(0)})
    assert len(masks) == CFG.num_layers and not np.array_equal(masks[0], masks[1])
