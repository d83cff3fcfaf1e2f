"""Any stage with low-rank adapters (``config.lora.rank > 0``): the base network frozen, only the adapters (and the
stage's own leaves, a reward head) trained, in the optimizer state and in the checkpoint.

    python -m llama_jax.train --config configs/sft/tiny.py:chats.jsonl --config.init_from=runs/pretrain \
        --config.lora.rank=16 --config.lora.alpha=32

The base lives in ``TrainState.frozen``, rebuilt on resume from the step ``init_from`` pinned (as DPO's reference
is), so a checkpoint holds the adapters, the optimizer's moments of them and the data state. The loss sees one
tree, base and adapters joined; DPO's reference is ``frozen``, the base with the adapters off: no second copy of the
weights. Gradients reach only the adapters: the base enters the step as an input, not as a differentiated argument.
With ``config.lora.dropout`` p each adapter's input is dropped (PEFT's lora_dropout) in training steps, its masks drawn
from the step's key; evaluation passes no key and drops nothing.
With ``config.lora.base="nf4"`` (QLoRA) or "int8" the frozen base's projections are stored quantized
(``lora.quantize_base``) and decoded inside each matmul; the adapters and activations keep their dtypes.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
from flax import traverse_util

from llama_jax import lora, model
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.train.step import LossFn, Stage


def with_adapters(stage: Stage, cfg: ModelConfig, config) -> Stage:
    """The same training stage on ``cfg.lora``'s adapters over a frozen base (``config.init_from``'s weights)."""
    if not config.init_from:
        raise ConfigError("config.lora.rank > 0 needs config.init_from: adapters fine-tune the weights a run starts "
                          "from, which stay frozen (and are read again on resume)")
    if config.lora.dropout and config.pipeline.schedule != "none":
        # A pipeline schedule runs the blocks through apply_layers, which has no dropout key to draw masks from.
        raise ConfigError("config.lora.dropout > 0 does not run with a pipeline schedule (config.pipeline.schedule="
                          f"{config.pipeline.schedule!r}): set config.lora.dropout=0 or config.pipeline.schedule=none")
    base_keys = set(model.param_shapes(cfg.replace(lora=None)))

    def is_base(path: str) -> bool:
        return path.split("/")[0] in base_keys and not lora.is_adapter(path)

    def part(params: dict, base: bool) -> dict:
        flat = traverse_util.flatten_dict(params, sep="/")
        return traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_base(k) == base}, sep="/")

    def frozen(params: dict) -> dict:
        base = part(params, base=True)
        if config.lora.base == "float":
            return base
        # Inside the jitted state constructor: the kernels quantized on their devices, the full-width copy dropped.
        return lora.quantize_base(nn.meta.unbox(base), cfg, config.lora.base)

    def make_loss_fn(cfg_: ModelConfig, config_, run_layers=None) -> LossFn:
        inner = stage.make_loss_fn(cfg_, config_, run_layers)

        def loss_fn(params, batch, rng, frozen):  # rng: the step's key, from which the adapters' dropout draws
            return inner(lora.join(frozen, params), batch, rng, frozen)

        return loss_fn

    # Without gradients of the frozen weights the backward pass costs one forward (activations' gradients), not
    # two: a third less than full fine-tuning per model pass.
    return dataclasses.replace(stage, make_loss_fn=make_loss_fn, trained=lambda p: part(p, base=False),
                               frozen=frozen, flops_factor=stage.flops_factor - 1 / 3)
