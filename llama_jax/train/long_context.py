"""Long-context extension (Llama 3 paper, section 3.4.2): phases of growing sequence length in one pretraining run.

    config.long_context.start_step = 100_000    # before it: data.seq_len, the ramp and the base schedule
    config.long_context.phases = [dict(seq_len=16384, tokens=50e9, context_parallel=2), ...]
    extension = long_context.parse(config, cfg, first_index=len(ramp_phases))   # None without phases
    extension.phases                            # train.phases.Phase objects, one per entry
    hooks = Gates(extension, tokenizer, cfg)    # the gates, run by the loop at each phase's end

A phase (one dict of ``long_context.phases``):
    seq_len             tokens per row
    steps | tokens      how long it lasts (tokens: rounded up to whole steps)
    batch_tokens | batch_size   tokens or rows per step (neither: the previous phase's tokens per step, kept constant;
                                the first one's previous is data.batch_size x data.seq_len)
    lr, end_lr, warmup_steps    linear warmup from 0 to lr, then linear to end_lr (default lr) at the phase's end;
                                without lr the base schedule goes on through the phase
    context_parallel    the mesh's ``sequence`` axis (default 1); it takes its devices from fsdp, then data
    grad_accum          microbatches per step (default optimizer.grad_accum)
    weights             one per data source (default data.sources' weights); 0 leaves a source out of the phase,
                        e.g. a long-document source weighted up for the long phases only
    whole_documents     the phase's ``data.whole_documents`` (default: data's): True, a document that fits in a row
                        is never cut, so a long document's beginning and end (a needle and its question) share a row

Each phase reads a fresh stream at its own length and rows, seeded by (data.seed, phase), and the held-out split is
the same in every phase; where the context-parallel degree changes, the state is re-sharded onto the phase's mesh
and attention runs as a ring. Gates at the end of each phase longer than data.seq_len: the held-out loss at
data.seq_len may rise by at most ``max_loss_increase`` over its value before the first longer phase, and greedy
exact-match retrieval (``eval.retrieval``) must reach ``min_retrieval``; ``action`` "off", "warn" or "stop". Why the
data and the gates work this way: docs/long-context.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping

from llama_jax import cli, experiment, generate, model, sharding
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.eval import retrieval
from llama_jax.experiment import Gate
from llama_jax.tokenizer import Tokenizer
from llama_jax.train.phases import LrLine, Phase

PHASE_KEYS = ("seq_len", "steps", "tokens", "batch_tokens", "batch_size", "lr", "end_lr", "warmup_steps",
              "context_parallel", "grad_accum", "weights", "whole_documents")
_SEED_STRIDE = 1_000_003  # phase k reads with data seed + (k + 1) * this: apart from the per-source offsets (+ i)


@dataclasses.dataclass(frozen=True)
class Extension:
    """The phases of ``config.long_context`` (``parse``); phase k reads stream k."""

    phases: tuple[Phase, ...]
    weights: tuple[tuple[float, ...], ...]  # per phase: one weight per data source (0: left out)
    whole_documents: tuple[bool, ...]  # per phase
    short_seq_len: int  # data.seq_len: the eval batches' length, what "short context" means in the gates
    gate: Gate

    def data_config(self, data_cfg: Mapping, stream: int) -> dict:
        """``config.data`` for stream ``stream``'s training batches: its length, rows, seed and sources."""
        p = self.phases[stream]
        sources = [dict(spec, weight=w) for spec, w in zip(data_cfg["sources"], self.weights[stream])]
        return {**dict(data_cfg), "seq_len": p.seq_len, "batch_size": p.rows, "sources": sources,
                "whole_documents": self.whole_documents[stream],
                "seed": int(data_cfg["seed"]) + (stream + 1) * _SEED_STRIDE}

    def needs_reference(self, phase: Phase) -> bool:
        """Whether ``phase`` is the first to go beyond data.seq_len (the short-context loss is measured before it)."""
        longer = [p for p in self.phases if p.seq_len > self.short_seq_len]
        return bool(longer) and longer[0].index == phase.index


def mesh_sizes(base: Mapping[str, int], context_parallel: int, key: str) -> dict[str, int]:
    """The base mesh with ``sequence`` set to ``context_parallel``, its devices taken from fsdp, then data."""
    parallel = base["data"] * base["fsdp"] * base["sequence"]  # the devices data and sequence share
    if parallel % context_parallel:
        raise ConfigError(f"{key}.context_parallel={context_parallel} does not divide the {parallel} devices of the "
                          f"mesh's data, fsdp and sequence axes ({dict(base)})")
    rows = parallel // context_parallel
    data = math.gcd(base["data"], rows)
    return {**base, "data": data, "fsdp": rows // data, "sequence": context_parallel}


def parse(config, cfg: ModelConfig, *, first_index: int = 0, base_mesh: Mapping[str, int] | None = None
          ) -> Extension | None:
    """The extension of ``config.long_context`` (a ConfigDict or an ``Experiment``; None when it has no phases), its
    phases numbered from ``first_index`` on ``base_mesh`` (default: config.mesh on this host's devices); ConfigError
    naming the key."""
    config = experiment.from_config(config)
    section = config.long_context
    entries = list(section.phases)
    if not entries:
        return None
    data = config.data
    base_mesh = dict(base_mesh or sharding.parse_mesh(config.mesh or None))
    sources = list(data.sources)
    previous_tokens = int(data.batch_size) * int(data.seq_len)
    step = int(section.start_step)
    phases, weights_of, whole_of = [], [], []
    for i, entry in enumerate(entries):
        key = f"long_context.phases[{i}]"
        entry = dict(entry)
        unknown = sorted(set(entry) - set(PHASE_KEYS))
        if unknown:
            raise ConfigError(f"{key} has unknown key(s) {unknown}; known: {list(PHASE_KEYS)}")
        seq_len = _int(entry, "seq_len", key, low=1, required=True)
        if seq_len > cfg.max_seq_len:
            raise ConfigError(f"{key}.seq_len={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}, the longest "
                              "sequence the model is meant for: raise model.max_seq_len")
        rows = _rows(entry, key, seq_len, previous_tokens)
        previous_tokens = rows * seq_len
        if ("steps" in entry) == ("tokens" in entry):
            raise ConfigError(f"{key} needs exactly one of steps and tokens (how long the phase lasts)")
        if "steps" in entry:
            steps = _int(entry, "steps", key, low=1)
        else:
            steps = math.ceil(_number(entry, "tokens", key, low=1) / (rows * seq_len))
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
            raise ConfigError(f"{key}: warmup_steps={warmup} needs an lr and fewer than the phase's {steps} steps")
        weights = tuple(float(s.get("weight", 1.0)) for s in sources)
        if entry.get("weights") is not None:
            weights = tuple(float(w) for w in entry["weights"])
            if len(weights) != len(sources) or any(not w >= 0 for w in weights) or not any(weights):
                raise ConfigError(f"{key}.weights={list(entry['weights'])}: expected one weight >= 0 per data source "
                                  f"({len(sources)}), not all 0")
        whole = entry.get("whole_documents", data.get("whole_documents", False))
        if not isinstance(whole, bool):
            raise ConfigError(f"{key}.whole_documents must be true or false, got {whole!r}")
        phases.append(Phase(index=first_index + i, start_step=step, end_step=step + steps, seq_len=seq_len,
                            rows=rows, grad_accum=grad_accum, mesh=mesh_sizes(base_mesh, cp, key), stream=i,
                            lr=None if lr is None else LrLine(lr, end_lr, warmup),
                            gated=section.gate.action != "off" and seq_len > int(data.seq_len)))
        weights_of.append(weights)
        whole_of.append(whole)
        step += steps
    gate = section.gate
    if not gate.depths or not all(0 <= d <= 1 for d in gate.depths):
        raise ConfigError(f"long_context.gate.depths {list(gate.depths)} must be fractions in [0, 1]")
    return Extension(phases=tuple(phases), weights=tuple(weights_of), whole_documents=tuple(whole_of),
                     short_seq_len=int(data.seq_len), gate=gate)


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


def stream_config(config, extension: Extension, stream: int):
    """The experiment config (an ``Experiment``) with ``data`` as stream ``stream`` reads it."""
    return dataclasses.replace(config, data=config.data.replace(**extension.data_config(config.data, stream)))


# --- Gates -------------------------------------------------------------------------------------------------


def retrieval_task(gate: Gate, add_bos: bool) -> retrieval.Task:
    """The gate's retrieval task: base-format prompts, with <|begin_of_text|> when the training data has it."""
    return retrieval.Task(gate.task, bos=add_bos)


def answer_room(tok: Tokenizer, task: retrieval.Task) -> int:
    """Tokens a reply may take: the longest answer, its full stop and the end-of-text token after it."""
    return retrieval.default_max_new_tokens(tok, task) - 8 + 2


def greedy_generate_fn(params, cfg: ModelConfig, tok: Tokenizer, mesh_sizes_: Mapping[str, int], *, rows: int,
                       max_new_tokens: int) -> retrieval.GenerateFn:
    """A ``retrieval.GenerateFn`` decoding greedily with ``generate`` (KV cache), ``rows`` prompts at a time, on the
    phase's devices with the sequence axis folded into fsdp (decoding has no long rows to split)."""
    sizes = {**mesh_sizes_, "fsdp": mesh_sizes_["fsdp"] * mesh_sizes_["sequence"], "sequence": 1}
    mesh = sharding.make_mesh(sizes)
    layout, decode_cfg = generate.inference_layout({k: params[k] for k in model.param_shapes(cfg)}, cfg)
    multiple = sizes["data"] * sizes["fsdp"]
    rows = -(-rows // multiple) * multiple

    def generate_fn(prompts: list[list[int]]) -> list[str]:
        replies = []
        for start in range(0, len(prompts), rows):
            chunk = prompts[start:start + rows]
            padded = chunk + [chunk[-1]] * (rows - len(chunk))  # whole rows for the mesh; the copies are dropped
            outs = generate.generate(layout, decode_cfg, padded, max_new_tokens, stop_ids=tok.stop_ids, mesh=mesh,
                                     vocab_size=tok.vocab_size)
            replies += [tok.decode(list(itertools.takewhile(lambda t: t not in tok.stop_ids, ids)))
                        for ids in outs[:len(chunk)]]
        return replies

    return generate_fn


@dataclasses.dataclass(frozen=True)
class GateResult:
    phase: int
    seq_len: int
    eval_loss: float | None  # held-out loss at data.seq_len
    reference_loss: float | None  # ... before the first longer phase
    retrieval_length: int
    retrieval_accuracy: float
    failures: tuple[str, ...]  # what did not pass, in words

    def metrics(self) -> dict[str, float]:
        out = {"gate_phase": float(self.phase), "gate_retrieval_accuracy": self.retrieval_accuracy,
               "gate_passed": float(not self.failures)}
        if self.eval_loss is not None:
            out["gate_eval_loss"] = self.eval_loss
        return out


def run_gate(extension: Extension, stream: int, *, eval_loss: float | None, reference_loss: float | None,
             generate_fn: retrieval.GenerateFn, tok: Tokenizer, task: retrieval.Task) -> GateResult:
    """The gate of the extension's phase ``stream``: retrieval at its length (prompts that leave room for the answer),
    and the short-context held-out loss against the reference (skipped when either is unknown: no eval batches)."""
    phase, gate = extension.phases[stream], extension.gate
    length = phase.seq_len - answer_room(tok, task)
    result = retrieval.evaluate(generate_fn, tok, task, [length], list(gate.depths), gate.samples)
    failures = []
    if result.mean_accuracy < gate.min_retrieval:
        failures.append(f"{task.kind} retrieval at {length} tokens: {result.mean_accuracy:.2f} exact-match accuracy, "
                        f"below long_context.gate.min_retrieval={gate.min_retrieval}")
    if eval_loss is not None and reference_loss is not None:
        allowed = reference_loss * (1 + gate.max_loss_increase)
        if eval_loss > allowed:
            failures.append(f"held-out loss at {extension.short_seq_len} tokens: {eval_loss:.4f}, above {allowed:.4f} "
                            f"({reference_loss:.4f} before the extension + long_context.gate.max_loss_increase="
                            f"{gate.max_loss_increase:.0%})")
    return GateResult(phase=phase.index, seq_len=phase.seq_len, eval_loss=eval_loss, reference_loss=reference_loss,
                      retrieval_length=length, retrieval_accuracy=result.mean_accuracy, failures=tuple(failures))


def check_gates(extension: Extension, tok: Tokenizer, task: retrieval.Task) -> None:
    """ConfigError before step 1 for a gated phase too short to hold the gate's retrieval prompt."""
    for p in extension.phases:
        if p.gated:
            try:
                retrieval.make_sample(tok, task, max(p.seq_len - answer_room(tok, task), 1), 0.5, 0)
            except ConfigError as e:
                raise ConfigError(f"long_context.phases[{p.stream}] (seq_len {p.seq_len}) is gated, but its rows "
                                  f"cannot hold a retrieval prompt: {e}") from None


class Gates:
    """The extension's ``train.phases.Hooks``: the short-context loss before the first longer phase, and each gated
    phase's gate at its end (logged; a failure warns or, with action "stop", raises after the loop checkpointed)."""

    def __init__(self, extension: Extension, tok: Tokenizer, cfg: ModelConfig, add_bos: bool):
        self.extension, self.tok, self.cfg = extension, tok, cfg
        self.task = retrieval_task(extension.gate, add_bos)

    def enter(self, phase: Phase, evaluate: Callable[[], dict] | None, log: Callable[[dict], None],
              memo: dict) -> None:
        if evaluate is None or memo.get("reference_loss") is not None or not self.extension.needs_reference(phase):
            return
        memo["reference_loss"] = evaluate()["loss"]
        log({"eval_loss_before_extension": memo["reference_loss"]})
        cli.log(f"step {phase.start_step}: held-out loss at {self.extension.short_seq_len} tokens before the extension "
              f"{memo['reference_loss']:.4f}")

    def end(self, phase: Phase, params, mesh_sizes_: Mapping[str, int], evaluate: Callable[[], dict] | None,
            log: Callable[[dict], None], memo: dict) -> None:
        if not phase.gated:
            return
        generate_fn = greedy_generate_fn(params, self.cfg, self.tok, mesh_sizes_, rows=phase.rows // phase.grad_accum,
                                         max_new_tokens=answer_room(self.tok, self.task))
        result = run_gate(self.extension, phase.stream, eval_loss=evaluate()["loss"] if evaluate else None,
                          reference_loss=memo.get("reference_loss"), generate_fn=generate_fn, tok=self.tok,
                          task=self.task)
        log(result.metrics())
        loss = "" if result.eval_loss is None else f", held-out loss {result.eval_loss:.4f}"
        cli_line = (f"step {phase.end_step}: gate of phase {phase.index}: {self.task.kind} retrieval "
                    f"{result.retrieval_accuracy:.2f} at {result.retrieval_length} tokens{loss}")
        cli.log(cli_line)
        if result.failures:
            message = f"the gate of phase {phase.index} ({phase.seq_len} tokens) failed:\n  " + "\n  ".join(
                result.failures)
            if self.extension.gate.action == "stop":
                raise LlamaJaxError(f"{message}\nTo go on training this phase, lengthen it (long_context.phases"
                                    f"[{phase.stream}].steps or tokens) and rerun; or set long_context.gate.action="
                                    "'warn'")
            cli.log(f"warning: {message}")
