"""The generic train step and the loop: exact resume, preemption, crash during save, accumulation, NaN guard,
sharded == single device, and the tiny model learning Shakespeare."""

import json
import os
import runpy
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, env, losses_by_step, read_metrics, train_command, wait_for

from llama_jax import config, optim, sharding
from llama_jax.checkpoint import CheckpointManager
from llama_jax.data import make_batches
from llama_jax.tokenizer import get_tokenizer
from llama_jax.train import create_state, loop, make_train_step, phases, state_shardings
from llama_jax.train.pretrain import make_loss_fn

TINY = ROOT / "configs" / "pretrain" / "tiny.py"


def tiny_config(corpus, run_dir, **sections):
    c = runpy.run_path(str(TINY))["get_config"](str(corpus))
    c.run_dir = str(run_dir)
    for section, values in sections.items():
        c[section].update(values)
    return c


def test_resume_is_bit_identical(corpus, tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 more: same losses each step, same final parameters and
    optimizer state, same data position (on the 8-device mesh the suite provides)."""
    def run(name, steps):
        loop.run(tiny_config(corpus, tmp_path / name, train=dict(steps=steps), checkpoint=dict(every=3),
                             logging=dict(eval_every=0)))

    run("straight", 6)
    run("resumed", 3)
    run("resumed", 6)

    straight, resumed = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "resumed")
    assert sorted(straight) == sorted(resumed) == list(range(1, 7))
    assert straight == resumed  # exact float equality, step by step
    assert [m["resumed_from"] for m in read_metrics(tmp_path / "resumed") if "resumed_from" in m] == [3]
    a = CheckpointManager(tmp_path / "straight").restore(6)
    b = CheckpointManager(tmp_path / "resumed").restore(6)
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.data_state == b.data_state and a.step == b.step == 6
    np.testing.assert_array_equal(np.asarray(a.rng), np.asarray(b.rng))


@pytest.mark.slow  # 23 s on 2 busy cores
def test_sigterm_saves_a_checkpoint_and_exits_zero(corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_command(corpus, run_dir, "--config.checkpoint.every=1000"), env=env(),
                            stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    last_step = read_metrics(run_dir)[-1]["step"]
    assert CheckpointManager(run_dir).latest_step() == last_step >= 3  # no periodic save was due: SIGTERM's


@pytest.mark.slow  # 37 s on 2 busy cores
def test_sigkill_during_save_resumes_from_last_complete(corpus, tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    proc = subprocess.Popen(train_command(corpus, run_dir, "--config.checkpoint.every=1",
                                           "--config.checkpoint.keep_last=100"),
                            env=env(), stderr=subprocess.PIPE, text=True)

    def saving_after_a_complete_one():
        names = os.listdir(checkpoints) if checkpoints.is_dir() else []
        return any(n.isdigit() for n in names) and any("tmp" in n for n in names)

    caught = wait_for(saving_after_a_complete_one, proc)
    proc.kill()
    proc.wait()
    assert caught, "never saw a checkpoint being written"
    complete = CheckpointManager(run_dir).latest_step()
    assert complete is not None
    partial = [n for n in os.listdir(checkpoints) if "tmp" in n]

    resumed = subprocess.run(train_command(corpus, run_dir, f"--config.train.steps={complete + 3}"), env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumes = [m["resumed_from"] for m in read_metrics(run_dir) if "resumed_from" in m]
    assert resumes == [complete], (resumes, complete, partial)
    assert CheckpointManager(run_dir).latest_step() == complete + 3


def _tiny_setup(mesh, microbatch_tokens=None, loss_fn=None):
    cfg = config.get("tiny", num_layers=2)
    schedule = optim.lr_schedule(1e-2, 1, 100)
    tx = optim.adamw(schedule)
    step = make_train_step(loss_fn or make_loss_fn(cfg, chunk_size=200), tx, mesh, state_shardings(cfg, tx, mesh),
                           schedule=schedule, microbatch_tokens=microbatch_tokens, donate=False)
    return cfg, create_state(cfg, tx, mesh, seed=0), step


def _batches(corpus, n, rows=8, seq=32):
    cfg = dict(tokenizer="byte", sources=[dict(format="text", path=str(corpus), split="paragraphs")],
               seq_len=seq, batch_size=rows, seed=0, holdout_every=0)
    it = make_batches(cfg, get_tokenizer("byte"))
    return [next(it) for _ in range(n)]


@pytest.mark.slow  # 18 s on 2 busy cores
def test_gradient_accumulation_matches_one_big_batch(corpus):
    mesh = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
    batches = _batches(corpus, 2)
    _, state, whole = _tiny_setup(mesh)
    _, _, accumulated = _tiny_setup(mesh, microbatch_tokens=2 * 32)  # 4 microbatches of 2 rows
    for batch in batches:  # step 0 has lr 0 (warmup): the second step is the one that moves
        a, metrics_a = whole(state, batch)
        b, metrics_b = accumulated(state, batch)
        state = a
        np.testing.assert_allclose(metrics_a["grad_norm"], metrics_b["grad_norm"], rtol=1e-4)
        np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # 19 s on 2 busy cores
def test_gradient_accumulation_of_bfloat16_params(corpus):
    """Accumulation sums in float32 and hands back gradients in the params' dtype (bfloat16 once broke the scan)."""
    mesh = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
    cfg = config.get("tiny", num_layers=2, param_dtype="bfloat16", dtype="bfloat16")
    tx = optim.adamw(1e-3)
    state = create_state(cfg, tx, mesh)
    step = make_train_step(make_loss_fn(cfg, chunk_size=200), tx, mesh, state_shardings(cfg, tx, mesh),
                           microbatch_tokens=2 * 32, donate=False)
    new, metrics = step(state, _batches(corpus, 1)[0])
    assert jax.tree.map(lambda x: x.dtype, new.params) == jax.tree.map(lambda x: x.dtype, state.params)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 0


@pytest.mark.slow  # 15 s on 2 busy cores
def test_nonfinite_step_is_not_applied(corpus):
    mesh = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
    cfg = config.get("tiny", num_layers=2)
    base = make_loss_fn(cfg, chunk_size=200)

    def poisoned(params, batch, rng, frozen):  # NaN whenever the first target is 0
        loss, metrics = base(params, batch, rng, frozen)
        return jnp.where(batch["targets"][0, 0] == 0, jnp.nan, loss), metrics

    _, state, step = _tiny_setup(mesh, loss_fn=poisoned)
    batch = _batches(corpus, 1)[0]
    state, _ = step(state, batch)  # lr 0 at step 0; now the state has moments
    bad = dict(batch, targets=batch["targets"].copy())
    bad["targets"][0, 0] = 0
    after_bad, metrics = step(state, bad)
    assert int(metrics["skipped"]) == 1 and int(after_bad.step) == 2
    for x, y in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((after_bad.params,
                                                                                        after_bad.opt_state))):
        np.testing.assert_array_equal(x, y)
    after_good, metrics = step(after_bad, batch)
    assert int(metrics["skipped"]) == 0
    assert not np.array_equal(after_good.params["embedding"], state.params["embedding"])


@pytest.mark.slow  # 22 s on 2 busy cores
def test_sharded_step_matches_single_device(corpus):
    assert jax.device_count() >= 8, "tests/conftest.py provides 8 CPU devices"
    batches = _batches(corpus, 3)
    single = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
    multi = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    results = []
    for mesh in (single, multi):
        _, state, step = _tiny_setup(mesh)
        losses = []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.device_get(state.params)))
        assert state.params["layers"]["attention"]["query"].sharding.mesh.devices.size == mesh.devices.size
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not os.environ.get("LLAMA_JAX_SHAKESPEARE"), reason="LLAMA_JAX_SHAKESPEARE is unset")
@pytest.mark.slow  # 74 s on 2 busy cores
def test_tiny_model_learns_shakespeare(tmp_path):
    """Held-out loss must fall well below the byte unigram entropy of the corpus (NumPy, from the texts):
    a model at the unigram entropy has learned only letter frequencies; below it, it uses context."""
    from llama_jax.data import TextSource, shakespeare_texts

    c = runpy.run_path(str(TINY))["get_config"]()
    c.run_dir = str(tmp_path)
    c.data.update(seq_len=128, batch_size=16, holdout_every=20)
    c.schedule.update(peak_lr=3e-3, warmup_steps=10, decay_steps=120, total_steps=120)
    c.train.steps = 0
    c.checkpoint.every = 1000
    c.logging.update(every=10, eval_every=120, eval_batches=4)
    summary = loop.run(c)

    text = "".join(TextSource([str(p) for p in shakespeare_texts()], split="file").docs).encode()
    counts = np.bincount(np.frombuffer(text, np.uint8), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())  # nats per byte; 3.31 for these plays
    assert summary["eval_loss"] < unigram_entropy - 0.5, (summary["eval_loss"], unigram_entropy)


@pytest.mark.slow  # 77 s on 2 busy cores
def test_resume_is_bit_identical_across_ramp_phases(corpus, tmp_path):
    """A batch ramp (rows of 32 tokens, then two data batches of 64 a step from 1,536 tokens on): 6 steps straight ==
    stop inside the first phase, stop at its end, resume. The same steps, shapes, losses and state."""
    ramp = [dict(start_tokens=0, seq_len=32, batches=1), dict(start_tokens=1536, seq_len=64, batches=2)]

    def run(run_dir, steps):
        return loop.run(tiny_config(corpus, run_dir, train=dict(steps=steps), schedule=dict(ramp=ramp),
                                    logging=dict(eval_every=0)))

    run(tmp_path / "straight", 6)
    for steps in (2, 3, 6):
        run(tmp_path / "resumed", steps)
    straight = read_metrics(tmp_path / "straight")
    assert [m["seq_len"] for m in straight if "loss" in m] == [32] * 3 + [64] * 3  # 512 tokens a step, then 1,024
    assert losses_by_step(tmp_path / "straight") == losses_by_step(tmp_path / "resumed")
    a, b = (CheckpointManager(tmp_path / name).restore(6) for name in ("straight", "resumed"))
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.data_state == b.data_state


@pytest.mark.parametrize("name", ["tiny", "demo", "llama3_8b", "llama3_405b"])
def test_configs_build(name):
    """Every experiment file yields a valid model config, schedule and ramp (nothing is allocated)."""
    c = runpy.run_path(str(ROOT / "configs" / "pretrain" / f"{name}.py"))["get_config"]()
    cfg = loop.model_config(c.model)
    s = c.schedule
    lr = optim.lr_schedule(s.peak_lr, s.warmup_steps, s.decay_steps, s.min_lr_ratio, s.anneal_steps, s.total_steps)
    phases.parse_ramp(list(s.ramp), c.data.seq_len)
    assert c.data.batch_size * c.data.seq_len % c.optimizer.grad_accum == 0
    if name == "llama3_405b":
        assert cfg == config.get("llama3.1-405b", remat="full")
        np.testing.assert_allclose([lr(8_000), lr(1_199_997), lr(1_200_000)], [8e-5, 8e-7, 0.0], rtol=1e-4, atol=0)


@pytest.mark.slow  # 49 s on 2 busy cores
def test_console_says_what_the_run_is_doing(corpus, tmp_path):
    """A start banner, the compile, evals, and on resume where it resumed and which config keys changed."""
    run_dir = tmp_path / "run"
    first = subprocess.run(train_command(corpus, run_dir, "--config.train.steps=2", "--config.logging.eval_every=2"),
                           env=env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "llama_jax pretrain: " in first.stderr and "fresh parameters" in first.stderr
    assert f"writing to {run_dir}" in first.stderr and "compiling the pretrain step" in first.stderr
    assert "step 2: eval loss" in first.stderr
    assert json.loads(first.stdout.splitlines()[-1])["step"] == 2

    again = subprocess.run(train_command(corpus, run_dir, "--config.train.steps=3", "--config.schedule.peak_lr=1e-3"),
                           env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 2" in again.stderr
    warning = again.stderr.split("warning: the config differs from the one the checkpoint was saved with:")[1]
    assert "schedule.peak_lr: 0.003 -> 0.001" in warning and "train.steps: 2 -> 3" in warning
    assert "logging.eval_every: 2 -> 0" in warning


@pytest.mark.slow  # ~6 minutes on 2 busy cores: 8 compiles of the step on 8 simulated devices
def test_resume_is_bit_identical_across_long_context_phases(corpus, tmp_path):
    """Base steps at 128 tokens, a phase of 256-token rows, then one of 512 with context parallelism 2 (the state
    re-sharded onto fsdp=4,sequence=2), gates on (warn): 7 steps straight == stop in the middle of the first phase,
    stop at its end, resume there. Same losses, parameters, optimizer state, data state, reference loss and gates."""
    extension = [dict(seq_len=256, batch_size=8, steps=3), dict(seq_len=512, batch_size=4, steps=2, context_parallel=2)]

    def run(run_dir, steps):
        c = tiny_config(corpus, run_dir, train=dict(steps=steps), logging=dict(eval_every=100, eval_batches=1))
        c.data.update(seq_len=128, add_bos=True)
        c.long_context.update(start_step=2, phases=extension)
        c.long_context.gate.update(action="warn", min_retrieval=1.0, depths=[0.5], samples=1)
        return loop.run(c)

    run(tmp_path / "straight", 7)
    for steps in (3, 5, 7):
        run(tmp_path / "resumed", steps)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert losses_by_step(tmp_path / "straight") == losses_by_step(tmp_path / "resumed")
    assert sorted(losses_by_step(tmp_path / "straight")) == list(range(1, 8))
    assert [m["seq_len"] for m in straight if "loss" in m] == [128] * 2 + [256] * 3 + [512] * 2

    def events(metrics):
        return [m for m in metrics if "gate_phase" in m or "eval_loss_before_extension" in m]

    assert events(straight) == events(resumed)
    assert [(m["step"], m.get("gate_phase")) for m in events(straight)] == [(2, None), (5, 1.0), (7, 2.0)]
    a = CheckpointManager(tmp_path / "straight").restore(7)
    b = CheckpointManager(tmp_path / "resumed").restore(7)
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.data_state == b.data_state and a.data_state["phases"]["stream"] == 1
    assert a.data_state["phases"]["memo"]["reference_loss"] > 0  # measured before the first longer phase
    assert a.data_state["seq_len"] == 512 and a.metadata["mesh"]["sequence"] == 2
