"""Conversion keeps what it can and refuses what it cannot: the tokenizer and max_seq_len survive llama_jax -> Meta
-> llama_jax (params.json lacks both), an HF export's tokenizer files load in transformers' AutoTokenizer and
encode text and chats exactly like our tokenizer, bos/eos ids are only written where the vocabulary has them,
and a quantized checkpoint's HF export is a clear error."""

import json
import os

import jax
import numpy as np
import pytest

from llama_jax import checkpoint, model, quantize
from llama_jax import config as config_lib
from llama_jax.convert import main as convert_main
from llama_jax.tokenizer import ByteTokenizer, Llama3Tokenizer

# Text in many scripts, code, emoji, digits and whitespace runs (long runs aside: both cut those differently).
VARIED = (
    "The quick brown fox can't jump; it's 3.14159 o'clock, ISN'T IT? I'LL see.\n"
    "Der Bär läuft über die Straße. Où est la bibliothèque ? ¿Dónde está el baño?\n"
    "नमस्ते, आप कैसे हैं? สวัสดีครับ 你好，世界！こんにちは。 Привет, мир!\n"
    "def square(x: int) -> int:\n\treturn x ** 2  # why not\n\n"
    "if (a !== b) { console.log(`${a}`); }\r\n"
    "Emoji: 👋🏽 🎉👨‍👩‍👧 ❤️ 🇩🇪   trailing   \n\n\n"
    "tabs\t\tand    runs      of whitespace\u00a0nbsp\u3000ideographic \n \n"
    "numbers 1234567 and 2024-11-05, mixed CamelCase_snake_case"
)
CHAT = [
    {"role": "system", "content": "You are terse. Environment: ipython"},
    {"role": "user", "content": "What is 2+2? Und auf Deutsch? 🙂"},
    {"role": "assistant", "content": "print(2 + 2)", "tool_call": True},
    {"role": "ipython", "content": "4"},
    {"role": "assistant", "content": "Vier.\n"},
    {"role": "user", "content": "Danke!"},
]


def _random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), model.param_shapes(cfg))


@pytest.fixture(scope="module")
def llama3():
    pytest.importorskip("llama_models", reason="the Llama 3 tokenizer.model ships with llama-models")
    return Llama3Tokenizer()


@pytest.fixture(scope="module")
def llama3_model():
    """A one-layer model with Llama 3's vocabulary (small enough to export in a second)."""
    cfg = config_lib.ModelConfig(vocab_size=128_256, dim=16, num_layers=1, num_heads=2, num_kv_heads=1, ffn_dim=32,
                                 tie_embeddings=True, rope_scaling=config_lib.RopeScaling(), max_seq_len=32_768)
    return _random_params(cfg), cfg


def _auto_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _chat_ids(hf, messages):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _read_json(path):
    return json.loads(path.read_text())


@pytest.mark.slow  # 3 s on 2 busy cores
def test_hf_export_tokenizer_encodes_like_ours(tmp_path, llama3, llama3_model):
    params, cfg = llama3_model
    checkpoint.export(str(tmp_path / "hf"), "hf", params, cfg, tokenizer=llama3)
    hf = _auto_tokenizer(tmp_path / "hf")
    assert hf(VARIED)["input_ids"] == llama3.encode(VARIED, bos=True)
    assert hf(VARIED, add_special_tokens=False)["input_ids"] == llama3.encode(VARIED)
    assert hf.decode(llama3.encode(VARIED)) == VARIED
    assert _chat_ids(hf, CHAT) == llama3.encode_dialog(CHAT, add_generation_prompt=True)[0]
    assert hf.model_max_length == cfg.max_seq_len
    # The one difference: a fast tokenizer reads special-token spellings in text as the special tokens (ours keeps
    # them text unless allowed, so user text cannot open a turn).
    spelled = "a <|eot_id|> b"
    assert hf(spelled, add_special_tokens=False)["input_ids"] == llama3.encode(spelled, allowed_special="all")

    hf_config = _read_json(tmp_path / "hf" / "config.json")
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (128_000, 128_001)
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(str(tmp_path / "hf"))
    assert sorted(generation.eos_token_id) == sorted(llama3.stop_ids) == [128_001, 128_008, 128_009]

    _, cfg_back, metadata = checkpoint.load(str(tmp_path / "hf"))
    assert metadata["tokenizer"] == {"name": "llama3", "sha256": llama3.sha256} and cfg_back == cfg


def test_byte_tokenizer_export_claims_its_own_ids(tmp_path):
    """A byte-level model's config.json must not claim Llama 3's ids 128000 / 128001 (outside its vocabulary)."""
    byte = ByteTokenizer()
    cfg = config_lib.get("tiny", num_layers=1)
    params = _random_params(cfg)
    checkpoint.export(str(tmp_path / "hf"), "hf", params, cfg, tokenizer=byte)
    hf_config = _read_json(tmp_path / "hf" / "config.json")
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (byte.bos_id, byte.eos_id) == (256, 257)
    generation = _read_json(tmp_path / "hf" / "generation_config.json")
    assert sorted(generation["eos_token_id"]) == sorted(byte.stop_ids)
    hf = _auto_tokenizer(tmp_path / "hf")
    assert hf(VARIED)["input_ids"] == byte.encode(VARIED, bos=True)
    assert _chat_ids(hf, CHAT) == byte.encode_dialog(CHAT, add_generation_prompt=True)[0]

    checkpoint.export(str(tmp_path / "unknown"), "hf", params, cfg)  # no tokenizer: no ids, no tokenizer files
    hf_config = _read_json(tmp_path / "unknown" / "config.json")
    assert "bos_token_id" not in hf_config and "eos_token_id" not in hf_config
    assert not (tmp_path / "unknown" / "tokenizer.json").exists()


@pytest.mark.parametrize("tokenizer_name", ["llama3", "byte"])
def test_llama_jax_to_meta_to_llama_jax_keeps_tokenizer_and_max_seq_len(tmp_path, tokenizer_name, request):
    tok = request.getfixturevalue("llama3") if tokenizer_name == "llama3" else ByteTokenizer()
    if tokenizer_name == "llama3":
        params, cfg = request.getfixturevalue("llama3_model")
    else:
        cfg = config_lib.get("tiny", num_layers=1, max_seq_len=1536)
        params = _random_params(cfg)
    identity = {"name": tok.name, "sha256": tok.sha256}
    checkpoint.save_params(str(tmp_path / "ckpt"), params, cfg, tokenizer=identity)
    for src, fmt, dst in (("ckpt", "meta", "meta"), ("meta", "llama_jax", "back")):
        assert convert_main(["--checkpoint", str(tmp_path / src), "--to", fmt, "--out", str(tmp_path / dst)]) == 0
    _, cfg_back, metadata = checkpoint.load(str(tmp_path / "back"))
    assert metadata["tokenizer"] == identity
    assert cfg_back.max_seq_len == cfg.max_seq_len != config_lib.ModelConfig.max_seq_len  # not the default by chance
    assert cfg_back == cfg
    # Meta's own layout holds the tokenizer.model for the Llama 3 tokenizer, byte for byte.
    copied = tmp_path / "meta" / "tokenizer.model"
    assert copied.exists() == (tokenizer_name == "llama3")
    if copied.exists():
        assert copied.read_bytes() == tok.path.read_bytes()


def test_meta_directory_from_elsewhere(tmp_path, llama3, llama3_model, capsys):
    """Without llama_jax.json: the tokenizer from the tokenizer.model Meta ships, the context length from the RoPE
    scaling (Llama 3.1's 128K), or from --max-seq-len; an unknown tokenizer is a warning that names the flag."""
    params, cfg = llama3_model
    checkpoint.export(str(tmp_path / "meta"), "meta", params, cfg, tokenizer=llama3)
    os.remove(tmp_path / "meta" / "llama_jax.json")
    _, cfg_read, metadata = checkpoint.load(str(tmp_path / "meta"))
    assert metadata["tokenizer"] == {"name": "llama3", "sha256": llama3.sha256}
    assert cfg_read.max_seq_len == 131_072
    assert convert_main(["--checkpoint", str(tmp_path / "meta"), "--to", "llama_jax", "--max-seq-len", "32768",
                         "--out", str(tmp_path / "back")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["max_seq_len"] == 32_768
    assert checkpoint.load(str(tmp_path / "back"))[1] == cfg

    tiny = config_lib.get("tiny", num_layers=1)
    checkpoint.export(str(tmp_path / "tiny-meta"), "meta", _random_params(tiny), tiny)
    assert convert_main(["--checkpoint", str(tmp_path / "tiny-meta"), "--to", "hf", "--out", str(tmp_path / "a")]) == 0
    assert "pass --tokenizer" in capsys.readouterr().err and not (tmp_path / "a" / "tokenizer.json").exists()
    assert convert_main(["--checkpoint", str(tmp_path / "tiny-meta"), "--to", "hf", "--tokenizer", "byte",
                         "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "tokenizer.json").exists()
    assert checkpoint.load(str(tmp_path / "b"))[2]["tokenizer"]["name"] == "byte"


def test_quantized_export_is_a_clear_error(tmp_path, capsys):
    cfg = config_lib.get("tiny", num_layers=2)
    quantized, quantized_cfg = quantize.quantize_params(_random_params(cfg), cfg, "int8")
    checkpoint.save_params(str(tmp_path / "int8"), quantized, quantized_cfg)
    for fmt in ("hf", "meta"):
        assert convert_main(["--checkpoint", str(tmp_path / "int8"), "--to", fmt, "--out", str(tmp_path / fmt)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "int8-quantized checkpoint cannot be exported to" in err
        assert not (tmp_path / fmt).exists()
