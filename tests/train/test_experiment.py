"""The typed experiment config: every key with its default, doc and range comes from the sections, ``--help
--config`` lists exactly those, every checked key refuses a value of the wrong type naming the key, and a config file
has no side effects."""

import os
import runpy
import subprocess
import sys

import pytest
from conftest import ROOT

from llama_jax import experiment
from llama_jax.errors import ConfigError
from llama_jax.train import defaults

RECIPES = {"pretrain": defaults.pretrain_config, "sft": defaults.sft_config, "reward": defaults.reward_config,
           "dpo": defaults.dpo_config}
WRONG = {"an integer": "12", "a number": "0.5", "one of": 3, "true or false": "yes",  # of the wrong type each
         "a non-empty list": "query"}


def rows(stage: str):
    return experiment.Experiment.describe(experiment.from_config(RECIPES[stage]("tiny")))


@pytest.mark.parametrize("stage", sorted(RECIPES))
def test_every_key_has_a_default_and_a_doc_from_the_sections(stage):
    listed = rows(stage)
    keys = [key for key, *_ in listed]
    assert len(keys) == len(set(keys))
    undocumented = [key for key, _, doc, _ in listed if not doc and not key.startswith("model.")]
    assert not undocumented  # the model's fields are ModelConfig's, documented there
    sections = {key.split(".")[0] for key in keys if "." in key}
    assert sections == {"model", "data", "pipeline", "optimizer", "loss", "schedule", "train", "checkpoint",
                        "long_context", "logging", "lora"} | ({stage} if stage in experiment.STAGE_SECTIONS else set())
    values = dict((key, value) for key, value, *_ in listed)
    assert values["stage"] == stage and values["loss.vocab_chunk"] == 8192 and values["long_context.phases"] == []
    checked = [(key, expected) for key, _, _, expected in listed if expected]
    assert len(checked) >= 40


@pytest.mark.parametrize("key, expected", [(k, e) for k, _, _, e in rows("dpo") if e])
def test_a_checked_key_refuses_a_value_of_the_wrong_type_naming_it(key, expected):
    c = defaults.dpo_config("tiny")
    *sections, leaf = key.split(".")
    node = c
    for name in sections:
        node = node[name]
    bad = next(value for prefix, value in WRONG.items() if expected.startswith(prefix))
    with node.ignore_type():
        node[leaf] = bad
    with pytest.raises(ConfigError, match=f"config key {key} = {bad!r}: expected"):
        experiment.from_config(c)


def test_unknown_keys_are_refused_naming_them():
    c = defaults.pretrain_config("tiny").to_dict()
    c["schedule"]["peak_lrr"] = 1.0
    with pytest.raises(ConfigError, match=r"config section schedule has unknown key\(s\) \['peak_lrr'\]"):
        experiment.from_config(c)


def test_help_lists_the_keys_from_the_sections():
    config = ROOT / "configs" / "sft" / "tiny.py"
    listed = subprocess.run([sys.executable, "-m", "llama_jax.train", "--help", "--config", str(config)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert listed.returncode == 0, listed.stderr
    lines = [line for line in listed.stdout.splitlines() if line.startswith("  --config.")]
    c = experiment.from_config(runpy.run_path(str(config))["get_config"]())
    assert len(lines) == len(experiment.Experiment.describe(c))
    assert "  --config.optimizer.b1=0.9  # AdamW first-moment decay (a number in [0, 1))" in lines
    assert any(line.startswith("  --config.schedule.peak_lr=") for line in lines)


def test_moved_keys_still_work_on_the_command_line_for_one_release(tmp_path):
    tiny = ROOT / "configs" / "pretrain" / "tiny.py"
    result = subprocess.run([sys.executable, "-m", "llama_jax.train", "--config", str(tiny),
                             f"--config.run_dir={tmp_path / 'run'}", "--config.optimizer.z_loss=-1"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "deprecated: --config.optimizer.z_loss -> use --config.loss.z_loss" in result.stderr
    assert result.stderr.strip().endswith("error: config key loss.z_loss = -1.0: expected a number >= 0")


def test_a_config_file_writes_nothing_even_for_help(tmp_path):
    """configs/pretrain/tiny_long_context.py used to write its corpora when loaded: now only running it does."""
    config = ROOT / "configs" / "pretrain" / "tiny_long_context.py"
    listed = subprocess.run([sys.executable, "-m", "llama_jax.train", "--help", "--config", str(config)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert listed.returncode == 0, listed.stderr
    assert "--config.long_context.phases=" in listed.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # ~25 s: 44,500 generated documents
def test_running_the_long_context_config_writes_its_corpora(tmp_path):
    config = ROOT / "configs" / "pretrain" / "tiny_long_context.py"
    written = subprocess.run([sys.executable, str(config), str(tmp_path / "corpora")], capture_output=True,
                             text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert written.returncode == 0, written.stderr
    assert {p.name for p in (tmp_path / "corpora").iterdir()} >= {"passkey_short.jsonl", "copy.jsonl"}
