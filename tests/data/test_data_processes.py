"""The global batch does not depend on the number of processes, and a data position saved by some number of
processes resumes on any other: P processes' rows, concatenated in process order, are exactly one process's batch."""

import json
import os
import runpy
from collections import Counter

import numpy as np
import pytest
from conftest import ROOT, global_batches, processes

from llama_jax.data import concat_batches, make_batches, merge_states, split_rows
from llama_jax.data import sources as sources_lib
from llama_jax.errors import DataError
from llama_jax.tokenizer import get_tokenizer

TOK = get_tokenizer("byte")
EOS = TOK.eos_id
TINY = ROOT / "configs" / "pretrain" / "tiny.py"
needs_shakespeare = pytest.mark.skipif(not os.environ.get("LLAMA_JAX_SHAKESPEARE"),
                                       reason="LLAMA_JAX_SHAKESPEARE is unset")


def tiny_shakespeare():
    """configs/pretrain/tiny.py's data section: Shakespeare paragraphs, byte tokenizer, 8 rows of 64."""
    return runpy.run_path(str(TINY))["get_config"]().data.to_dict()


def write_mixture(tmp_path):
    """Two sources: paragraphs of a text file (weight 0.7) and JSONL records with two malformed ones (0.3)."""
    paragraphs = [f"text {i}: " + "abcdefghij"[i % 10] * (3 + i % 17) for i in range(90)]
    (tmp_path / "a.txt").write_text("\n\n".join(paragraphs))
    lines = [json.dumps({"text": f"json {i}: " + "KLMNOPQ"[i % 7] * (2 + i % 23)}) for i in range(70)]
    lines[8], lines[30] = "not json", json.dumps({"body": "no text field"})  # a held-out and a training one
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    cfg = dict(tokenizer="byte", seq_len=16, batch_size=8, seed=3, add_bos=False, holdout_every=4, on_error="skip",
               sources=[dict(format="text", path=str(tmp_path / "a.txt"), split="paragraphs", weight=0.7),
                        dict(format="jsonl", path=str(tmp_path / "b.jsonl"), weight=0.3)])
    records = [json.loads(line).get("text") if line.startswith("{") else None for line in lines]
    return cfg, paragraphs, records


@pytest.fixture(params=["tiny_shakespeare", "mixture"])
def data_cfg(request, tmp_path):
    if request.param == "tiny_shakespeare":
        if not os.environ.get("LLAMA_JAX_SHAKESPEARE"):
            pytest.skip("LLAMA_JAX_SHAKESPEARE is unset")
        return tiny_shakespeare()
    return write_mixture(tmp_path)[0]






def assert_equal_batches(a, b):
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"batch {step}, {k}")


def row_streams(batches):
    """Each row's tokens over the batches, joined: rows hold T + 1 tokens (tokens + the last target)."""
    rows = [np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1) for b in batches]
    return [np.concatenate([r[i] for r in rows]) for i in range(len(rows[0]))]


def documents_of(stream):
    """Complete documents (EOS-terminated) of a row stream, decoded; padding (id 0) dropped."""
    ends = np.flatnonzero(stream == EOS)
    return [TOK.decode(d[d != 0][:-1]) for d in np.split(stream[: ends[-1] + 1], ends[:-1] + 1)] if ends.size else []


def test_global_batch_is_the_same_on_any_number_of_processes(data_cfg):
    single = global_batches(processes(data_cfg, 1), 10)
    rows, seq = data_cfg["batch_size"], data_cfg["seq_len"]
    assert single[0]["tokens"].shape == (rows, seq)
    for count in (2, 4):
        assert next(processes(data_cfg, count)[-1])["tokens"].shape == (rows // count, seq)
        assert_equal_batches(single, global_batches(processes(data_cfg, count), 10))


def test_resume_on_another_number_of_processes(data_cfg):
    expected = global_batches(processes(data_cfg, 1), 10)
    saved_by_two = processes(data_cfg, 2)
    global_batches(saved_by_two, 4)
    state = merge_states([it.get_state() for it in reversed(saved_by_two)])  # gathered in any order
    for count in (1, 2, 4):
        assert_equal_batches(expected[4:], global_batches(processes(data_cfg, count, state=state), 6))


def test_eval_pass_is_the_same_on_any_number_of_processes(data_cfg):
    single = global_batches(processes(data_cfg, 1, "eval"))
    assert 2 < len(single) < 5000
    for count in (2, 4):
        assert_equal_batches(single, global_batches(processes(data_cfg, count, "eval")))
    saved_by_two = processes(data_cfg, 2, "eval")
    global_batches(saved_by_two, 2)
    state = merge_states([it.get_state() for it in saved_by_two])
    for count in (1, 4):
        assert_equal_batches(single[2:], global_batches(processes(data_cfg, count, "eval", state=state)))


@needs_shakespeare
def test_eval_pass_of_tiny_reads_every_held_out_paragraph_once():
    """Checked against the plays themselves: one pass holds exactly the paragraphs i % 10 == 0, each whole."""
    cfg = tiny_shakespeare()
    paragraphs = sources_lib.TextSource([str(p) for p in sources_lib.shakespeare_texts()], split="paragraphs").docs
    batches = global_batches(processes(cfg, 4, "eval"))
    found = Counter(d for stream in row_streams(batches) for d in documents_of(stream))
    assert found == Counter(paragraphs[::10])


def test_mixture_rows_are_whole_documents_and_eval_reads_each_held_out_one_once(tmp_path):
    cfg, paragraphs, records = write_mixture(tmp_path)
    train = global_batches(processes(cfg, 2), 40)
    docs = [d for stream in row_streams(train) for d in documents_of(stream)]
    held_out = set(paragraphs[::4]) | {r for r in records[::4] if r}
    readable = set(paragraphs) | {r for r in records if r}
    assert set(docs) <= readable - held_out  # whole training documents, never a held-out one
    text_share = sum(d.startswith("text") for d in docs) / len(docs)
    assert 0.55 < text_share < 0.85, text_share  # weights 0.7 / 0.3 (by documents)
    # Row r reads positions r, r + 8, ... of each source's order: within an epoch, no two reads are the same.
    first_epoch = [d for stream in row_streams(train) for d in documents_of(stream)[:5]]
    assert len(first_epoch) == 40 and len(set(first_epoch)) == 40

    evals = global_batches(processes(cfg, 4, "eval"))
    found = Counter(d for stream in row_streams(evals) for d in documents_of(stream))
    assert found == Counter(held_out)  # every held-out document once; the malformed record 8 is skipped
    last = evals[-1]
    assert (last["segment_ids"] == 0).any() and last["loss_mask"][last["segment_ids"] == 0].sum() == 0


def test_each_process_reads_only_its_rows_documents(tmp_path, monkeypatch):
    cfg = write_mixture(tmp_path)[0]
    reads: list[int] = []
    original = sources_lib.TextSource.__getitem__
    monkeypatch.setattr(sources_lib.TextSource, "__getitem__", lambda self, i: reads.append(i) or original(self, i))

    def read_by(it, steps=6):
        reads.clear()
        for _ in range(steps):
            next(it)
        return Counter(reads)

    everything = read_by(make_batches(cfg, TOK))
    shares = [read_by(it) for it in processes(cfg, 2)]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert shares[0] + shares[1] == everything
    skipped = [it.skipped for it in processes(cfg, 2)]  # fresh: nothing read yet
    assert skipped == [[], []]
    both, one = processes(cfg, 2), make_batches(cfg, TOK)
    global_batches(both, 60)
    global_batches([one], 60)
    assert one.skipped == [f"{tmp_path / 'b.jsonl'}:31"]  # the malformed training record (line 31)
    # Counted by the processes whose rows read it (in 60 steps every row has gone through the JSONL file).
    assert set(both[0].skipped) | set(both[1].skipped) == set(one.skipped)


def test_ramp_steps_are_the_same_on_any_number_of_processes(tmp_path):
    """Two data batches per step, cut to half-length rows: each process's share is a block of the step's rows."""
    cfg = write_mixture(tmp_path)[0]
    single = make_batches(cfg, TOK)
    one_step = split_rows(concat_batches([next(single), next(single)]), 8)
    for count in (2, 4):
        its = processes(cfg, count)
        parts = [split_rows(concat_batches([next(it), next(it)]), 8) for it in its]
        for k in one_step:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), one_step[k])
    assert one_step["tokens"].shape == (32, 8)


def test_states_that_cannot_resume_are_refused(tmp_path):
    cfg = write_mixture(tmp_path)[0]
    its = processes(cfg, 2)
    global_batches(its, 3)
    with pytest.raises(DataError, match=r"lacks rows \[4, 5, 6, 7\]"):
        merge_states([its[0].get_state()])
    with pytest.raises(DataError, match="disagree on .*step"):
        next(its[1])
        merge_states([it.get_state() for it in its])
    fresh = make_batches(cfg, TOK)
    with pytest.raises(DataError, match=r"lacks rows \[0, 1, 2, 3\]"):
        fresh.set_state(its[1].get_state())  # one process's rows only
    with pytest.raises(DataError, match="batch_size=8, this stream batch_size=4"):
        make_batches(cfg | {"batch_size": 4}, TOK).set_state(merge_states([it.get_state() for it in processes(cfg, 2)]))
    with pytest.raises(DataError, match="older llama_jax"):
        fresh.set_state({"process_count": 1, "processes": [{}]})
