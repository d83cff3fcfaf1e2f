"""The command users run, `python -m llama_jax.train`, on two real processes over loopback (4 CPU devices each,
gloo collectives): the same losses and parameters as one process with all 8 devices, one writer of logs,
complete checkpoints, and a resume on another number of processes that continues with the same data."""

import json
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, env, losses_by_step, read_metrics

from llama_jax.checkpoint import CheckpointManager

TINY = ROOT / "configs" / "pretrain" / "tiny.py"
MESH = "data=2,fsdp=2,tensor=2"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(1)
    words = "a multi host run reads its own rows of one global batch and the loss is the same".split()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words, size=rng.integers(4, 40))) for _ in range(300)))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(corpus, run_dir, steps, processes):
    """Runs the train command as `processes` processes splitting 8 devices; returns each one's stdout."""
    command = [sys.executable, "-m", "llama_jax.train", f"--config={TINY}:{corpus}", f"--config.run_dir={run_dir}",
               f"--config.mesh={MESH}", f"--config.train.steps={steps}", "--config.checkpoint.every=2",
               "--config.logging.eval_every=0"]
    if processes > 1:
        port = _free_port()
        flags = lambda i: ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),  # noqa: E731
                           "--process-id", str(i)]
    else:
        flags = lambda i: []  # noqa: E731
    workers = [subprocess.Popen(command + flags(i), env=env(8 // processes), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(processes)]
    try:
        outputs = [w.communicate(timeout=600) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for i, (w, (_, err)) in enumerate(zip(workers, outputs)):
        assert w.returncode == 0, f"process {i} of {processes} failed:\n{err[-3000:]}"
    return [out for out, _ in outputs]


def _losses(run_dir) -> dict[int, float]:
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice: more than one process writes metrics"
    return losses_by_step(run_dir)


def _params(run_dir, step):
    with CheckpointManager(run_dir) as manager:
        assert manager.all_steps() == [step - 2, step]  # complete checkpoints, keep_last=2
        return jax.tree.map(np.asarray, manager.restore(step, params_only=True).params)


def _assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 53 s on 2 busy cores
def test_train_command_on_two_processes_matches_one(corpus, tmp_path):
    one = _train(corpus, tmp_path / "one", 4, processes=1)
    two = _train(corpus, tmp_path / "two", 4, processes=2)
    assert json.loads(one[0].splitlines()[-1])["step"] == json.loads(two[0].splitlines()[-1])["step"] == 4
    assert not [line for line in two[1].splitlines() if line.startswith("{")]  # one result per run: process 0's

    want = _losses(tmp_path / "one")
    got = _losses(tmp_path / "two")
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5)
    _assert_close(_params(tmp_path / "two", 4), _params(tmp_path / "one", 4))

    # Saved by two processes at step 2, resumed by one: the steps that follow see the same data.
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "two" / "checkpoints" / "2", tmp_path / "resumed" / "checkpoints" / "2")
    _train(corpus, tmp_path / "resumed", 4, processes=1)
    resumed = _losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    np.testing.assert_allclose([resumed[3], resumed[4]], [want[3], want[4]], rtol=1e-5)
    _assert_close(_params(tmp_path / "resumed", 4), _params(tmp_path / "one", 4))


def test_initialize_rejects_partial_settings(monkeypatch):
    from llama_jax import distributed
    from llama_jax.errors import ConfigError

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="process count and process id"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ConfigError, match=r"outside \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 5)
    assert distributed.initialize() is False  # nothing configured: a single process
