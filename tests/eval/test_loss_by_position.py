"""``perplexity.evaluate``'s loss by position (and ``python -m llama_jax.eval --by-position``) equal a direct
computation: every document piece of every packed row run alone through the model, log-softmax in float64 NumPy,
summed by the piece's own position."""

import json
import math

import jax
import numpy as np
import pytest

from llama_jax import checkpoint, config, model
from llama_jax.data import make_batches
from llama_jax.eval import perplexity
from llama_jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
CFG = config.get("tiny", num_layers=2)
WORDS = "now is the winter of our discontent made glorious summer by this sun of york".split()
DOCS = [" ".join(WORDS[i % 5:i % 5 + 1 + i % 9]) for i in range(24)]  # 24 documents of 2 to 60 bytes


def _direct(params, batches, length):
    """(summed nll [T], targets [T]) by position, each piece (a run of one segment id) alone through the model:
    pieces right-padded into one batch (causal attention keeps the padding out of what comes before it)."""
    pieces = []  # (tokens, targets, loss mask) of each piece
    for batch in batches:
        for tokens, targets, mask, segments in zip(batch["tokens"], batch["targets"], batch["loss_mask"],
                                                   batch["segment_ids"]):
            pieces += [(tokens[segments == s], targets[segments == s], mask[segments == s])
                       for s in np.unique(segments[segments > 0])]
    padded = np.zeros((len(pieces), length), np.int32)
    for i, (tokens, _, _) in enumerate(pieces):
        padded[i, :len(tokens)] = tokens
    logits = np.asarray(model.Llama(CFG).apply({"params": params}, padded), np.float64)  # [pieces, T, V]
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll, count = np.zeros(length), np.zeros(length, np.int64)
    for i, (_, targets, mask) in enumerate(pieces):
        for p in np.flatnonzero(mask):
            nll[p] -= log_probs[i, p, targets[p]]
            count[p] += 1
    return nll, count


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("by_position")
    params = jax.tree.map(np.asarray, model.init_params(CFG, jax.random.key(2)))
    path = str(directory / "ckpt")
    checkpoint.save_params(path, params, CFG, tokenizer={"name": TOK.name, "sha256": TOK.sha256})
    corpus = directory / "docs.txt"
    corpus.write_text("\n\n".join(DOCS))
    return path, params, corpus


def test_loss_by_position_equals_each_piece_alone(setup):
    _, params, corpus = setup
    data_cfg = dict(tokenizer="byte", sources=[dict(format="text", path=str(corpus), split="paragraphs")],
                    seq_len=16, batch_size=8, holdout_every=1, add_bos=False)
    batches = list(make_batches(data_cfg, TOK, split="eval"))
    assert any(b["segment_ids"].max() > 1 for b in batches)  # documents are packed, and some are cut across rows
    scores = perplexity.evaluate(params, CFG, batches, TOK)
    nll, count = _direct(params, batches, 16)
    np.testing.assert_array_equal(scores.tokens_by_position, count)
    assert (count > 0).all()
    np.testing.assert_allclose(scores.loss_by_position, nll / count, rtol=1e-5)
    assert scores.loss == pytest.approx(nll.sum() / count.sum(), rel=1e-5)


def test_by_position_flag_adds_it_to_the_json(setup, capsys):
    path, _, corpus = setup
    assert perplexity.main(["--checkpoint", path, "--data", str(corpus), "--seq-len", "64", "--by-position"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    losses, tokens = result["loss_by_position"], result["tokens_by_position"]
    assert len(losses) == len(tokens) == 64 and sum(tokens) == result["tokens"]
    assert tokens[0] >= len(DOCS)  # every document (and every piece a row cut off) predicts at position 0
    assert all((loss is None) == (n == 0) for loss, n in zip(losses, tokens))
    mean = sum(loss * n for loss, n in zip(losses, tokens) if n) / result["tokens"]
    assert mean == pytest.approx(result["loss"], rel=1e-6) and not math.isnan(mean)
