"""Meshes, the rules table and sharded steps on 8 simulated CPU devices (tests/conftest.py sets XLA_FLAGS)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import config, model, sharding
from llama_jax.errors import ConfigError, DataError
from llama_jax.train import pretrain, step

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

# Divisible by every mesh below: tensor 2 splits 8 heads / 4 kv heads / 128 mlp / 256 vocab; fsdp 8 splits 64.
CFG = config.get("tiny", vocab_size=256, dim=64, num_layers=2, num_heads=8, num_kv_heads=4, ffn_dim=128)
MESHES = {  # (data, fsdp, tensor, sequence)
    "data8": "data=8",
    "fsdp8": "fsdp=8",
    "2x2x2": "data=2,fsdp=2,tensor=2",
    "fsdp2_tp2_cp2": "fsdp=2,tensor=2,sequence=2",
}


def packed_batch(batch=8, seq=32, seed=0):
    """Rows of 1-3 documents (positions restart per document) with padding (segment 0) at the end."""
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(4, seq - 2), size=rng.integers(1, 3), replace=False))
        start = 0
        for doc, end in enumerate([*cuts, seq - rng.integers(0, 4)], start=1):
            segment_ids[row, start:end] = doc
            positions[row, start:end] = np.arange(end - start)
            start = end
    tokens = rng.integers(0, CFG.vocab_size, (batch, seq), dtype=np.int32)
    targets = rng.integers(0, CFG.vocab_size, (batch, seq), dtype=np.int32)
    return {"tokens": tokens, "targets": targets, "segment_ids": segment_ids, "positions": positions,
            "loss_mask": (segment_ids > 0).astype(np.int32)}


def loss_fn(params, batch):
    logits = model.Llama(CFG).apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(losses * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])


@pytest.fixture(scope="module")
def reference():
    params = model.init_params(CFG, jax.random.key(0))
    batch = packed_batch()
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, batch)
    return jax.device_get(params), batch, float(loss), jax.device_get(grads)


def test_rules_give_the_documented_layout():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    specs = jax.tree.map(lambda s: s.spec, model.param_shardings(CFG, mesh))
    layer = specs["layers"]
    assert specs["embedding"] == P("tensor", "fsdp")
    assert specs["lm_head"] == P("fsdp", "tensor")
    assert layer["attention"]["query"] == P("pipeline", "fsdp", "tensor", None)
    assert layer["attention"]["key"] == P("pipeline", "fsdp", "tensor", None)
    assert layer["attention"]["out"] == P("pipeline", "tensor", None, "fsdp")
    assert layer["feed_forward"]["gate"] == P("pipeline", "fsdp", "tensor")
    assert layer["feed_forward"]["down"] == P("pipeline", "tensor", "fsdp")
    assert layer["attention_norm"]["scale"] == P("pipeline", "fsdp")
    # Activations: batch claims fsdp first, so embed stays whole; length goes to sequence.
    assert nn.logical_to_mesh_axes(("batch", "length", "embed"), sharding.LOGICAL_RULES) == P(
        ("data", "fsdp"), "sequence", None)
    assert nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"), sharding.LOGICAL_RULES) == P(
        ("data", "fsdp"), "sequence", "tensor", None)


def test_parse_mesh():
    assert sharding.parse_mesh("data=2,fsdp=2,tensor=2", 8) == {"data": 2, "pipeline": 1, "fsdp": 2, "tensor": 2,
                                                                "sequence": 1}
    assert sharding.parse_mesh("tensor=2, data=-1", 8) == {"data": 4, "pipeline": 1, "fsdp": 1, "tensor": 2,
                                                           "sequence": 1}
    assert sharding.parse_mesh("pipeline=4,fsdp=-1", 8)["pipeline"] == 4
    assert sharding.parse_mesh(None, 8) == {"data": 1, "pipeline": 1, "fsdp": 8, "tensor": 1, "sequence": 1}
    assert sharding.parse_mesh({"sequence": 4, "fsdp": 2}, 8)["sequence"] == 4
    with pytest.raises(ConfigError, match="has 4 devices"):
        sharding.parse_mesh("data=2,tensor=2", 8)
    with pytest.raises(ConfigError, match="unknown axis name.*'model'"):
        sharding.parse_mesh("model=8", 8)
    with pytest.raises(ConfigError, match="cannot parse"):
        sharding.parse_mesh("data:8", 8)
    with pytest.raises(ConfigError, match="not divisible by 3"):
        sharding.parse_mesh("data=3,fsdp=-1", 8)
    with pytest.raises(ConfigError):
        sharding.make_mesh("data=16")


def test_old_axis_name_stage_still_parses_for_one_release(capsys):
    """``stage=`` (the pipeline axis's old name) in a mesh spec, and in the mesh an older checkpoint recorded, reads
    as ``pipeline`` and says so once on stderr; naming the axis both ways is an error."""
    sharding._say_renamed.cache_clear()
    assert sharding.parse_mesh("stage=4,fsdp=-1", 8) == sharding.parse_mesh("pipeline=4,fsdp=-1", 8)
    recorded = {"data": 1, "stage": 2, "fsdp": 4, "tensor": 1, "sequence": 1}  # an older checkpoint's metadata
    assert sharding.parse_mesh(recorded, 8) == {"data": 1, "pipeline": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
    assert sharding.make_mesh("stage=2,fsdp=4").shape["pipeline"] == 2
    assert capsys.readouterr().err == "deprecated: mesh axis stage -> use pipeline\n"
    with pytest.raises(ConfigError, match="names axis 'pipeline' twice"):
        sharding.parse_mesh("stage=2,pipeline=2,fsdp=2", 8)


def test_axis_that_does_not_divide_is_a_config_error():
    mesh = sharding.make_mesh("tensor=8")
    with pytest.raises(ConfigError, match=r"\['layers'\]\['attention'\]\['key'\].*not divisible by tensor = 8"):
        model.param_shardings(CFG, mesh)  # 4 kv heads over 8 devices
    with pytest.raises(DataError, match="divisible by 8"):
        sharding.shard_batch({"tokens": np.zeros((4, 8), np.int32)}, sharding.make_mesh("fsdp=8"))


@pytest.mark.slow  # 15 s on 2 busy cores
def test_init_params_is_born_sharded_and_equals_unsharded_init():
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    params = model.init_params(CFG, jax.random.key(3), mesh)
    reference = model.init_params(CFG, jax.random.key(3))
    query = params["layers"]["attention"]["query"]  # [L, D, N, H] split D/4 and N/2
    assert query.sharding.spec == P("pipeline", "fsdp", "tensor", None)
    assert {s.data.shape for s in query.addressable_shards} == {(2, 16, 4, 8)}
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)  # same draws


@pytest.mark.parametrize("name", MESHES)
@pytest.mark.slow  # 43 s on 2 busy cores
def test_loss_and_grads_match_single_device(reference, name):
    params, batch, want_loss, want_grads = reference
    mesh = sharding.make_mesh(MESHES[name])
    shardings = model.param_shardings(CFG, mesh)
    sharded_params = jax.device_put(params, shardings)
    sharded_batch = sharding.shard_batch(batch, mesh)
    with sharding.activate(mesh):
        step = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(None, shardings))
        loss, grads = step(sharded_params, sharded_batch)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    for (path, got), want, expected in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads),
                                           jax.tree.leaves(shardings)):
        assert got.sharding.spec == expected.spec, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def test_state_shardings_follow_params():
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    shardings = step.state_shardings(CFG, optax.adamw(1e-3), mesh)
    adam = shardings.opt_state[0]
    assert adam.mu["layers"]["feed_forward"]["down"].spec == P("pipeline", "tensor", "fsdp")
    assert adam.nu["embedding"].spec == P("tensor", "fsdp")
    assert adam.count.spec == P()
    assert shardings.params["lm_head"].spec == P("fsdp", "tensor")
    assert shardings.step.spec == P() and shardings.rng.spec == P()


def compiled_grad_step(loss, cfg, mesh_spec, batch):
    """The compiled (SPMD-partitioned, per-device) program of value_and_grad(loss) on a mesh."""
    mesh = sharding.make_mesh(mesh_spec)
    params = model.abstract_params(cfg, mesh)
    arrays = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
              for k, v in batch.items()}
    with sharding.activate(mesh):
        return jax.jit(jax.value_and_grad(loss)).lower(params, arrays).compile()


def test_embedding_lookup_never_holds_the_global_batch():
    # With data and fsdp both > 1, GSPMD used to reshard the lookup's embed-split rows by replicating all 16
    # rows' embeddings on every device ("involuntary full rematerialization"; it picks that plan for a 512 x 64
    # table, not for 256 x 64); each device owns 4 rows.
    cfg = CFG.replace(vocab_size=512)

    def loss(params, batch):
        return jnp.mean(model.Llama(cfg).apply({"params": params}, batch["tokens"], output="hidden") ** 2)

    hlo = compiled_grad_step(loss, cfg, "data=2,fsdp=2,tensor=2", packed_batch(batch=16, seq=24)).as_text()
    assert "[4,24," in hlo  # local rows do appear: the pattern below would find the global ones
    assert not re.search(r"\[16,24,\d+\]", hlo), re.findall(r"\S+\[16,24,\d+\]\S*", hlo)[:5]


@pytest.mark.slow  # 15 s on 2 busy cores
def test_tensor_parallelism_splits_the_chunked_loss():
    # The vocabulary is split over `tensor`; the chunked loss must keep it split (each device computes logits
    # for its own shard) rather than gather the LM head and repeat the whole loss on every tensor rank.
    loss = pretrain.make_loss_fn(CFG, chunk_size=64)  # 4 chunks of the 256-token vocabulary
    batch = packed_batch()

    def flops(mesh_spec):
        cost = compiled_grad_step(lambda p, b: loss(p, b, None)[0], CFG, mesh_spec, batch).cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    # Norms and other element-wise work on the replicated rows are repeated per tensor rank: ~1% here.
    assert flops("fsdp=4,tensor=2") <= 1.05 * flops("fsdp=8")
