"""Long-context extension (Llama 3 paper, section 3.4.2): one pretraining run whose sequence length grows in stages.

    config.long_context.start_step = 100_000    # before it: data.seq_len, the ramp and the base schedule
    config.long_context.stages = [dict(seq_len=16384, tokens=50e9, context_parallel=2), ...]
    plan = long_context.parse(config, cfg)      # None without stages; every key checked before anything is built
    plan.stage_at(step)                         # the stage a step belongs to (-1: before start_step)
    schedule = plan.schedule(base_schedule)     # the learning rate of every step (jitted inside the optimizer)
    sizes = plan.mesh_sizes(k)                  # stage k's mesh: ``sequence`` = its context-parallel degree
    data = StagedBatches(base, lambda k: make_batches(plan.data_config(config.data, k), tok))

A stage (one dict of ``long_context.stages``):
    seq_len             tokens per row
    steps | tokens      how long it lasts (tokens: rounded up to whole steps)
    batch_tokens | batch_size   tokens or rows per step (neither: the previous stage's tokens per step, kept constant;
                                the first stage's previous is data.batch_size x data.seq_len)
    lr, end_lr, warmup_steps    linear warmup from 0 to lr, then linear to end_lr (default lr) at the stage's end;
                                without lr the base schedule goes on through the stage
    context_parallel    the mesh's ``sequence`` axis (default 1); it takes its devices from fsdp, then data
    grad_accum          microbatches per step (default optimizer.grad_accum)
    weights             one per data source (default data.sources' weights); 0 leaves a source out of the stage,
                        e.g. a long-document source weighted up for the long stages only
    whole_documents     the stage's ``data.whole_documents`` (default: data's): True, a document that fits in a row
                        is never cut, so a long document's beginning and end (a needle and its question) share a row

Data. Each stage reads a fresh stream at its own length and row count, seeded by (data.seed, stage): documents
longer than a row are split across the row's next batches, shorter ones packed, as in any pretraining batch (with
``whole_documents``, one that fits in a row opens the next one instead of being cut). Why
not carry each row's position over from the stage before: with the tokens per step constant, the row count changes
with the length, and a position belongs to its row; fresh streams follow one rule for every stage. The cost is
that a stage may meet documents an earlier stage read, as a new epoch would. The held-out split is the same in every
stage. The checkpoint's data state names the stage its rows belong to, with the short-context loss measured before
the first longer stage, so a resume inside a stage or at its end continues exactly.

Mesh. A stage's context-parallel degree is its mesh's ``sequence`` axis: where it changes, the train state is
re-sharded onto the new mesh (exact: ``jax.device_put``) and the step recompiled. Attention then runs as a ring
(``ops.context_parallel``), and each row is stored in the zig-zag order that gives every device the same work (the
loss is a sum over positions and the mask is built from positions, so the order changes nothing else).

Gates (``long_context.gate``), at the end of each stage longer than data.seq_len, as the paper describes them: the
held-out loss at data.seq_len (the run's eval batches) may exceed its value before the first longer stage by at
most ``max_loss_increase`` (relative), and greedy exact-match retrieval (``eval.retrieval``'s passkey or needle
prompts, as long as the stage's rows allow) must reach ``min_retrieval``. ``action``: "off", "warn" (log and go
on) or "stop" (checkpoint, then an error naming what failed). Replies are decoded by full forward passes of the
training model on the stage's mesh (``greedy_generate_fn``), so a gate fits wherever the training step does; the
KV-cache decoder's prefill of a 128K prompt would not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import cli, model, pipeline, sharding
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError, DataError, LlamaJaxError
from llama_jax.eval import retrieval
from llama_jax.ops.context_parallel import zigzag_order
from llama_jax.tokenizer import Tokenizer
from llama_jax.train.step import Stage as TrainingStage
from llama_jax.train.step import abstract_state, make_eval_step, make_train_step

STAGE_KEYS = ("seq_len", "steps", "tokens", "batch_tokens", "batch_size", "lr", "end_lr", "warmup_steps",
              "context_parallel", "grad_accum", "weights", "whole_documents")
GATE_ACTIONS = ("off", "warn", "stop")
_SEED_STRIDE = 1_000_003  # stage k reads with data seed + (k + 1) * this: apart from the per-source offsets (+ i)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the extension, with its place in the run resolved."""

    index: int
    seq_len: int
    start_step: int
    steps: int
    rows: int  # rows per step, all processes together
    grad_accum: int
    context_parallel: int
    lr: float | None  # None: the base schedule goes on
    end_lr: float | None
    warmup_steps: int
    weights: tuple[float, ...]  # per data source; 0: left out
    whole_documents: bool  # documents that fit in a row are never cut (data.whole_documents)

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps

    @property
    def batch_tokens(self) -> int:
        return self.rows * self.seq_len


@dataclasses.dataclass(frozen=True)
class Gate:
    action: str  # off | warn | stop
    max_loss_increase: float  # relative rise of the short-context held-out loss allowed
    task: str  # eval.retrieval task kind: passkey | needle
    min_retrieval: float  # exact-match accuracy at the stage's length
    depths: tuple[float, ...]
    samples: int  # prompts per depth


@dataclasses.dataclass(frozen=True)
class Plan:
    """The stages of a long-context run (``parse``)."""

    start_step: int
    stages: tuple[Stage, ...]
    short_seq_len: int  # data.seq_len: the eval batches' length, what "short context" means in the gates
    base_mesh: str
    gate: Gate

    @property
    def end_step(self) -> int:
        return self.stages[-1].end_step

    def stage_at(self, step: int) -> int:
        """Index of the stage ``step`` belongs to; -1 before start_step (steps past the end: the last stage)."""
        if step < self.start_step:
            return -1
        return next((s.index for s in self.stages if step < s.end_step), len(self.stages) - 1)

    def gated(self, index: int) -> bool:
        """Whether a gate runs at the end of stage ``index``: stages longer than data.seq_len, when gates are on."""
        return self.gate.action != "off" and index >= 0 and self.stages[index].seq_len > self.short_seq_len

    def needs_reference(self, index: int) -> bool:
        """Whether entering stage ``index`` first goes beyond data.seq_len (the short-context loss is measured then)."""
        return index >= 0 and self.stages[index].seq_len > self.short_seq_len and not any(
            s.seq_len > self.short_seq_len for s in self.stages[:index])

    def schedule(self, base: optax.Schedule) -> optax.Schedule:
        """``base`` before start_step and through stages without ``lr``; each other stage's own warmup and line."""

        def lr(step):
            step = jnp.asarray(step, jnp.float32)
            value = base(step)
            for s in self.stages:
                if s.lr is None:
                    continue
                local = step - s.start_step
                warmup = s.lr * local / max(s.warmup_steps, 1)
                fraction = jnp.clip((local - s.warmup_steps) / max(s.steps - s.warmup_steps, 1), 0.0, 1.0)
                line = s.lr + (s.end_lr - s.lr) * fraction
                inside = (local >= 0) & ((local < s.steps) | (s.index == len(self.stages) - 1))  # the last goes on
                value = jnp.where(inside, jnp.where(local < s.warmup_steps, warmup, line), value)
            return value

        return lr

    def mesh_sizes(self, index: int, num_devices: int | None = None) -> dict[str, int]:
        """The mesh of stage ``index`` (-1: the base mesh): the base mesh with ``sequence`` set to the stage's
        context-parallel degree, the devices for it taken from fsdp, then data; tensor unchanged."""
        sizes = sharding.parse_mesh(self.base_mesh or None, num_devices)
        if index < 0:
            return sizes
        cp = self.stages[index].context_parallel
        parallel = sizes["data"] * sizes["fsdp"] * sizes["sequence"]  # the devices data and sequence share
        if parallel % cp:
            raise ConfigError(f"long_context.stages[{index}].context_parallel={cp} does not divide the "
                              f"{parallel} devices of the mesh's data, fsdp and sequence axes ({sizes})")
        rows = parallel // cp
        data = math.gcd(sizes["data"], rows)
        return {**sizes, "data": data, "fsdp": rows // data, "sequence": cp}

    def data_config(self, data_cfg: Mapping, index: int) -> dict:
        """``config.data`` for stage ``index``'s training stream: its length, rows, seed and sources."""
        s = self.stages[index]
        sources = [dict(spec, weight=w) for spec, w in zip(data_cfg["sources"], s.weights)]
        return {**dict(data_cfg), "seq_len": s.seq_len, "batch_size": s.rows, "sources": sources,
                "whole_documents": s.whole_documents, "seed": int(data_cfg["seed"]) + (index + 1) * _SEED_STRIDE}


def parse(config, cfg: ModelConfig) -> Plan | None:
    """The plan of ``config.long_context`` (None when it has no stages); ConfigError naming the key at fault."""
    section = config.long_context
    entries = list(section.stages)
    if not entries:
        return None
    data = config.data
    sources = list(data.sources)
    previous_tokens = int(data.batch_size) * int(data.seq_len)
    step = int(section.start_step)
    stages = []
    for i, entry in enumerate(entries):
        key = f"long_context.stages[{i}]"
        entry = dict(entry)
        unknown = sorted(set(entry) - set(STAGE_KEYS))
        if unknown:
            raise ConfigError(f"{key} has unknown key(s) {unknown}; known: {list(STAGE_KEYS)}")
        seq_len = _int(entry, "seq_len", key, low=1, required=True)
        if seq_len > cfg.max_seq_len:
            raise ConfigError(f"{key}.seq_len={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}, the longest "
                              "sequence the model is meant for: raise model.max_seq_len")
        rows = _rows(entry, key, seq_len, previous_tokens)
        previous_tokens = rows * seq_len
        if ("steps" in entry) == ("tokens" in entry):
            raise ConfigError(f"{key} needs exactly one of steps and tokens (how long the stage lasts)")
        if "steps" in entry:
            steps = _int(entry, "steps", key, low=1)
        else:
            tokens = _number(entry, "tokens", key, low=1)
            steps = math.ceil(tokens / (rows * seq_len))
        grad_accum = _int(entry, "grad_accum", key, low=1, default=int(config.optimizer.grad_accum))
        if rows % grad_accum:
            raise ConfigError(f"{key}: {rows} rows per step do not split into grad_accum={grad_accum} microbatches")
        cp = _int(entry, "context_parallel", key, low=1, default=1)
        if cp > 1 and seq_len % (2 * cp):
            raise ConfigError(f"{key}: context_parallel={cp} needs seq_len ({seq_len}) divisible by 2 x {cp} "
                              "(the zig-zag layout's chunks)")
        lr = None if entry.get("lr") is None else _number(entry, "lr", key, low=0)
        end_lr = lr if entry.get("end_lr") is None else _number(entry, "end_lr", key, low=0)
        if lr is None and end_lr is not None:
            raise ConfigError(f"{key} gives end_lr without lr")
        warmup = _int(entry, "warmup_steps", key, low=0, default=0)
        if warmup and (lr is None or warmup >= steps):
            raise ConfigError(f"{key}: warmup_steps={warmup} needs an lr and fewer than the stage's {steps} steps")
        weights = tuple(float(s.get("weight", 1.0)) for s in sources)
        if entry.get("weights") is not None:
            weights = tuple(float(w) for w in entry["weights"])
            if len(weights) != len(sources) or any(not w >= 0 for w in weights) or not any(weights):
                raise ConfigError(f"{key}.weights={list(entry['weights'])}: expected one weight >= 0 per data source "
                                  f"({len(sources)}), not all 0")
        whole = entry.get("whole_documents", data.get("whole_documents", False))
        if not isinstance(whole, bool):
            raise ConfigError(f"{key}.whole_documents must be true or false, got {whole!r}")
        stages.append(Stage(index=i, seq_len=seq_len, start_step=step, steps=steps, rows=rows, grad_accum=grad_accum,
                            context_parallel=cp, lr=lr, end_lr=end_lr, warmup_steps=warmup, weights=weights,
                            whole_documents=whole))
        step += steps
    g = section.gate
    if g.action not in GATE_ACTIONS:
        raise ConfigError(f"long_context.gate.action must be one of {GATE_ACTIONS}, got {g.action!r}")
    if g.task not in ("passkey", "needle"):
        raise ConfigError(f"long_context.gate.task must be 'passkey' or 'needle', got {g.task!r}")
    gate = Gate(action=g.action, max_loss_increase=float(g.max_loss_increase), task=g.task,
                min_retrieval=float(g.min_retrieval), depths=tuple(float(d) for d in g.depths),
                samples=int(g.samples))
    if not gate.depths or not all(0 <= d <= 1 for d in gate.depths) or gate.samples < 1:
        raise ConfigError(f"long_context.gate: depths {list(gate.depths)} must be fractions in [0, 1] and samples "
                          f"({gate.samples}) >= 1")
    return Plan(start_step=int(section.start_step), stages=tuple(stages), short_seq_len=int(data.seq_len),
                base_mesh=config.mesh, gate=gate)


def _rows(entry: dict, key: str, seq_len: int, previous_tokens: int) -> int:
    if "batch_tokens" in entry and "batch_size" in entry:
        raise ConfigError(f"{key} gives both batch_tokens and batch_size; give one (or neither: keep the tokens)")
    if "batch_size" in entry:
        return _int(entry, "batch_size", key, low=1)
    tokens = _int(entry, "batch_tokens", key, low=1) if "batch_tokens" in entry else previous_tokens
    if tokens % seq_len:
        raise ConfigError(f"{key}: {tokens} tokens per step are not a whole number of rows of seq_len={seq_len}; "
                          "give batch_tokens or batch_size")
    return tokens // seq_len


def _int(entry: dict, name: str, key: str, *, low: int, default: int | None = None, required: bool = False) -> int:
    if name not in entry:
        if required:
            raise ConfigError(f"{key} needs {name}")
        return default
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}.{name} = {value!r}: expected an integer >= {low}")
    return value


def _number(entry: dict, name: str, key: str, *, low: float) -> float:
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:
        raise ConfigError(f"{key}.{name} = {value!r}: expected a number >= {low}")
    return float(value)


def stage_config(config, plan: Plan, index: int):
    """The experiment config with ``data`` as stage ``index`` reads it (its training stream)."""
    staged = config.copy_and_resolve_references()
    staged.data.update(plan.data_config(config.data.to_dict(), index))
    return staged


def check_layouts(plan: Plan, cfg: ModelConfig, tx: optax.GradientTransformation, stage: TrainingStage,
                  eval_rows: int) -> None:
    """ConfigError before step 1 for a stage whose mesh cannot hold the train state or split its batches (its rows,
    and the eval batches' ``eval_rows``, evaluated on its mesh)."""
    for s in plan.stages:
        sizes = plan.mesh_sizes(s.index)
        abstract_state(cfg, tx, sharding.make_mesh(sizes), stage)  # the state's dimensions divide on this mesh
        data_parallel = sizes["data"] * sizes["fsdp"]
        for what, rows in (("rows per step", s.rows), ("eval rows (data.batch_size)", eval_rows)):
            if rows % data_parallel or rows % jax.process_count():
                raise ConfigError(f"long_context.stages[{s.index}]: {what} {rows} do not divide over its mesh's data x "
                                  f"fsdp = {data_parallel} ({sizes}) and {jax.process_count()} process(es)")


def zigzag(batch: dict[str, np.ndarray], context_parallel: int) -> dict[str, np.ndarray]:
    """Each row in the zig-zag order of ``context_parallel`` shards (unchanged for 1): equal ring work per device."""
    if context_parallel == 1:
        return batch
    order = zigzag_order(batch["tokens"].shape[1], context_parallel)
    return {k: v[:, order] for k, v in batch.items()}


class StagedBatches:
    """The training batches of a long-context run: the base stream before start_step, then one fresh stream per
    stage (``enter``). Its state is the current stream's, plus ``long_context``: the stage it belongs to and the
    short-context loss measured before the first longer stage (``reference_loss``)."""

    def __init__(self, base, make_stage: Callable[[int], Any]):
        self._base, self._make_stage = base, make_stage
        self._current = base
        self.stage = -1
        self.reference_loss: float | None = None

    def enter(self, index: int) -> None:
        """Reads stage ``index``'s stream from its start (-1: the base stream, as built)."""
        self._current = self._base if index < 0 else self._make_stage(index)
        self.stage = index

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._current)

    def get_state(self) -> dict:
        return {**self._current.get_state(),
                "long_context": {"stage": self.stage, "reference_loss": self.reference_loss}}

    def set_state(self, state: Mapping) -> None:
        """Resumes from ``get_state()``'s output, or from a run without stages (its base stream: stages added to
        the config of a run that has pretrained at data.seq_len continue it)."""
        saved = state.get("long_context", {"stage": -1, "reference_loss": None})
        self.enter(int(saved["stage"]))
        self._current.set_state(state)
        self.reference_loss = saved["reference_loss"]

    @property
    def skipped(self) -> list[str]:
        return sorted(set(self._base.skipped) | set(self._current.skipped))


# --- Gates -------------------------------------------------------------------------------------------------


def greedy_generate_fn(params, cfg: ModelConfig, tok: Tokenizer, mesh, param_shardings, *, length: int,
                       rows: int, max_new_tokens: int) -> retrieval.GenerateFn:
    """A ``retrieval.GenerateFn`` decoding greedily with full forward passes of rows of ``length`` tokens on
    ``mesh`` (prompts ``rows`` at a time, the rows' zig-zag order under context parallelism): no KV cache, so it
    needs no more memory than a forward pass of the training step."""
    network = model.Llama(cfg)
    cp = mesh.shape["sequence"]
    order = zigzag_order(length, cp) if cp > 1 else np.arange(length)
    slot_of = np.argsort(order)  # where each position is stored
    llama = {k: params[k] for k in model.param_shapes(cfg)}
    llama_shardings = {k: param_shardings[k] for k in llama}

    def next_tokens(params, tokens, positions, segment_ids, last):
        hidden = network.apply({"params": params}, tokens, positions, segment_ids, output="hidden")  # [R, T, D]
        final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [R, D]
        logits = jnp.einsum("RD,DV->RV", final, model.lm_head_kernel(params, cfg).astype(final.dtype),
                            preferred_element_type=jnp.float32, precision=cfg.resolved_matmul_precision)
        known = jnp.arange(logits.shape[-1]) < tok.vocab_size  # ids the tokenizer can decode
        return jnp.argmax(jnp.where(known, logits, -jnp.inf), axis=-1).astype(jnp.int32)

    batch_sharding = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(next_tokens, in_shardings=(llama_shardings, batch_sharding, batch_sharding, batch_sharding,
                                                replicated), out_shardings=replicated)
    multiple = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = -(-rows // multiple) * multiple

    def global_array(x: np.ndarray, sharding_):
        return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])

    def decode(prompts: list[list[int]]) -> list[str]:
        tokens = np.zeros((rows, length), np.int32)
        segments = np.zeros((rows, length), np.int32)
        lengths = np.ones(rows, np.int64)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)], segments[i, : len(prompt)], lengths[i] = prompt, 1, len(prompt)
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))
        replies = [[] for _ in prompts]
        active = np.array([True] * len(prompts) + [False] * (rows - len(prompts)))
        for _ in range(max_new_tokens):
            arrays = [global_array(x[:, order], batch_sharding) for x in (tokens, positions, segments)]
            with sharding.activate(mesh):
                new = np.asarray(jitted(llama, *arrays, global_array(slot_of[lengths - 1].astype(np.int32),
                                                                     replicated)))
            for i in np.flatnonzero(active):
                if new[i] in tok.stop_ids:
                    active[i] = False
                    continue
                replies[i].append(int(new[i]))
                tokens[i, lengths[i]], segments[i, lengths[i]] = new[i], 1
                lengths[i] += 1
            if not active.any():
                break
        return [tok.decode(r) for r in replies]

    def generate_fn(prompts: list[list[int]]) -> list[str]:
        too_long = [len(p) for p in prompts if len(p) + max_new_tokens > length]
        if too_long:
            raise DataError(f"prompts of {too_long[0]} tokens + {max_new_tokens} new do not fit rows of {length}")
        return [reply for start in range(0, len(prompts), rows) for reply in decode(prompts[start:start + rows])]

    return generate_fn


@dataclasses.dataclass(frozen=True)
class GateResult:
    stage: int
    seq_len: int
    eval_loss: float | None  # held-out loss at data.seq_len
    reference_loss: float | None  # ... before the first longer stage
    retrieval_length: int
    retrieval_accuracy: float
    failures: tuple[str, ...]  # what did not pass, in words

    def metrics(self) -> dict[str, float]:
        out = {"gate_stage": float(self.stage), "gate_retrieval_accuracy": self.retrieval_accuracy,
               "gate_passed": float(not self.failures)}
        if self.eval_loss is not None:
            out["gate_eval_loss"] = self.eval_loss
        return out


def retrieval_task(gate: Gate, add_bos: bool) -> retrieval.Task:
    """The gate's retrieval task: base-format prompts, with <|begin_of_text|> when the training data has it."""
    return retrieval.Task(gate.task, bos=add_bos)


def check_gates(plan: Plan, tok: Tokenizer, task: retrieval.Task) -> None:
    """ConfigError before step 1 for a gated stage too short to hold the gate's retrieval prompt."""
    for s in plan.stages:
        if plan.gated(s.index):
            length = s.seq_len - answer_room(tok, task)
            try:
                retrieval.make_sample(tok, task, max(length, 1), 0.5, 0)
            except ConfigError as e:
                raise ConfigError(f"long_context.stages[{s.index}] (seq_len {s.seq_len}) is gated, but its rows cannot "
                                  f"hold a retrieval prompt: {e}") from None


def answer_room(tok: Tokenizer, task: retrieval.Task) -> int:
    """Tokens a reply may take: the longest answer, its full stop and the end-of-text token after it."""
    return retrieval.default_max_new_tokens(tok, task) - 8 + 2


def run_gate(plan: Plan, index: int, *, eval_loss: float | None, reference_loss: float | None,
             generate_fn: retrieval.GenerateFn, tok: Tokenizer, task: retrieval.Task) -> GateResult:
    """Stage ``index``'s gate: retrieval at its length (prompts that leave room for the answer), and the short-context
    held-out loss against the reference (skipped when either is unknown: no eval batches)."""
    stage, gate = plan.stages[index], plan.gate
    length = stage.seq_len - answer_room(tok, task)
    result = retrieval.evaluate(generate_fn, tok, task, [length], list(gate.depths), gate.samples)
    failures = []
    if result.mean_accuracy < gate.min_retrieval:
        failures.append(f"{task.kind} retrieval at {length} tokens: {result.mean_accuracy:.2f} exact-match accuracy, "
                        f"below long_context.gate.min_retrieval={gate.min_retrieval}")
    if eval_loss is not None and reference_loss is not None:
        allowed = reference_loss * (1 + gate.max_loss_increase)
        if eval_loss > allowed:
            failures.append(f"held-out loss at {plan.short_seq_len} tokens: {eval_loss:.4f}, above {allowed:.4f} "
                            f"({reference_loss:.4f} before the extension + long_context.gate.max_loss_increase="
                            f"{gate.max_loss_increase:.0%})")
    return GateResult(stage=index, seq_len=stage.seq_len, eval_loss=eval_loss, reference_loss=reference_loss,
                      retrieval_length=length, retrieval_accuracy=result.mean_accuracy, failures=tuple(failures))


def describe(plan: Plan, sizes: Sequence[Mapping[str, int]]) -> str:
    """One line per stage: steps, length, rows, mesh, learning rate."""
    lines = []
    for s, mesh in zip(plan.stages, sizes):
        lr = "base schedule" if s.lr is None else f"lr {s.lr:g}" + (f" -> {s.end_lr:g}" if s.end_lr != s.lr else "")
        mesh_text = ",".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "1 device"
        lines.append(f"  stage {s.index}: steps {s.start_step} -> {s.end_step}, {s.rows} x {s.seq_len} tokens, "
                     f"grad_accum {s.grad_accum}, mesh {mesh_text}, {lr}")
    return "\n".join(lines)


# --- In the training loop ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Events:
    """What the loop lends the stage changes: its held-out evaluation and its metrics log (at the current step)."""

    evaluate: Callable[[], dict[str, float]]  # the eval batches' mean metrics for the loop's current state
    log: Callable[[dict[str, float]], None]


def enter_stage(run, state, index: int, step: int, events: Events):
    """Moves ``run`` (a ``train.loop.Run`` whose data is ``StagedBatches``) into stage ``index`` at ``step``: the gate
    of the stage its data was in, the short-context loss before the first longer stage, then the stage's mesh (the
    state re-sharded onto it: exact), its train step and its stream. Returns the state on the stage's mesh."""
    plan, data = run.long_context, run.data
    finished = data.stage
    if finished != index and plan.gated(finished):
        run_stage_gate(run, state, finished, step, events)
    if data.reference_loss is None and plan.needs_reference(index) and run.eval_batches:
        data.reference_loss = events.evaluate()["loss"]
        events.log({"eval_loss_before_extension": data.reference_loss})
        cli.log(f"step {step}: held-out loss at {plan.short_seq_len} tokens before the extension "
                f"{data.reference_loss:.4f}")
    s, sizes = plan.stages[index], plan.mesh_sizes(index)
    moved = sizes != dict(run.mesh.shape)
    if moved:  # a pipeline schedule is built for its mesh: the loss is rebuilt with it
        run.mesh = sharding.make_mesh(sizes)
        run_layers = pipeline.make_run_layers(run.cfg, run.mesh, **run.config.pipeline)
        run.loss_fn = run.stage.make_loss_fn(run.cfg, run.config, run_layers)
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state(run.cfg, run.tx, run.mesh, run.stage))
    run.train_step = make_train_step(run.loss_fn, run.tx, run.mesh, shardings, schedule=run.schedule,
                                     microbatch_tokens=s.batch_tokens // s.grad_accum)
    if moved:  # on an unchanged mesh the eval step (and its compiled program) stays
        run.eval_step = make_eval_step(run.loss_fn, run.mesh, shardings)
        state = jax.device_put(state, shardings)
    if finished != index:
        data.enter(index)
    cli.log(f"step {step}: long-context stage {index}: {s.rows} x {s.seq_len} tokens per step until step "
            f"{s.end_step}, mesh {dict(run.mesh.shape)}")
    return state


def run_stage_gate(run, state, index: int, step: int, events: Events) -> None:
    """Stage ``index``'s gate (``run_gate``) on ``state``, logged; a failure warns or, with action "stop", raises
    (the loop has checkpointed the step)."""
    plan, tok = run.long_context, run.tokenizer
    s = plan.stages[index]
    task = retrieval_task(plan.gate, bool(run.config.data.add_bos))
    generate_fn = greedy_generate_fn(state.params, run.cfg, tok, run.mesh,
                                     jax.tree.map(lambda a: a.sharding, state.params), length=s.seq_len,
                                     rows=s.rows // s.grad_accum, max_new_tokens=answer_room(tok, task))
    result = run_gate(plan, index, eval_loss=events.evaluate()["loss"] if run.eval_batches else None,
                      reference_loss=run.data.reference_loss, generate_fn=generate_fn, tok=tok, task=task)
    events.log(result.metrics())
    loss = "" if result.eval_loss is None else f", held-out loss {result.eval_loss:.4f} at {plan.short_seq_len}"
    cli.log(f"step {step}: gate of long-context stage {index}: {task.kind} retrieval "
            f"{result.retrieval_accuracy:.2f} at {result.retrieval_length} tokens{loss}")
    if result.failures:
        message = f"the gate of long-context stage {index} ({s.seq_len} tokens) failed:\n  " + "\n  ".join(
            result.failures)
        if plan.gate.action == "stop":
            raise LlamaJaxError(f"{message}\nTo go on training this stage, lengthen it (long_context.stages"
                                f"[{index}].steps or tokens) and rerun; or set long_context.gate.action='warn'")
        cli.log(f"warning: {message}")
