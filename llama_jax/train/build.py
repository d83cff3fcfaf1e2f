"""A training run built from an experiment config: the stage, its phases and compiled steps, the sharded state
(fresh, from ``init_from``, or resumed from ``run_dir``), the data and the checkpoint manager.

    run = build(config)        # checked, locked and placed; ``loop.fit(run)`` trains it

A run directory with a checkpoint always resumes, before ``init_from`` (a llama_jax run or step directory, a Hugging
Face or a Meta directory) is looked at. What resuming restores and how failures are handled: docs/recovery.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from llama_jax import checkpoint, cli, experiment, model, optim, sharding
from llama_jax.checkpoint import CheckpointManager, checksums
from llama_jax.config import ModelConfig
from llama_jax.errors import CheckpointError, ConfigError, DataError
from llama_jax.experiment import Experiment
from llama_jax.parallel import pipeline
from llama_jax.tokenizer import Tokenizer, get_tokenizer
from llama_jax.train import dpo, long_context, phases, pretrain, reward, sft
from llama_jax.train.adapters import with_adapters
from llama_jax.train.lock import RunLock
from llama_jax.train.step import Stage, TrainState, abstract_state, create_state, make_eval_step, make_train_step

STAGES: dict[str, Stage] = {stage.name: stage for stage in (pretrain.STAGE, sft.STAGE, reward.STAGE, dpo.STAGE)}


def model_config(section: Mapping) -> ModelConfig:
    """``config.model`` of a ConfigDict or dict: every ModelConfig field (configs fill them from a preset)."""
    if isinstance(section, ModelConfig):
        return section
    return ModelConfig.from_dict(section.to_dict() if hasattr(section, "to_dict") else dict(section))


@dataclasses.dataclass(frozen=True)
class Compiled:
    """The steps of one (mesh, microbatch tokens) layout, and the state's shardings on that mesh."""

    mesh: jax.sharding.Mesh
    shardings: TrainState
    train_step: Any
    eval_step: Any


def _key(phase: phases.Phase) -> tuple:
    return tuple(sorted(phase.mesh.items())), phase.microbatch_tokens


def compiler(config: Experiment, stage: Stage, cfg: ModelConfig, tx, schedule) -> Callable[[phases.Phase], Compiled]:
    """``compile(phase)``: its mesh and steps, built once per layout (a pipeline schedule is built for its mesh,
    so the loss is built per mesh too)."""
    meshes: dict[tuple, tuple] = {}
    steps: dict[tuple, Compiled] = {}

    def compile_phase(phase: phases.Phase) -> Compiled:
        mesh_key, microbatch_tokens = _key(phase)
        if mesh_key not in meshes:
            mesh = sharding.make_mesh(dict(phase.mesh))
            loss_fn = stage.make_loss_fn(cfg, config, pipeline.make_run_layers(cfg, mesh, **dict(config.pipeline)))
            shardings = jax.tree.map(lambda a: a.sharding, abstract_state(cfg, tx, mesh, stage))
            meshes[mesh_key] = mesh, loss_fn, shardings, make_eval_step(loss_fn, mesh, shardings)
        if (mesh_key, microbatch_tokens) not in steps:
            mesh, loss_fn, shardings, eval_step = meshes[mesh_key]
            train_step = make_train_step(loss_fn, tx, mesh, shardings, schedule=schedule,
                                         microbatch_tokens=microbatch_tokens)
            steps[mesh_key, microbatch_tokens] = Compiled(mesh, shardings, train_step, eval_step)
        return steps[mesh_key, microbatch_tokens]

    return compile_phase


def plan_phases(config: Experiment, cfg: ModelConfig, base_mesh: Mapping[str, int] | None = None
                ) -> tuple[phases.Plan, long_context.Extension | None]:
    """The run's phases: the batch ramp until the long-context extension starts, then the extension's phases;
    on ``base_mesh`` (default: config.mesh on this host's devices)."""
    extended = bool(list(config.long_context.phases))
    base_mesh = dict(base_mesh or sharding.parse_mesh(config.mesh or None))
    base = phases.ramp_phases(phases.parse_ramp(list(config.schedule.ramp), int(config.data.seq_len)),
                              data_rows=int(config.data.batch_size), data_seq_len=int(config.data.seq_len),
                              grad_accum=int(config.optimizer.grad_accum), mesh=base_mesh,
                              until=int(config.long_context.start_step) if extended else None)
    extension = long_context.parse(config, cfg, first_index=len(base), base_mesh=base_mesh)
    return phases.Plan(tuple(base) + (extension.phases if extension else ())), extension


@dataclasses.dataclass
class Run:
    """Everything ``loop.fit`` needs, made by ``build``. ``mesh``, ``train_step`` and ``eval_step`` are those of the
    layout compiled last (``compiled``): the loop changes them when it enters a phase of another layout."""

    config: Experiment  # the typed experiment config the run was built from
    stage: Stage
    cfg: ModelConfig
    tokenizer: Tokenizer
    plan: phases.Plan
    hooks: phases.Hooks  # what features do at phase boundaries (the long-context gates)
    compile: Callable[[phases.Phase], Compiled]
    compiled: tuple  # the layout (mesh, microbatch tokens) of mesh, train_step and eval_step
    mesh: jax.sharding.Mesh
    train_step: Any
    eval_step: Any
    state: TrainState
    data: phases.PhasedBatches
    eval_batches: list[dict]  # the held-out batches every evaluation uses (read by build; [] without eval)
    checkpoints: CheckpointManager
    lock: RunLock  # this run's hold on run_dir; ``close`` releases it
    resumed_from: int | None
    init_from: dict | None  # where a fresh run took its parameters: {"path", "format", "step"}
    changed: list[str]  # on resume: config keys whose value differs from the checkpoint's (``key: old -> new``)

    def enter(self, phase: phases.Phase, state: TrainState) -> TrainState:
        """Uses ``phase``'s layout from now on (compiled once; the state re-sharded, exactly, when the mesh
        changes) and shapes the data as it says. Returns the state on its mesh."""
        if _key(phase) != self.compiled:
            compiled = self.compile(phase)
            if compiled.mesh != self.mesh:
                state = jax.device_put(state, compiled.shardings)
            self.mesh, self.train_step, self.eval_step = compiled.mesh, compiled.train_step, compiled.eval_step
            self.compiled = _key(phase)
        self.data.enter(phase)
        return state

    def close(self) -> None:
        """Waits for the last checkpoint to be durable and releases run_dir (``fit`` does it)."""
        try:
            self.checkpoints.close()
        finally:
            self.lock.release()


def start_from(path: str, cfg: ModelConfig, mesh) -> tuple[dict, ModelConfig, dict]:
    """A Llama tree to start a stage from (any format), checked against the architecture the config names, and
    where it came from, pinned: {"path" (as given), "format", "step", "stage", "source_dir" (the step directory a
    run directory resolved to, or the HF / Meta directory), "checksum" (``checksums.tree_digest`` of the tree)}."""
    params, source_cfg, metadata = checkpoint.load(path, shardings=mesh if _is_stacked(path) else None)
    if not source_cfg.scan_layers:
        params = model.stack_layers(params, source_cfg.num_layers)
    differences = source_cfg.architecture_differences(cfg)
    if differences:
        raise ConfigError(f"init_from {path} is not the model config.model describes (checkpoint vs config):\n  "
                          + "\n  ".join(differences))
    llama = {k: params[k] for k in model.param_shapes(cfg)}  # a stage's extra leaves (a reward head) stay behind
    fmt, step = metadata.get("format", "llama_jax"), metadata.get("step")
    source_dir = os.path.abspath(path)
    if fmt == "llama_jax" and not checkpoint.is_checkpoint_dir(path):  # a run directory: the step load() took
        source_dir = os.path.join(source_dir, checkpoint.CHECKPOINTS_DIR, str(step))
    source = {"path": os.path.abspath(path), "format": fmt, "step": step, "stage": metadata.get("stage"),
              "source_dir": source_dir, "checksum": checksums.tree_digest(llama)}
    return llama, source_cfg, source


def pinned_start(init_from: Mapping, cfg: ModelConfig, mesh) -> tuple[dict, dict]:
    """The parameters a run started from, read again from where its checkpoint's ``init_from`` pins them (a resumed
    DPO rebuilds its reference from them), and their ``start_from`` record. CheckpointError naming the step and the
    directory when they are gone or no longer hold what the run started from."""
    what = f"init_from step {init_from.get('step')}" if init_from.get("step") is not None else "init_from"
    source_dir = _pinned_dir(init_from, what)
    try:
        start, _, source = start_from(source_dir, cfg, mesh)
    except CheckpointError as e:
        raise CheckpointError(f"{what} ({source_dir}), the parameters this run started from, cannot be read: "
                              f"{e}") from None
    if "checksum" in init_from and source["checksum"] != init_from["checksum"]:
        raise CheckpointError(f"{what} ({source_dir}) no longer holds the parameters this run started from (checksum "
                              f"{init_from['checksum'][:16]}... recorded, {source['checksum'][:16]}... now): it was "
                              "overwritten; restore it or start a new run")
    return start, {**source, "path": init_from["path"]}


def _pinned_dir(init_from: Mapping, what: str) -> str:
    """The directory ``init_from`` pins; a record of an older llama_jax (a run directory and its step, no
    source_dir) resolves to that step's directory inside the run, never to the run's newest step."""
    if "source_dir" in init_from:
        source_dir = init_from["source_dir"]
    elif init_from.get("format") == "llama_jax" and not checkpoint.is_checkpoint_dir(init_from["path"]):
        source_dir = os.path.join(init_from["path"], checkpoint.CHECKPOINTS_DIR, str(init_from.get("step")))
    else:
        source_dir = init_from["path"]
    if not os.path.isdir(source_dir) or (init_from.get("format") == "llama_jax"
                                         and not checkpoint.is_checkpoint_dir(source_dir)):
        raise CheckpointError(f"{what} ({source_dir}), the parameters this run started from, is gone (deleted, or "
                              "rotated away by that run's checkpoint.keep_last): the run cannot resume with the "
                              "same starting point; restore that directory or start a new run")
    return source_dir


def _is_stacked(path: str) -> bool:
    """Whether ``checkpoint.load`` can place this source straight onto the mesh's shardings (stacked, unquantized
    llama_jax trees, HF and Meta directories); per-layer trees are stacked on the host first."""
    if checkpoint.detect_format(path) != "llama_jax":
        return True
    metadata = checkpoint.read_metadata(checkpoint.resolve_step_dir(path))
    return metadata.get("param_layout") == "stacked" and not metadata.get("quantization")


def build(config) -> Run:
    """A run from an experiment config (a ConfigDict from configs/<stage>/*.py, or an ``Experiment``): resumed from
    ``run_dir`` when it holds a checkpoint, else started from ``init_from`` or from fresh parameters. Every key, every
    phase's layout and the data (eval split included) are checked first; then run_dir's lock is taken, held until
    ``fit`` ends."""
    config = experiment.from_config(config)
    if not config.run_dir:
        raise ConfigError("config.run_dir is empty: pass --config.run_dir=/path/to/run")
    if config.stage not in STAGES:
        raise ConfigError(f"config.stage {config.stage!r} is not one of {sorted(STAGES)}")
    if config.stage in experiment.STAGE_SECTIONS and config[config.stage] is None:
        raise ConfigError(f"the {config.stage} stage needs its section config.{config.stage} (start from "
                          f"llama_jax.train.defaults.{config.stage}_config)")
    stage = STAGES[config.stage]
    if stage.configure is not None:
        stage = stage.configure(config)
    cfg = config.model.replace(lora=config.lora.spec())
    if cfg.lora is not None:
        stage = with_adapters(stage, cfg, config)
    plan, extension = plan_phases(config, cfg)
    tokenizer = get_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids; the model's vocabulary "
                          f"is only {cfg.vocab_size}")
    s, opt = config.schedule, config.optimizer
    schedule = plan.schedule(optim.lr_schedule(s.peak_lr, s.warmup_steps, s.decay_steps, s.min_lr_ratio,
                                               s.anneal_steps, s.total_steps))
    tx = optim.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                     clip_norm=opt.clip_norm or None, decay_embeddings=opt.decay_embeddings)
    compile_phase = compiler(config, stage, cfg, tx, schedule)
    first = compile_phase(plan.phases[0])
    base = stage.make_batches(config, tokenizer, "train")
    data = phases.PhasedBatches(base, lambda k: stage.make_batches(long_context.stream_config(config, extension, k),
                                                                   tokenizer, "train"), config.data.seq_len)
    hooks = phases.NoHooks() if extension is None else long_context.Gates(extension, tokenizer, cfg,
                                                                          bool(config.data.add_bos))
    eval_batches = []
    if config.logging.eval_every or any(p.gated for p in plan.phases):  # read now: too small a split fails here
        stream = stage.make_batches(config, tokenizer, "eval")
        eval_batches = [b for _, b in zip(range(config.logging.eval_batches), stream)]
        if not eval_batches:
            raise DataError(f"the eval split (every data.holdout_every={config.data.holdout_every}-th record) holds "
                            f"too few records for one batch of data.batch_size={config.data.batch_size} rows; lower "
                            "data.holdout_every, or set logging.eval_every=0")
    if len(plan.phases) > 1:
        phases.check_layouts(plan, lambda sizes: abstract_state(cfg, tx, sharding.make_mesh(dict(sizes)), stage),
                             int(config.data.batch_size), jax.process_count())
    if extension is not None:
        long_context.check_gates(extension, tokenizer, hooks.task)

    lock = RunLock.acquire(config.run_dir)  # before the first write
    try:
        checkpoints = CheckpointManager(config.run_dir, keep_last=config.checkpoint.keep_last,
                                        keep_every=config.checkpoint.keep_every or None,
                                        async_save=config.checkpoint.async_save)
        abstract = abstract_state(cfg, tx, first.mesh, stage)
        state, latest, init_from, changed = _start(config, stage, cfg, tx, first.mesh, abstract, checkpoints, data)
    except BaseException:
        lock.release()
        raise
    return Run(config=config, stage=stage, cfg=cfg, tokenizer=tokenizer, plan=plan, hooks=hooks,
               compile=compile_phase, compiled=_key(plan.phases[0]), mesh=first.mesh, train_step=first.train_step,
               eval_step=first.eval_step, state=state, data=data, eval_batches=eval_batches, checkpoints=checkpoints,
               lock=lock, resumed_from=latest, init_from=init_from, changed=changed)


def _start(config: Experiment, stage: Stage, cfg: ModelConfig, tx, mesh, abstract: TrainState,
           checkpoints: CheckpointManager, data) -> tuple[TrainState, int | None, dict | None, list[str]]:
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
        start, init_from = pinned_start(init_from, cfg, mesh)
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


