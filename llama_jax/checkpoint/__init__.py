"""The llama_jax checkpoint: one orbax format for every stage, a run's ``CheckpointManager``, and ``load`` /
``export`` of every weight format (llama_jax, Hugging Face, Meta). Failure and recovery: docs/recovery.md."""

from llama_jax.checkpoint.any_format import (
    FORMATS,
    atomic_directory,
    check_destination,
    detect_format,
    export,
    identity,
    load,
    save_params,
)
from llama_jax.checkpoint.format import (
    CHECKPOINTS_DIR,
    FORMAT_VERSION,
    LAYOUTS,
    check_structure,
    is_checkpoint_dir,
    read_metadata,
)
from llama_jax.checkpoint.manager import CheckpointManager, resolve_step_dir
from llama_jax.checkpoint.restore import Restored, restore_dir

__all__ = [
    "CHECKPOINTS_DIR", "FORMATS", "FORMAT_VERSION", "LAYOUTS", "CheckpointManager", "Restored", "atomic_directory",
    "check_destination", "check_structure", "detect_format", "export", "identity", "is_checkpoint_dir", "load",
    "read_metadata", "resolve_step_dir", "restore_dir", "save_params",
]
