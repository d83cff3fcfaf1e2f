"""The experiment config of a training run: one typed section per concern, every key's default and range declared
once, here (the data keys in ``llama_jax.data.config``).

    c = experiment.config_dict("tiny")                   # the ml_collections override surface a config file edits
    exp = experiment.from_config(c)                      # typed, checked once: what a run is built from
    exp.schedule.peak_lr; exp.loss.z_loss; exp.to_dict()

``configs/<stage>/<name>.py`` return the ConfigDict (``--config.<section>.<key>=<value>`` changes any key); the run
converts it once. A config file only builds values: it reads and writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from llama_jax import config as model_config
from llama_jax.config import BASE_FORMATS, LORA_TARGETS, LoRA, ModelConfig
from llama_jax.data.config import DataConfig
from llama_jax.errors import ConfigError
from llama_jax.sections import BOOLEAN, Check, Section, at_least, number, one_of, option


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pipeline(Section):
    key: ClassVar[str] = "pipeline"

    schedule: str = option("none", "how the mesh's pipeline axis runs the layers (llama_jax.parallel.pipeline; "
                                   "pretrain and sft): none (needs pipeline=1) | gpipe | circular",
                           one_of("none", "gpipe", "circular"))
    microbatches: int = option(1, "per forward/backward (each grad_accum microbatch is split again into this many)",
                               at_least(1))
    circular_repeats: int = option(2, "circular: rounds of the pipeline ring per microbatch (blocks of L / (ranks x "
                                      "this))", at_least(1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Optimizer(Section):
    key: ClassVar[str] = "optimizer"

    b1: float = option(0.9, "AdamW first-moment decay", number(lambda v: 0 <= v < 1, "in [0, 1)"))
    b2: float = option(0.95, "AdamW second-moment decay", number(lambda v: 0 <= v < 1, "in [0, 1)"))
    eps: float = option(1e-8, "AdamW epsilon", number(lambda v: v > 0, "> 0"))
    weight_decay: float = option(0.1, "decoupled, scaled by the learning rate", number(lambda v: v >= 0, ">= 0"))
    clip_norm: float = option(1.0, "global gradient norm clip (0: off)", number(lambda v: v >= 0, ">= 0 (0: off)"))
    decay_embeddings: bool = option(False, "decay the embedding too (llama_jax.optim says why not)", BOOLEAN)
    grad_accum: int = option(1, "microbatches per data batch (a ramp point of k batches accumulates k times as many)",
                             at_least(1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Loss(Section):
    key: ClassVar[str] = "loss"

    z_loss: float = option(0.0, "coefficient of mean(logsumexp^2)", number(lambda v: v >= 0, ">= 0"))
    vocab_chunk: int = option(8192, "vocabulary columns per cross-entropy chunk (0: the whole vocabulary at once)",
                              at_least(0))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule(Section):
    key: ClassVar[str] = "schedule"

    peak_lr: float = option(3e-4, "learning rate after warmup", number(lambda v: v >= 0, ">= 0"))
    warmup_steps: int = option(2000, "linear warmup from 0", at_least(0))
    decay_steps: int = option(100_000, "cosine from peak to peak x min_lr_ratio until this step", at_least(1))
    min_lr_ratio: float = option(0.01, "where the cosine ends, relative to the peak (Llama 3: 1%)",
                                 number(lambda v: 0 <= v <= 1, "in [0, 1]"))
    anneal_steps: int = option(0, "a final linear decay to 0 over this many steps before total_steps", at_least(0))
    total_steps: int = option(100_000, "the schedule's end", at_least(1))
    ramp: tuple = option((), "batch ramp: [{start_tokens, seq_len, batches}] (train.phases); [] means data.seq_len "
                             "and one batch a step throughout")



@dataclasses.dataclass(frozen=True, kw_only=True)
class Train(Section):
    key: ClassVar[str] = "train"

    steps: int = option(0, "stop this invocation at this step (0: the schedule's end); a rerun resumes", at_least(0))
    on_nonfinite: str = option("skip", "a step with a non-finite loss or gradient is never applied: skip (counted) or "
                                       "halt", one_of("skip", "halt"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Checkpoint(Section):
    key: ClassVar[str] = "checkpoint"

    every: int = option(1000, "steps between checkpoints", at_least(1))
    keep_last: int = option(3, "newest intact checkpoints kept", at_least(1))
    keep_every: int = option(0, "also keep every step that is a multiple of this (0: off)", at_least(0))
    async_save: bool = option(True, "write in the background while training goes on", BOOLEAN)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gate(Section):
    key: ClassVar[str] = "long_context.gate"

    action: str = option("off", "at the end of each phase longer than data.seq_len: off | warn (log, go on) | stop "
                                "(checkpoint, then an error)", one_of("off", "warn", "stop"))
    max_loss_increase: float = option(0.02, "held-out loss at data.seq_len: at most this much (relative) above its "
                                            "value before the first longer phase", number(lambda v: v >= 0, ">= 0"))
    task: str = option("passkey", "retrieval prompts (llama_jax.eval.retrieval)", one_of("passkey", "needle"))
    min_retrieval: float = option(0.9, "greedy exact-match accuracy at the phase's length",
                                  number(lambda v: 0 <= v <= 1, "in [0, 1]"))
    depths: tuple = option((0.0, 0.25, 0.5, 0.75, 1.0), "where the needle sits in the prompts (fractions)")
    samples: int = option(2, "prompts per depth", at_least(1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongContext(Section):
    key: ClassVar[str] = "long_context"

    start_step: int = option(0, "the step the first phase begins at (before it: data.seq_len, the ramp, the base "
                                "schedule)", at_least(0))
    phases: tuple = option((), "[{seq_len, steps | tokens, batch_tokens | batch_size, lr, end_lr, warmup_steps, "
                               "context_parallel, grad_accum, weights, whole_documents}] (train.long_context); [] "
                               "means no extension")
    gate: Gate = option(factory=Gate, doc="checks at the end of each longer phase")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Logging(Section):
    key: ClassVar[str] = "logging"

    every: int = option(10, "steps per metrics line (averaged over them)", at_least(1))
    eval_every: int = option(1000, "steps between held-out evaluations (0: never)", at_least(0))
    eval_batches: int = option(8, "batches per evaluation (the same ones each time)", at_least(1))
    peak_tflops: float = option(0.0, "per-device peak for MFU (0: measure a float32 matmul at start)",
                                number(lambda v: v >= 0, ">= 0 (0: measure)"))
    progress: bool = option(True, "a tqdm bar on stderr", BOOLEAN)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reward(Section):
    key: ClassVar[str] = "reward"

    packed: bool = option(False, "the prompt and all its replies in one row of data.seq_len tokens (the paper's)",
                          BOOLEAN)
    edited: bool = option(True, "rank edited > chosen > rejected where a record has an edited reply", BOOLEAN)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPO(Section):
    key: ClassVar[str] = "dpo"

    beta: float = option(0.1, "the DPO temperature (the paper's 0.1)", number(lambda v: v > 0, "> 0"))
    nll_coef: float = option(0.2, "+ this x the chosen reply's per-token NLL (the paper's 0.2; 0: off)",
                             number(lambda v: v >= 0, ">= 0 (0: off)"))
    mask_formatting: bool = option(True, "formatting tokens out of the DPO term's log-probs (the paper's)", BOOLEAN)
    reference: str = option("model", "model: a frozen copy of init_from; precomputed: log-probs in the data",
                            one_of("model", "precomputed"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Adapters(Section):
    key: ClassVar[str] = "lora"

    rank: int = option(0, "low-rank adapters' rank r (0: none, every parameter trains); with r > 0 only the "
                          "adapters and the stage's own leaves train, the base stays frozen", at_least(0))
    alpha: float = option(16.0, "the update's scale is alpha / r (alpha / sqrt(r) with rslora)",
                          number(lambda v: v > 0, "> 0"))
    targets: tuple = option(LORA_TARGETS, "the projections adapted",
                            Check((tuple, list), lambda v: bool(v) and set(v) <= set(LORA_TARGETS),
                                  f"a non-empty list of {', '.join(LORA_TARGETS)}"))
    rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(r)", BOOLEAN)
    dropout: float = option(0.0, "PEFT's lora_dropout: the probability of dropping each input of an adapter (before "
                                 "A) in training steps; evaluation and generation never drop",
                            number(lambda v: 0 <= v < 1, "in [0, 1)"))
    base: str = option("float", "how the frozen base is kept: float (param_dtype) | nf4 (QLoRA: 4-bit NormalFloat, "
                                "blocks of 64, double-quantized scales) | int8 (per output channel)",
                       one_of(*BASE_FORMATS))

    def spec(self) -> LoRA | None:
        """The model's adapters (``ModelConfig.lora``), or None without them."""
        return LoRA(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets), rslora=self.rslora,
                    dropout=self.dropout) if self.rank else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Experiment(Section):
    key: ClassVar[str] = ""  # the whole config: its keys are the sections and the top-level keys

    stage: str = option("pretrain", "which stage's loss and batches: pretrain | sft | reward | dpo")
    run_dir: str = option("", "where checkpoints/, metrics.jsonl and tb/ go (required)")
    init_from: str = option("", "start from these weights (llama_jax run/step dir, HF dir, Meta dir) unless run_dir "
                                "resumes")
    seed: int = option(0, "parameter init and the step RNG", at_least(0))
    model: ModelConfig = option(doc="every ModelConfig field, from a preset")
    mesh: str = option("", "e.g. data=2,fsdp=4,tensor=8 or pipeline=4,fsdp=-1 (with pipeline.schedule); empty: every "
                           "device on fsdp")
    data: DataConfig = option(factory=DataConfig, doc="what is read (llama_jax.data)")
    pipeline: Pipeline = option(factory=Pipeline, doc="pipeline parallelism")
    optimizer: Optimizer = option(factory=Optimizer, doc="AdamW")
    loss: Loss = option(factory=Loss, doc="the cross-entropy's terms and chunking")
    schedule: Schedule = option(factory=Schedule, doc="the learning rate over steps, and the batch ramp")
    train: Train = option(factory=Train, doc="this invocation")
    checkpoint: Checkpoint = option(factory=Checkpoint, doc="saving and retention")
    long_context: LongContext = option(factory=LongContext, doc="the long-context extension")
    logging: Logging = option(factory=Logging, doc="metrics, evaluation, progress")
    lora: Adapters = option(factory=Adapters, doc="low-rank adapters (llama_jax.lora)")
    reward: Reward | None = option(None, "the reward stage's own section")
    dpo: DPO | None = option(None, "the dpo stage's own section")

    def __post_init__(self):
        super().__post_init__()
        rows, accum = self.data.batch_size, self.optimizer.grad_accum
        if rows % accum:
            raise ConfigError(f"data.batch_size ({rows}) must be a multiple of optimizer.grad_accum ({accum}): each "
                              "microbatch takes batch_size / grad_accum rows")

    def to_dict(self) -> dict[str, Any]:
        """Without the stage sections a config does not have (None)."""
        return {k: v for k, v in super().to_dict().items() if v is not None}


STAGE_SECTIONS = {"reward": Reward, "dpo": DPO}  # a stage's own section, in its configs only
# Keys that moved, still taken on the command line for one release (with a deprecation line).
RENAMED = {"optimizer.z_loss": "loss.z_loss", "optimizer.loss_chunk": "loss.vocab_chunk",
           "long_context.stages": "long_context.phases"}


def from_config(config) -> Experiment:
    """The typed experiment of a ConfigDict (or dict): unknown keys and bad values are ConfigErrors naming the key.
    An ``Experiment`` is already checked: it is returned as it is."""
    return config if isinstance(config, Experiment) else Experiment.from_dict(config)


def config_dict(preset: str, stage: str = "pretrain", **model_overrides):
    """The ``ml_collections.ConfigDict`` of the defaults of a training stage with the ``preset`` model, locked: a config
    file or flag that names a key not declared in the sections is an error, not a new key."""
    import ml_collections  # the override surface only: the library itself never needs it

    sections = {name: section() for name, section in STAGE_SECTIONS.items() if name == stage}
    exp = Experiment(stage=stage, model=model_config.get(preset, **model_overrides), **sections)
    c = ml_collections.ConfigDict(exp.to_dict())
    c.lock()
    return c


def describe(config) -> list[str]:
    """``--config.<key>=<value>  # doc (range)`` for every key of ``config``, from the sections."""
    rows = Experiment.describe(from_config(config))
    return [f"  --config.{key}={_json(value)}" + (f"  # {doc}" if doc else "") + (f" ({expected})" if expected else "")
            for key, value, doc, expected in rows]


def _json(value: Any) -> str:
    return json.dumps(value, default=str)
