"""What checkpoint integrity costs: checksumming a training state, against saving and restoring it.

    python benchmarks/checksums.py                    # ~52M parameters: a 0.6 GB float32 state with AdamW moments
    python benchmarks/checksums.py --layers 2 --repeats 1

A float32 state (parameters + AdamW's two moments) of a small Llama is saved synchronously with CheckpointManager
(which computes a checksum of every array) and restored (which verifies them); ``checksums.tree_checksums`` is also
timed alone. Best of ``--repeats`` after one warm-up (which compiles the checksum). Both costs grow with the bytes
of the state, so the share of a save that checksumming takes carries over to larger states on the same kind of
machine; the last line (JSON) also gives the time the Llama 3.1 8B state (params + moments, float32: 96.4 GB)
would take on one such device, and per device when split over 64.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import jax
import optax

from llama_jax import config, model
from llama_jax.checkpoint import CheckpointManager, checksums

STATE_8B_BYTES = 3 * 4 * config.get("llama3.1-8b").num_params()  # float32 params and two AdamW moments


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = config.ModelConfig(vocab_size=32_000, dim=768, num_layers=args.layers, num_heads=12, num_kv_heads=4,
                             ffn_dim=2048, rope_theta=10_000.0, max_seq_len=2048)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    opt_state = optax.adamw(1e-3).init(params)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((params, opt_state)))

    checksums.tree_checksums((params, opt_state))  # compile
    checksum_s = best_of(args.repeats, lambda: checksums.tree_checksums((params, opt_state)))
    root = tempfile.mkdtemp(prefix="llama_jax-checksums-")
    try:
        run_dir = os.path.join(root, "run")
        manager = CheckpointManager(run_dir, keep_last=1, async_save=False)
        steps = iter(range(1, 10 * args.repeats + 2))
        manager.save(next(steps), params=params, cfg=cfg, stage="pretrain", opt_state=opt_state)
        save_s = best_of(args.repeats, lambda: manager.save(next(steps), params=params, cfg=cfg, stage="pretrain",
                                                             opt_state=opt_state))
        targets = dict(params_target=params, opt_state_target=opt_state)
        manager.restore(**targets)
        restore_s = best_of(args.repeats, lambda: manager.restore(**targets))
        manager.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    seconds_per_byte = checksum_s / state_bytes
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{jax.devices()[0].platform}; load average {os.getloadavg()[0]:.1f}",
        "state_bytes": state_bytes, "num_params": cfg.num_params(),
        "checksum_s": round(checksum_s, 3), "checksum_gb_per_s": round(state_bytes / checksum_s / 1e9, 3),
        "save_s_with_checksums": round(save_s, 3), "restore_s_with_verification": round(restore_s, 3),
        "checksum_share_of_save": round(checksum_s / save_s, 3),
        "checksum_share_of_restore": round(checksum_s / restore_s, 3),
        "state_8b_bytes": STATE_8B_BYTES,
        "checksum_8b_one_device_s": round(STATE_8B_BYTES * seconds_per_byte, 1),
        "checksum_8b_per_device_of_64_s": round(STATE_8B_BYTES * seconds_per_byte / 64, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
