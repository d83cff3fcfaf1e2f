"""The network against transformers' PyTorch Llama on three tiny shapes, from our weights and from theirs."""

import numpy as np
import pytest
from conftest import PARITY_CONFIGS, SEQ_LEN, our_logits, random_params

from llama_jax import config
from llama_jax.config import ModelConfig
from llama_jax.formats.hf import params_from_hf, params_to_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_model(cfg: ModelConfig, state_dict: dict | None = None):
    hf_cfg = transformers.LlamaConfig(**config.to_hf(cfg))
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    if state_dict is not None:
        missing, unexpected = m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                                                strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        if cfg.tie_embeddings:
            m.tie_weights()
    return m


def hf_logits(m, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(tokens).long()).logits.numpy()


@pytest.mark.parametrize("name", [
    "mha",
    pytest.param("gqa4_llama3_rope", marks=pytest.mark.slow),  # 5 s on 2 busy cores
    pytest.param("tied_head_dim", marks=pytest.mark.slow),  # 5 s on 2 busy cores
])
def test_logits_match_transformers_from_our_weights(name):
    cfg = PARITY_CONFIGS[name]
    params = random_params(cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, SEQ_LEN[name]), dtype=np.int32)
    reference = hf_logits(hf_model(cfg, params_to_hf(params, cfg)), tokens)
    assert np.abs(reference).max() > 1.0  # logits large enough for the tolerance to mean something
    np.testing.assert_allclose(our_logits(cfg, params, tokens), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_match_transformers_from_hf_weights(name):
    cfg = PARITY_CONFIGS[name]
    m = hf_model(cfg)
    with torch.no_grad():  # HF's default init is tiny (std 0.02): widen it so the logits carry signal
        for p in m.parameters():
            p.normal_(1.0 if p.ndim == 1 else 0.0, 0.15)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, SEQ_LEN[name]), dtype=np.int32)
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    params = params_from_hf(sd, cfg)
    np.testing.assert_allclose(our_logits(cfg, params, tokens), hf_logits(m, tokens), atol=1e-4, rtol=0)
    # and back: the exported state dict is the one we read, bit for bit
    back = params_to_hf(params, cfg)
    expected = {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for k in back:
        np.testing.assert_array_equal(back[k], expected[k], err_msg=k)
