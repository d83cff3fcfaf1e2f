"""Presets, Hugging Face config dicts in both rope spellings, and config errors."""

import pytest

from llama_jax import config
from llama_jax.config import ModelConfig, RopeScaling
from llama_jax.errors import ConfigError

transformers = pytest.importorskip("transformers")

LLAMA31_8B_HF = {  # the published config.json of Llama 3.1 8B (transformers 4.4x spelling)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}


def test_from_hf_reads_the_published_8b_config():
    cfg = config.from_hf(LLAMA31_8B_HF)
    preset = config.get("llama3.1-8b")
    shape_fields = ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim", "norm_eps",
                    "rope_theta", "rope_scaling", "max_seq_len", "tie_embeddings")
    assert {f: getattr(cfg, f) for f in shape_fields} == {f: getattr(preset, f) for f in shape_fields}
    assert cfg.num_params() == 8_030_261_248


def test_from_hf_reads_transformers_v5_rope_parameters():
    hf = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=4096, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 123.0, "factor": 16.0, "low_freq_factor": 2.0,
                         "high_freq_factor": 8.0, "original_max_position_embeddings": 512},
    ).to_dict()
    assert "rope_parameters" in hf
    cfg = config.from_hf(hf)
    assert cfg.rope_theta == 123.0 and cfg.tie_embeddings and cfg.num_kv_heads == 2
    assert cfg.rope_scaling == RopeScaling(factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0,
                                           original_max_position=512)


@pytest.mark.parametrize("name", ["llama3.1-70b", "llama3.2-1b", "tiny"])
def test_to_hf_round_trips_and_transformers_accepts_it(name):
    cfg = config.get(name)
    d = config.to_hf(cfg)
    back = config.from_hf(d)
    assert back.replace(param_dtype=cfg.param_dtype, dtype=cfg.dtype) == cfg  # dtypes are the loader's choice
    hf = transformers.LlamaConfig(**d)
    assert (hf.hidden_size, hf.num_key_value_heads, hf.tie_word_embeddings) == (cfg.dim, cfg.num_kv_heads,
                                                                                cfg.tie_embeddings)
    assert config.from_hf(hf.to_dict()).replace(param_dtype=cfg.param_dtype, dtype=cfg.dtype) == cfg


def test_model_config_dict_round_trip():
    cfg = config.get("llama3.1-405b")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 3}, r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
        ({"hidden_size": 66}, r"dim \(66\) must be divisible by num_heads \(4\)"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"model_type": "mistral"}, "model_type 'mistral'"),
        ({"sliding_window": 4096}, r"does not understand: \['sliding_window'\]"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks 'low_freq_factor'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0},
          "rope_parameters": {"rope_type": "llama3", "factor": 4.0}}, "disagrees"),
    ],
)
def test_bad_hf_configs_are_rejected_with_the_reason(change, message):
    d = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, **change}
    with pytest.raises(ConfigError, match=message):
        config.from_hf(d)


def test_missing_hf_field_and_bad_values():
    with pytest.raises(ConfigError, match=r"lacks required field\(s\) \['intermediate_size'\]"):
        config.from_hf({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2})
    with pytest.raises(ConfigError, match="remat must be one of"):
        config.get("tiny", remat="sometimes")
    with pytest.raises(ConfigError, match="num_layers must be a positive int"):
        config.get("tiny", num_layers=0)
