"""Pipeline parallelism on 8 simulated CPU devices: pipelined loss and gradients equal the plain scan's on one
device (GPipe and circular, composed with fsdp, data, tensor and sequence parallelism), a pipelined training run
resumes bit-identically, and its checkpoints restore onto a mesh without a pipeline axis."""

import runpy

import jax
import numpy as np
import pytest
from conftest import ROOT

from llama_jax import config, model, sharding
from llama_jax.checkpoint import CheckpointManager
from llama_jax.errors import ConfigError
from llama_jax.parallel import pipeline
from llama_jax.train import dpo, loop, pretrain, reward

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

# 8 layers: 4 pipeline ranks x 2 circular repeats of one layer each. Heads, kv heads, mlp and vocab divide by tensor=2.
CFG = config.get("tiny", vocab_size=256, dim=64, num_layers=8, num_heads=8, num_kv_heads=4, ffn_dim=128)


def packed_batch(rows=16, seq=32, seed=0):
    """Rows of two documents each (positions restart at the cut) and a little padding (segment 0) at the end."""
    rng = np.random.default_rng(seed)
    cut = rng.integers(4, seq - 8, rows)
    end = seq - rng.integers(0, 4, rows)
    index = np.arange(seq)[None]
    segment_ids = np.where(index < cut[:, None], 1, np.where(index < end[:, None], 2, 0)).astype(np.int32)
    positions = np.where(index < cut[:, None], index, index - cut[:, None]).astype(np.int32)
    return {"tokens": rng.integers(0, CFG.vocab_size, (rows, seq), dtype=np.int32),
            "targets": rng.integers(0, CFG.vocab_size, (rows, seq), dtype=np.int32),
            "positions": positions, "segment_ids": segment_ids, "loss_mask": (segment_ids > 0).astype(np.int32)}


@pytest.fixture(scope="module")
def reference():
    """Loss and gradients of the plain scanned model on one device (no mesh, no pipeline)."""
    params = model.init_params(CFG, jax.random.key(0))
    batch = packed_batch()
    loss_fn = pretrain.make_loss_fn(CFG, chunk_size=64)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, None)
    return jax.device_get(params), batch, float(loss), jax.device_get(grads)


@pytest.mark.parametrize("mesh_spec, schedule, microbatches", [
    pytest.param("pipeline=4,fsdp=2", "gpipe", 4, marks=pytest.mark.slow),  # 4 s on 2 busy cores (+ 4 s of fixture)
    pytest.param("pipeline=4,fsdp=2", "circular", 4, marks=pytest.mark.slow),  # 6 s on 2 busy cores
    ("pipeline=2,fsdp=2,tensor=2", "gpipe", 2),
    pytest.param("pipeline=2,tensor=2,sequence=2", "circular", 2, marks=pytest.mark.slow),  # 10 s on 2 busy cores
    pytest.param("pipeline=2,data=2,fsdp=2", "circular", 8, marks=pytest.mark.slow),
])
def test_pipelined_equals_unpipelined(reference, mesh_spec, schedule, microbatches):
    params, batch, want_loss, want_grads = reference
    mesh = sharding.make_mesh(mesh_spec)
    run_layers = pipeline.make_run_layers(CFG, mesh, schedule=schedule, microbatches=microbatches)
    loss_fn = pretrain.make_loss_fn(CFG, chunk_size=64, run_layers=run_layers)
    shardings = model.param_shardings(CFG, mesh)
    assert shardings["layers"]["feed_forward"]["down"].spec[0] == "pipeline"  # each rank holds only its layers
    with sharding.activate(mesh):
        step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), out_shardings=(None, shardings))
        (loss, _), grads = step(jax.device_put(params, shardings), sharding.shard_batch(batch, mesh), None)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("ranks, repeats", [(4, 2), (16, 8), (4, 8), (3, 2), (8, 3)])
def test_circular_blocks_reach_their_ranks_in_permutation_rounds(ranks, repeats):
    placed = {}
    for moves in pipeline.circular_rounds(ranks, repeats):
        assert sorted(m[0] for m in moves) == sorted(m[2] for m in moves) == list(range(ranks))  # one ppermute
        for source, block, target, slot in moves:
            placed[target, slot] = source * repeats + block  # the block's index in the stored layer order
    assert placed == {(t, r): r * ranks + t for t in range(ranks) for r in range(repeats)}


def test_bad_schedules_are_config_errors():
    mesh = sharding.make_mesh("pipeline=4,fsdp=2")
    with pytest.raises(ConfigError, match="pipeline=4: set pipeline.schedule"):
        pipeline.make_run_layers(CFG, mesh, schedule="none", microbatches=1)
    with pytest.raises(ConfigError, match="do not split into pipeline=4 x repeats=3"):
        pipeline.make_run_layers(CFG, mesh, schedule="circular", microbatches=4, circular_repeats=3)
    with pytest.raises(ConfigError, match="at least as many microbatches as pipeline ranks"):
        pipeline.make_run_layers(CFG, mesh, schedule="circular", microbatches=2)
    with pytest.raises(ConfigError, match="one of"):
        pipeline.make_run_layers(CFG, mesh, schedule="1f1b", microbatches=4)
    assert pipeline.make_run_layers(CFG, sharding.make_mesh("fsdp=8"), schedule="none", microbatches=1) is None
    assert pipeline.bubble_fraction(4, 4) == 3 / 7 and pipeline.bubble_fraction(4, 4, 2) == 3 / 11
    # Pipelines run the stages whose loss is one pass over token rows (pretrain, sft); the others say so.
    run_layers = pipeline.make_run_layers(CFG, mesh, schedule="gpipe", microbatches=4)
    for stage in (reward, dpo):
        c = runpy.run_path(str(ROOT / "configs" / stage.STAGE.name / "tiny.py"))["get_config"]()
        with pytest.raises(ConfigError, match=f"the {stage.STAGE.name} stage runs without a pipeline"):
            stage.STAGE.make_loss_fn(CFG, c, run_layers)


def _tiny_run(corpus, run_dir, steps):
    c = runpy.run_path(str(ROOT / "configs" / "pretrain" / "tiny.py"))["get_config"](str(corpus))
    c.run_dir = str(run_dir)
    c.mesh = "pipeline=2,fsdp=4"
    c.pipeline.update(schedule="circular", microbatches=2, circular_repeats=2)  # tiny: 4 layers = 2 x 2 x 1
    c.train.steps = steps
    c.logging.update(eval_every=0)
    c.checkpoint.update(every=1000)
    return c


@pytest.mark.slow  # 34 s on 2 busy cores
def test_pipelined_run_resumes_bit_identically_and_restores_on_any_mesh(tmp_path):
    corpus = tmp_path / "corpus.txt"
    words = np.random.default_rng(0).choice("the king queen night day love crown sleep".split(), size=3000)
    corpus.write_text("\n\n".join(" ".join(words[i:i + 25]) + "." for i in range(0, 3000, 25)))
    loop.run(_tiny_run(corpus, tmp_path / "straight", 6))
    loop.run(_tiny_run(corpus, tmp_path / "resumed", 3))
    loop.run(_tiny_run(corpus, tmp_path / "resumed", 6))
    straight = CheckpointManager(tmp_path / "straight").restore(6)
    resumed = CheckpointManager(tmp_path / "resumed").restore(6)
    for x, y in zip(jax.tree.leaves((straight.params, straight.opt_state)),
                    jax.tree.leaves((resumed.params, resumed.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert straight.data_state == resumed.data_state
    # The checkpoint holds the unpipelined tree: it restores onto a mesh without a pipeline axis.
    cfg = loop.model_config(_tiny_run(corpus, tmp_path, 6).model)
    flat = CheckpointManager(tmp_path / "resumed").restore(
        6, params_target=model.abstract_params(cfg, sharding.make_mesh("fsdp=8")))
    for x, y in zip(jax.tree.leaves(flat.params), jax.tree.leaves(straight.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
