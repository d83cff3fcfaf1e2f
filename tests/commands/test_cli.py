"""Every command speaks one language: --help works, and a missing checkpoint, an unknown flag, an unknown config key
or a bad mesh is `error: ...` on stderr and exit status 2, never a traceback."""

import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from conftest import ROOT, env

from llama_jax import chat, checkpoint, cli, config, convert, generate, model, plan, quantize
from llama_jax.errors import ConfigError
from llama_jax.eval import perplexity, retrieval, word_count
from llama_jax.posttrain import average, reference_logps, rejection_sample, score
from llama_jax.tools import synthetic
from llama_jax.train import __main__ as train

TINY = str(ROOT / "configs" / "pretrain" / "tiny.py")
COMMANDS = {"train": train, "convert": convert, "generate": generate, "chat": chat, "quantize": quantize,
            "plan": plan, "eval.retrieval": retrieval, "tools.synthetic": synthetic,
            "posttrain.score": score, "posttrain.rejection_sample": rejection_sample,
            "posttrain.reference_logps": reference_logps, "eval.word_count": word_count, "eval": perplexity,
            "posttrain.average": average}
WITH_CHECKPOINT = {"convert": ["--to", "hf", "--out", "OUT"], "generate": ["--prompt", "x"], "chat": [],
                   "quantize": ["--out", "OUT"], "eval.retrieval": [], "eval": ["--data", "x.txt"],
                   "posttrain.rejection_sample": ["--reward", "OUT", "--input", "prompts.jsonl", "--out", "OUT"],
                   "posttrain.score": ["--input", "x.jsonl", "--out", "OUT"], "posttrain.average": ["--out", "OUT"]}
WITH_MESH = {"generate": ["--prompt", "x"], "chat": [], "eval": ["--data", "x.txt"]}


def _run(*argv):
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=env(), timeout=300)


# Slow to start on 2 busy cores (their imports): chat 10 s, convert 7, eval.retrieval 7, train 7, eval 6,
# tools.synthetic 5, score 3; the others start in under 3 s.
SLOW_TO_START = {"chat", "convert", "eval.retrieval", "train", "eval", "tools.synthetic", "score"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TO_START else n
                                  for n in sorted(COMMANDS)])
def test_help_and_an_unknown_flag_from_the_shell(name):
    shown = _run(f"llama_jax.{name}", "--help")
    assert shown.returncode == 0 and "--coordinator" in shown.stdout, shown.stderr[-2000:]
    wrong = _run(f"llama_jax.{name}", "--no-such-flag")
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: ") and "Traceback" not in wrong.stderr


def _fails(main, argv, capsys, needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("name", sorted(WITH_CHECKPOINT))
def test_missing_checkpoint(name, tmp_path, capsys):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in WITH_CHECKPOINT[name]]
    _fails(COMMANDS[name].main, ["--checkpoint", str(tmp_path / "missing"), *argv], capsys, "missing")


@pytest.mark.parametrize("name", sorted(WITH_MESH))
def test_bad_mesh(name, tmp_path, capsys):
    cfg = config.get("tiny", num_layers=1, dim=32, num_heads=2, num_kv_heads=1, ffn_dim=64)
    path = str(tmp_path / "ckpt")
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), model.param_shapes(cfg))
    checkpoint.save_params(path, zeros, cfg, tokenizer={"name": "byte", "sha256": "-"})
    _fails(COMMANDS[name].main, ["--checkpoint", path, "--mesh", "tensr=2", *WITH_MESH[name]], capsys, "tensr")


def test_config_commands_reject_unknown_keys_and_bad_meshes(tmp_path, capsys):
    _fails(train.main, ["--config", TINY, "--config.optimizer.peak_lr=1"], capsys, "optimizer.peak_lr")
    _fails(train.main, ["--config", TINY, "--config.nonsense=1"], capsys, "nonsense")
    _fails(train.main, ["--config", TINY, f"--config.run_dir={tmp_path}", "--config.mesh=fsdp=3"], capsys,
           "fsdp=3")
    _fails(plan.main, ["--config", TINY, "--config.schedule.nope=2"], capsys, "schedule.nope")
    _fails(plan.main, ["--mesh", "fsdp=0"], capsys, "fsdp=0")
    _fails(train.main, ["--config.run_dir=x"], capsys, "needs --config")
    _fails(train.main, ["--config", str(tmp_path / "none.py")], capsys, "does not exist")


def test_config_overrides_parse_as_the_type_they_replace():
    c = ml_collections.ConfigDict({"a": 1, "b": 0.5, "c": "x", "d": True, "e": [1], "f": None,
                                   "s": {"g": 2}})
    c.lock()
    for key, text in (("a", "3"), ("b", "2e-3"), ("c", "y"), ("d", "false"), ("e", '[{"k": 1}]'), ("f", "None"),
                      ("s.g", "7")):
        cli.set_key(c, key, text)
    assert (c.a, c.b, c.c, c.d, c.e, c.f, c.s.g) == (3, 2e-3, "y", False, [{"k": 1}], None, 7)
    for key, text, needle in (("a", "x", "invalid literal"), ("d", "maybe", "true or false"),
                              ("s", "1", "is a section"), ("s.h", "1", "unknown config key 's.h'"),
                              ("z.y", "1", "unknown config key 'z'")):
        with pytest.raises(ConfigError, match=needle):
            cli.set_key(c, key, text)


def test_help_with_config_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", TINY, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--config.schedule.peak_lr=0.003" in out and "--config.data.sources=" in out


def test_a_misspelt_key_in_a_config_file_is_an_error(tmp_path, capsys):
    path = tmp_path / "typo.py"
    path.write_text("from llama_jax.train.defaults import sft_config\n\n"
                    "def get_config():\n    c = sft_config('tiny')\n    c.schedule.peak_lrr = 1.0\n    return c\n")
    _fails(train.main, ["--config", str(path)], capsys, "unknown key peak_lrr (did you mean 'peak_lr'?)")
