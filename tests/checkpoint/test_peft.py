"""PEFT adapter directories, checked against PEFT itself: an adapter written here runs in
``peft.PeftModel.from_pretrained`` on transformers' Llama with our logits, one PEFT saved runs here with theirs, and
what we cannot run is refused naming the file."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import assert_trees_equal, random_params
from safetensors import safe_open
from safetensors.numpy import save_file

from llama_jax import lora, model
from llama_jax.config import LORA_TARGETS, LoRA, ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.formats import hf, peft

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

# GQA (2 kv heads of 4) so q_proj and k_proj flatten differently; head_dim 12 != dim / heads.
CFG = ModelConfig(vocab_size=96, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12, ffn_dim=48,
                  rope_theta=10_000.0, max_seq_len=64)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12), dtype=np.int32)


def _trained(adapters, seed=3, std=0.2):
    """Adapters as training leaves them: B no longer zero, A moved."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _transformers_llama(base, directory):
    """transformers' LlamaForCausalLM loaded from our base written as an HF directory (as a user would)."""
    os.makedirs(directory)
    hf.write(str(directory), base, CFG)
    return transformers.LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def _logits(torch_model) -> np.ndarray:
    with torch.no_grad():
        return torch_model(torch.from_numpy(TOKENS).long()).logits.numpy()


def _ours(base, adapters, lora_cfg) -> np.ndarray:
    return np.asarray(model.Llama(CFG.replace(lora=lora_cfg)).apply({"params": lora.join(base, adapters)}, TOKENS))


@pytest.mark.parametrize("lora_cfg", [
    LoRA(rank=4, alpha=8.0, targets=LORA_TARGETS),
    LoRA(rank=4, alpha=6.0, targets=("query", "out", "down"), rslora=True, dropout=0.05),
])
def test_an_adapter_written_here_runs_in_peft_with_our_logits(tmp_path, lora_cfg):
    base = random_params(CFG)
    adapters = _trained(lora.init(CFG.replace(lora=lora_cfg), jax.random.key(1)))
    peft.write(tmp_path / "adapter", adapters, CFG.replace(lora=lora_cfg))
    peft_model = peft_lib.PeftModel.from_pretrained(_transformers_llama(base, tmp_path / "base"),
                                                    str(tmp_path / "adapter")).eval()
    assert peft_model.peft_config["default"].lora_dropout == lora_cfg.dropout
    theirs, ours = _logits(peft_model), _ours(base, adapters, lora_cfg)
    assert np.abs(ours - _ours(base, {}, None)).max() > 0.1  # the adapter moves the logits
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # and it reads back bit for bit
    back, back_cfg = peft.read(tmp_path / "adapter", CFG)
    assert back_cfg == lora_cfg
    assert_trees_equal(back, jax.tree.map(np.asarray, adapters))


@pytest.mark.parametrize("targets, rslora", [(["k_proj", "o_proj", "up_proj"], False), ("all-linear", True)])
def test_an_adapter_peft_saved_runs_here_with_its_logits(tmp_path, targets, rslora):
    base = random_params(CFG)
    llama = _transformers_llama(base, tmp_path / "base")
    config = peft_lib.LoraConfig(r=3, lora_alpha=5, target_modules=targets, use_rslora=rslora, lora_dropout=0.1,
                                 task_type="CAUSAL_LM")
    peft_model = peft_lib.get_peft_model(llama, config).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero: move it (and A) as training would
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    adapters, lora_cfg = peft.read(tmp_path / "adapter", CFG)
    expected_targets = ("key", "out", "up") if isinstance(targets, list) else LORA_TARGETS
    assert lora_cfg == LoRA(rank=3, alpha=5, targets=expected_targets, rslora=rslora, dropout=0.1)
    theirs = _logits(peft_model)
    assert np.abs(theirs - _ours(base, {}, None)).max() > 0.1
    np.testing.assert_allclose(_ours(base, adapters, lora_cfg), theirs, atol=1e-4, rtol=0)


def test_the_file_holds_peft_key_names_and_torch_layouts(tmp_path):
    """q_proj's B is [N*H, r] flattened as formats.hf flattens the query kernel: the merged kernel exported by
    formats.hf equals W + scale B A built from the file's two tensors."""
    lora_cfg = LoRA(rank=4, alpha=8.0, targets=("query", "out"))
    cfg = CFG.replace(lora=lora_cfg)
    base, adapters = random_params(CFG), _trained(lora.init(cfg, jax.random.key(1)))
    peft.write(tmp_path, adapters, cfg)
    merged = hf.params_to_hf(lora.merge(lora.join(base, adapters), cfg), CFG)
    plain = hf.params_to_hf(base, CFG)
    with safe_open(tmp_path / peft.WEIGHTS_FILE, "numpy") as f:
        assert len(f.keys()) == 2 * 2 * CFG.num_layers
        for i in range(CFG.num_layers):
            for module in ("self_attn.q_proj", "self_attn.o_proj"):
                prefix = f"base_model.model.model.layers.{i}.{module}"
                a, b = f.get_tensor(f"{prefix}.lora_A.weight"), f.get_tensor(f"{prefix}.lora_B.weight")
                w = plain[f"model.layers.{i}.{module}.weight"]
                assert a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4)
                np.testing.assert_allclose(merged[f"model.layers.{i}.{module}.weight"], w + 2.0 * b @ a, atol=1e-5)
    config = json.loads((tmp_path / peft.CONFIG_FILE).read_text())
    assert config["target_modules"] == ["q_proj", "o_proj"] and config["bias"] == "none"
    assert peft_lib.LoraConfig.from_pretrained(str(tmp_path)).lora_alpha == 8


def _edit_config(directory, **fields):
    path = directory / peft.CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("edit, file, message", [
    (dict(bias="all"), peft.CONFIG_FILE, "bias='all'"),
    (dict(use_dora=True), peft.CONFIG_FILE, "use_dora"),
    (dict(rank_pattern={"q_proj": 8}), peft.CONFIG_FILE, "rank_pattern"),
    (dict(target_modules=["q_proj", "w1"]), peft.CONFIG_FILE, r"\['w1'\]"),
    (dict(peft_type="IA3"), peft.CONFIG_FILE, "IA3"),
    (dict(r=8), peft.WEIGHTS_FILE, r"shape \(4, 32\).*r=8"),
])
def test_what_we_cannot_run_is_refused_naming_the_file(tmp_path, edit, file, message):
    cfg = CFG.replace(lora=LoRA(rank=4, targets=("query",)))
    peft.write(tmp_path, lora.init(cfg, jax.random.key(0)), cfg)
    _edit_config(tmp_path, **edit)
    with pytest.raises(ConfigError, match=f"{tmp_path / file}.*{message}"):
        peft.read(tmp_path, CFG)


def test_tensors_we_do_not_have_or_missing_layers_are_refused(tmp_path):
    cfg = CFG.replace(lora=LoRA(rank=4, targets=("query",)))
    adapters = lora.init(cfg, jax.random.key(0))
    peft.write(tmp_path, adapters, cfg)
    with pytest.raises(ConfigError, match="lacks .*layers.2.self_attn.q_proj.lora_A"):
        peft.read(tmp_path, CFG.replace(num_layers=3))  # an adapter for another base
    weights = tmp_path / peft.WEIGHTS_FILE
    with safe_open(weights, "numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 32), np.float32)
    save_file(tensors, weights)
    with pytest.raises(ConfigError, match=f"{weights}.*lm_head"):
        peft.read(tmp_path, CFG)


def test_a_pickled_adapter_is_never_loaded(tmp_path):
    cfg = CFG.replace(lora=LoRA(rank=4, targets=("query",)))
    peft.write(tmp_path, lora.init(cfg, jax.random.key(0)), cfg)
    os.rename(tmp_path / peft.WEIGHTS_FILE, tmp_path / peft.PICKLE_FILE)
    with pytest.raises(ConfigError, match=f"{tmp_path / peft.PICKLE_FILE} is a pickle"):
        peft.read(tmp_path, CFG)
