"""Two real processes on loopback (4 CPU devices each, gloo collectives) run sharded train steps together and
reach the same losses as one process with all 8 devices. Run as a script, this file is one of the workers."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

MESH = "data=2,fsdp=2,tensor=2"
GLOBAL_BATCH, SEQ, STEPS = 8, 16, 3


def train(log_path=None):
    """Steps of llama_jax.train's sharded train step (tiny model, SGD) on MESH; each process loads only its own
    rows. Returns the losses."""
    import jax
    import optax

    from llama_jax import config, distributed, sharding
    from llama_jax.train import create_state, make_train_step, pretrain, state_shardings

    cfg = config.get("tiny", vocab_size=256, dim=64, num_layers=2, num_heads=8, num_kv_heads=4, ffn_dim=128)
    mesh = sharding.make_mesh(MESH)
    tx = optax.sgd(0.5)
    train_state = create_state(cfg, tx, mesh, seed=0)
    step = make_train_step(pretrain.make_loss_fn(cfg), tx, mesh, state_shardings(cfg, tx, mesh))
    losses = []
    for i in range(STEPS):
        data = np.random.default_rng(i).integers(0, cfg.vocab_size, (GLOBAL_BATCH, SEQ + 1), dtype=np.int32)
        rows = data[distributed.local_rows(GLOBAL_BATCH)]  # process-local loading
        batch = {"tokens": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": np.ones_like(rows[:, 1:]),
                 "segment_ids": np.ones_like(rows[:, 1:]), "positions": np.tile(np.arange(SEQ, dtype=np.int32),
                                                                               (len(rows), 1))}
        train_state, metrics = step(train_state, batch)  # numpy rows -> sharded global batch inside
        losses.append(float(metrics["loss"]))
    if log_path and distributed.is_main_process():
        with open(log_path, "a") as f:
            f.write(json.dumps({"losses": losses, "processes": jax.process_count()}) + "\n")
    return losses


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    from llama_jax import distributed  # noqa: F401  (the workers import it; fail here first if it is broken)

    want = train()
    port, log = _free_port(), tmp_path / "log.jsonl"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    workers = [subprocess.Popen([sys.executable, __file__, f"127.0.0.1:{port}", str(i), str(log)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        outputs = [w.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for i, (w, out) in enumerate(zip(workers, outputs)):
        assert w.returncode == 0, f"worker {i} failed:\n{out[-3000:]}"
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        np.testing.assert_allclose(r["losses"], want, rtol=1e-5)
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["processes"] == 2  # only process 0 logged


def test_initialize_rejects_partial_settings(monkeypatch):
    import pytest

    from llama_jax import distributed
    from llama_jax.errors import ConfigError

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="process count and process id"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ConfigError, match=r"outside \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 5)
    assert distributed.initialize() is False  # nothing configured: a single process


if __name__ == "__main__":
    address, process_id, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    from llama_jax import distributed

    distributed.initialize(address, 2, process_id, timeout_s=60)
    try:
        import jax

        assert jax.device_count() == 8 and jax.local_device_count() == 4
        print(json.dumps({"process": jax.process_index(), "losses": train(log_path)}), flush=True)
    finally:
        distributed.shutdown()
