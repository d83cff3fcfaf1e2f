"""Will a run fit? Per-device memory of a train step (or of serving) from the analytic model (``memory``), the
real step compiled for chips you do not have (``aot``), and ``python -m llama_jax.plan`` on top (``command``)."""

from llama_jax.plan.aot import CHIPS, Report, compile_train_step, mesh_for, parse_topology, topology_devices
from llama_jax.plan.command import (
    FLOPS_CAVEAT,
    GB,
    H100_BYTES,
    TABLE4,
    TABLE4_LAYERS,
    long_context_rows,
    main,
    plan_train,
    table4_rows,
)
from llama_jax.plan.memory import (
    BACKENDS,
    WEIGHT_DTYPES,
    Backend,
    InferenceBudget,
    TrainBudget,
    inference_budget,
    mesh_device_count,
    param_bytes,
    train_budget,
)

__all__ = ["BACKENDS", "CHIPS", "FLOPS_CAVEAT", "GB", "H100_BYTES", "TABLE4", "TABLE4_LAYERS", "WEIGHT_DTYPES",
           "Backend", "InferenceBudget", "Report", "TrainBudget", "compile_train_step", "inference_budget",
           "long_context_rows", "main", "mesh_device_count", "mesh_for", "param_bytes", "parse_topology",
           "plan_train", "table4_rows", "topology_devices", "train_budget"]
