"""Phases: everything that changes the shape of training over time, as one list (docs/architecture.md).

    phases = ramp_phases(config, until=None)   # the batch ramp (``schedule.ramp``): larger batches, longer rows
    phases += long_context.phases(...)          # the long-context extension: longer rows, own meshes and data
    plan = Plan(phases)
    plan.at(step)                               # the phase a step belongs to
    schedule = plan.schedule(base)              # each phase's own learning-rate line where it has one
    data = PhasedBatches(base_stream, make_stream, data_seq_len)   # each step's batch as its phase shapes it

A phase fixes, for its steps, the rows and sequence length of a step, its microbatches, the mesh, and the data stream
it reads. The loop asks which phase a step is in and enters it (re-meshing and recompiling when these change); a
phase's hooks (a long-context gate) run when it is entered and when it ends. The loop knows no feature by name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np
import optax

from llama_jax.data import concat_batches, split_rows
from llama_jax.errors import ConfigError
from llama_jax.ops.context_parallel import zigzag_order

BASE_STREAM = -1  # the run's own data stream (config.data), as built or resumed


@dataclasses.dataclass(frozen=True)
class LrLine:
    """A phase's own learning rate: linear warmup from 0 to ``peak``, then linear to ``end`` at the phase's end."""

    peak: float
    end: float
    warmup_steps: int = 0


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps ``start_step`` .. ``end_step`` - 1 (``end_step`` None: until the run ends) and the shape of each."""

    index: int
    start_step: int
    end_step: int | None
    seq_len: int  # tokens per row of a step
    rows: int  # rows per step, all processes together
    grad_accum: int  # microbatches per step
    mesh: Mapping[str, int]  # mesh axis sizes (sharding.parse_mesh's form)
    stream: int = BASE_STREAM  # which data stream it reads: the base one, or extension phase k's own fresh stream
    batches: int = 1  # data batches of its stream concatenated into one step (then cut into rows of seq_len)
    lr: LrLine | None = None  # None: the base schedule goes on through the phase
    gated: bool = False  # whether a gate runs at its end (the hooks decide what a gate is)

    def contains(self, step: int) -> bool:
        return self.start_step <= step and (self.end_step is None or step < self.end_step)

    @property
    def context_parallel(self) -> int:
        return self.mesh["sequence"]

    @property
    def batch_tokens(self) -> int:
        return self.rows * self.seq_len

    @property
    def microbatch_tokens(self) -> int:
        return self.batch_tokens // self.grad_accum

    def describe(self) -> str:
        end = "the end" if self.end_step is None else f"step {self.end_step}"
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items() if v > 1) or "1 device"
        lr = "base schedule" if self.lr is None else f"lr {self.lr.peak:g}" + (
            f" -> {self.lr.end:g}" if self.lr.end != self.lr.peak else "")
        return (f"  phase {self.index}: steps {self.start_step} -> {end}, {self.rows} x {self.seq_len} tokens, "
                f"grad_accum {self.grad_accum}, mesh {mesh}, {lr}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The phases of a run, in order, each starting where the previous ends."""

    phases: tuple[Phase, ...]

    def __post_init__(self):
        for a, b in zip(self.phases, self.phases[1:]):
            assert a.end_step == b.start_step, (a, b)

    @property
    def end_step(self) -> int | None:
        return self.phases[-1].end_step

    def at(self, step: int) -> Phase:
        """The phase ``step`` belongs to (steps past a closed plan's end: its last phase)."""
        return next((p for p in self.phases if p.contains(step)), self.phases[-1])

    def owner(self, stream: int) -> Phase | None:
        """The phase a fresh stream belongs to (None for the base stream, which several phases share)."""
        return next((p for p in self.phases if p.stream == stream), None) if stream != BASE_STREAM else None

    def schedule(self, base: optax.Schedule) -> optax.Schedule:
        """``base``, except inside phases with their own line (the last phase's goes on past its end)."""
        lines = [p for p in self.phases if p.lr is not None]
        if not lines:
            return base
        last = self.phases[-1].index

        def lr(step):
            step = jnp.asarray(step, jnp.float32)
            value = base(step)
            for p in lines:
                local = step - p.start_step
                steps = p.end_step - p.start_step
                warmup = p.lr.peak * local / max(p.lr.warmup_steps, 1)
                fraction = jnp.clip((local - p.lr.warmup_steps) / max(steps - p.lr.warmup_steps, 1), 0.0, 1.0)
                line = p.lr.peak + (p.lr.end - p.lr.peak) * fraction
                inside = (local >= 0) & ((local < steps) | (p.index == last))
                value = jnp.where(inside, jnp.where(local < p.lr.warmup_steps, warmup, line), value)
            return value

        return lr

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.phases)


def check_layouts(plan: Plan, check_state: Callable[[Mapping[str, int]], Any], eval_rows: int,
                  process_count: int) -> None:
    """ConfigError before step 1 for a phase whose mesh cannot hold the train state (``check_state(mesh sizes)``
    raises) or split its rows, or the eval batches' ``eval_rows``, over its data-parallel devices and processes."""
    checked = []
    for p in plan.phases:
        if p.mesh not in checked:
            check_state(p.mesh)
            checked.append(p.mesh)
        data_parallel = p.mesh["data"] * p.mesh["fsdp"]
        for what, rows in (("rows per step", p.rows), ("eval rows (data.batch_size)", eval_rows)):
            if rows % data_parallel or rows % process_count:
                raise ConfigError(f"phase {p.index} (steps from {p.start_step}): {what} {rows} do not divide over "
                                  f"its mesh's data x fsdp = {data_parallel} ({dict(p.mesh)}) and {process_count} "
                                  "process(es)")


# --- The batch ramp (Llama 3, section 3.4.1) ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RampPoint:
    """From ``start_tokens`` on, a step takes ``batches`` data batches, cut into rows of ``seq_len`` tokens."""

    start_tokens: float
    seq_len: int
    batches: int = 1


def parse_ramp(entries: Sequence[Mapping], data_seq_len: int) -> tuple[RampPoint, ...]:
    """``schedule.ramp`` entries -> points; empty means one point at the data's own sequence length."""
    points = tuple(RampPoint(float(e["start_tokens"]), int(e["seq_len"]), int(e.get("batches", 1)))
                   for e in entries) or (RampPoint(0.0, data_seq_len, 1),)
    if points[0].start_tokens != 0:
        raise ConfigError(f"schedule.ramp: the first entry must start at 0 tokens, got {points[0].start_tokens}")
    for a, b in zip(points, points[1:]):
        if b.start_tokens <= a.start_tokens:
            raise ConfigError(f"schedule.ramp entries must start at increasing token counts: {points}")
    for p in points:
        if p.batches < 1 or p.seq_len < 1 or data_seq_len % p.seq_len:
            raise ConfigError(f"schedule.ramp entry {p}: seq_len must divide data.seq_len ({data_seq_len}), "
                              "batches >= 1")
    return points


def ramp_phases(points: Sequence[RampPoint], *, data_rows: int, data_seq_len: int, grad_accum: int,
                mesh: Mapping[str, int], until: int | None = None) -> list[Phase]:
    """One phase per ramp point, until step ``until`` (None: the last goes on). A point lasts until the tokens seen
    reach the next one's ``start_tokens`` (its last step may overshoot). Microbatches keep the data batch's tokens
    divided by ``grad_accum``: a step of k batches accumulates k times as many."""
    phases, tokens, start = [], 0, 0
    for i, point in enumerate(points):
        per_step = data_rows * data_seq_len * point.batches
        end = None
        if i + 1 < len(points):
            end = start + math.ceil(max(points[i + 1].start_tokens - tokens, 0) / per_step)
        if until is not None and (end is None or end > until):
            end = until
        if end is not None and end <= start:
            continue
        phases.append(Phase(index=len(phases), start_step=start, end_step=end, seq_len=point.seq_len,
                            rows=data_rows * point.batches * (data_seq_len // point.seq_len),
                            grad_accum=grad_accum * point.batches, mesh=dict(mesh), batches=point.batches))
        if end is None or end == until:
            break
        tokens += (end - start) * per_step
        start = end
    return phases


# --- Data --------------------------------------------------------------------------------------------------


class Hooks(Protocol):
    """What a feature does at phase boundaries; ``memo`` is kept in the data state, so it survives a resume."""

    def enter(self, phase: Phase, evaluate: Callable[[], dict] | None, log: Callable[[dict], None],
              memo: dict) -> None: ...

    def end(self, phase: Phase, params: Any, mesh, evaluate: Callable[[], dict] | None,
            log: Callable[[dict], None], memo: dict) -> None: ...


class NoHooks:
    def enter(self, phase, evaluate, log, memo) -> None:
        pass

    def end(self, phase, params, mesh, evaluate, log, memo) -> None:
        pass


class PhasedBatches:
    """Each step's batch, shaped by the phase ``enter`` set: ``batches`` batches of its stream concatenated, cut
    into rows of its seq_len, and stored in zig-zag order under context parallelism (equal ring work per device;
    the loss is a sum over positions and masks come from positions, so the order changes nothing else).

    A phase with its own stream reads it from its start when entered; the base stream goes on across the phases
    that share it."""

    def __init__(self, base, make_stream: Callable[[int], Any], base_seq_len: int):
        self._base, self._make_stream, self._base_seq_len = base, make_stream, base_seq_len
        self._current, self.stream, self.phase = base, BASE_STREAM, None
        self.memo: dict = {}

    def enter(self, phase: Phase) -> None:
        if phase.stream != self.stream:
            self._current = self._base if phase.stream == BASE_STREAM else self._make_stream(phase.stream)
            self.stream = phase.stream
        self.phase = phase

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        p = self.phase
        batch = concat_batches([next(self._current) for _ in range(p.batches)])
        if self.stream == BASE_STREAM and p.seq_len != self._base_seq_len:  # the ramp's shorter rows
            batch = split_rows(batch, p.seq_len)
        return zigzag(batch, p.context_parallel)

    def get_state(self) -> dict:
        """The current stream's state; with ``phases`` once a phase has its own stream or the hooks keep something
        (a plain run's state is its stream's)."""
        state = self._current.get_state()
        if self.stream == BASE_STREAM and not self.memo:
            return state
        return {**state, "phases": {"stream": self.stream, "memo": self.memo}}

    def set_state(self, state: Mapping) -> None:
        """Resumes from ``get_state()``'s output, or from a run without phases (its base stream)."""
        saved = state.get("phases", {"stream": BASE_STREAM, "memo": {}})
        stream = int(saved["stream"])
        self._current = self._base if stream == BASE_STREAM else self._make_stream(stream)
        self.stream, self.phase = stream, None
        self._current.set_state(state)
        self.memo = dict(saved["memo"])

    @property
    def skipped(self) -> list[str]:
        return sorted(set(self._base.skipped) | set(self._current.skipped))

    def reports(self) -> list[str]:
        return self._current.reports()


def zigzag(batch: Mapping[str, np.ndarray], context_parallel: int) -> dict[str, np.ndarray]:
    """Each row in the zig-zag order of ``context_parallel`` shards (unchanged for 1)."""
    if context_parallel == 1:
        return dict(batch)
    order = zigzag_order(batch["tokens"].shape[1], context_parallel)
    return {k: v[:, order] for k, v in batch.items()}
