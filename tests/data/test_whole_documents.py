"""``data.whole_documents``: a document that fits in a row is never cut; one that does not fit in what is left of a
row opens the next row. Documents longer than a row are cut as before, and the documents read stay the same."""

import json

import numpy as np
import pytest

from llama_jax.data import make_batches
from llama_jax.errors import ConfigError
from llama_jax.tokenizer import get_tokenizer

TOK = get_tokenizer("byte")
ROW = 49  # seq_len + 1: the tokens a row packs (the last one only as a target)
TEXTS = [f"{i}:" + "abcdefg"[i % 7] * int(n) for i, n in enumerate(np.random.default_rng(3).integers(3, 70, 60))]
LENGTH = {text: len(TOK.encode(text)) + 1 for text in TEXTS}  # + EOS


def data_config(tmp_path, **kw):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(TEXTS))
    return dict(tokenizer="byte", sources=[dict(format="text", path=str(path), split="paragraphs")], seq_len=ROW - 1,
                batch_size=2, seed=0, add_bos=False, holdout_every=0) | kw


def first_batches(tmp_path, count=12, **kw):
    it = make_batches(data_config(tmp_path, **kw), TOK)
    return [next(it) for _ in range(count)]


def row_pieces(batches, row):
    """The texts of one row stream, row by row: [(pieces ending with EOS, the piece cut at the row's end or "")]."""
    rows = []
    for batch in batches:
        ids = [int(t) for t in [*batch["tokens"][row], batch["targets"][row, -1]] if t]  # 0: padding (no NUL here)
        *ended, cut = np.split(np.array(ids), np.flatnonzero(np.array(ids) == TOK.eos_id) + 1)
        rows.append(([TOK.decode(p[:-1].tolist()) for p in ended], TOK.decode(cut.tolist())))
    return rows


def read_order(rows):
    """The documents a row stream started, in order (a cut document counted where it starts)."""
    order = []
    for i, (ended, cut) in enumerate(rows):
        continued = i > 0 and rows[i - 1][1] != ""
        order += ended[1:] if continued else ended
        order += [cut] if cut and not (continued and not ended) else []
    return [text.split(":")[0] for text in order]


@pytest.mark.parametrize("row", [0, 1])
def test_documents_that_fit_a_row_are_never_cut(tmp_path, row):
    whole = row_pieces(first_batches(tmp_path, whole_documents=True), row)
    split = row_pieces(first_batches(tmp_path), row)
    for i, (ended, cut) in enumerate(whole):
        continued = i > 0 and whole[i - 1][1] != ""
        for text in ended[1:] if continued else ended:
            assert text in LENGTH, f"row {i}: {text!r} is not a whole document"
        if cut and (ended or not continued):  # (not the middle of a document that spans three rows)
            assert any(t.startswith(cut) and LENGTH[t] > ROW for t in TEXTS), f"row {i}: {cut!r} was cut"
    # The default packer cuts documents that would have fitted: what the option is for.
    assert any(cut and not any(t.startswith(cut) and LENGTH[t] > ROW for t in TEXTS) for _, cut in split)
    # The same documents in the same order; only where rows break differs (padding instead of a cut).
    assert read_order(whole) == read_order(split)[:len(read_order(whole))]
    assert len(read_order(whole)) >= 12


def test_resume_continues_the_same_rows(tmp_path):
    it = make_batches(data_config(tmp_path, whole_documents=True), TOK)
    first_five = [next(it) for _ in range(5)]
    assert any((b["segment_ids"][:, -1] == 0).any() for b in first_five)  # rows that end in padding
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(4)]
    again = make_batches(data_config(tmp_path, whole_documents=True), TOK)
    again.set_state(state)
    for batch in want:
        got = next(again)
        for key in batch:
            np.testing.assert_array_equal(batch[key], got[key])


def test_whole_documents_must_be_a_bool_and_documents(tmp_path):
    with pytest.raises(ConfigError, match="config key data.whole_documents = .*: expected true or false"):
        make_batches(data_config(tmp_path, whole_documents="yes"), TOK)
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    with pytest.raises(ConfigError, match="packed documents only"):
        make_batches(data_config(tmp_path, whole_documents=True, sources=[dict(format="chat", path=str(path))]), TOK)
