"""``python -m llama_jax.eval``: reproduces the eval loss a training run logged, and its loss, perplexity and bits
per byte on a file equal a direct computation (each document alone through the model, log-softmax in NumPy)."""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, env, read_metrics

from llama_jax import checkpoint, model
from llama_jax import config as config_lib
from llama_jax.eval import perplexity
from llama_jax.tokenizer import ByteTokenizer
from llama_jax.train.__main__ import main as train_main

TINY = str(ROOT / "configs" / "pretrain" / "tiny.py")
DOCS = ["Now is the winter of our discontent", "Größe, café, naïve — déjà vu", "数字 12345 and emoji 🎉 ok",
        "short", "To be, or not to be: that is the question", "tabs\tand\nnewlines", "ÆØÅ æøå", "the end."]


def _command(*argv):
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=env(devices=8),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


@pytest.mark.slow  # 23 s on 2 busy cores
def test_reproduces_the_logged_training_eval_loss(tmp_path):
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = "the king queen lord night day love death sword crown heart fair foul sleep dream".split()
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, rng.integers(5, 30))) + "." for _ in range(200)))
    run_dir = tmp_path / "run"
    assert train_main(["--config", f"{TINY}:{corpus}", f"--config.run_dir={run_dir}", "--config.train.steps=4",
                       "--config.logging.eval_every=4", "--config.logging.progress=false"]) == 0
    eval_loss = next(r["eval_loss"] for r in read_metrics(run_dir) if r.get("step") == 4 and "eval_loss" in r)

    # The checkpoint's own data config, held-out split, the loop's two eval batches; on another mesh.
    result, stderr = _command("llama_jax.eval", "--checkpoint", str(run_dir), "--mesh", "data=2,fsdp=4")
    assert result["split"] == "heldout" and result["batches"] == 2 and result["tokenizer"] == "byte"
    assert result["batch_mean_loss"] == pytest.approx(eval_loss, rel=1e-6)
    assert result["loss"] == pytest.approx(eval_loss, rel=1e-3)  # token-weighted: batches differ by a few targets
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert "eval: 100%" in stderr and "bits/byte" in stderr  # progress bar and summary on stderr


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    cfg = config_lib.get("tiny", num_layers=2)
    params = jax.tree.map(np.asarray, model.init_params(cfg, jax.random.key(1)))
    path = str(tmp_path_factory.mktemp("eval") / "ckpt")
    byte = ByteTokenizer()
    checkpoint.save_params(path, params, cfg, tokenizer={"name": byte.name, "sha256": byte.sha256})
    return path, params, cfg


def _nll(params, cfg, sequences, masks):
    """Summed -log p(ids[t + 1] | ids[:t + 1]) where masks[t + 1] is 1, every sequence alone (no packing), from
    logits in float64 NumPy. Sequences are right-padded into one batch: causal attention keeps padding out."""
    length = max(len(ids) for ids in sequences)
    tokens = np.array([ids + [0] * (length - len(ids)) for ids in sequences])
    logits = np.asarray(model.Llama(cfg).apply({"params": params}, tokens), np.float64)  # [B, T, V]
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return -sum(log_probs[i, t, ids[t + 1]] for i, (ids, mask) in enumerate(zip(sequences, masks))
                for t in range(len(ids) - 1) if mask[t + 1])


@pytest.mark.slow  # 16 s on 2 busy cores
def test_scores_on_a_file_equal_a_direct_computation(tmp_path, tiny_checkpoint, capsys):
    """Eight documents, eight rows: each row holds one document, so the pipeline's packed, sharded batch must give
    what each document alone gives."""
    path, params, cfg = tiny_checkpoint
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(DOCS))
    assert perplexity.main(["--checkpoint", path, "--data", str(data), "--seq-len", "64",
                            "--mesh", "data=2,fsdp=2,tensor=2"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    tok = ByteTokenizer()
    sequences = [tok.encode(doc, bos=True, eos=True) for doc in DOCS]  # the pipeline's add_bos default
    nll = _nll(params, cfg, sequences, [[1] * len(ids) for ids in sequences])
    targets = sum(len(ids) - 1 for ids in sequences)
    nbytes = sum(len(doc.encode("utf-8")) for doc in DOCS)
    assert (result["tokens"], result["bytes"], result["batches"], result["split"]) == (targets, nbytes, 1, "all")
    assert result["loss"] == pytest.approx(nll / targets, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / targets), rel=1e-5)


@pytest.mark.slow  # 9 s on 2 busy cores
def test_chat_data_scores_the_assistant_only(tmp_path, tiny_checkpoint, capsys):
    path, params, cfg = tiny_checkpoint
    chats = [[{"role": "user", "content": f"Say hello to {name}."}, {"role": "assistant", "content": f"Hello, {name}!"}]
             for name in ("Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal")]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": m}) for m in chats))
    assert perplexity.main(["--checkpoint", path, "--data", str(data), "--seq-len", "64"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    encoded = [ByteTokenizer().encode_dialog(messages) for messages in chats]
    nll = _nll(params, cfg, [ids for ids, _ in encoded], [mask for _, mask in encoded])
    trained = sum(sum(mask[1:]) for _, mask in encoded)
    assert result["kind"] == "chat" and result["tokens"] == trained
    assert result["loss"] == pytest.approx(nll / trained, rel=1e-5)


def test_errors_name_what_is_missing(tmp_path, tiny_checkpoint, capsys):
    path, _, cfg = tiny_checkpoint
    assert perplexity.main(["--checkpoint", path]) == 2  # a params-only checkpoint records no data config
    assert "records no training data config" in capsys.readouterr().err
    hf = str(tmp_path / "hf")
    checkpoint.export(hf, "hf", checkpoint.load(path)[0], cfg)
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    assert perplexity.main(["--checkpoint", hf, "--data", str(tmp_path / "a.txt")]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
