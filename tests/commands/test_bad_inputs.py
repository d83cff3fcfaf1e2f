"""Nothing silent (issue 12, problems 5, 6 and 8): data that cannot make progress, sampling ids the tokenizer cannot
decode, and every bad input the hostile tester tried answered by an error naming the fault (or, for text a terminal
delivers, by a warning and a result), never a traceback.

Each test feeds the input that used to fail (hang, crash or a foreign message) and checks the answer now.
"""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from conftest import ROOT, env

from llama_jax import checkpoint, config, experiment, generate, model
from llama_jax.data import make_batches
from llama_jax.errors import CheckpointError, ConfigError, DataError, TokenizerError
from llama_jax.formats import meta as meta_format
from llama_jax.quantize import quantize_params
from llama_jax.tokenizer import get_tokenizer
from llama_jax.train import loop

TINY = ROOT / "configs" / "pretrain" / "tiny.py"
BYTE = get_tokenizer("byte")


def _command(*argv, stdin: bytes | None = None):
    return subprocess.run([sys.executable.encode(), b"-m", *[a if isinstance(a, bytes) else a.encode() for a in argv]],
                          input=stdin, capture_output=True, env=env(), timeout=300)


def _data(sources, **keys):
    return dict(dict(tokenizer="byte", seq_len=32, batch_size=2, holdout_every=0), sources=sources, **keys)


def _first_batch(data_cfg):
    return next(make_batches(data_cfg, BYTE))


# --- 5. Data that cannot make progress ---------------------------------------------------------------------


def test_p5_no_valid_record_is_an_error_naming_sources_and_counts(tmp_path):
    """on_error="skip" and not one usable record used to loop forever; now the stream gives up after a bounded
    number of consecutive skips (one pass over the split) and names each source with its counts."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n{"txt": "no text key"}\nnot json\n')
    with pytest.raises(DataError) as err:
        _first_batch(_data([dict(format="jsonl", path=str(bad))], on_error="skip"))
    message = str(err.value)
    assert "cannot make progress" in message and f"0 (jsonl {bad}): 3 record(s) skipped of 3" in message
    assert f"{bad}:" in message  # an example record, by file and line

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "fine text"}) + "\n")
    batch = _first_batch(_data([dict(format="jsonl", path=str(bad)), dict(format="jsonl", path=str(good))],
                               on_error="skip"))  # one usable source is progress
    assert batch["loss_mask"].sum() > 0

    chats = tmp_path / "long.jsonl"  # every chat's reply lies past the row: all dropped, whatever on_error says
    chats.write_text("\n".join(json.dumps({"prompt": "x" * 100, "completion": "y"}) for _ in range(3)) + "\n")
    with pytest.raises(DataError, match=r"cannot make progress.*3 record\(s\) skipped of 3.*dropped"):
        _first_batch(_data([dict(format="chat", path=str(chats))]))


# --- 6. Sampling ids the tokenizer cannot decode ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """Random parameters of the tiny preset (512 ids) saved with the byte tokenizer (264 ids)."""
    cfg = config.get("tiny", num_layers=1)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    path = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    checkpoint.save_params(path, params, cfg, tokenizer={"name": BYTE.name, "sha256": BYTE.sha256})
    return path, params, cfg


@pytest.mark.slow  # 47 s on 2 busy cores
def test_p6_sampling_draws_only_ids_the_tokenizer_decodes(tiny_checkpoint):
    _, params, cfg = tiny_checkpoint
    prompt = [BYTE.encode("To be", bos=True)]
    unmasked = generate.generate(params, cfg, prompt, 48, temperature=1.5, seed=0, stop_ids=())[0]
    assert max(unmasked) >= BYTE.vocab_size  # the failure: ids past the byte tokenizer's 264
    with pytest.raises(TokenizerError):
        BYTE.decode(unmasked)
    for temperature in (0.0, 1.0, 1.5, 5.0):
        ids = generate.generate(params, cfg, prompt, 48, temperature=temperature, seed=0, stop_ids=(),
                                vocab_size=BYTE.vocab_size)[0]
        assert len(ids) == 48 and max(ids) < BYTE.vocab_size
        BYTE.decode(ids)


@pytest.mark.slow  # 20 s on 2 busy cores
def test_p6_p8_generate_command_samples_hot_from_a_non_utf8_prompt(tiny_checkpoint):
    """The command at temperature 1.5 on the tiny setup, with a prompt holding bytes that are not UTF-8 (as a
    terminal may pass them): a warning and a completion, exit 0 (TokenizerError / UnicodeEncodeError before)."""
    path, _, _ = tiny_checkpoint
    result = _command("llama_jax.generate", "--checkpoint", path, "--temperature", "1.5", "--max-new-tokens", "40",
                      "--prompt", b"caf\xc3\xa9 \xff\xfe!")
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr[-3000:]
    assert "warning: --prompt 1 holds 2 byte(s) that are not UTF-8 text" in stderr
    out = json.loads(result.stdout.decode().splitlines()[-1])
    assert 1 <= out["tokens"][0] <= 40 and isinstance(out["completions"][0], str)  # up to a stop id, or 40
    assert result.stdout.decode().startswith("café \ufffd\ufffd!")


@pytest.mark.slow  # 35 s on 2 busy cores
def test_p8_chat_survives_input_that_is_not_utf8_and_refuses_zero_new_tokens(tiny_checkpoint):
    path, _, _ = tiny_checkpoint
    result = _command("llama_jax.chat", "--checkpoint", path, "--temperature", "1.5", "--max-new-tokens", "8",
                      stdin=b"hello\n\xff\xfe oops\nstill here?\n")
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr[-3000:]
    assert "warning: input line 2 holds 2 byte(s) that are not UTF-8 text" in stderr
    assert json.loads(result.stdout.decode().splitlines()[-1]) == {"turns": 3}  # the dialog went on

    zero = _command("llama_jax.chat", "--checkpoint", path, "--max-new-tokens", "0", stdin=b"hi\n")
    assert zero.returncode == 2
    assert zero.stderr.decode().strip() == "error: --max-new-tokens must be >= 1 (tokens per reply), got 0"


# --- 8. Errors that name the fault -------------------------------------------------------------------------


BAD_VALUES = {  # one out-of-range value per checked key
    "seed": -1, "data.seq_len": 0, "data.batch_size": 0, "data.seed": -1, "data.holdout_every": -1,
    "optimizer.b1": 1.0, "optimizer.b2": -0.1, "optimizer.eps": 0.0, "optimizer.weight_decay": -0.1,
    "optimizer.clip_norm": -1.0, "optimizer.grad_accum": 0, "loss.z_loss": -1.0, "loss.vocab_chunk": -1,
    "schedule.peak_lr": -1e-3, "schedule.warmup_steps": -1, "schedule.decay_steps": 0, "schedule.min_lr_ratio": 1.5,
    "schedule.anneal_steps": -1, "schedule.total_steps": 0, "train.steps": -1, "checkpoint.every": 0,
    "checkpoint.keep_last": -1, "checkpoint.keep_every": -1, "logging.every": 0, "logging.eval_every": -1,
    "logging.eval_batches": 0, "logging.peak_tflops": -1.0, "long_context.start_step": -1,
    "long_context.gate.max_loss_increase": -0.1, "long_context.gate.min_retrieval": 1.5,
    "long_context.gate.samples": 0, "dpo.beta": 0.0, "dpo.nll_coef": -0.2, "pipeline.microbatches": 0,
    "pipeline.circular_repeats": 0, "lora.rank": -1, "lora.alpha": 0.0, "lora.dropout": 1.0,
}


def test_every_range_checked_key_has_a_bad_value_here():
    dpo = experiment.from_config(runpy.run_path(str(ROOT / "configs" / "dpo" / "tiny.py"))["get_config"]())
    ranged = {key for key, _, _, expected in experiment.Experiment.describe(dpo)
              if expected.startswith(("an integer", "a number"))}
    assert set(BAD_VALUES) == ranged


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_p8_a_bad_count_or_ratio_is_a_config_error_naming_the_key(key, tmp_path):
    stage_config = ROOT / "configs" / "dpo" / "tiny.py" if key.startswith("dpo.") else TINY  # the stage's own keys
    c = runpy.run_path(str(stage_config))["get_config"]()
    c.run_dir = str(tmp_path / "run")
    *sections, leaf = key.split(".")
    section = c
    for name in sections:
        section = section[name]
    section[leaf] = BAD_VALUES[key]
    with pytest.raises(ConfigError, match=rf"config key {key} = "):
        loop.build(c)
    assert not (tmp_path / "run").exists()


def test_p8_batch_size_not_divisible_by_grad_accum(tmp_path):
    c = runpy.run_path(str(TINY))["get_config"]()
    c.run_dir = str(tmp_path)
    c.optimizer.grad_accum = 3
    with pytest.raises(ConfigError, match=r"data.batch_size \(8\) must be a multiple of optimizer.grad_accum \(3\)"):
        loop.build(c)


@pytest.mark.slow  # 7 s on 2 busy cores
def test_p8_zero_division_keys_from_the_command_line(tmp_path):
    """checkpoint.every=0 used to end in a ZeroDivisionError traceback after the first step."""
    result = _command("llama_jax.train", f"--config={TINY}", f"--config.run_dir={tmp_path / 'run'}",
                      "--config.checkpoint.every=0")
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in stderr
    assert stderr.strip() == "error: config key checkpoint.every = 0: expected an integer >= 1"


def test_p8_data_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    for path, fmt in ((empty, "text"), (blank, "jsonl")):
        with pytest.raises(DataError, match=rf"data source 0 \({fmt} {path}\) holds no documents"):
            _first_batch(_data([dict(format=fmt, path=str(path))]))

    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"text": "a\\ud800b"}\n{"text": "fine"}\n')  # valid JSON, not valid Unicode
    with pytest.raises(DataError, match=rf"{surrogate}:1: malformed record \(field 'text' holds a lone surrogate"):
        _first_batch(_data([dict(format="jsonl", path=str(surrogate))]))
    stream = make_batches(_data([dict(format="jsonl", path=str(surrogate))], on_error="skip"), BYTE)
    next(stream)
    assert stream.skipped == [f"{surrogate}:1"]

    np.save(tmp_path / "pickled.npy", np.array([{"ids": [1, 2]}], dtype=object), allow_pickle=True)
    (tmp_path / "garbage.npy").write_bytes(b"these are not token ids")
    np.save(tmp_path / "whole.npy", np.arange(1000, dtype=np.int32) % 200)
    whole = (tmp_path / "whole.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(whole[: len(whole) // 2])
    for name, why in (("pickled", "holds pickled Python objects, which are never loaded"),
                      ("garbage", r"not a .npy file \(no NUMPY header\)"),
                      ("truncated", "not a readable .npy array of token ids")):
        with pytest.raises(DataError, match=rf"{tmp_path / name}.npy: {why}"):
            _first_batch(_data([dict(format="tokens", path=str(tmp_path / f"{name}.npy"))]))


def test_p8_lone_surrogates_are_a_tokenizer_error():
    with pytest.raises(TokenizerError, match=r"lone surrogate '\\udcff' at character 3"):
        BYTE.encode("abc\udcffdef")


@pytest.fixture(scope="module")
def meta_dirs(tmp_path_factory):
    """A tiny Meta checkpoint in one and in two model-parallel shards."""
    cfg = config.get("tiny", num_layers=1)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), model.param_shapes(cfg))
    root = tmp_path_factory.mktemp("meta")
    for shards in (1, 2):
        checkpoint.export(str(root / f"shards{shards}"), "meta", params, cfg, num_shards=shards)
    return root


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def test_p8_meta_checkpoint_errors_name_the_key_and_tensor(meta_dirs, tmp_path):
    bad = _copy(meta_dirs / "shards1", tmp_path / "multiple_of")
    params = json.loads((bad / "params.json").read_text())
    (bad / "params.json").write_text(json.dumps({**params, "multiple_of": 0}))
    with pytest.raises(CheckpointError, match=r"params.json: multiple_of must be a positive integer .* got 0"):
        checkpoint.load(str(bad))

    for shards in (1, 2):
        for name, reshape, rank in (("layers.0.attention.wo.weight", lambda t: t.reshape(-1), 2),
                                    ("norm.weight", lambda t: t[None, :], 1)):
            bad = _copy(meta_dirs / f"shards{shards}", tmp_path / f"rank-{shards}-{name}")
            state = torch.load(bad / "consolidated.00.pth", weights_only=True)
            state[name] = reshape(state[name])
            torch.save(state, bad / "consolidated.00.pth")
            with pytest.raises(CheckpointError, match=rf"consolidated.00.pth: tensor '{name}' has shape .* has "
                                                      rf"{rank} dimension"):
                checkpoint.load(str(bad))

    with pytest.raises(CheckpointError, match="num_shards .* must be an integer >= 1, got 0"):
        meta_format.write(str(tmp_path), *checkpoint.load(str(meta_dirs / "shards1"))[:2], num_shards=0)


def test_convert_names_a_second_shard_split_another_way(meta_dirs, tmp_path):
    """Issue 27, item 11: consolidated.01.pth holding a part of the right size along the split dimension but not
    along the other (split like another checkpoint's) ended in numpy's "could not broadcast" and exit 1."""
    bad = _copy(meta_dirs / "shards2", tmp_path / "resplit")
    name = "layers.0.attention.wo.weight"  # [dim, heads * head_dim], split along its columns
    state = torch.load(bad / "consolidated.01.pth", weights_only=True)
    state[name] = state[name][: state[name].shape[0] // 2].clone()
    torch.save(state, bad / "consolidated.01.pth")
    result = _command("llama_jax.convert", "--checkpoint", str(bad), "--to", "llama_jax", "--out",
                      str(tmp_path / "out"))
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"error: {bad / 'consolidated.01.pth'}: {name!r} is float32[64, 64]; the part of each rank is "
        f"float32[128, 64] (rank 0's, split along dim 1)")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # 22 s on 2 busy cores
def test_p8_convert_refuses_zero_shards_and_quantized_to_hf(meta_dirs, tmp_path):
    result = _command("llama_jax.convert", "--checkpoint", str(meta_dirs / "shards1"), "--to", "meta",
                      "--num-shards", "0", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.decode().strip() == ("error: --num-shards must be >= 1 (model-parallel ranks of a Meta "
                                              "export), got 0")

    params, cfg, _ = checkpoint.load(str(meta_dirs / "shards1"))
    checkpoint.save_params(str(tmp_path / "int8"), *quantize_params(params, cfg, "int8"))
    result = _command("llama_jax.convert", "--checkpoint", str(tmp_path / "int8"), "--to", "hf",
                      "--out", str(tmp_path / "hf"))
    assert result.returncode == 2 and "Traceback" not in result.stderr.decode()
    assert "error: a int8-quantized checkpoint cannot be exported to hf" in result.stderr.decode()
    assert not (tmp_path / "hf").exists()
