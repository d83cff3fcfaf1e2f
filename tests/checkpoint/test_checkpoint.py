"""The llama_jax checkpoint: contents, retention, atomicity under SIGKILL, restore onto other meshes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_equal, env

import llama_jax
from llama_jax import checkpoint, model, sharding
from llama_jax import config as config_lib
from llama_jax.errors import CheckpointError

CFG = config_lib.get("tiny", num_layers=2)


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)  # numpy, not model.init_params: no compile, and every leaf differs
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32), s.dtype),
                        model.param_shapes(cfg))


@pytest.fixture(scope="module")
def params():
    return _random_params(CFG)


@pytest.mark.slow  # 23 s on 2 busy cores
def test_save_restore_everything(tmp_path, params):
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    # One real update so the moments and count are not their trivial initial values.
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    rng = jax.random.key(7)
    mesh = sharding.make_mesh("fsdp=8")
    with checkpoint.CheckpointManager(tmp_path) as manager:
        assert manager.save(5, params=params, cfg=CFG, stage="sft", opt_state=opt_state,
                            data_state={"epoch": 1, "position": 123}, rng=rng,
                            stage_config={"optimizer": {"peak_lr": 3e-4}, "betas": (0.9, 0.95)},
                            tokenizer={"name": "byte", "sha256": "ab" * 32}, mesh=mesh)
        assert not manager.save(5, params=params, cfg=CFG, stage="sft")  # the step exists already
        manager.wait()
        assert manager.latest_step() == 5
        restored = manager.restore(opt_state_target=opt_state)

    assert restored.step == 5
    assert_trees_equal(restored.params, params)
    assert_trees_equal(restored.opt_state, opt_state)  # the optax NamedTuple structure comes back
    assert restored.data_state == {"epoch": 1, "position": 123}
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(rng))
    np.testing.assert_array_equal(jax.random.uniform(restored.rng, (3,)), jax.random.uniform(rng, (3,)))

    meta = json.loads((tmp_path / "checkpoints" / "5" / "metadata" / "metadata.json").read_text())
    assert meta["format_version"] == checkpoint.FORMAT_VERSION
    assert meta["llama_jax_version"] == llama_jax.__version__
    assert config_lib.ModelConfig.from_dict(meta["model_config"]) == CFG
    assert meta["tokenizer"] == {"name": "byte", "sha256": "ab" * 32}
    assert meta["stage"] == "sft"
    assert meta["stage_config"] == {"optimizer": {"peak_lr": 3e-4}, "betas": [0.9, 0.95]}
    assert meta["step"] == 5
    assert meta["mesh"] == {"data": 1, "pipeline": 1, "fsdp": 8, "tensor": 1, "sequence": 1}
    assert json.loads((tmp_path / "checkpoints" / "5" / "data_state" / "data_state.json").read_text()) == {
        "epoch": 1, "position": 123}


def test_params_only_restore_and_load(tmp_path, params):
    tx = optax.sgd(0.1)
    with checkpoint.CheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(3, params=params, cfg=CFG, stage="pretrain", opt_state=tx.init(params), data_state={"i": 1})
        restored = manager.restore(params_only=True)
    assert restored.opt_state is None and restored.data_state is None
    assert_trees_equal(restored.params, params)

    loaded, cfg, meta = checkpoint.load(str(tmp_path))  # a run dir: its latest step
    assert cfg == CFG and meta["stage"] == "pretrain"
    assert_trees_equal(loaded, params)


def test_wrong_config_lists_mismatched_leaves(tmp_path, params):
    with checkpoint.CheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(1, params=params, cfg=CFG, stage="pretrain")
        other = config_lib.get("tiny", num_layers=2, ffn_dim=256, tie_embeddings=True)
        with pytest.raises(CheckpointError) as err:
            manager.restore(params_target=model.param_shapes(other))
    message = str(err.value)
    assert "layers/feed_forward/gate: checkpoint has (2, 128, 384), target expects (2, 128, 256)" in message
    assert "not in target: lm_head" in message
    assert "attention" not in message  # only the leaves that differ are listed


def test_save_refuses_params_that_do_not_fit_the_config(tmp_path, params):
    with checkpoint.CheckpointManager(tmp_path) as manager:
        with pytest.raises(CheckpointError, match="lm_head"):
            manager.save(1, params=params, cfg=CFG.replace(tie_embeddings=True), stage="pretrain")
        assert manager.latest_step() is None


def test_keep_last_and_keep_every(tmp_path):
    cfg = config_lib.ModelConfig(vocab_size=4, dim=2, num_layers=1, num_heads=1, num_kv_heads=1, ffn_dim=2)
    tiny_params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), model.param_shapes(cfg))
    with checkpoint.CheckpointManager(tmp_path, keep_last=2, keep_every=4) as manager:
        for step in range(1, 11):
            manager.save(step, params=tiny_params, cfg=cfg, stage="pretrain")
        manager.wait()
        assert manager.all_steps() == [4, 8, 9, 10]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "4", "8", "9"]


def test_incomplete_step_directories_are_ignored(tmp_path, params):
    with checkpoint.CheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(2, params=params, cfg=CFG, stage="pretrain")
    # What a crash leaves: orbax's temporary directory, and a renamed step without the commit marker.
    (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-123").mkdir()
    bogus = tmp_path / "checkpoints" / "9"
    bogus.mkdir()
    (bogus / "params").mkdir()
    manager = checkpoint.CheckpointManager(tmp_path)
    assert manager.latest_step() == 2
    assert_trees_equal(manager.restore().params, params)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        manager.restore(9)
    manager.close()


@pytest.mark.slow  # 11 s on 2 busy cores
def test_restore_onto_other_meshes(tmp_path):
    assert jax.device_count() == 8
    save_mesh = sharding.make_mesh("fsdp=8")
    params = jax.device_put(_random_params(CFG, seed=1), model.param_shardings(CFG, save_mesh))
    assert params["embedding"].addressable_shards[0].data.shape == (512, 128 // 8)  # really split 8 ways
    expected = _host(params)
    with checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, params=params, cfg=CFG, stage="pretrain")
        manager.wait()

        tp_mesh = sharding.make_mesh("tensor=2,fsdp=4")
        target = model.abstract_params(CFG, tp_mesh)
        on_tp = manager.restore(params_target=target).params
        for leaf, want in zip(jax.tree.leaves(on_tp), jax.tree.leaves(target)):
            assert leaf.sharding == want.sharding
        # query [L, D, N, H]: D over fsdp=4, heads over tensor=2
        assert on_tp["layers"]["attention"]["query"].addressable_shards[0].data.shape == (2, 128 // 4, 4 // 2, 32)
        assert_trees_equal(_host(on_tp), expected)

        one_device = manager.restore().params  # no target: the default device
        assert {d for leaf in jax.tree.leaves(one_device) for d in leaf.devices()} == {jax.devices()[0]}
        assert_trees_equal(_host(one_device), expected)

    loaded, _, _ = checkpoint.load(str(tmp_path), shardings=tp_mesh)
    assert loaded["lm_head"].sharding == model.param_shardings(CFG, tp_mesh)["lm_head"]
    assert_trees_equal(_host(loaded), expected)


_SAVER = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from llama_jax import checkpoint, config, model
    cfg = config.get("tiny", num_layers=2, dim=256, ffn_dim=4096, vocab_size=4096)  # ~50 MB: saves take a while
    shapes = model.param_shapes(cfg)
    manager = checkpoint.CheckpointManager(sys.argv[1], keep_last=2)
    for step in range(1, 1000):
        params = jax.tree.map(lambda s: jnp.full(s.shape, step, s.dtype), shapes)
        manager.save(step, params=params, cfg=cfg, stage="pretrain", data_state={"step": step})
""")


def _kill_while_saving(script, run_dir) -> list[str]:
    """Runs the saver, SIGKILLs it as soon as a save (after the first two) is seen in flight; returns what the
    checkpoints directory held right after the kill."""
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.DEVNULL, env=env())
    checkpoints = run_dir / "checkpoints"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            names = os.listdir(checkpoints) if checkpoints.is_dir() else []
            if len([n for n in names if n.isdigit()]) >= 2 and any("orbax-checkpoint-tmp" in n for n in names):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return os.listdir(checkpoints)


@pytest.mark.slow  # 20 s on 2 busy cores
def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    caught_mid_save = 0
    for attempt in range(3):
        run_dir = tmp_path / f"run{attempt}"
        left = _kill_while_saving(script, run_dir)
        caught_mid_save += any(".orbax-checkpoint-tmp" in name for name in left)
        manager = checkpoint.CheckpointManager(run_dir)
        step = manager.latest_step()
        assert step is not None and step >= 1
        restored = manager.restore()
        assert restored.step == step and restored.data_state == {"step": step}
        for leaf in jax.tree.leaves(restored.params):
            np.testing.assert_array_equal(np.asarray(leaf, np.float32), step)
        manager.close()
        if caught_mid_save >= 1 and attempt >= 1:
            break
    assert caught_mid_save >= 1, "no kill landed while a save was being written"
