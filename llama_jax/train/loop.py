"""The training loop of every stage: ``python -m llama_jax.train --config configs/<stage>/<name>.py``.

    run = build(config)        # stage, mesh, sharded state (fresh, from init_from, or resumed), step, data
    summary = fit(run)         # step, log, evaluate, checkpoint until train.steps; returns the last metrics

``config.stage`` picks the stage (``STAGES``); the stage brings its loss and batches, the loop is the same for all.
Resuming restores params, optimizer state, step, RNG and the data streams' position, so a resumed run takes
exactly the steps an uninterrupted one would have taken; a run directory with a checkpoint always resumes, before
``init_from`` (a llama_jax run or step directory, a Hugging Face or a Meta directory) is looked at.

Failure and recovery:
- one run writes a run directory at a time: ``build`` takes ``<run_dir>/lock`` (``train.lock``) before anything is
  written, and a second run on the same directory is refused, naming the holder;
- every key's range and the eval split are checked by ``build``, before step 1;
- resume takes the newest checkpoint that verifies (``checkpoint``: checksums); newer ones that do not are
  reported and moved aside (``<step>.corrupt-<time>``), never used;
- SIGTERM (preemption) at any moment, waiting for data included, saves one checkpoint of the current step and
  returns normally (exit status 0);
- a data error (a malformed record under ``data.on_error="raise"``) or ``train.on_nonfinite="halt"`` saves the
  current step, whose state is sound, before the error is raised: fix the cause and rerun to resume;
- a checkpoint records whether it is healthy (some step since the previous one was applied), and retention always
  keeps the newest healthy one.

Run directory:
    <run_dir>/checkpoints/<step>/   (llama_jax.checkpoint)
    <run_dir>/metrics.jsonl         one JSON object per logged step and per eval
    <run_dir>/tb/                   TensorBoard events
Only process 0 writes logs; every process takes part in checkpointing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from llama_jax import checkpoint, cli, model, optim, pipeline, sharding
from llama_jax.checkpoint import CheckpointManager
from llama_jax.config import ModelConfig
from llama_jax.data import concat_batches, merge_states, split_rows
from llama_jax.errors import CheckpointError, ConfigError, DataError, LlamaJaxError
from llama_jax.tokenizer import Tokenizer, get_tokenizer
from llama_jax.train import defaults, dpo, long_context, pretrain, reward, sft
from llama_jax.train.lock import RunLock
from llama_jax.train.step import Stage, TrainState, abstract_state, create_state, make_eval_step, make_train_step

STAGES: dict[str, Stage] = {stage.name: stage for stage in (pretrain.STAGE, sft.STAGE, reward.STAGE, dpo.STAGE)}


def model_config(section: Mapping) -> ModelConfig:
    """``config.model``: every ModelConfig field (configs fill them from a preset: train/defaults.py)."""
    fields = section.to_dict() if hasattr(section, "to_dict") else dict(section)  # nested ConfigDicts -> dicts
    return ModelConfig.from_dict(fields)


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


@dataclasses.dataclass
class Run:
    """Everything ``fit`` needs, made by ``build``."""

    config: Any
    stage: Stage
    cfg: ModelConfig
    tokenizer: Tokenizer
    mesh: jax.sharding.Mesh
    schedule: optax.Schedule
    ramp: tuple[optim.RampStage, ...]
    state: TrainState
    train_step: Any
    eval_step: Any
    data: Iterator[dict]
    eval_batches: list[dict]  # the held-out batches every evaluation uses (read by build; [] without eval)
    checkpoints: CheckpointManager
    lock: RunLock  # this run's hold on run_dir; ``close`` releases it
    resumed_from: int | None
    init_from: dict | None  # where a fresh run took its parameters: {"path", "format", "step"}
    changed: list[str]  # on resume: config keys whose value differs from the checkpoint's (``key: old -> new``)
    tx: optax.GradientTransformation | None = None  # the optimizer, and the stage's loss: what a long-context
    loss_fn: Any = None  #                            stage rebuilds its step from on its own mesh
    long_context: long_context.Plan | None = None  # config.long_context's stages (None: no extension)

    def close(self) -> None:
        """Waits for the last checkpoint to be durable and releases run_dir (``fit`` does it)."""
        try:
            self.checkpoints.close()
        finally:
            self.lock.release()


def start_from(path: str, cfg: ModelConfig, mesh) -> tuple[dict, ModelConfig, dict]:
    """A Llama tree to start a stage from (any format), checked against the architecture the config names."""
    params, source_cfg, metadata = checkpoint.load(path, shardings=mesh if _is_stacked(path) else None)
    if not source_cfg.scan_layers:
        params = model.stack_layers(params, source_cfg.num_layers)
    differences = source_cfg.architecture_differences(cfg)
    if differences:
        raise ConfigError(f"init_from {path} is not the model config.model describes (checkpoint vs config):\n  "
                          + "\n  ".join(differences))
    llama = {k: params[k] for k in model.param_shapes(cfg)}  # a stage's extra leaves (a reward head) stay behind
    source = {"path": os.path.abspath(path), "format": metadata.get("format", "llama_jax"),
              "step": metadata.get("step"), "stage": metadata.get("stage")}
    return llama, source_cfg, source


def _is_stacked(path: str) -> bool:
    """Whether ``checkpoint.load`` can place this source straight onto the mesh's shardings (stacked, unquantized
    llama_jax trees, HF and Meta directories); per-layer trees are stacked on the host first."""
    if checkpoint.detect_format(path) != "llama_jax":
        return True
    metadata = checkpoint.read_metadata(checkpoint.resolve_step_dir(path))
    return metadata.get("param_layout") == "stacked" and not metadata.get("quantization")


def build(config) -> Run:
    """A run from an experiment config (see configs/<stage>/*.py): resumed from ``run_dir`` when it holds a
    checkpoint, else started from ``init_from`` or from fresh parameters. Every key's range and the data (eval
    split included) are checked first; then run_dir's lock is taken, held until ``fit`` (or ``Run.close``) ends."""
    if not config.run_dir:
        raise ConfigError("config.run_dir is empty: pass --config.run_dir=/path/to/run")
    if config.stage not in STAGES:
        raise ConfigError(f"config.stage {config.stage!r} is not one of {sorted(STAGES)}")
    defaults.check_ranges(config)
    plan = long_context.parse(config, model_config(config.model))
    if config.train.on_nonfinite not in ("skip", "halt"):
        raise ConfigError(f"train.on_nonfinite must be 'skip' or 'halt', got {config.train.on_nonfinite!r}")
    stage = STAGES[config.stage]
    if stage.configure is not None:
        stage = stage.configure(config)
    cfg = model_config(config.model)
    tokenizer = get_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids; the model's vocabulary "
                          f"is only {cfg.vocab_size}")
    mesh = sharding.make_mesh(config.mesh or None)
    s, opt = config.schedule, config.optimizer
    schedule = optim.lr_schedule(s.peak_lr, s.warmup_steps, s.decay_steps, s.min_lr_ratio, s.anneal_steps,
                                 s.total_steps)
    if plan is not None:
        schedule = plan.schedule(schedule)
    tx = optim.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                     clip_norm=opt.clip_norm or None, decay_embeddings=opt.decay_embeddings)
    data_seq, data_rows = int(config.data.seq_len), int(config.data.batch_size)
    ramp = optim.parse_ramp(list(s.ramp), data_seq)

    run_layers = pipeline.make_run_layers(cfg, mesh, **config.pipeline)  # None: the plain scan
    loss_fn = stage.make_loss_fn(cfg, config, run_layers)
    abstract = abstract_state(cfg, tx, mesh, stage)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    train_step = make_train_step(loss_fn, tx, mesh, shardings, schedule=schedule,
                                 microbatch_tokens=data_rows * data_seq // int(opt.grad_accum))
    eval_step = make_eval_step(loss_fn, mesh, shardings)
    data = stage.make_batches(config, tokenizer, "train")
    if plan is not None:
        data = long_context.StagedBatches(
            data, lambda k: stage.make_batches(long_context.stage_config(config, plan, k), tokenizer, "train"))
    eval_batches = []
    gates = plan is not None and plan.gate.action != "off"
    if config.logging.eval_every or gates:  # read now: an eval split too small for one batch fails before step 1
        stream = stage.make_batches(config, tokenizer, "eval")
        eval_batches = [b for _, b in zip(range(config.logging.eval_batches), stream)]
        if not eval_batches:
            raise DataError(f"the eval split (every data.holdout_every={config.data.holdout_every}-th record) holds "
                            f"too few records for one batch of data.batch_size={config.data.batch_size} rows; lower "
                            "data.holdout_every, or set logging.eval_every=0")
    if plan is not None:
        long_context.check_layouts(plan, cfg, tx, stage, int(config.data.batch_size))
        long_context.check_gates(plan, tokenizer, long_context.retrieval_task(plan.gate, bool(config.data.add_bos)))

    lock = RunLock.acquire(config.run_dir)  # before the first write
    try:
        checkpoints = CheckpointManager(config.run_dir, keep_last=config.checkpoint.keep_last,
                                        keep_every=config.checkpoint.keep_every or None,
                                        async_save=config.checkpoint.async_save)
        state, latest, init_from, changed = _start(config, stage, cfg, tx, mesh, abstract, checkpoints, data)
    except BaseException:
        lock.release()
        raise
    return Run(config=config, stage=stage, cfg=cfg, tokenizer=tokenizer, mesh=mesh, schedule=schedule, ramp=ramp,
               state=state, train_step=train_step, eval_step=eval_step, data=data, eval_batches=eval_batches,
               checkpoints=checkpoints, lock=lock, resumed_from=latest, init_from=init_from, changed=changed,
               tx=tx, loss_fn=loss_fn, long_context=plan)


def _start(config, stage: Stage, cfg: ModelConfig, tx, mesh, abstract: TrainState, checkpoints: CheckpointManager,
           data) -> tuple[TrainState, int | None, dict | None, list[str]]:
    """(state, step resumed from, init_from, changed config keys): resumed from the newest checkpoint that verifies
    (reporting and moving aside newer ones that do not), else from ``init_from``, else fresh."""
    leftovers = checkpoints.remove_leftovers()  # this run holds the lock: nobody else is writing them
    if leftovers:
        cli.log(f"removed what interrupted saves left in {checkpoints.directory}: {', '.join(leftovers)}")
    if not checkpoints.present_steps():
        if config.init_from:
            start, _, init_from = start_from(config.init_from, cfg, mesh)
            return create_state(cfg, tx, mesh, config.seed, stage=stage, params=start), None, init_from, []
        return create_state(cfg, tx, mesh, config.seed, stage=stage), None, None, []
    restored = checkpoints.restore(params_target=abstract.params, opt_state_target=abstract.opt_state)
    for step, why in restored.skipped:
        moved = checkpoints.set_aside(step, "corrupt")
        cli.log(f"warning: checkpoint step {step} cannot be used: {why}\n  moved to {moved}; resuming from "
                f"step {restored.step}, the newest checkpoint that verifies")
    init_from = restored.metadata.get("init_from")
    changed = config_changes(restored.metadata.get("stage_config") or {}, config.to_dict())
    frozen = None
    if stage.frozen is not None:  # not in the checkpoint: rebuilt from where the run started
        if not init_from:
            raise CheckpointError(f"{config.run_dir}: the {stage.name} stage keeps frozen parameters, rebuilt "
                                  "from the run's init_from on resume, but its checkpoint records none")
        start, _, _ = start_from(init_from["path"], cfg, mesh)
        frozen = create_state(cfg, tx, mesh, config.seed, stage=stage, params=start).frozen
    state = TrainState(step=jnp.asarray(restored.step, jnp.int32), params=restored.params,
                       opt_state=restored.opt_state, rng=jnp.asarray(restored.rng, jnp.uint32), frozen=frozen)
    state = jax.device_put(state, jax.tree.map(lambda a: a.sharding, abstract))
    data.set_state(restored.data_state)
    return state, restored.step, init_from, changed


def config_changes(saved: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    """``key: saved -> current`` for every experiment-config key whose value differs (nested keys dotted)."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changes += config_changes(old, new, f"{prefix}{key}.")
        elif json.dumps(old, default=str) != json.dumps(new, default=str):  # tuples and lists compare equal
            changes.append(f"{prefix}{key}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}")
    return changes


def _banner(run: Run, stop_step: int) -> str:
    c, step = run.config, int(run.state.step)
    tokens = int(c.data.batch_size) * int(c.data.seq_len)
    start = (f"resumed from step {run.resumed_from}" if run.resumed_from is not None
             else f"started from {run.init_from['path']}" if run.init_from else "fresh parameters")
    banner = (f"llama_jax {run.stage.name}: {run.cfg.num_params():,} parameters, {jax.device_count()} "
              f"{jax.default_backend()} device(s) in {jax.process_count()} process(es), mesh "
              f"{dict(run.mesh.shape)}; {tokens:,} tokens per data batch; steps {step} -> {stop_step}; {start}; "
              f"writing to {os.path.abspath(c.run_dir)}")
    plan = run.long_context
    if plan is None:
        return banner
    sizes = [plan.mesh_sizes(s.index) for s in plan.stages]
    return f"{banner}\nlong-context stages from step {plan.start_step}:\n{long_context.describe(plan, sizes)}"


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
    config, cfg, data, plan = run.config, run.cfg, run.data, run.long_context
    stop_step = int(config.train.steps or (plan.end_step if plan else config.schedule.total_steps))
    data_seq, data_rows = int(config.data.seq_len), int(config.data.batch_size)
    is_main = jax.process_index() == 0
    logger = _Logger(Path(config.run_dir), is_main)
    peak = float(config.logging.peak_tflops) * 1e12 or measure_peak_flops()
    tokenizer_info = {"name": run.tokenizer.name, "sha256": run.tokenizer.sha256}
    state, step = run.state, int(run.state.step)
    first_step = step
    extra_params = sorted(set(state.params) - set(model.param_shapes(cfg)))  # the stage's own leaves
    cli.log(_banner(run, stop_step))
    if run.changed:
        cli.log("warning: the config differs from the one the checkpoint was saved with:\n  "
                + "\n  ".join(run.changed))
    if run.resumed_from is not None:
        logger.write(step, {"resumed_from": float(run.resumed_from)})

    summary: dict = {}
    window_start, window_tokens, window_metrics = time.perf_counter(), 0, []
    skipped_total = 0
    pending = None  # (step, its `skipped` flag): read one step late, so the host never waits on the device
    last_saved = first_step  # the newest step with a checkpoint, or where this run began (nothing new to save)
    since_save = skipped_since_save = 0  # steps taken, and skipped as non-finite, since then: is the next healthy?

    def settle() -> None:
        """Reads the pending step's `skipped` flag; raises if it was skipped and on_nonfinite is "halt"."""
        nonlocal pending, skipped_total, skipped_since_save
        if pending is None:
            return
        (at, flag), pending = pending, None
        if int(flag):
            skipped_total += 1
            skipped_since_save += 1
            if config.train.on_nonfinite == "halt":
                raise LlamaJaxError(
                    f"non-finite loss or gradient at step {at}; the update was not applied. Set "
                    "train.on_nonfinite='skip' to skip such steps and go on, or lower the learning rate")

    def save(data_state: dict | None) -> None:
        """A checkpoint of the current step, unless it has one; ``data_state`` None: the stream's position."""
        nonlocal last_saved, since_save, skipped_since_save
        if step == last_saved:
            return
        healthy = since_save == 0 or skipped_since_save < since_save
        run.checkpoints.save(step, params=state.params, cfg=cfg, stage=run.stage.name, opt_state=state.opt_state,
                             data_state=_gather_data_state(data.get_state() if data_state is None else data_state),
                             rng=state.rng, stage_config=config.to_dict(), tokenizer=tokenizer_info, mesh=run.mesh,
                             init_from=run.init_from, extra_params=extra_params, healthy=healthy)
        last_saved, since_save, skipped_since_save = step, 0, 0

    def evaluate() -> dict[str, float]:
        results = [run.eval_step(state, b) for b in run.eval_batches]
        return {k: float(np.mean([r[k] for r in jax.device_get(results)])) for k in results[0]}

    active = -1  # the long-context stage whose mesh and step run.mesh and run.train_step are (-1: the base run's)
    events = long_context.Events(evaluate=evaluate, log=lambda metrics: logger.write(step, metrics))

    progress = cli.progress(total=stop_step, initial=step, disable=not (is_main and config.logging.progress),
                            desc=run.stage.name, unit="step")
    position = None  # the data position before the batch being fetched: where to resume if the fetch fails
    try:
        try:
            while step < stop_step and not preemption.requested:
                if plan is not None and plan.stage_at(step) != active:
                    active = plan.stage_at(step)
                    state = long_context.enter_stage(run, state, active, step, events)
                position = data.get_state()
                if active >= 0:  # a long-context stage: its own stream, rows in zig-zag order under CP
                    with preemption.interruptible():
                        batch = next(data)
                    batch = long_context.zigzag(batch, plan.stages[active].context_parallel)
                    seq_len = plan.stages[active].seq_len
                else:
                    ramp_stage, _ = optim.ramp_position(step, run.ramp, data_rows * data_seq)
                    with preemption.interruptible():
                        batch = concat_batches([next(data) for _ in range(ramp_stage.batches)])
                    if ramp_stage.seq_len != data_seq:
                        batch = split_rows(batch, ramp_stage.seq_len)
                    seq_len = ramp_stage.seq_len
                position = None
                if step == first_step:
                    cli.log(f"compiling the {run.stage.name} step for batches of "
                            f"{jax.tree.leaves(batch)[0].shape} ...")
                state, metrics = run.train_step(state, batch)
                step += 1
                since_save += 1
                settle()
                pending = (step - 1, metrics["skipped"])
                window_tokens += _tokens(batch) * jax.process_count()
                window_metrics.append(metrics)

                if step % config.logging.every == 0 or step == stop_step:
                    fetched = [_scalars(m) for m in window_metrics]
                    elapsed = time.perf_counter() - window_start
                    summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    summary["skipped"] = float(sum(m["skipped"] for m in fetched))
                    tokens_per_s = window_tokens / elapsed
                    mfu = cfg.flops_per_token(seq_len) * tokens_per_s / (peak * jax.device_count())
                    summary.update(tokens_per_s=tokens_per_s, seq_len=seq_len, mfu=mfu)
                    logger.write(step, summary)
                    progress.set_postfix(loss=f"{summary['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                    window_start, window_tokens, window_metrics = time.perf_counter(), 0, []
                if run.eval_batches and (step % config.logging.eval_every == 0 or step == stop_step):
                    evaluated = {f"eval_{k}": v for k, v in evaluate().items()}
                    summary.update(evaluated)
                    logger.write(step, evaluated)
                    if is_main:
                        progress.write(f"step {step}: eval loss {evaluated['eval_loss']:.4f}", file=sys.stderr)
                if step % config.checkpoint.every == 0 and step < stop_step:
                    settle()
                    save(None)
                progress.update(1)
            if plan is not None and step == plan.end_step > first_step and plan.gated(data.stage):
                long_context.run_stage_gate(run, state, data.stage, step, events)  # the last stage's end
        except _Preempted:  # SIGTERM while waiting for data: the state is that of the last step taken
            pass
        settle()
    except CheckpointError:
        logger.close()
        raise
    except LlamaJaxError as e:  # bad data or a halt: the state is sound, so keep it before stopping
        progress.close()
        logger.close()
        with contextlib.suppress(LlamaJaxError):
            settle()
        save(position)
        run.checkpoints.wait()
        cli.log(f"saved a checkpoint of step {step} before stopping on: {e}\nRemove the cause and rerun the "
                "same command to resume from it.")
        raise
    progress.close()
    save(position)
    run.checkpoints.wait()
    logger.close()
    summary.update(step=step, preempted=preemption.requested, skipped_total=skipped_total,
                   skipped_records=len(data.skipped))
    return summary


def run(config) -> dict:
    """``fit(build(config))``: what ``python -m llama_jax.train`` does. SIGTERM is watched from the start: one that
    arrives while the run is built stops it before step 1 (nothing new to save), with a normal return."""
    with _Preemption() as preemption:
        return fit(build(config), preemption)
