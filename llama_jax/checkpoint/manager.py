"""The checkpoints of one run, ``<run_dir>/checkpoints/<step>/``: save (in the background), restore the newest step
that verifies (the one rule, which ``load`` of a run directory shares: ``newest_that_verifies``), retention.

    manager = CheckpointManager(run_dir, keep_last=3, keep_every=1000)
    manager.save(step, params=params, cfg=cfg, stage="pretrain", opt_state=opt_state, data_state=it_state)
    restored = manager.restore(params_target=abstract_params, opt_state_target=abstract_opt_state)
    for step, why in restored.skipped:         # newer steps that did not verify: report them, move them aside
        manager.set_aside(step, "corrupt")

Retention keeps the newest ``keep_last`` intact steps, every multiple of ``keep_every`` and the newest healthy one,
so a run stuck skipping non-finite steps never rotates away the last state it trained from. Which step restore
picks, what the run does with the others, and why: docs/recovery.md.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
from jax.experimental import multihost_utils

from llama_jax import lora, model
from llama_jax.checkpoint.format import (
    CHECKPOINTS_DIR,
    check_structure,
    is_checkpoint_dir,
    jsonable,
    make_metadata,
    orbax_checkpointer,
    save_args,
    warn,
)
from llama_jax.checkpoint.restore import Restored, restore_dir
from llama_jax.config import ModelConfig
from llama_jax.errors import CheckpointError, ConfigError, CorruptCheckpointError

T = TypeVar("T")


class CheckpointManager:
    """Saves and restores the checkpoints of one run (``<run_dir>/checkpoints/<step>/``).

    keep_last: newest intact checkpoints kept (>= 1); keep_every: additionally keep every step that is a multiple
    of it; the newest healthy checkpoint is always kept (see the module docstring). async_save: ``save`` returns
    once arrays are copied to host, writing continues in the background (``wait`` blocks until it is durable).
    One run writes a run directory at a time (``llama_jax.train.lock``); any number may read it.
    """

    def __init__(self, run_dir: str, *, keep_last: int = 3, keep_every: int | None = None, async_save: bool = True):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be an int >= 1 (the newest checkpoints kept), got "
                              f"{keep_last!r}")
        if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
            raise ConfigError(f"checkpoint.keep_every must be an int >= 1 or 0/None (off), got {keep_every!r}")
        self.directory = os.path.join(os.path.abspath(run_dir), CHECKPOINTS_DIR)
        self.keep_last, self.keep_every, self.async_save = keep_last, keep_every, async_save
        self._checkpointer = orbax_checkpointer(background=True)
        self._in_flight: int | None = None  # the step being written in the background

    def save(self, step: int, *, params, cfg: ModelConfig, stage: str, opt_state=None, data_state: dict | None = None,
             rng=None, stage_config: dict | None = None, tokenizer: dict | None = None, mesh=None,
             init_from: dict | None = None, extra_params: Sequence[str] = (), healthy: bool = True) -> bool:
        """Starts saving ``step``; False (nothing written) when that step is already saved or being saved.

        init_from: where the run took its first parameters ({"path", "format", "step", "stage"}), recorded.
        extra_params: top-level entries of ``params`` that a stage adds to the Llama tree (e.g. "reward_head").
        healthy: False when every step since the previous checkpoint was skipped as non-finite (retention keeps
        the newest healthy checkpoint whatever keep_last says).
        Every process calls it (the checksums and the write are collective).
        """
        if step == self._in_flight or step in self.all_steps():
            return False
        _check_params(params, cfg, extra_params)
        data_state = None if data_state is None else jsonable(data_state)
        metadata = make_metadata(step, cfg, stage, stage_config, tokenizer, mesh, rng, params, opt_state=opt_state,
                                 data_state=data_state, init_from=init_from, extra_params=extra_params,
                                 healthy=healthy)
        args = save_args(params, metadata, opt_state=opt_state, data_state=data_state)
        self.wait()  # the previous save is durable, and rotated, before this one starts
        if os.path.exists(self.step_dir(step)):  # an incomplete leftover (see all_steps) would block the write
            warn(f"{self.step_dir(step)} is an incomplete checkpoint; moved to {self.set_aside(step, 'incomplete')}")
        os.makedirs(self.directory, exist_ok=True)
        self._checkpointer.save(self.step_dir(step), args=args)
        self._in_flight = step
        if not self.async_save:
            self.wait()
        return True

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return [s for s in self.present_steps() if is_checkpoint_dir(self.step_dir(s))]

    def present_steps(self) -> list[int]:
        """Every step directory on disk, complete or not, ascending."""
        return step_numbers(self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore(self, step: int | None = None, *, params_target=None, opt_state_target=None,
                params_only: bool = False) -> Restored:
        """A checkpoint restored onto the targets' shardings and verified against its checksums.

        ``step`` None: the newest step that verifies; newer step directories that do not (incomplete, corrupt) are
        listed in ``Restored.skipped`` with the reason, for the caller to report (and ``set_aside``).
        Targets are trees of ``jax.ShapeDtypeStruct`` (with ``.sharding``) or arrays; None restores onto the
        default device. params_only: skip optimizer and data state (starting a new stage from this one).
        """
        kwargs = dict(params_target=params_target, opt_state_target=opt_state_target, params_only=params_only)
        if step is not None:
            if not is_checkpoint_dir(self.step_dir(step)):
                raise CheckpointError(f"{self.step_dir(step)} is not a complete checkpoint; complete steps: "
                                      f"{self.all_steps()}")
            return restore_dir(self.step_dir(step), **kwargs)
        _, restored, skipped = newest_that_verifies(self.directory, lambda path: restore_dir(path, **kwargs))
        restored.skipped = skipped
        return restored

    def set_aside(self, step: int, why: str) -> str:
        """Renames step directory ``step`` to ``<step>.<why>-<time>`` (kept for inspection, out of every step
        list) and returns the new path. Process 0 renames; every process calls it."""
        new = f"{self.step_dir(step)}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            os.rename(self.step_dir(step), new)
        _sync("llama_jax_set_aside")
        return new

    def remove_leftovers(self) -> list[str]:
        """Deletes what interrupted writes left (orbax temporary directories, half-deleted steps); returns their
        names. Only the run's one writer may call it: another writer's save in progress looks the same."""
        if not os.path.isdir(self.directory):
            return []
        names = [n for n in os.listdir(self.directory) if ".orbax-checkpoint-tmp" in n or ".deleting-" in n]
        if jax.process_index() == 0:
            for name in names:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        _sync("llama_jax_remove_leftovers")
        return names

    def wait(self) -> None:
        """Blocks until the save in flight is durable, then applies the retention rule."""
        step, self._in_flight = self._in_flight, None
        try:
            self._checkpointer.wait_until_finished()
        except Exception as e:  # orbax re-raises whatever failed in the background write (disk full, ...)
            raise CheckpointError(f"writing checkpoint {self.step_dir(step)} failed: {e}") from e
        if step is not None:
            self._rotate()

    def _rotate(self) -> None:
        if jax.process_index() != 0:
            return
        intact = {}
        for step in self.all_steps():
            try:
                intact[step] = check_structure(self.step_dir(step))
            except CheckpointError:  # not counted, not deleted: resume reports it
                continue
        steps = sorted(intact)
        keep = set(steps[-self.keep_last:])
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        keep |= set([s for s in steps if intact[s].get("healthy", True)][-1:])
        for step in steps:
            if step not in keep:
                doomed = f"{self.step_dir(step)}.deleting-{uuid.uuid4().hex[:8]}"
                os.rename(self.step_dir(step), doomed)  # never a half-deleted step that looks complete
                shutil.rmtree(doomed, ignore_errors=True)

    def close(self) -> None:
        self.wait()
        self._checkpointer.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_params(params, cfg: ModelConfig, extra_params: Sequence[str]) -> None:
    """The tree must be what ``cfg`` describes, plus the top-level leaves a stage declares (a reward head); with
    adapters (``cfg.lora``) the adapters alone: the base stays where the run's init_from pins it."""
    try:
        tree = {k: v for k, v in params.items() if k not in extra_params}
        if cfg.lora is not None:
            lora.check(tree, cfg)
        else:
            model.check_params(tree, cfg)
    except ConfigError as e:
        raise CheckpointError(f"refusing to save: {e}") from e


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# --- the steps of a run ---------------------------------------------------------------------------------


def step_numbers(directory: str) -> list[int]:
    """The steps of every step directory in ``directory`` (a run's checkpoints/), complete or not, ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def resolve_step_dir(path: str) -> str:
    """A step directory itself, or the newest complete step of a run directory."""
    if is_checkpoint_dir(path):
        return path
    run_checkpoints = os.path.join(path, CHECKPOINTS_DIR)
    for step in reversed(step_numbers(run_checkpoints)):
        if is_checkpoint_dir(os.path.join(run_checkpoints, str(step))):
            return os.path.join(run_checkpoints, str(step))
    raise CheckpointError(f"no complete checkpoint in {run_checkpoints}")


def newest_that_verifies(directory: str, read: Callable[[str], T]) -> tuple[int, T, list[tuple[int, str]]]:
    """(step, ``read(its directory)``) of the newest step in ``directory`` (a run's checkpoints/) that ``read``
    gets without a CorruptCheckpointError, and (step, why) of each newer one it skipped, newest first.

    CorruptCheckpointError listing every step when none verifies; CheckpointError when there is none.
    """
    skipped = []
    for step in reversed(step_numbers(directory)):
        try:
            return step, read(os.path.join(directory, str(step))), skipped
        except CorruptCheckpointError as e:
            skipped.append((step, str(e)))
    if skipped:
        raise CorruptCheckpointError(f"no checkpoint in {directory} verifies:\n  "
                                     + "\n  ".join(why for _, why in skipped))
    raise CheckpointError(f"no complete checkpoint in {directory}")
