"""Typed model configs, the Llama 3.1 / 3.2 presets, and conversion to and from Hugging Face config dicts.

    cfg = llama_jax.config.get("llama3.1-8b")
    cfg.num_params()                     # 8_030_261_248, from shapes alone
    small = cfg.replace(num_layers=2)    # frozen: derive, never mutate
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from llama_jax.errors import ConfigError

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
# The fields that make the network (what config.json / params.json record); the rest says how it runs.
ARCHITECTURE = ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim", "head_dim", "norm_eps",
                "rope_theta", "rope_scaling", "tie_embeddings")
ATTENTION_IMPLS = ("dense", "flash")
CONTEXT_PARALLEL_MODES = ("auto", "off", "ring", "all_gather")
MATMUL_PRECISIONS = ("auto", "highest", "high", "default")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3.1's frequency scaling that stretches an 8K-trained RoPE to 128K context."""

    factor: float = 8.0  # long wavelengths are slowed down by this much
    low_freq_factor: float = 1.0  # wavelengths above original/low_freq_factor are fully scaled
    high_freq_factor: float = 4.0  # wavelengths below original/high_freq_factor are kept
    original_max_position: int = 8192  # context length the unscaled RoPE was trained on


LORA_TARGETS = ("query", "key", "value", "out", "gate", "up", "down")  # the projections an adapter may adapt
BASE_FORMATS = ("float", "nf4", "int8")  # how an adapted run keeps its frozen base: as loaded, QLoRA's NF4, int8


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA:
    """Low-rank adapters (Hu et al. 2021) on the projections ``targets``: each runs as W + scale x B A, with B [r, out]
    and A [in, r] stacked along the layer axis like W; scale alpha / r, or alpha / sqrt(r) with ``rslora``."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    rslora: bool = False  # rank-stabilised scaling (Kalajdzievski 2023): alpha / sqrt(r)
    dropout: float = 0.0  # PEFT's lora_dropout: drops the adapter path's input x (before A) while training

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ConfigError(f"LoRA.rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA.alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA.dropout must be in [0, 1), got {self.dropout!r}")
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown or not self.targets:
            raise ConfigError(f"LoRA.targets must be a non-empty subset of {LORA_TARGETS}, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of one Llama model. Field names follow Meta's params.json where they can."""

    vocab_size: int  # V: rows of the embedding, columns of the LM head
    dim: int  # D: model width
    num_layers: int  # L: decoder blocks
    num_heads: int  # N: query heads
    num_kv_heads: int  # K: key/value heads (grouped-query attention; N % K == 0)
    ffn_dim: int  # F: SwiGLU hidden width
    head_dim: int | None = None  # H: per-head width; None means dim // num_heads
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 500_000.0  # RoPE base
    rope_scaling: RopeScaling | None = None  # Llama 3.1 long-context scaling, or None for plain RoPE
    max_seq_len: int = 131_072  # longest sequence the model is meant for (KV cache default size)
    tie_embeddings: bool = False  # LM head reuses the embedding matrix (Llama 3.2 1B / 3B)
    # How the network runs (the architecture above is what config.json / params.json record):
    param_dtype: str = "float32"  # dtype parameters are stored and updated in
    dtype: str = "float32"  # compute dtype of matmuls and activations (softmax/norms stay float32)
    remat: str = "none"  # activation checkpointing per block: none | full | dots | dots_no_batch
    scan_layers: bool = True  # parameter layout: stacked under nn.scan (one compiled block) or one subtree per layer
    attention: str = "dense"  # attention kernel (ops.attention): dense (XLA) | flash (the backend's fused kernel)
    context_parallel: str = "auto"  # sequence-split attention: auto (ring when the mesh splits length) | off | ring
    #                                 | all_gather
    matmul_precision: str = "auto"  # precision of every matmul (see resolved_matmul_precision): auto | highest
    #                                 | high | default
    lora: LoRA | None = None  # low-rank adapters on the projections (model.py); None: the network alone

    def __post_init__(self):
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None and self.dim % self.num_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"head_dim ({self.resolved_head_dim}) must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        for name, allowed in (("attention", ATTENTION_IMPLS), ("context_parallel", CONTEXT_PARALLEL_MODES),
                              ("matmul_precision", MATMUL_PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"ModelConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("norm_eps and rope_theta must be positive")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.num_heads

    @property
    def resolved_matmul_precision(self) -> str | None:
        """The ``precision=`` every matmul of the network, its loss and its attention passes to jax.

        "auto" asks for what ``dtype`` promises: float32 compute gets "highest" (true float32 products, as
        PyTorch and XLA:CPU give; XLA would otherwise run float32 matmuls as TF32 on NVIDIA GPUs and as one
        bfloat16 pass on TPUs), 16-bit compute gets None, the backend's fast default. "high" is TF32 on GPUs and
        three bfloat16 passes on TPUs; "default" (None) leaves the choice to the backend and to the user's own
        ``jax.default_matmul_precision`` / JAX_DEFAULT_MATMUL_PRECISION. No global flag is ever set here.
        """
        if self.matmul_precision == "auto":
            return "highest" if self.dtype == "float32" else None
        return None if self.matmul_precision == "default" else self.matmul_precision

    def replace(self, **changes: Any) -> ModelConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {sorted(unknown)}")
        if isinstance(changes.get("rope_scaling"), dict):
            changes["rope_scaling"] = RopeScaling(**changes["rope_scaling"])
        if isinstance(changes.get("lora"), dict):
            changes["lora"] = LoRA(**changes["lora"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def architecture_differences(self, other: ModelConfig) -> list[str]:
        """``name: mine vs theirs`` for each ARCHITECTURE field where two configs differ (empty: same network)."""
        return [f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}" for name in ARCHITECTURE
                if getattr(self, name) != getattr(other, name)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {sorted(unknown)}; known: {sorted(fields)}")
        d = dict(d)
        if d.get("attention") == "auto":  # older configs and checkpoints (one release): "auto" always ran dense
            print('deprecated: ModelConfig.attention "auto" -> use "dense"', file=sys.stderr)
            d["attention"] = "dense"
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if isinstance(d.get("lora"), dict):
            d["lora"] = LoRA(**d["lora"])
        return cls(**d)

    def num_params(self) -> int:
        """Exact parameter count, computed from shapes (nothing is allocated)."""
        d, h = self.dim, self.resolved_head_dim
        attention = d * self.num_heads * h * 2 + d * self.num_kv_heads * h * 2  # q, o, k, v
        feed_forward = 3 * d * self.ffn_dim
        per_layer = attention + feed_forward + 2 * d  # two RMSNorm scales
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + d + embeddings

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), attention included.

        Matmul FLOPs 6 * (non-embedding params + LM head) plus causal attention scores and values
        (12 * L * N * H * T / 2: half the score matrix is masked away).
        """
        matmul_params = self.num_params() - self.vocab_size * self.dim * (0 if self.tie_embeddings else 1)
        attention = 6 * self.num_layers * self.num_heads * self.resolved_head_dim * seq_len
        return 6 * matmul_params + attention


_LLAMA31_SCALING = RopeScaling()


def _llama31(dim: int, layers: int, heads: int, ffn: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=128_256, dim=dim, num_layers=layers, num_heads=heads, num_kv_heads=8, ffn_dim=ffn,
        rope_scaling=_LLAMA31_SCALING, param_dtype="bfloat16", dtype="bfloat16",
    )


def _llama32(dim: int, layers: int, heads: int) -> ModelConfig:
    # Llama 3.2's small models were trained with factor 32 RoPE scaling and tied embeddings.
    return ModelConfig(
        vocab_size=128_256, dim=dim, num_layers=layers, num_heads=heads, num_kv_heads=8, ffn_dim=8192,
        rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True, param_dtype="bfloat16", dtype="bfloat16",
    )


PRESETS = {
    "llama3.1-8b": lambda: _llama31(4096, 32, 32, 14_336),
    "llama3.1-70b": lambda: _llama31(8192, 80, 64, 28_672),
    "llama3.1-405b": lambda: _llama31(16_384, 126, 128, 53_248),
    "llama3.2-1b": lambda: _llama32(2048, 16, 32),
    "llama3.2-3b": lambda: _llama32(3072, 28, 24),
    # Seconds on a laptop CPU; vocab fits the byte tokenizer (256 bytes + specials).
    "tiny": lambda: ModelConfig(
        vocab_size=512, dim=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_dim=384,
        rope_theta=10_000.0, max_seq_len=2048,
    ),
}


def get(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, optionally with fields replaced: ``get("tiny", num_layers=2)``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)


# --- Hugging Face config.json ---------------------------------------------------------------------

# Fields of a transformers LlamaConfig that do not change the network we build (token ids, caching,
# bookkeeping). Anything else we do not know is an error, not a silent mismatch.
_HF_IGNORED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "attention_dropout",
    "pretraining_tp", "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder",
    "tie_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task", "tokenizer_class",
    "prefix", "add_cross_attention", "is_decoder", "cross_attention_hidden_size", "pruned_heads",
    "torchscript", "tf_legacy_loss", "use_bfloat16", "output_scores", "return_dict_in_generate",
}
_HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 folds theta into `rope_parameters`; older files use `rope_theta` + `rope_scaling`.
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    if scaling and params and any(params.get(k, v) != v for k, v in scaling.items()):
        raise ConfigError(f"rope_scaling {scaling} disagrees with rope_parameters {params}")
    params = {**scaling, **params}
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10_000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"unsupported rope type {kind!r} in HF config (only 'default' and 'llama3')")
    try:
        return theta, RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"llama3 rope scaling in HF config lacks {e.args[0]!r}: {params}") from None


def from_hf(d: dict[str, Any], **overrides: Any) -> ModelConfig:
    """A ModelConfig from a Hugging Face LlamaConfig dict (the contents of ``config.json``)."""
    missing = [k for k in _HF_REQUIRED if k not in d]
    if missing:
        raise ConfigError(f"HF config lacks required field(s) {missing}")
    if d.get("model_type", "llama") != "llama":
        raise ConfigError(f"HF config has model_type {d['model_type']!r}; only 'llama' is supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"HF config has hidden_act {d['hidden_act']!r}; Llama uses 'silu'")
    for bias in ("attention_bias", "mlp_bias"):
        if d.get(bias, False):
            raise ConfigError(f"HF config sets {bias}=True; Llama 3 has no biases")
    known = set(_HF_REQUIRED) | {
        "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "max_position_embeddings", "tie_word_embeddings", "head_dim", "hidden_act", "attention_bias", "mlp_bias",
    }
    unknown = sorted(k for k in d if k not in known and k not in _HF_IGNORED and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"HF config has field(s) llama_jax does not understand: {unknown}")
    theta, scaling = _rope_from_hf(d)
    heads = int(d["num_attention_heads"])
    head_dim = d.get("head_dim")
    if head_dim is not None and int(head_dim) == int(d["hidden_size"]) // heads:
        head_dim = None  # the derived value: keep the config canonical
    fields = dict(
        vocab_size=int(d["vocab_size"]), dim=int(d["hidden_size"]), num_layers=int(d["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
        ffn_dim=int(d["intermediate_size"]), head_dim=None if head_dim is None else int(head_dim),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=int(d.get("max_position_embeddings", 131_072)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict for ``cfg`` (transformers' LlamaForCausalLM); token ids such as
    ``bos_token_id`` belong to the tokenizer, so ``formats.hf`` adds them."""
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "intermediate_size": cfg.ffn_dim,
        "head_dim": cfg.resolved_head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        d["rope_scaling"] = {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position,
        }
    return d
