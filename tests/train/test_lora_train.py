"""Stages with low-rank adapters (config.lora) through the command users run: only the adapters train and are saved,
the base stays frozen and is read again on resume (bit-identical), DPO's reference is the base with the adapters off
(ln 2 and accuracy 0.5 at its first step)."""

import json
import math
import runpy
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, env, losses_by_step, read_metrics, wait_for
from flax import traverse_util

from llama_jax import checkpoint, lora, model
from llama_jax.errors import ConfigError
from llama_jax.train import loop

PRETRAIN_TINY, SFT_TINY, DPO_TINY = (ROOT / "configs" / stage / "tiny.py" for stage in ("pretrain", "sft", "dpo"))
WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(f"Say {w}, please. {w.title()}!" for w in WORDS * 20))
    c = runpy.run_path(str(PRETRAIN_TINY))["get_config"](str(corpus))
    c.update(run_dir=str(tmp / "run"))
    c.train.steps = 4
    c.logging.eval_every = 0
    loop.run(c)
    return tmp / "run"


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    rng = np.random.default_rng(0)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                     {"role": "assistant", "content": f"{w.title()}!"}]}) + "\n"
                            for w in rng.choice(WORDS, 80)))
    return path


def _train(config, data, run_dir, *overrides, steps=3):
    return [sys.executable, "-m", "llama_jax.train", f"--config={config}:{data}", f"--config.run_dir={run_dir}",
            f"--config.train.steps={steps}", "--config.logging.every=1", "--config.logging.eval_every=0",
            "--config.lora.rank=4", "--config.lora.alpha=8", *overrides]


@pytest.mark.slow  # 20 s (the fast set has DPO's command and the in-process checks)
def test_sft_with_adapters_trains_and_saves_only_them(pretrained, chats, tmp_path):
    done = subprocess.run(_train(SFT_TINY, chats, tmp_path / "straight", f"--config.init_from={pretrained}", steps=2),
                          env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained: low-rank adapters, rank 4" in done.stderr
    params, cfg, metadata = checkpoint.load(str(tmp_path / "straight"), merge_adapters=False)
    saved = traverse_util.flatten_dict(params, sep="/")
    assert saved and all(lora.is_adapter(path) for path in saved)  # the base is not in the checkpoint
    lora.check(params, cfg)
    assert cfg.lora.rank == 4 and cfg.lora.scale == 2.0
    assert any(np.any(v) for p, v in saved.items() if p.endswith("_lora_b"))  # B moved from zero: it trained
    assert metadata["init_from"]["checksum"]  # where the base is, pinned


def test_gradients_reach_only_the_adapters(pretrained, chats, tmp_path):
    c = runpy.run_path(str(SFT_TINY))["get_config"](str(chats))
    c.update(run_dir=str(tmp_path / "run"), init_from=str(pretrained))
    c.lora.rank = 4
    run = loop.build(c)
    try:
        state = run.enter(run.plan.phases[0], run.state)
        base_bytes = [np.asarray(x).tobytes() for x in jax.tree.leaves(state.frozen)]
        before = jax.tree.map(np.asarray, state.params)
        for _, batch in zip(range(2), run.data):
            state, metrics = run.train_step(state, batch)
        assert [np.asarray(x).tobytes() for x in jax.tree.leaves(state.frozen)] == base_bytes
        moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, state.params)
        assert any(jax.tree.leaves(moved))
        trained = set(traverse_util.flatten_dict(state.params, sep="/"))
        assert all(lora.is_adapter(p) for p in trained)
        moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
        assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(state.params))  # Adam: 2
    finally:
        run.close()


def _preferences(path):
    rng = np.random.default_rng(1)
    path.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": f"{w.title()}!", "rejected": w.upper()})
                            + "\n" for w in rng.choice(WORDS, 64)))
    return path


def test_dpo_with_adapters_starts_at_ln2_against_the_base_with_adapters_off(pretrained, tmp_path):
    prefs = _preferences(tmp_path / "prefs.jsonl")
    done = subprocess.run(_train(DPO_TINY, prefs, tmp_path / "dpo", f"--config.init_from={pretrained}",
                                 "--config.data.seq_len=64", steps=2), env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first = [m for m in read_metrics(tmp_path / "dpo") if "loss" in m][0]
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["accuracy"] == 0.5 and first["margin"] == 0.0
    params, _, _ = checkpoint.load(str(tmp_path / "dpo"), merge_adapters=False)
    assert all(lora.is_adapter(p) for p in traverse_util.flatten_dict(params, sep="/"))  # no reference copy saved


def test_adapters_without_init_from_are_refused_before_anything_is_written(chats, tmp_path):
    done = subprocess.run(_train(SFT_TINY, chats, tmp_path / "run"), env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "error: config.lora.rank > 0 needs config.init_from" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # 28 s: a run killed mid-way resumes to the same losses as one that ran straight
def test_sft_with_adapters_resumes_bit_identically_after_sigkill(pretrained, chats, tmp_path):
    command = _train(SFT_TINY, chats, tmp_path / "killed", f"--config.init_from={pretrained}",
                     "--config.checkpoint.every=2", steps=8)
    straight = _train(SFT_TINY, chats, tmp_path / "straight", f"--config.init_from={pretrained}", steps=8)
    assert subprocess.run(straight, env=env(), capture_output=True, timeout=600).returncode == 0
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: (tmp_path / "killed" / "checkpoints" / "4").exists(), proc, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resumed from step" in resumed.stderr, resumed.stderr[-3000:]
    assert losses_by_step(tmp_path / "killed") == losses_by_step(tmp_path / "straight")


@pytest.fixture(scope="module")
def sft_adapters(pretrained, chats, tmp_path_factory):
    """A short SFT run with adapters on every projection (in this process: the commands under test read it)."""
    c = runpy.run_path(str(SFT_TINY))["get_config"](str(chats))
    c.update(run_dir=str(tmp_path_factory.mktemp("sft") / "run"), init_from=str(pretrained))
    c.lora.update(rank=4, alpha=8.0)
    c.train.steps = 3
    c.schedule.update(warmup_steps=1, peak_lr=1e-2)  # B moves well away from zero in three steps
    c.logging.eval_every = 0
    loop.run(c)
    return c.run_dir


@pytest.mark.slow  # 17 s with its fixture's run (tests/model/test_lora.py checks lora.merge)
def test_merge_folds_the_adapters_into_a_plain_checkpoint_with_the_same_logits(pretrained, sft_adapters, tmp_path):
    done = subprocess.run([sys.executable, "-m", "llama_jax.lora", "merge", "--checkpoint", sft_adapters, "--out",
                           str(tmp_path / "merged")], env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    merged, merged_cfg, _ = checkpoint.load(str(tmp_path / "merged"))
    adapters, cfg, _ = checkpoint.load(sft_adapters, merge_adapters=False)
    base, _, _ = checkpoint.load(str(pretrained))
    assert merged_cfg.lora is None and cfg.lora.rank == 4
    tokens = np.arange(1, 33)[None]
    unmerged = model.Llama(cfg).apply({"params": lora.join(base, adapters)}, tokens)
    np.testing.assert_allclose(model.Llama(merged_cfg).apply({"params": merged}, tokens), unmerged, atol=1e-5)
    assert np.abs(unmerged - model.Llama(merged_cfg).apply({"params": base}, tokens)).max() > 1e-2  # it trained
    refused = subprocess.run([sys.executable, "-m", "llama_jax.lora", "merge", "--checkpoint", str(pretrained),
                              "--out", str(tmp_path / "x")], env=env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "holds no adapters" in refused.stderr


@pytest.mark.slow  # 25 s: two commands and transformers + peft
def test_exported_adapter_loads_in_peft_with_the_same_logits(pretrained, sft_adapters, tmp_path):
    import peft
    import torch
    import transformers

    export = ["llama_jax.lora", "export", "--checkpoint", sft_adapters, "--out", str(tmp_path / "adapter")]
    convert = ["llama_jax.convert", "--checkpoint", str(pretrained), "--to", "hf", "--out", str(tmp_path / "hf")]
    for command in (export, convert):
        done = subprocess.run([sys.executable, "-m", *command], env=env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    theirs_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens = np.arange(1, 33)[None]
    with torch.no_grad():
        theirs = theirs_model(torch.from_numpy(tokens)).logits.numpy()
    params, cfg, _ = checkpoint.load(sft_adapters)  # merged on load
    np.testing.assert_allclose(np.asarray(model.Llama(cfg).apply({"params": params}, tokens)), theirs, atol=1e-4)


@pytest.mark.slow  # 12 s on 2 busy cores
def test_the_reward_stage_trains_its_head_beside_the_adapters(pretrained, tmp_path):
    prefs = _preferences(tmp_path / "prefs.jsonl")
    c = runpy.run_path(str(ROOT / "configs" / "reward" / "tiny.py"))["get_config"](str(prefs))
    c.update(run_dir=str(tmp_path / "rm"), init_from=str(pretrained))
    c.data.seq_len = 64
    c.lora.rank = 2
    c.train.steps = 2
    c.logging.eval_every = 0
    loop.run(c)
    adapters, cfg, metadata = checkpoint.load(str(tmp_path / "rm"), merge_adapters=False)
    assert metadata["extra_params"] == ["reward_head"] and cfg.lora.rank == 2
    assert {p for p in traverse_util.flatten_dict(adapters, sep="/") if not lora.is_adapter(p)} == {
        p for p in traverse_util.flatten_dict({"reward_head": adapters["reward_head"]}, sep="/")}
    merged, _, _ = checkpoint.load(str(tmp_path / "rm"))
    assert "reward_head" in merged and "embedding" in merged  # the base joined, the head kept


def _qlora_config(chats, pretrained, run_dir, base, steps):
    c = runpy.run_path(str(SFT_TINY))["get_config"](str(chats))
    c.update(run_dir=str(run_dir), init_from=str(pretrained))
    c.lora.update(rank=4, alpha=8.0, base=base)
    c.train.steps = steps
    c.schedule.update(warmup_steps=1, peak_lr=1e-2)
    c.logging.update(every=1, eval_every=steps, eval_batches=2)
    c.data.holdout_every = 8
    return c


def test_a_qlora_base_is_stored_in_nf4_and_stays_frozen(pretrained, chats, tmp_path):
    run = loop.build(_qlora_config(chats, pretrained, tmp_path / "run", "nf4", 2))
    try:
        state = run.enter(run.plan.phases[0], run.state)
        kernels = state.frozen["layers"]["attention"]["query"], state.frozen["layers"]["feed_forward"]["down"]
        assert all(type(k).__name__ == "NF4Array" for k in kernels)
        stored = sum(x.nbytes for k in kernels for x in jax.tree.leaves(k))
        assert stored < 0.14 * sum(4 * np.prod(k.shape) for k in kernels)  # 4.127 bits of float32's 32, and the stack
        frozen_bytes = [np.asarray(x).tobytes() for x in jax.tree.leaves(state.frozen)]
        for _, batch in zip(range(2), run.data):
            state, metrics = run.train_step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
        assert [np.asarray(x).tobytes() for x in jax.tree.leaves(state.frozen)] == frozen_bytes
    finally:
        run.close()


@pytest.mark.slow  # 40 s: three short SFT runs
def test_qlora_lowers_the_held_out_loss_as_lora_on_the_float_base_does(pretrained, chats, tmp_path):
    """The same SFT on the same data and steps, the base kept in float32 or in NF4: the held-out loss falls by
    nearly as much (NF4 adds its rounding, 7% of a weight's std: within a tenth of the float run's gain)."""
    start = _qlora_config(chats, pretrained, tmp_path / "start", "float", 1)
    start.schedule.peak_lr = 0.0  # B stays 0: the held-out loss of the base itself
    loop.run(start)
    finals = {}
    for base in ("start", "float", "nf4"):
        if base != "start":
            loop.run(_qlora_config(chats, pretrained, tmp_path / base, base, 20))
        finals[base] = [m["eval_loss"] for m in read_metrics(tmp_path / base) if "eval_loss" in m][-1]
    float_gain, nf4_gain = finals["start"] - finals["float"], finals["start"] - finals["nf4"]
    assert float_gain > 0.5 and nf4_gain > 0.9 * float_gain, finals


def _dropout_sft(chats, pretrained, run_dir, dropout, steps):
    c = runpy.run_path(str(SFT_TINY))["get_config"](str(chats))
    c.update(run_dir=str(run_dir), init_from=str(pretrained))
    c.lora.update(rank=4, alpha=8.0, dropout=dropout)
    c.train.steps = steps
    c.schedule.update(warmup_steps=1, peak_lr=1e-2)
    c.logging.update(every=1, eval_every=0)
    c.checkpoint.every = 2
    return c


@pytest.mark.slow  # 16 s on 2 busy cores (tests/model/test_lora.py checks the masks)
def test_adapter_dropout_trains_and_resumes_bit_identically(pretrained, chats, tmp_path):
    """The masks come from the step's key (fold_in(state.rng, step)): a resumed run draws the same ones."""
    loop.run(_dropout_sft(chats, pretrained, tmp_path / "straight", 0.1, 4))
    loop.run(_dropout_sft(chats, pretrained, tmp_path / "resumed", 0.1, 2))
    loop.run(_dropout_sft(chats, pretrained, tmp_path / "resumed", 0.1, 4))
    loop.run(_dropout_sft(chats, pretrained, tmp_path / "plain", 0.0, 4))
    straight, plain = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "plain")
    assert losses_by_step(tmp_path / "resumed") == straight and len(straight) == 4
    assert straight[1] == plain[1] and straight[4] != plain[4]  # B = 0 at step 1; then the dropped inputs tell
    _, cfg, _ = checkpoint.load(str(tmp_path / "straight"), merge_adapters=False)
    assert cfg.lora.dropout == 0.1


def test_adapter_dropout_with_a_pipeline_schedule_is_refused(pretrained, chats, tmp_path):
    c = _dropout_sft(chats, pretrained, tmp_path / "run", 0.1, 1)
    c.pipeline.schedule = "gpipe"
    with pytest.raises(ConfigError, match="config.lora.dropout > 0 does not run with a pipeline schedule"):
        loop.build(c)
