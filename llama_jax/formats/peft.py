"""PEFT LoRA adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors`` <-> our adapter leaves.

    write("my-adapter/", adapters, cfg)                # cfg.lora: rank, alpha, targets, rslora, dropout
    adapters, lora_cfg = read("their-adapter/", cfg)   # cfg: the base model's (it holds the head split)
    params = lora.join(base, adapters); model.Llama(cfg.replace(lora=lora_cfg)).apply({"params": params}, tokens)

What ``peft.PeftModel.from_pretrained`` loads on transformers' ``LlamaForCausalLM`` and ``save_pretrained`` writes:
a LoraConfig as JSON, and per layer and adapted projection two tensors,
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]
(torch's [out, in] order), W_eff = W + scale B A. Ours are stacked along the layer axis and keep heads as their own
axis (``lora.py``): A [L, in dims, r], B [L, r, out dims]; the in/out dims flatten row-major, as ``formats.hf``
flattens the kernels they adapt (query [D, N, H] -> q_proj [N*H, D]).

Only safetensors is read: an ``adapter_model.bin`` is a pickle, never loaded. What we cannot run (bias terms, DoRA,
per-module ranks, adapters on embeddings or the head, some layers only) is a ConfigError naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from llama_jax import lora
from llama_jax.config import LORA_TARGETS, LoRA, ModelConfig
from llama_jax.errors import CheckpointError, ConfigError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

# our target -> (its subtree in a layer, the module's name inside transformers' ``model.layers.{i}``)
_MODULES = {
    "query": ("attention", "self_attn.q_proj"), "key": ("attention", "self_attn.k_proj"),
    "value": ("attention", "self_attn.v_proj"), "out": ("attention", "self_attn.o_proj"),
    "gate": ("feed_forward", "mlp.gate_proj"), "up": ("feed_forward", "mlp.up_proj"),
    "down": ("feed_forward", "mlp.down_proj"),
}
_TARGET_OF_MODULE = {module: target for target, (_, module) in _MODULES.items()}
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight")
# LoraConfig fields that change what the adapter computes, and the value under which it is plain LoRA.
_PLAIN = {
    "bias": "none", "lora_bias": False, "use_dora": False, "fan_in_fan_out": False, "rank_pattern": {},
    "alpha_pattern": {}, "layers_to_transform": None, "layer_replication": None, "modules_to_save": None,
    "trainable_token_indices": None, "target_parameters": None, "use_qalora": False,
    "alora_invocation_tokens": None,
}


def _key(layer: int, target: str, matrix: str) -> str:
    return f"base_model.model.model.layers.{layer}.{_MODULES[target][1]}.lora_{matrix}.weight"


def write(directory: str | os.PathLike, adapters: dict, cfg: ModelConfig, *,
          base_model_name_or_path: str | None = None) -> None:
    """Writes ``adapters`` (``lora.init``'s tree, trained) of ``cfg.lora`` as a PEFT adapter directory, made if
    missing. ``base_model_name_or_path`` is recorded for PEFT's ``AutoPeftModel`` loaders."""
    if cfg.lora is None:
        raise ConfigError("formats.peft.write needs cfg.lora (the adapters' rank, alpha and targets)")
    rank, tensors = cfg.lora.rank, {}
    for target in cfg.lora.targets:
        part = _MODULES[target][0]
        a, b = (adapters.get("layers", {}).get(part, {}).get(f"{target}{s}") for s in lora.SUFFIXES)
        if a is None or b is None:
            raise ConfigError(f"cfg.lora targets {target!r} but the adapters lack layers/{part}/{target}_lora_a/_b")
        a, b = np.asarray(a), np.asarray(b)
        for i in range(cfg.num_layers):
            tensors[_key(i, target, "A")] = np.ascontiguousarray(a[i].reshape(-1, rank).T)  # [in dims, r] -> [r, in]
            tensors[_key(i, target, "B")] = np.ascontiguousarray(b[i].reshape(rank, -1).T)  # [r, out dims] -> [out, r]
    alpha = cfg.lora.alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "use_rslora": cfg.lora.rslora,
        "target_modules": [_MODULES[t][1].rsplit(".", 1)[1] for t in cfg.lora.targets],
        "lora_dropout": cfg.lora.dropout, "inference_mode": True, "init_lora_weights": True, **_PLAIN,
    }
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})  # PEFT/torch want "pt"


def read(directory: str | os.PathLike, cfg: ModelConfig) -> tuple[dict, LoRA]:
    """A PEFT LoRA adapter directory for the base model of ``cfg`` -> (adapters as ``lora.init`` shapes them, in
    the stored dtype; the ``LoRA`` to run them with: ``cfg.replace(lora=...)``)."""
    config_file, weights_file = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights_file):
        if os.path.isfile(os.path.join(directory, PICKLE_FILE)):
            raise ConfigError(f"{os.path.join(directory, PICKLE_FILE)} is a pickle, which llama_jax never loads: "
                              f"save the adapter with safe_serialization=True ({WEIGHTS_FILE})")
        raise ConfigError(f"{directory} holds no {WEIGHTS_FILE}")
    lora_cfg = _lora_config(config_file)
    try:
        with safe_open(weights_file, framework="numpy") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:  # truncated / corrupt header or data
        raise CheckpointError(f"cannot read safetensors file {weights_file}: {e}") from e

    if not tensors:
        raise ConfigError(f"{weights_file} holds no tensors")
    found = set()
    for key in tensors:
        match = _KEY.fullmatch(key)
        if match is None or match[2] not in _TARGET_OF_MODULE:
            raise ConfigError(f"{weights_file} holds {key!r}; llama_jax adapts only "
                              f"model.layers.{{i}}.{{{','.join(_TARGET_OF_MODULE)}}}.lora_{{A,B}}.weight")
        found.add(_TARGET_OF_MODULE[match[2]])
    missing = sorted({_key(i, t, m) for t in found for i in range(cfg.num_layers) for m in "AB"} - set(tensors))
    if missing:  # some layers only (PEFT's layers_to_transform / exclude_modules), or a layer beyond the base's
        raise ConfigError(f"{weights_file} lacks {missing[:4]} ({len(missing)} in all): llama_jax adapts a "
                          f"projection in all {cfg.num_layers} layers of the base")
    lora_cfg = dataclasses.replace(lora_cfg, targets=tuple(t for t in LORA_TARGETS if t in found))

    expected = jax.eval_shape(lambda: lora.init(cfg.replace(lora=lora_cfg), jax.random.key(0)))
    adapters: dict = {"layers": {}}
    for target in lora_cfg.targets:
        part = _MODULES[target][0]
        for suffix, matrix in zip(lora.SUFFIXES, "AB"):
            ours = expected["layers"][part][f"{target}{suffix}"].shape[1:]  # one layer: [in dims, r] / [r, out dims]
            theirs = (ours[-1], int(np.prod(ours[:-1]))) if matrix == "A" else (int(np.prod(ours[1:])), ours[0])
            per_layer = []
            for i in range(cfg.num_layers):
                w = tensors[_key(i, target, matrix)]
                if w.shape != theirs:
                    raise ConfigError(f"{weights_file}: {_key(i, target, matrix)} has shape {w.shape}; the base "
                                      f"model and r={lora_cfg.rank} give {theirs}")
                per_layer.append(w.T.reshape(ours))
            adapters["layers"].setdefault(part, {})[f"{target}{suffix}"] = np.stack(per_layer)
    return adapters, lora_cfg


def _lora_config(config_file: str) -> LoRA:
    """The rank, alpha, rsLoRA flag and dropout of a PEFT LoraConfig file (targets: the tensors decide); anything we
    would run differently refused."""
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {config_file}: {e}") from e
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{config_file}: peft_type is {config.get('peft_type')!r}; llama_jax reads LORA adapters")
    for field, plain in _PLAIN.items():
        if config.get(field, plain) not in (plain, None, [], {}):  # PEFT writes null, empty or the default
            raise ConfigError(f"{config_file}: {field}={config[field]!r} is not supported (llama_jax runs plain "
                              f"LoRA: {field}={plain!r})")
    targets = config.get("target_modules")
    # A list names modules by suffix ("q_proj", "self_attn.q_proj"); a string is a regex (or "all-linear"), which
    # the tensor names settle.
    listed = targets if isinstance(targets, list) else []
    ours = {module.rsplit(".", 1)[1] for module in _TARGET_OF_MODULE}
    unknown = sorted(t for t in listed if t.rsplit(".", 1)[-1] not in ours)
    if unknown:
        raise ConfigError(f"{config_file}: target_modules {unknown} are not modules llama_jax adapts "
                          f"({', '.join(sorted(ours))})")
    # lora_dropout acts only in training (the adapter's function does not depend on it); kept for training on.
    try:
        return LoRA(rank=config.get("r"), alpha=config.get("lora_alpha"), rslora=bool(config.get("use_rslora")),
                    dropout=config.get("lora_dropout") or 0.0)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{config_file}: {e}") from e
