"""HF safetensors and Meta .pth directories: exact round trips, transformers parity, Meta's published
conversion rules, and clear errors (with nothing written) for bad input."""

import json
import os
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import assert_trees_equal
from safetensors import safe_open

from llama_jax import checkpoint, model, sharding
from llama_jax import config as config_lib
from llama_jax.config import RopeScaling
from llama_jax.convert import main as convert_main
from llama_jax.errors import CheckpointError
from llama_jax.formats import hf_tokenizer
from llama_jax.tokenizer import ByteTokenizer, Llama3Tokenizer

BASE = config_lib.get("tiny", num_layers=2)
CONFIGS = {
    "gqa-f32": BASE,
    "tied-bf16": BASE.replace(tie_embeddings=True, param_dtype="bfloat16", dtype="bfloat16"),
    "scaled-rope": BASE.replace(rope_scaling=RopeScaling(factor=8.0), max_seq_len=32_768),
    "mha-8-heads": BASE.replace(num_heads=8, num_kv_heads=8),  # splits 8 ways like 70B / 405B
    "tied-f32": BASE.replace(tie_embeddings=True),
}


def _params(cfg, seed=0):
    """Random weights in cfg.param_dtype (numpy: no init compile), norm scales near 1."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        scale = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return (scale + 0.05 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, model.param_shapes(cfg))


def read(path):
    """(params, cfg) of any format, as checkpoint.load gives them."""
    params, cfg, _ = checkpoint.load(path)
    return params, cfg


def _no_partial_dirs(parent):
    return not [n for n in os.listdir(parent) if ".partial-" in n]


# --- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("max_shard_bytes", [None, 300_000])
def test_hf_round_trip(tmp_path, name, max_shard_bytes):
    cfg = CONFIGS[name]
    params = _params(cfg)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    checkpoint.export(str(tmp_path / "hf"), "hf", params, cfg, **kwargs)
    files = sorted(os.listdir(tmp_path / "hf"))
    if max_shard_bytes is None:
        assert files == ["config.json", "llama_jax.json", "model.safetensors"]  # no tokenizer: no tokenizer files
    else:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 2
    with safe_open(str(tmp_path / "hf" / [f for f in files if f.endswith(".safetensors")][0]), "numpy") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16" if cfg.param_dtype == "bfloat16" else "F32"}

    back, cfg_back = read(str(tmp_path / "hf"))
    assert_trees_equal(back, params)
    assert cfg_back == cfg


@pytest.mark.parametrize("name,shards", [("gqa-f32", 1), ("gqa-f32", 2), ("tied-bf16", 2), ("scaled-rope", 1),
                                         ("mha-8-heads", 8)])
def test_meta_round_trip(tmp_path, name, shards):
    cfg = CONFIGS[name]
    params = _params(cfg)
    checkpoint.export(str(tmp_path / "meta"), "meta", params, cfg, num_shards=shards)
    files = sorted(os.listdir(tmp_path / "meta"))
    assert set(files) == {"params.json", "llama_jax.json"} | {f"consolidated.{r:02d}.pth" for r in range(shards)}
    back, cfg_back = read(str(tmp_path / "meta"))
    assert_trees_equal(back, params)
    assert cfg_back == cfg  # params.json lacks the context length: llama_jax.json carries it


def test_llama_jax_export_round_trip(tmp_path):
    cfg = CONFIGS["tied-bf16"]
    params = _params(cfg)
    checkpoint.export(str(tmp_path / "ckpt"), "llama_jax", params, cfg, tokenizer=ByteTokenizer())
    loaded, cfg_back, meta = checkpoint.load(str(tmp_path / "ckpt"))
    assert_trees_equal(jax.tree.map(np.asarray, loaded), params)
    assert cfg_back == cfg and meta["stage"] == "export" and meta["tokenizer"]["name"] == "byte"


# --- transformers parity -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gqa-f32", "scaled-rope", "tied-f32"])
def test_transformers_loads_our_export(tmp_path, name):
    from transformers import LlamaForCausalLM

    cfg = CONFIGS[name]
    params = _params(cfg, seed=3)
    checkpoint.export(str(tmp_path / "hf"), "hf", params, cfg, max_shard_bytes=500_000)
    hf_model = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(model.Llama(cfg).apply({"params": params}, tokens))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.abs(theirs).max() > 0.1  # the comparison is not between two near-zero arrays


# --- Meta -> HF against the published conversion rules --------------------------------------------------


def _reference_permute(w, n_heads, dim1, dim2):
    """HF's convert_llama_weights_to_hf.py permutation, from its published formula."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _write_meta_by_hand(path, cfg, shards, seed=0):
    """A Meta-layout checkpoint written from torch tensors, sharded per Meta's llama3 fairscale layers."""
    gen = torch.Generator().manual_seed(seed)
    d, f, v, h = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.resolved_head_dim
    shapes = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    for i in range(cfg.num_layers):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (cfg.num_heads * h, d),
            f"layers.{i}.attention.wk.weight": (cfg.num_kv_heads * h, d),
            f"layers.{i}.attention.wv.weight": (cfg.num_kv_heads * h, d),
            f"layers.{i}.attention.wo.weight": (d, cfg.num_heads * h),
            f"layers.{i}.feed_forward.w1.weight": (f, d), f"layers.{i}.feed_forward.w3.weight": (f, d),
            f"layers.{i}.feed_forward.w2.weight": (d, f),
            f"layers.{i}.attention_norm.weight": (d,), f"layers.{i}.ffn_norm.weight": (d,),
        })
    full = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in shapes.items()}
    columns = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight",
               "tok_embeddings.weight")  # ColumnParallelLinear / VocabParallelEmbedding: dim 0
    rows = ("wo.weight", "w2.weight")  # RowParallelLinear: dim 1
    os.makedirs(path)
    for r in range(shards):
        shard = {}
        for k, w in full.items():
            if k.endswith(columns):
                w = w.chunk(shards, dim=0)[r]
            elif k.endswith(rows):
                w = w.chunk(shards, dim=1)[r]
            shard[k] = w.clone()
        torch.save(shard, os.path.join(path, f"consolidated.{r:02d}.pth"))
    params = {"dim": d, "n_layers": cfg.num_layers, "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_kv_heads,
              "vocab_size": v, "multiple_of": 128, "ffn_dim_multiplier": None, "norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "use_scaled_rope": True}
    with open(os.path.join(path, "params.json"), "w") as fh:
        json.dump(params, fh)
    return full


@pytest.mark.parametrize("name,shards", [("gqa-f32", 1), ("gqa-f32", 2), ("mha-8-heads", 8)])
def test_meta_to_hf_matches_reference_conversion(tmp_path, name, shards):
    cfg = CONFIGS[name]  # ffn_dim 384 = 8 * 128 / 3 rounded up to a multiple of 128, as params.json says
    full = _write_meta_by_hand(str(tmp_path / "meta"), cfg, shards)
    assert convert_main(["--from", "meta", "--to", "hf",
                         "--checkpoint", str(tmp_path / "meta"), "--out", str(tmp_path / "hf")]) == 0

    h = cfg.resolved_head_dim
    reference = {"model.embed_tokens.weight": full["tok_embeddings.weight"], "model.norm.weight": full["norm.weight"],
                 "lm_head.weight": full["output.weight"]}
    for i in range(cfg.num_layers):
        m, o = f"layers.{i}.", f"model.layers.{i}."
        reference.update({
            o + "self_attn.q_proj.weight": _reference_permute(full[m + "attention.wq.weight"], cfg.num_heads,
                                                              cfg.num_heads * h, cfg.dim),
            o + "self_attn.k_proj.weight": _reference_permute(full[m + "attention.wk.weight"], cfg.num_kv_heads,
                                                              cfg.num_kv_heads * h, cfg.dim),
            o + "self_attn.v_proj.weight": full[m + "attention.wv.weight"],
            o + "self_attn.o_proj.weight": full[m + "attention.wo.weight"],
            o + "mlp.gate_proj.weight": full[m + "feed_forward.w1.weight"],
            o + "mlp.down_proj.weight": full[m + "feed_forward.w2.weight"],
            o + "mlp.up_proj.weight": full[m + "feed_forward.w3.weight"],
            o + "input_layernorm.weight": full[m + "attention_norm.weight"],
            o + "post_attention_layernorm.weight": full[m + "ffn_norm.weight"],
        })
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as fh:
        ours = {k: fh.get_tensor(k) for k in fh.keys()}
    assert set(ours) == set(reference)
    for k, want in reference.items():
        assert ours[k].dtype == torch.bfloat16
        assert torch.equal(ours[k], want), k
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["rope_scaling"]["rope_type"] == "llama3" and hf_config["rope_scaling"]["factor"] == 8.0
    assert hf_config["intermediate_size"] == cfg.ffn_dim


# --- bad input: a clear CheckpointError naming the file, and nothing written -----------------------------


def _run_cli_expecting_failure(tmp_path, capsys, src, fmt, needle):
    dst = tmp_path / "out"
    assert convert_main(["--from", fmt, "--to", "llama_jax", "--checkpoint", str(src), "--out", str(dst)]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not dst.exists() and _no_partial_dirs(tmp_path)
    return err


def test_truncated_safetensors(tmp_path, capsys):
    checkpoint.export(str(tmp_path / "hf"), "hf", _params(BASE), BASE)
    file = tmp_path / "hf" / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read(str(tmp_path / "hf"))
    _run_cli_expecting_failure(tmp_path, capsys, tmp_path / "hf", "hf", str(file))


def test_missing_hf_shard(tmp_path, capsys):
    checkpoint.export(str(tmp_path / "hf"), "hf", _params(BASE), BASE, max_shard_bytes=300_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    second = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / "hf" / second)
    _run_cli_expecting_failure(tmp_path, capsys, tmp_path / "hf", "hf", f"shard {tmp_path / 'hf' / second}")


def test_missing_meta_shard(tmp_path, capsys):
    checkpoint.export(str(tmp_path / "meta"), "meta", _params(BASE), BASE, num_shards=2)
    checkpoint.export(str(tmp_path / "meta4"), "meta", _params(BASE.replace(num_kv_heads=4)),
                  BASE.replace(num_kv_heads=4), num_shards=4)
    os.remove(tmp_path / "meta4" / "consolidated.01.pth")
    _run_cli_expecting_failure(tmp_path, capsys, tmp_path / "meta4", "meta", "consolidated.01.pth")
    os.remove(tmp_path / "meta" / "consolidated.01.pth")  # the last rank: only the shapes can tell
    _run_cli_expecting_failure(tmp_path, capsys, tmp_path / "meta", "meta", "params.json disagrees")


class _Exploit:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def test_pickled_code_in_pth_does_not_run(tmp_path, capsys):
    cfg = BASE
    checkpoint.export(str(tmp_path / "meta"), "meta", _params(cfg), cfg)
    sentinel = tmp_path / "pwned"
    torch.save({"tok_embeddings.weight": _Exploit(sentinel)}, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        read(str(tmp_path / "meta"))
    _run_cli_expecting_failure(tmp_path, capsys, tmp_path / "meta", "meta", "consolidated.00.pth")
    assert not sentinel.exists()


def test_params_json_disagreeing_with_tensors(tmp_path, capsys):
    checkpoint.export(str(tmp_path / "meta"), "meta", _params(BASE), BASE, num_shards=2)
    params_file = tmp_path / "meta" / "params.json"
    params = json.loads(params_file.read_text())
    params["n_layers"] = 3
    params["ffn_dim_multiplier"] = 1.5  # derives ffn 512, tensors have 384
    params_file.write_text(json.dumps(params))
    err = _run_cli_expecting_failure(tmp_path, capsys, tmp_path / "meta", "meta", "params.json disagrees")
    assert "missing layers.2.attention.wq.weight" in err
    assert "layers.0.feed_forward.w1.weight: tensors give [384, 128], params.json implies [512, 128]" in err


def test_refuses_existing_destination_and_wrong_format(tmp_path, capsys):
    checkpoint.export(str(tmp_path / "hf"), "hf", _params(BASE), BASE)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    assert convert_main(["--to", "meta", "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "file").read_text() == "keep me"
    assert convert_main(["--from", "meta", "--to", "hf",
                         "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "x")]) == 2
    assert "looks like a 'hf' checkpoint" in capsys.readouterr().err


def test_load_detects_each_format(tmp_path):
    params = _params(BASE)
    for fmt in ("hf", "meta", "llama_jax"):
        checkpoint.export(str(tmp_path / fmt), fmt, params, BASE)
        assert checkpoint.detect_format(str(tmp_path / fmt)) == fmt
        loaded, cfg, _ = checkpoint.load(str(tmp_path / fmt))
        assert isinstance(jax.tree.leaves(loaded)[0], jax.Array)
        assert_trees_equal(jax.tree.map(np.asarray, loaded), params)
        assert cfg.dim == BASE.dim
    with pytest.raises(CheckpointError, match="neither"):
        checkpoint.detect_format(str(tmp_path))

    mesh = sharding.make_mesh("tensor=2,fsdp=4")
    loaded, _, meta = checkpoint.load(str(tmp_path / "hf"), shardings=mesh)
    assert meta["format"] == "hf"
    want = model.param_shardings(BASE, mesh)
    assert all(a.sharding == s for a, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)))
    assert_trees_equal(jax.tree.map(np.asarray, loaded), params)


def test_bf16_stays_bf16_through_every_format(tmp_path):
    cfg = CONFIGS["tied-bf16"]
    params = _params(cfg)
    assert params["embedding"].dtype == ml_dtypes.bfloat16
    checkpoint.export(str(tmp_path / "meta"), "meta", params, cfg, num_shards=2)
    assert convert_main(["--to", "hf", "--checkpoint", str(tmp_path / "meta"), "--out", str(tmp_path / "hf")]) == 0
    assert convert_main(["--to", "llama_jax",
                         "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert convert_main(["--to", "meta", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "meta2")]) == 0
    back, cfg_back = read(str(tmp_path / "meta2"))
    assert_trees_equal(back, params)
    assert cfg_back.param_dtype == "bfloat16" and cfg_back.tie_embeddings


# --- the exported chat template ----------------------------------------------------------------------------


@pytest.mark.slow  # 7 s on 2 busy cores: the Llama 3 tokenizer's files, loaded by transformers
def test_exported_chat_template_encodes_like_meta_unless_content_starts_with_a_newline(tmp_path):
    """Meta's ChatFormat (and our encoder) encodes a header's "\n\n" apart from the content; the exported template
    renders one string, in which content that starts with "\n" merges with them. The docs state that one exception."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("llama_models", reason="the Llama 3 tokenizer.model ships with llama-models")
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    tok = Llama3Tokenizer()
    for name, content in hf_tokenizer.tokenizer_files(tok, model_max_length=4096).items():
        (tmp_path / name).write_text(json.dumps(content))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    meta = ChatFormat(MetaTokenizer.get_instance())
    for content in ["Hello\n", " Hello", "\tTab", " \nHi", "\r\nHi", "\nHello", "\n\nHi"]:
        ours = tok.encode_dialog([{"role": "user", "content": content}], add_generation_prompt=True)[0]
        assert ours == meta.encode_dialog_prompt([RawMessage(role="user", content=content)]).tokens
        template = hf.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        template = list(template["input_ids"] if hasattr(template, "keys") else template)
        assert (template == ours) == (not content.startswith("\n")), repr(content)
    doc = (Path(__file__).parents[2] / "docs" / "coming-from-hf-maxtext.md").read_text()
    assert "starts with a newline" in " ".join(doc.split())
