"""Nothing lost, nothing silent (issue 12, problems 1-4 and 7): checkpoint integrity and the fallback to the newest
step that verifies, retention that keeps the last healthy state, one writer per run directory, keep_last >= 1,
preemption at any moment, and checks that fire before step 1 or save before stopping.

Each test sets up the failure the issue found (damaged files, two runs, SIGTERM timed into a save or a data wait,
a bad record mid-run) and checks what happens now: nothing lost, a message naming the fault, the right exit code.
"""

import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, env, read_metrics, train_command, wait_for

from llama_jax import checkpoint, config, model
from llama_jax.checkpoint import CheckpointManager
from llama_jax.data import make_batches, merge_states
from llama_jax.errors import ConfigError, CorruptCheckpointError, DataError
from llama_jax.tokenizer import get_tokenizer
from llama_jax.train import loop
from llama_jax.train.lock import LOCK_FILE, STALE_S, RunLock

TINY = ROOT / "configs" / "pretrain" / "tiny.py"
CFG = config.get("tiny", num_layers=1)


def tiny_config(data_path, run_dir, **sections):
    """The tiny experiment with one layer and no eval (fast to compile), changed by ``sections``."""
    c = runpy.run_path(str(TINY))["get_config"](str(data_path))
    c.run_dir = str(run_dir)
    c.model.num_layers = 1
    c.logging.update(eval_every=0, progress=False)
    c.schedule.update(decay_steps=1000, total_steps=1000)
    for section, values in sections.items():
        c[section].update(values)
    return c


# --- 1. Integrity: damaged checkpoints are reported and skipped; retention keeps the last healthy one ---------


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run directory with complete checkpoints at steps 1 and 2 (params, optimizer state, data state)."""
    run_dir = tmp_path_factory.mktemp("two_steps")
    rng = np.random.default_rng(0)
    tx = optax.adamw(1e-3)
    with CheckpointManager(run_dir, async_save=False) as manager:
        for step in (1, 2):
            params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), model.param_shapes(CFG))
            manager.save(step, params=params, cfg=CFG, stage="pretrain", opt_state=tx.init(params),
                         data_state={"step": step})
    return run_dir


def _largest_params_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "params").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)


def _overwrite(path: Path, at: float, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    i = int(len(raw) * at)
    raw[i:i + len(data)] = data
    path.write_bytes(bytes(raw))


def _flip_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_metadata(step_dir: Path) -> None:
    file = step_dir / "metadata" / "metadata.json"
    file.write_text(file.read_text().replace('"step": 2', '"step": 3'))


DAMAGE = {  # what is done to step 2, and what the report must say
    "eight bytes overwritten": (lambda d: _overwrite(_largest_params_file(d), 0.5, b"\xff" * 8), "checksum mismatch"),
    "one bit flipped": (lambda d: _flip_bit(_largest_params_file(d)), "checksum mismatch"),
    "params file truncated": (lambda d: _truncate(_largest_params_file(d)), "cannot read params/"),
    "params/_METADATA truncated": (lambda d: _truncate(d / "params" / "_METADATA"), "params/_METADATA"),
    "opt_state/ deleted": (lambda d: shutil.rmtree(d / "opt_state"), "lacks its opt_state/"),
    "data_state/ deleted": (lambda d: shutil.rmtree(d / "data_state"), "lacks its data_state/"),
    "metadata.json edited": (_edit_metadata, "metadata.json was altered"),
    "commit marker lost": (lambda d: (d / "commit_success.txt").unlink(), "not a complete checkpoint"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_p1_a_damaged_newest_checkpoint_is_reported_and_skipped(two_steps, tmp_path, damage, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    step2 = run_dir / "checkpoints" / "2"
    harm, reported = DAMAGE[damage]
    harm(step2)
    if damage in ("eight bytes overwritten", "one bit flipped"):  # the failure: orbax alone reads altered values
        good = ocp.StandardCheckpointer().restore(two_steps / "checkpoints" / "2" / "params")
        altered = ocp.StandardCheckpointer().restore(step2 / "params")
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(altered)))

    manager = CheckpointManager(run_dir)
    restored = manager.restore()
    assert restored.step == 1 and restored.data_state == {"step": 1}
    assert [step for step, _ in restored.skipped] == [2] and reported in restored.skipped[0][1], restored.skipped
    if damage != "commit marker lost":
        with pytest.raises(CorruptCheckpointError, match=reported):
            manager.restore(2)
        with pytest.raises(CorruptCheckpointError, match=reported):
            checkpoint.load(str(step2))
    params, _, metadata = checkpoint.load(str(run_dir))  # a run directory: falls back, and says so
    assert metadata["step"] == 1
    expected = CheckpointManager(two_steps).restore(1).params
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if damage != "commit marker lost":  # an incomplete step is not a checkpoint at all for load: nothing to say
        assert "loaded step 1" in capsys.readouterr().err


def test_p1_retention_keeps_the_newest_healthy_checkpoint(tmp_path):
    """Steps saved while every step was skipped as non-finite (healthy=False) count toward keep_last but never
    push out the last healthy checkpoint; keep_last < 1 is refused."""
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), model.param_shapes(CFG))
    with CheckpointManager(tmp_path, keep_last=2, async_save=True) as manager:
        for step in range(1, 7):
            manager.save(step, params=params, cfg=CFG, stage="pretrain", healthy=step <= 2)
        manager.wait()
        assert manager.all_steps() == [2, 5, 6]
        manager.save(7, params=params, cfg=CFG, stage="pretrain", healthy=True)
        manager.wait()
        assert manager.all_steps() == [6, 7]  # a newer healthy one: the old one may go
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="keep_last must be an int >= 1"):
            CheckpointManager(tmp_path, keep_last=bad)


@pytest.mark.slow  # 12 s on 2 busy cores
def test_p1_training_resumes_from_the_newest_checkpoint_that_verifies(corpus, tmp_path, capsys):
    """The issue's run: the newest step's params damaged (8 bytes -> NaN), then every step skipped. Resume reports
    the damaged step and moves it aside, trains from the one before, and the checkpoints it saves while every step
    is skipped never rotate that good one away."""
    run_dir = tmp_path / "run"
    loop.run(tiny_config(corpus, run_dir, train=dict(steps=4), checkpoint=dict(every=2, keep_last=2)))
    assert CheckpointManager(run_dir).all_steps() == [2, 4]
    _overwrite(_largest_params_file(run_dir / "checkpoints" / "4"), 0.5, b"\xff" * 8)
    capsys.readouterr()

    # z_loss = inf makes every loss non-finite: each step is skipped, as after loading NaN parameters.
    summary = loop.run(tiny_config(corpus, run_dir, train=dict(steps=10), checkpoint=dict(every=2, keep_last=2),
                                   loss=dict(z_loss=float("inf"))))
    err = capsys.readouterr().err
    assert "checkpoint step 4 cannot be used" in err and "checksum mismatch" in err and "resuming from step 2" in err
    assert [n for n in os.listdir(run_dir / "checkpoints") if n.startswith("4.corrupt-")]
    assert [m["resumed_from"] for m in read_metrics(run_dir) if "resumed_from" in m] == [2]
    assert summary["step"] == 10 and summary["skipped_total"] == 8
    manager = CheckpointManager(run_dir)
    assert manager.all_steps() == [2, 8, 10]  # keep_last=2 newest, and step 2: the newest healthy one
    assert [checkpoint.read_metadata(manager.step_dir(s))["healthy"] for s in (2, 8, 10)] == [True, False, False]
    for step in manager.all_steps():
        manager.restore(step)  # all verify


# --- 2. One writer per run directory ---------------------------------------------------------------------


def test_p2_the_lock_refuses_a_second_holder_and_takes_over_stale_ones(tmp_path, capsys):
    lock = RunLock.acquire(tmp_path)
    with pytest.raises(ConfigError, match=rf"in use by another run: pid {os.getpid()} on host "
                                          rf"{socket.gethostname()}"):
        RunLock.acquire(tmp_path)
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock.acquire(tmp_path).release()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "start_ticks": None, "started": "then",
             "command": "python -m llama_jax.train", "token": "x"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    lock = RunLock.acquire(tmp_path)  # its holder has exited
    assert f"process {dead.pid} on this host has exited" in capsys.readouterr().err
    assert [n for n in os.listdir(tmp_path) if n.startswith("lock.stale-")]
    lock.release()

    elsewhere = dict(stale, host="another-host", pid=1)
    (tmp_path / LOCK_FILE).write_text(json.dumps(elsewhere))
    with pytest.raises(ConfigError, match="pid 1 on host another-host"):  # cannot be checked, recently touched
        RunLock.acquire(tmp_path)
    old = time.time() - STALE_S - 60
    os.utime(tmp_path / LOCK_FILE, (old, old))
    RunLock.acquire(tmp_path).release()  # untouched for longer than STALE_S: its node is gone
    assert "has not touched it" in capsys.readouterr().err


def _train_command(corpus, run_dir, *overrides):
    return train_command(corpus, run_dir, "--config.model.num_layers=1", "--config.train.steps=100000",
                         "--config.logging.progress=false", *overrides)


@pytest.mark.slow  # 12 s on 2 busy cores
def test_p2_a_second_run_on_the_same_run_dir_is_refused(corpus, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(_train_command(corpus, run_dir, "--config.checkpoint.every=1000"), env=env(),
                             stderr=subprocess.PIPE, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        assert wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, first, timeout=300,
                        poll=0.05)
        second = subprocess.run(_train_command(corpus, run_dir), env=env(), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another run: pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert not (run_dir / LOCK_FILE).exists()  # released on exit
    last_step = read_metrics(run_dir)[-1]["step"]
    assert CheckpointManager(run_dir).latest_step() == last_step  # the first run's state, whole


# --- 3. keep_last = 0 ----------------------------------------------------------------------------------------


def test_p3_keep_last_zero_is_refused_before_anything_is_written(corpus, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(_train_command(corpus, run_dir, "--config.checkpoint.keep_last=0"), env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: config key checkpoint.keep_last = 0: expected an "
                                                     "integer >= 1")
    assert not run_dir.exists()


# --- 4. Preemption -----------------------------------------------------------------------------------------


class _Data:
    """A run's data stream, with a hook called before each batch is handed out."""

    def __init__(self, inner, before_batch):
        self.inner, self.before_batch, self.batches = inner, before_batch, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.batches += 1
        self.before_batch(self.batches)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)

    def __getattr__(self, name):  # the rest of the phased stream (enter, stream, memo, skipped) as it is
        return getattr(self.inner, name)


@pytest.mark.slow  # 6 s on 2 busy cores
def test_p4_sigterm_during_a_step_that_ends_in_a_periodic_save(corpus, tmp_path):
    """SIGTERM arrives while step 4 runs; step 4 ends in the periodic save, which the preemption must not repeat
    (orbax's StepAlreadyExistsError before): one checkpoint of step 4, a normal return (exit status 0)."""
    run = loop.build(tiny_config(corpus, tmp_path / "run", train=dict(steps=100),
                                 checkpoint=dict(every=4, async_save=True)))
    step = run.train_step

    def train_step_then_sigterm(state, batch):
        fourth = int(state.step) == 3  # read before the step donates the state's buffers
        result = step(state, batch)
        if fourth:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    run.train_step = train_step_then_sigterm
    summary = loop.fit(run)
    assert summary["preempted"] and summary["step"] == 4
    manager = CheckpointManager(tmp_path / "run")
    assert manager.all_steps() == [4]
    assert manager.restore().step == 4


@pytest.mark.slow  # 7 s on 2 busy cores
def test_p4_sigterm_while_waiting_for_data(corpus, tmp_path):
    """SIGTERM while the loop waits for a batch that never comes (a hung filesystem): it used to be ignored. Now
    the wait is cut short, step 3 is saved with the data position before the batch it was waiting for."""
    config = tiny_config(corpus, tmp_path / "run", train=dict(steps=100))
    run = loop.build(config)

    def hang_at_fourth_batch(count):
        if count == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 120
            while time.time() < deadline:
                time.sleep(0.01)
            raise AssertionError("SIGTERM was ignored while waiting for data")

    run.data = _Data(run.data, hang_at_fourth_batch)
    summary = loop.fit(run)
    assert summary["preempted"] and summary["step"] == 3
    restored = CheckpointManager(tmp_path / "run").restore()
    assert restored.step == 3
    expected = make_batches(config.data, get_tokenizer("byte"))
    for _ in range(3):
        next(expected)
    assert restored.data_state == merge_states([expected.get_state()])  # resumes with the fourth batch


# --- 7. Checks before step 1; a save before stopping ----------------------------------------------------------


def _jsonl(path: Path, texts, bad_lines=()) -> Path:
    lines = ["{not json" if i in bad_lines else json.dumps({"text": t}) for i, t in enumerate(texts)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _texts(n):
    rng = np.random.default_rng(1)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    return [" ".join(rng.choice(words, size=rng.integers(5, 20))) for _ in range(n)]


def test_p7_an_eval_split_too_small_for_a_batch_fails_before_step_1(tmp_path):
    """Every held-out record (each 10th) is malformed and skipped: the eval split yields no batch. That used to be
    found at the first eval, after the training steps, which were lost; now build refuses, and writes nothing."""
    data = _jsonl(tmp_path / "docs.jsonl", _texts(100), bad_lines=range(0, 100, 10))
    config = tiny_config("", tmp_path / "run", logging=dict(eval_every=5))
    config.data.sources = [dict(format="jsonl", path=str(data), weight=1.0, split="file", text_key="text")]
    config.data.update(on_error="skip", holdout_every=10)
    with pytest.raises(DataError, match="the eval split .* too few records for one batch"):
        loop.build(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # 8 s on 2 busy cores
def test_p7_a_malformed_record_mid_run_saves_the_last_step_before_stopping(tmp_path, capsys):
    """on_error="raise" and a malformed line met at some step k: the run stops with the file:line, after saving
    step k - 1 with the data position just before the bad batch, so a rerun resumes there."""
    texts = _texts(120)
    data = _jsonl(tmp_path / "docs.jsonl", texts, bad_lines=[77])
    config = tiny_config("", tmp_path / "run", train=dict(steps=1000), checkpoint=dict(every=1000))
    config.data.sources = [dict(format="jsonl", path=str(data), weight=1.0, split="file", text_key="text")]
    config.data.holdout_every = 0

    stream, position, fails_at = make_batches(config.data, get_tokenizer("byte")), None, None
    for batch_index in range(1, 200):  # where the bad line is met, from the data alone
        position = stream.get_state()
        try:
            next(stream)
        except DataError:
            fails_at = batch_index
            break
    assert fails_at is not None and fails_at > 1

    with pytest.raises(DataError, match=r"docs.jsonl:78: malformed record"):
        loop.run(config)
    assert f"saved a checkpoint of step {fails_at - 1} before stopping" in capsys.readouterr().err
    restored = CheckpointManager(tmp_path / "run").restore()
    assert restored.step == fails_at - 1
    assert restored.data_state == merge_states([position])
    assert not (tmp_path / "run" / LOCK_FILE).exists()
