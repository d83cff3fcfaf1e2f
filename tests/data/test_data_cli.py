"""Own data from the command line: ``--data PATH[:FORMAT]`` with the format read from the extension (and a JSONL
file's first record), and ``configs/pretrain/tiny.py:my.jsonl`` reading JSONL as JSONL."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, env

from llama_jax import cli
from llama_jax.data import make_batches, source_spec
from llama_jax.errors import ConfigError, DataError
from llama_jax.tokenizer import ByteTokenizer

TINY = str(ROOT / "configs" / "pretrain" / "tiny.py")
WORDS = "the king queen lord night day love death sword crown heart fair foul sleep dream".split()


def _jsonl(path: Path, records) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture
def documents(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    return _jsonl(tmp_path / "my.jsonl", [{"id": i, "text": " ".join(rng.choice(WORDS, 12)) + "."} for i in range(60)])


def test_format_from_extension_and_record_shape(tmp_path, documents):
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    np.save(tmp_path / "ids.npy", np.arange(10, dtype=np.int32))
    chats = _jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}])
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "hi", "completion": "hello"}])
    prefs = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": "hi", "chosen": "hello", "rejected": "go"}])
    assert source_spec(str(tmp_path / "a.txt")) == {"format": "text", "path": str(tmp_path / "a.txt"), "weight": 1.0,
                                                    "split": "paragraphs"}
    assert source_spec(str(documents))["format"] == "jsonl" and source_spec(str(documents))["text_key"] == "text"
    assert source_spec(str(chats))["format"] == "chat" and source_spec(str(pairs))["format"] == "chat"
    assert source_spec(str(prefs))["format"] == "preference"
    assert source_spec(str(tmp_path / "ids.npy"))["format"] == "tokens"
    assert source_spec(str(tmp_path / "*.txt"))["format"] == "text"  # globs and directories: by their files
    assert source_spec(f"{documents}:text") == {"format": "text", "path": str(documents), "weight": 1.0,
                                                "split": "paragraphs"}  # a named format wins

    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"notes\.csv.*\.csv.*:FORMAT"):
        source_spec(str(tmp_path / "notes.csv"))
    with pytest.raises(ConfigError, match="extension"):  # one source of mixed formats
        source_spec(str(tmp_path))
    with pytest.raises(DataError, match="no data files match"):
        source_spec(str(tmp_path / "missing.jsonl"))


def test_tiny_config_reads_jsonl_as_jsonl(documents):
    """It used to read the file as plain text: one document, then "the train split ... is empty"."""
    config = cli.load_config(f"{TINY}:{documents}")
    assert config.data.sources[0]["format"] == "jsonl"
    batch = next(make_batches(config.data, ByteTokenizer()))
    text = ByteTokenizer().decode(batch["tokens"].ravel().tolist())
    assert "king" in text or "queen" in text or "night" in text
    assert '"text"' not in text and '"id"' not in text  # the records' text, not their JSON


@pytest.mark.slow  # 18 s on 2 busy cores
def test_train_from_the_command_line_with_data(documents, tmp_path):
    command = env()
    shown = subprocess.run([sys.executable, "-m", "llama_jax.train", "--help"], capture_output=True, text=True,
                           env=command, timeout=120)
    assert "--data PATH[:FORMAT]" in shown.stdout and ".jsonl" in shown.stdout
    run = subprocess.run([sys.executable, "-m", "llama_jax.train", "--config", TINY, "--data", str(documents),
                          f"--config.run_dir={tmp_path / 'run'}", "--config.train.steps=2",
                          "--config.logging.eval_every=2"], capture_output=True, text=True, env=command, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1])["step"] == 2
    saved = json.loads(next((tmp_path / "run" / "checkpoints" / "2" / "metadata").glob("*.json")).read_text())
    assert saved["stage_config"]["data"]["sources"] == [{"format": "jsonl", "path": str(documents), "weight": 1.0,
                                                          "text_key": "text"}]

    chats = _jsonl(tmp_path / "chats.jsonl", [{"prompt": "hi", "completion": "hello"}] * 20)
    wrong = subprocess.run([sys.executable, "-m", "llama_jax.train", "--config", TINY, "--data", str(chats),
                            f"--config.run_dir={tmp_path / 'chat-run'}"], capture_output=True, text=True, env=command,
                           timeout=300)
    assert wrong.returncode == 2 and "this stage reads documents data, but data.sources are chat" in wrong.stderr
