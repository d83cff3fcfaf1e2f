"""The training loop of every stage: ``python -m llama_jax.train --config configs/<stage>/<name>.py``.

    run = build(config)        # stage, phases, sharded state (fresh, from init_from, or resumed), data (train.build)
    summary = fit(run)         # step, log, evaluate, checkpoint until train.steps; returns the last metrics

The stage brings its loss and batches and the phases the shape of each step; the loop is the same for all and knows
no feature by name. A resumed run takes exactly the steps an uninterrupted one would have taken. SIGTERM saves the
current step and returns normally; a data error or a halt on a non-finite loss saves the current step before the
error is raised (docs/recovery.md).

Run directory:
    <run_dir>/checkpoints/<step>/   (llama_jax.checkpoint)
    <run_dir>/metrics.jsonl         one JSON object per logged step and per eval
    <run_dir>/tb/                   TensorBoard events
Only process 0 writes logs; every process takes part in checkpointing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llama_jax import cli, model
from llama_jax.data import merge_states, record_counts
from llama_jax.errors import CheckpointError, LlamaJaxError
from llama_jax.train.build import STAGES, Run, build, model_config, start_from

__all__ = ["STAGES", "Run", "build", "fit", "model_config", "run", "start_from"]


def measure_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one device on a float32 [size, size] matmul (the best of a few runs): an MFU denominator."""
    x = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class _Preempted(BaseException):
    """SIGTERM inside ``_Preemption.interruptible()``: a BaseException, so no ``except Exception`` swallows it."""


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (installed only in the main thread); inside
    ``interruptible()`` (a wait for data, which holds no training state) it raises ``_Preempted`` at once."""

    def __init__(self):
        self.requested = False
        self._interruptible = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True
        if self._interruptible:
            self._interruptible = False
            raise _Preempted

    @contextlib.contextmanager
    def interruptible(self):
        if self.requested:
            raise _Preempted
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Logger:
    """metrics.jsonl + TensorBoard, written by process 0 only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self._file = self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # optional writer, imported only by the process that logs

            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(run_dir / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{prefix + k: v for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def _gather_data_state(local_state: dict) -> dict:
    """Every process's row positions merged into one state, which any number of processes can resume from."""
    if jax.process_count() == 1:
        return merge_states([local_state])
    encoded = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int32(encoded.size))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded)
    return merge_states([json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)])


def _scalars(metrics: Mapping) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def _tokens(batch: Mapping) -> int:
    """Input tokens in a batch (preference batches nest their rows: chosen, rejected, ...)."""
    return sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(batch)
               if getattr(path[-1], "key", None) == "tokens")




class _Health:
    """Which steps were skipped as non-finite, read one step late so the host never waits on the device, and
    whether the next checkpoint is healthy (some step since the previous one was applied)."""

    def __init__(self, halt: bool, last_saved: int):
        self.halt, self.last_saved = halt, last_saved
        self.pending = None  # (step, its `skipped` flag)
        self.skipped_total = self.since_save = self.skipped_since_save = 0

    def took(self, step: int, skipped_flag) -> None:
        self.settle()
        self.pending = (step, skipped_flag)
        self.since_save += 1

    def settle(self) -> None:
        """Reads the pending step's flag; raises if it was skipped and on_nonfinite is "halt"."""
        if self.pending is None:
            return
        (at, flag), self.pending = self.pending, None
        if int(flag):
            self.skipped_total += 1
            self.skipped_since_save += 1
            if self.halt:
                raise LlamaJaxError(
                    f"non-finite loss or gradient at step {at}; the update was not applied. Set "
                    "train.on_nonfinite='skip' to skip such steps and go on, or lower the learning rate")

    def saved(self, step: int) -> bool:
        """Whether the checkpoint about to be written at ``step`` is healthy; resets the counts."""
        healthy = self.since_save == 0 or self.skipped_since_save < self.since_save
        self.last_saved, self.since_save, self.skipped_since_save = step, 0, 0
        return healthy


def _save(run: Run, state, step: int, health: _Health, data_state: dict | None) -> None:
    """A checkpoint of ``step``, unless it has one; ``data_state`` None: the stream's current position."""
    if step == health.last_saved:
        return
    extra_params = sorted(set(state.params) - set(model.param_shapes(run.cfg)))  # the stage's own leaves
    run.checkpoints.save(step, params=state.params, cfg=run.cfg, stage=run.stage.name, opt_state=state.opt_state,
                         data_state=_gather_data_state(run.data.get_state() if data_state is None else data_state),
                         rng=state.rng, stage_config=run.config.to_dict(),
                         tokenizer={"name": run.tokenizer.name, "sha256": run.tokenizer.sha256}, mesh=run.mesh,
                         init_from=run.init_from, extra_params=extra_params, healthy=health.saved(step))


def _banner(run: Run, stop_step: int) -> str:
    c, step = run.config, int(run.state.step)
    tokens = int(c.data.batch_size) * int(c.data.seq_len)
    start = (f"resumed from step {run.resumed_from}" if run.resumed_from is not None
             else f"started from {run.init_from['path']}" if run.init_from else "fresh parameters")
    trained = sum(x.size for x in jax.tree.leaves(run.state.params))
    base = "" if run.config.lora.base == "float" else f", base in {run.config.lora.base}"
    adapters = f" ({trained:,} trained: low-rank adapters, rank {run.cfg.lora.rank}{base})" if run.cfg.lora else ""
    banner = (f"llama_jax {run.stage.name}: {run.cfg.num_params():,} parameters{adapters}, {jax.device_count()} "
              f"{jax.default_backend()} device(s) in {jax.process_count()} process(es), mesh "
              f"{dict(run.mesh.shape)}; {tokens:,} tokens per data batch; steps {step} -> {stop_step}; {start}; "
              f"writing to {os.path.abspath(c.run_dir)}; records cut to fit a row or dropped so far: "
              + ", ".join(f"{k} {v}" for k, v in record_counts(_gather_data_state(run.data.get_state())).items()))
    return banner if len(run.plan.phases) == 1 else f"{banner}\nphases:\n{run.plan.describe()}"


def fit(run: Run, preemption: _Preemption | None = None) -> dict:
    """Trains ``run`` up to ``config.train.steps`` (or the schedule's end); returns the last logged metrics.
    Ends by closing the run (the last checkpoint durable, run_dir's lock released), whatever happens.
    ``preemption``: the SIGTERM watcher (``run`` installs one before ``build``); None installs one now."""
    try:
        with contextlib.nullcontext(preemption) if preemption is not None else _Preemption() as watcher:
            return _fit(run, watcher)
    finally:
        run.close()


def _fit(run: Run, preemption: _Preemption) -> dict:
    config, data = run.config, run.data
    stop_step = int(config.train.steps or run.plan.end_step or config.schedule.total_steps)
    state, step = run.state, int(run.state.step)
    first_step, phase, position = step, None, None  # position: the data's before the batch being fetched
    health = _Health(config.train.on_nonfinite == "halt", last_saved=first_step)

    def evaluate() -> dict[str, float]:
        results = jax.device_get([run.eval_step(state, b) for b in run.eval_batches])
        return {k: float(np.mean([r[k] for r in results])) for k in results[0]}

    report = _Report(run, stop_step, evaluate if run.eval_batches else None)
    boundary = dict(evaluate=report.evaluate, memo=data.memo, log=lambda metrics: report.logger.write(step, metrics))
    try:
        try:
            while step < stop_step and not preemption.requested:
                if (current := run.plan.at(step)) is not phase:
                    phase = current
                    state = _enter(run, state, phase, step, boundary)
                position = data.get_state()
                with preemption.interruptible():
                    batch = next(data)
                position = None
                if step == first_step:
                    cli.log(f"compiling the {run.stage.name} step for batches of {jax.tree.leaves(batch)[0].shape} ...")
                state, metrics = run.train_step(state, batch)
                step += 1
                health.took(step - 1, metrics["skipped"])
                report.step(step, metrics, _tokens(batch) * jax.process_count(), phase.seq_len)
                if step % config.checkpoint.every == 0 and step < stop_step:
                    health.settle()
                    _save(run, state, step, health, None)
            if step == run.plan.end_step and step > first_step:  # the last phase's end
                run.hooks.end(phase, state.params, phase.mesh, **boundary)
        except _Preempted:  # SIGTERM while waiting for data: the state is that of the last step taken
            pass
        health.settle()
    except CheckpointError:
        report.close()
        raise
    except LlamaJaxError as e:  # bad data or a halt: the state is sound, so keep it before stopping
        report.close()
        with contextlib.suppress(LlamaJaxError):
            health.settle()
        _save(run, state, step, health, position)
        run.checkpoints.wait()
        cli.log(f"saved a checkpoint of step {step} before stopping on: {e}\nRemove the cause and rerun the "
                "same command to resume from it.")
        raise
    report.close()
    _save(run, state, step, health, position)
    run.checkpoints.wait()
    return {**report.summary, "step": step, "preempted": preemption.requested, "skipped_total": health.skipped_total,
            "skipped_records": len(data.skipped)}


class _Report:
    """What the steps leave behind: the start banner, a metrics line every logging.every steps (averaged over them,
    with tokens/s and MFU), the held-out evaluations, the progress bar; ``summary``: the latest of them."""

    def __init__(self, run: Run, stop_step: int, evaluate: Callable[[], dict] | None):
        config, step = run.config, int(run.state.step)
        self.every, self.eval_every, self.stop_step = config.logging.every, config.logging.eval_every, stop_step
        self.evaluate, self.summary, self.data = evaluate, {}, run.data
        self.is_main = jax.process_index() == 0
        self.logger = _Logger(Path(config.run_dir), self.is_main)
        self.window = _Window(run.cfg, float(config.logging.peak_tflops) * 1e12 or measure_peak_flops(),
                              run.stage.flops_factor)
        cli.log(_banner(run, stop_step))
        if run.changed:
            cli.log("warning: the config differs from the one the checkpoint was saved with:\n  "
                    + "\n  ".join(run.changed))
        if run.resumed_from is not None:
            self.logger.write(step, {"resumed_from": float(run.resumed_from)})
        self.progress = cli.progress(total=stop_step, initial=step, desc=run.stage.name, unit="step",
                                     disable=not (self.is_main and config.logging.progress))

    def step(self, step: int, metrics, tokens: int, seq_len: int) -> None:
        self.window.add(metrics, tokens)
        last = step == self.stop_step
        if step % self.every == 0 or last:
            # Counted in the data state, every process's rows together: the same on any topology, and across resumes.
            self.summary = self.window.flush(seq_len) | record_counts(_gather_data_state(self.data.get_state()))
            for line in self.data.reports():
                cli.log(line)
            self.logger.write(step, self.summary)
            self.progress.set_postfix(loss=f"{self.summary['loss']:.3f}",
                                      tok_s=f"{self.summary['tokens_per_s']:,.0f}")
        if self.evaluate is not None and ((self.eval_every and step % self.eval_every == 0) or last):
            evaluated = {f"eval_{k}": v for k, v in self.evaluate().items()}
            self.summary.update(evaluated)
            self.logger.write(step, evaluated)
            if self.is_main:
                self.progress.write(f"step {step}: eval loss {evaluated['eval_loss']:.4f}", file=sys.stderr)
        self.progress.update(1)

    def close(self) -> None:
        self.progress.close()
        self.logger.close()


def _enter(run: Run, state, phase, step: int, boundary: dict):
    """Into ``phase`` at ``step``: the end hook of the phase whose stream the data is in, if it is another (so a run
    resumed at a phase's end runs it then), the phase's enter hook, then its layout and data shape."""
    ended = run.plan.owner(run.data.stream)
    if ended is not None and ended.index != phase.index:
        run.hooks.end(ended, state.params, ended.mesh, **boundary)
    run.hooks.enter(phase, **boundary)
    state = run.enter(phase, state)
    if len(run.plan.phases) > 1:
        cli.log(f"step {step}: phase {phase.index}: {phase.rows} x {phase.seq_len} tokens per step until "
                f"{'the end' if phase.end_step is None else f'step {phase.end_step}'}, mesh {dict(run.mesh.shape)}")
    return state


class _Window:
    """The metrics of the steps since the last log line, averaged, with tokens per step and per second and MFU
    (``flops_factor``: the stage's FLOPs per token in forward + backward passes)."""

    def __init__(self, cfg, peak_flops: float, flops_factor: float):
        self.cfg, self.peak, self.flops_factor = cfg, peak_flops, flops_factor
        self.start, self.tokens, self.metrics = time.perf_counter(), 0, []

    def add(self, metrics, tokens: int) -> None:
        self.metrics.append(metrics)
        self.tokens += tokens

    def flush(self, seq_len: int) -> dict:
        fetched = [_scalars(m) for m in self.metrics]
        tokens_per_s = self.tokens / (time.perf_counter() - self.start)
        summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        flops_per_token = self.flops_factor * self.cfg.flops_per_token(seq_len)
        summary.update(skipped=float(sum(m["skipped"] for m in fetched)), tokens_per_step=self.tokens / len(fetched),
                       tokens_per_s=tokens_per_s, seq_len=seq_len,
                       mfu=flops_per_token * tokens_per_s / (self.peak * jax.device_count()))
        self.start, self.tokens, self.metrics = time.perf_counter(), 0, []
        return summary


def run(config) -> dict:
    """``fit(build(config))``: what ``python -m llama_jax.train`` does. SIGTERM is watched from the start: one that
    arrives while the run is built stops it before step 1 (nothing new to save), with a normal return."""
    with _Preemption() as preemption:
        return fit(build(config), preemption)
