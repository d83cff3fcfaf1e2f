"""``data.document_mask``: on (the default, the paper's), attention stays within each document of a packed row; off,
a row is one causal sequence, so a document's tokens read the documents before it in the row."""

import json

import jax
import numpy as np
import pytest

from llama_jax import config, model
from llama_jax.data import make_batches
from llama_jax.errors import ConfigError
from llama_jax.tokenizer import get_tokenizer

TOK = get_tokenizer("byte")
CFG = config.get("tiny", num_layers=2, dim=64, num_heads=4, num_kv_heads=2, ffn_dim=128)


def data_config(tmp_path, **kw):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"document {i} says " + "xyz"[i % 3] * (3 + i % 7) for i in range(40)))
    return dict(tokenizer="byte", sources=[dict(format="text", path=str(path), split="paragraphs")], seq_len=48,
                batch_size=4, seed=0, add_bos=False, holdout_every=0) | kw


def test_unmasked_rows_are_one_sequence_with_the_same_targets(tmp_path):
    masked = next(make_batches(data_config(tmp_path), TOK))
    unmasked = next(make_batches(data_config(tmp_path, document_mask=False), TOK))
    assert masked["segment_ids"].max() >= 3  # rows do hold several documents
    for key in ("tokens", "targets", "loss_mask"):  # the same text and the same targets scored
        np.testing.assert_array_equal(masked[key], unmasked[key])
    real = masked["segment_ids"] > 0
    np.testing.assert_array_equal(unmasked["segment_ids"], real.astype(np.int32))
    np.testing.assert_array_equal(unmasked["positions"], np.where(real, np.arange(48), 0))


@pytest.mark.slow  # 8 s on 2 busy cores
def test_the_mask_decides_whether_attention_crosses_documents(tmp_path):
    params = model.init_params(CFG, jax.random.key(0))
    llama = model.Llama(CFG)
    masked = next(make_batches(data_config(tmp_path), TOK))
    unmasked = next(make_batches(data_config(tmp_path, document_mask=False), TOK))
    row = int(np.argmax(masked["segment_ids"].max(axis=1)))
    segments = masked["segment_ids"][row]
    second = segments == 2  # a whole document that follows another one in this row
    tokens = masked["tokens"][row:row + 1]

    def logits(batch):
        return np.asarray(llama.apply({"params": params}, batch["tokens"][row:row + 1],
                                      batch["positions"][row:row + 1], batch["segment_ids"][row:row + 1]))[0]

    # Independent references: the second document run alone, and the whole row as one plain causal sequence.
    alone = np.asarray(llama.apply({"params": params}, tokens[:, second]))[0]
    whole_row = np.asarray(llama.apply({"params": params}, tokens))[0]
    np.testing.assert_allclose(logits(masked)[second], alone, atol=1e-4)  # on: the document sees only itself
    np.testing.assert_allclose(logits(unmasked), whole_row, atol=1e-4)  # off: causal attention over the row
    assert np.abs(logits(unmasked)[second] - alone).max() > 1e-2  # ... so the earlier documents change its logits


@pytest.mark.parametrize("value", ["false", 0, None])
def test_document_mask_must_be_a_bool(tmp_path, value):
    with pytest.raises(ConfigError, match="config key data.document_mask = .*: expected true or false"):
        make_batches(data_config(tmp_path, document_mask=value), TOK)


def test_document_mask_off_is_refused_for_chats(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    cfg = data_config(tmp_path, document_mask=False, sources=[dict(format="chat", path=str(path))])
    with pytest.raises(ConfigError, match="packed documents only"):
        make_batches(cfg, TOK)
