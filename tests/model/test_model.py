"""The network's own variants (packing, scan / remat, bfloat16, the KV cache), RoPE scaling and the spec's parameter
counts; no torch needed (parity with transformers is test_model_parity.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PARITY_CONFIGS, our_logits, random_params

from llama_jax import config, model
from llama_jax.errors import ConfigError, DataError


def test_rope_frequencies_follow_the_spec_formula():
    cfg = PARITY_CONFIGS["gqa4_llama3_rope"]
    h, s = cfg.resolved_head_dim, cfg.rope_scaling
    base = [1.0 / cfg.rope_theta ** (2 * i / h) for i in range(h // 2)]
    expected = []
    for f in base:  # the spec's words, case by case
        w = 2 * np.pi / f
        if w < s.original_max_position / s.high_freq_factor:
            expected.append(f)
        elif w > s.original_max_position / s.low_freq_factor:
            expected.append(f / s.factor)
        else:
            smooth = (s.original_max_position / w - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            expected.append((1 - smooth) * f / s.factor + smooth * f)
    got = model.rope_frequencies(cfg)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert len({round(g / b, 6) for g, b in zip(got, base)}) > 2  # kept, scaled and interpolated bands all occur


@pytest.mark.slow  # 12 s on 2 busy cores
def test_packed_documents_equal_separate_documents():
    cfg = PARITY_CONFIGS["gqa4_llama3_rope"]
    params = random_params(cfg)
    rng = np.random.default_rng(3)
    doc_a, doc_b = rng.integers(0, cfg.vocab_size, (1, 7)), rng.integers(0, cfg.vocab_size, (1, 12))
    packed = np.concatenate([doc_a, doc_b, [[0, 0, 0]]], axis=1).astype(np.int32)
    segment_ids = np.array([[1] * 7 + [2] * 12 + [0] * 3], np.int32)
    positions = np.array([list(range(7)) + list(range(12)) + [0, 0, 0]], np.int32)
    got = our_logits(cfg, params, packed, positions=positions, segment_ids=segment_ids)
    np.testing.assert_allclose(got[:, :7], our_logits(cfg, params, doc_a.astype(np.int32)), atol=1e-5)
    np.testing.assert_allclose(got[:, 7:19], our_logits(cfg, params, doc_b.astype(np.int32)), atol=1e-5)
    # without segment ids the second document would see the first: the test can tell the difference
    unmasked = our_logits(cfg, params, packed, positions=positions)
    assert np.abs(unmasked[:, 7:19] - got[:, 7:19]).max() > 1e-3


def _loss_and_grads(cfg, params, tokens):
    def loss(p):
        logits = model.Llama(cfg).apply({"params": p}, tokens)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("remat", ["none", "full", "dots", "dots_no_batch"])
@pytest.mark.slow  # 47 s on 2 busy cores
def test_scan_unscanned_and_remat_agree(remat):
    base = PARITY_CONFIGS["gqa4_llama3_rope"]
    params = random_params(base)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, base.vocab_size, (2, 24)), jnp.int32)
    ref_loss, ref_grads = _loss_and_grads(base, params, tokens)
    for scan in (True, False):
        cfg = base.replace(remat=remat, scan_layers=scan)
        p = params if scan else model.unstack_layers(params, cfg.num_layers)
        loss, grads = _loss_and_grads(cfg, p, tokens)
        if not scan:
            grads = model.stack_layers(grads, cfg.num_layers)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), grads, ref_grads)


def test_bfloat16_compute_tracks_float32():
    cfg = PARITY_CONFIGS["mha"]
    params = random_params(cfg)
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 16), dtype=np.int32)
    f32 = our_logits(cfg, params, tokens)
    bf16 = our_logits(cfg.replace(dtype="bfloat16"), params, tokens)
    assert bf16.dtype == np.float32
    assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()


SPEC_COUNTS = {
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", list(SPEC_COUNTS))
def test_parameter_counts_match_the_spec(name):
    cfg = config.get(name)
    assert cfg.num_params() == SPEC_COUNTS[name]
    # the module's own (abstract) tree agrees with the formula, without allocating 405B floats
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.param_shapes(cfg))) == SPEC_COUNTS[name]


def test_tiny_initialised_count_and_logical_axes():
    cfg = config.get("tiny")
    params = model.init_params(cfg, jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
    axes = model.logical_axes(cfg)
    assert tuple(axes["layers"]["attention"]["query"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(axes["lm_head"]) == ("embed", "vocab")
    # every leaf is named, one name per dimension
    jax.tree.map(lambda spec, p: len(spec) == p.ndim or pytest.fail(f"{spec} vs {p.shape}"), axes, params,
                 is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


@pytest.mark.slow  # 14 s on 2 busy cores
def test_kv_cache_decoding_matches_full_forward():
    cfg = PARITY_CONFIGS["gqa4_llama3_rope"]
    params = random_params(cfg)
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    full = our_logits(cfg, params, tokens)
    cache = model.init_cache(cfg, batch=2, length=16)
    llama = model.Llama(cfg)
    logits, cache = llama.apply({"params": params}, tokens[:, :5], cache=cache)
    steps = [logits]
    for t in range(5, 12):
        logits, cache = llama.apply({"params": params}, tokens[:, t:t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
    assert int(cache["index"]) == 12


def test_bad_inputs_raise_clear_errors():
    cfg = config.get("tiny")
    params = model.init_params(cfg, jax.random.key(0))
    llama = model.Llama(cfg)
    with pytest.raises(DataError, match=r"outside the vocabulary \[0, 512\)"):
        llama.apply({"params": params}, jnp.array([[1, 2, 512]]))
    with pytest.raises(DataError, match=r"\[batch, seq\]"):
        llama.apply({"params": params}, jnp.array([1, 2, 3]))
    with pytest.raises(DataError, match="positions has shape"):
        llama.apply({"params": params}, jnp.array([[1, 2, 3]]), positions=jnp.zeros((1, 2), jnp.int32))
    bad = jax.tree.map(lambda x: x, params)
    bad["layers"]["attention"]["query"] = bad["layers"]["attention"]["query"][:, :, :2]
    with pytest.raises(ConfigError, match=r"layers'\]\['attention'\]\['query'\].*shape \(4, 128, 2, 32\)"):
        model.check_params(bad, cfg)
    with pytest.raises(Exception, match="query"):  # flax names the parameter and both shapes
        llama.apply({"params": bad}, jnp.array([[1, 2, 3]]))
    with pytest.raises(ConfigError, match="unknown model preset 'llama4'"):
        config.get("llama4")
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        config.get("tiny", n_layers=3)
