"""The llama_jax checkpoint: one orbax format for every stage; ``load`` and ``export`` for every weight format."""

from llama_jax.checkpoint.format import (
    CHECKPOINTS_DIR,
    FORMAT_VERSION,
    FORMATS,
    LAYOUTS,
    CheckpointManager,
    Restored,
    atomic_directory,
    check_destination,
    check_structure,
    detect_format,
    export,
    identity,
    is_checkpoint_dir,
    load,
    read_metadata,
    resolve_step_dir,
    restore_dir,
    save_params,
)

__all__ = [
    "CHECKPOINTS_DIR", "FORMATS", "FORMAT_VERSION", "LAYOUTS", "CheckpointManager", "Restored", "atomic_directory",
    "check_destination", "check_structure", "detect_format", "export", "identity", "is_checkpoint_dir", "load",
    "read_metadata", "resolve_step_dir", "restore_dir", "save_params",
]
