"""The training loop: ``python -m llama_jax.train --config configs/pretrain/tiny.py --config.run_dir=/tmp/run``.

One explicit loop for every run: build (or resume) the sharded state, pull batches, step, log, evaluate,
checkpoint. Resuming restores params, optimizer state, step, RNG and the data iterator's position, so a
resumed run takes exactly the steps an uninterrupted one would have taken. SIGTERM (preemption) saves a
checkpoint and returns normally (exit status 0).

Run directory:
    <run_dir>/checkpoints/<step>/   (llama_jax.checkpoint)
    <run_dir>/metrics.jsonl         one JSON object per logged step and per eval
    <run_dir>/tb/                   TensorBoard events
Only process 0 writes logs; every process takes part in checkpointing.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from llama_jax import optim, pipeline, sharding
from llama_jax.checkpoint import CheckpointManager
from llama_jax.config import ModelConfig
from llama_jax.data import concat_batches, make_batches, split_rows
from llama_jax.errors import ConfigError, DataError, LlamaJaxError
from llama_jax.tokenizer import get_tokenizer
from llama_jax.train import pretrain
from llama_jax.train.step import TrainState, abstract_state, create_state, make_eval_step, make_train_step

STAGE = "pretrain"


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


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (installed only in the main thread)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Logger:
    """metrics.jsonl + TensorBoard, written by process 0 only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self._file = self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

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
    """Every process's iterator state, so each resumes its own share of the stream."""
    if jax.process_count() == 1:
        return {"process_count": 1, "processes": [local_state]}
    encoded = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int32(encoded.size))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded)
    states = [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]
    return {"process_count": jax.process_count(), "processes": states}


def _local_data_state(saved: dict) -> dict:
    if saved.get("process_count") != jax.process_count():
        raise DataError(
            f"the checkpoint's data position was saved by {saved.get('process_count')} processes; this run has "
            f"{jax.process_count()}: resuming would not reproduce the data order"
        )
    return saved["processes"][jax.process_index()]


def _scalars(metrics: Mapping) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def run(config) -> dict:
    """Trains as ``config`` says (see configs/pretrain/tiny.py); returns the last logged metrics and eval."""
    if not config.run_dir:
        raise ConfigError("config.run_dir is empty: pass --config.run_dir=/path/to/run")
    run_dir = Path(config.run_dir)
    cfg = model_config(config.model)
    tokenizer = get_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids; the model's vocabulary "
                          f"is only {cfg.vocab_size}")
    mesh = sharding.make_mesh(config.mesh or None)
    total_steps = int(config.schedule.total_steps)
    stop_step = int(config.train.steps or total_steps)
    sched = optim.lr_schedule(
        config.schedule.peak_lr, config.schedule.warmup_steps, config.schedule.decay_steps,
        config.schedule.min_lr_ratio, config.schedule.anneal_steps, total_steps)
    opt = config.optimizer
    tx = optim.adamw(sched, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                     clip_norm=opt.clip_norm or None, decay_embeddings=opt.decay_embeddings)
    data_seq, data_rows = int(config.data.seq_len), int(config.data.batch_size)
    ramp = optim.parse_ramp(list(config.schedule.ramp), data_seq)
    if config.train.on_nonfinite not in ("skip", "halt"):
        raise ConfigError(f"train.on_nonfinite must be 'skip' or 'halt', got {config.train.on_nonfinite!r}")

    run_layers = pipeline.make_run_layers(cfg, mesh, **config.pipeline)
    loss_fn = pretrain.make_loss_fn(cfg, chunk_size=opt.loss_chunk or None, z_loss=opt.z_loss, run_layers=run_layers)
    abstract = abstract_state(cfg, tx, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    train_step = make_train_step(loss_fn, tx, mesh, shardings, schedule=sched,
                                 microbatch_tokens=data_rows * data_seq // int(opt.grad_accum))
    eval_step = make_eval_step(loss_fn, mesh, shardings.params)
    data = make_batches(config.data, tokenizer)

    checkpoints = CheckpointManager(run_dir, keep_last=config.checkpoint.keep_last,
                                    keep_every=config.checkpoint.keep_every or None,
                                    async_save=config.checkpoint.async_save)
    latest = checkpoints.latest_step()
    if latest is None:
        state = create_state(cfg, tx, mesh, seed=config.seed)
    else:
        restored = checkpoints.restore(latest, params_target=abstract.params, opt_state_target=abstract.opt_state)
        state = TrainState(step=jnp.asarray(restored.step, jnp.int32), params=restored.params,
                           opt_state=restored.opt_state, rng=jnp.asarray(restored.rng, jnp.uint32))
        state = jax.device_put(state, shardings)
        data.set_state(_local_data_state(restored.data_state))

    is_main = jax.process_index() == 0
    logger = _Logger(run_dir, is_main)
    peak = float(config.logging.peak_tflops) * 1e12 or measure_peak_flops()
    eval_batches = None
    tokenizer_info = {"name": tokenizer.name, "sha256": tokenizer.sha256}
    step = int(state.step)
    if latest is not None:
        logger.write(step, {"resumed_from": float(latest)})

    def save(force: bool) -> None:
        checkpoints.save(int(state.step), params=state.params, cfg=cfg, stage=STAGE, opt_state=state.opt_state,
                         data_state=_gather_data_state(data.get_state()), rng=state.rng,
                         stage_config=config.to_dict(), tokenizer=tokenizer_info, mesh=mesh, force=force)

    def evaluate() -> dict[str, float]:
        nonlocal eval_batches
        if eval_batches is None:  # the same held-out batches every time, read once
            stream = make_batches(config.data, tokenizer, split="eval")
            eval_batches = [b for _, b in zip(range(config.logging.eval_batches), stream)]
            if not eval_batches:
                raise DataError("the eval split is smaller than one batch; lower data.holdout_every")
        results = [eval_step(state.params, b) for b in eval_batches]
        return {k: float(np.mean([r[k] for r in jax.device_get(results)])) for k in results[0]}

    summary: dict = {}
    window_start, window_tokens, window_metrics = time.perf_counter(), 0, []
    skipped_total = 0
    pending = None  # (step, its `skipped` flag): read one step late, so the host never waits on the device

    def check_finite() -> None:
        nonlocal skipped_total
        if pending is not None and int(pending[1]):
            skipped_total += 1
            if config.train.on_nonfinite == "halt":
                raise LlamaJaxError(
                    f"non-finite loss or gradient at step {pending[0]}; the update was not applied. Set "
                    "train.on_nonfinite='skip' to skip such steps and go on, or lower the learning rate")

    progress = tqdm.tqdm(total=stop_step, initial=step, disable=not (is_main and config.logging.progress),
                         dynamic_ncols=True)
    with _Preemption() as preemption:
        while step < stop_step and not preemption.requested:
            stage, _ = optim.ramp_position(step, ramp, data_rows * data_seq)
            batch = concat_batches([next(data) for _ in range(stage.batches)])
            if stage.seq_len != data_seq:
                batch = split_rows(batch, stage.seq_len)
            state, metrics = train_step(state, batch)
            check_finite()
            pending = (step, metrics["skipped"])
            step += 1
            window_tokens += batch["tokens"].size * jax.process_count()
            window_metrics.append(metrics)

            if step % config.logging.every == 0 or step == stop_step:
                fetched = [_scalars(m) for m in window_metrics]
                elapsed = time.perf_counter() - window_start
                summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                summary["skipped"] = float(sum(m["skipped"] for m in fetched))
                tokens_per_s = window_tokens / elapsed
                mfu = cfg.flops_per_token(stage.seq_len) * tokens_per_s / (peak * jax.device_count())
                summary.update(tokens_per_s=tokens_per_s, seq_len=stage.seq_len, mfu=mfu)
                logger.write(step, summary)
                progress.set_postfix(loss=f"{summary['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                window_start, window_tokens, window_metrics = time.perf_counter(), 0, []
            if config.logging.eval_every and (step % config.logging.eval_every == 0 or step == stop_step):
                evaluated = {f"eval_{k}": v for k, v in evaluate().items()}
                summary.update(evaluated)
                logger.write(step, evaluated)
            if step % config.checkpoint.every == 0 and step < stop_step:
                save(force=False)
            progress.update(1)
        check_finite()
        progress.close()
        if step != latest:
            save(force=True)
        checkpoints.wait()
    checkpoints.close()
    logger.close()
    summary.update(step=step, preempted=preemption.requested, skipped_total=skipped_total,
                   skipped_records=len(data.skipped))
    return summary
