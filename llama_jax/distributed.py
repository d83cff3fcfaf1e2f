"""Multi-host start-up: one process per host (or per GPU), all joined into one JAX runtime.

    distributed.initialize()            # flags, LLAMA_JAX_* / JAX_* env vars, or SLURM / TPU auto-detection
    rows = distributed.local_rows(global_batch)   # this process loads only its own rows
    if distributed.is_main_process(): write_logs()

Where the settings come from, first match wins:
1. arguments (the train / plan CLIs pass ``--coordinator``, ``--num_processes``, ``--process_id``);
2. ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` environment variables;
3. a SLURM job step with several tasks, or a multi-host TPU VM (``TPU_WORKER_HOSTNAMES``, ``MEGASCALE_*``):
   jax's own cluster detection reads ``SLURM_*`` / the TPU metadata;
4. otherwise a single process: nothing to do.
On CPU, processes talk over gloo (jax's default CPU collectives), which is what the tests use on loopback.
"""

from __future__ import annotations

import logging
import os

import jax

from llama_jax.errors import ConfigError


def _cluster_detected() -> bool:
    slurm = int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")) or 1) > 1
    tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    return slurm or tpu


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> bool:
    """Joins this process to the others; returns True when running multi-process. Call before any other jax
    use. Non-main processes then log warnings only, so process 0 alone writes progress."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    explicit = (coordinator_address, num_processes, process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise ConfigError(
                "multi-process start needs all of coordinator address, process count and process id; got "
                f"coordinator={coordinator_address!r}, num_processes={num_processes!r}, process_id={process_id!r}"
            )
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"process_id {process_id} outside [0, {num_processes})")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    elif _cluster_detected():
        jax.distributed.initialize(initialization_timeout=timeout_s)
    else:
        return False
    if not is_main_process():
        logging.getLogger().setLevel(logging.WARNING)
    return True


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, metrics and (coordinated) checkpoint metadata."""
    return jax.process_index() == 0


def local_rows(global_batch: int) -> slice:
    """The rows of a global batch that this process loads: contiguous blocks in process order, which is where
    ``sharding.make_mesh`` puts each process's devices on the data-parallel axes."""
    processes = jax.process_count()
    if global_batch % processes:
        raise ConfigError(f"global batch {global_batch} is not divisible by {processes} processes")
    per = global_batch // processes
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def shutdown() -> None:
    """Leaves the distributed runtime (a no-op in a single process)."""
    if jax.process_count() > 1:
        jax.distributed.shutdown()
