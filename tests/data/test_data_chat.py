"""SFT chat data: the assistant mask on real Llama 3 ids, whole chats packed per row, order rules, errors and skips,
truncation, and the same global batch on any number of processes."""

import json

import numpy as np
import pytest
from conftest import global_batches, processes

from llama_jax.data import encode_chat, make_batches, merge_states
from llama_jax.errors import ConfigError, DataError
from llama_jax.tokenizer import get_tokenizer

BYTE = get_tokenizer("byte")
# Llama 3 ids from the published format (llama3-spec.md), not from our tokenizer's table.
START_HEADER, END_HEADER, EOM, EOT, PYTHON_TAG, DOUBLE_NEWLINE = 128006, 128007, 128008, 128009, 128010, 271

DIALOG = [
    {"role": "system", "content": "Environment: ipython\n\nYou are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And the weather in Paris?"},
    {"role": "assistant", "content": 'brave_search.call(query="Paris weather")', "tool_call": True},
    {"role": "ipython", "content": '{"temp_c": 18, "sky": "clear"}'},
    {"role": "assistant", "content": "18 °C under a clear sky."},
]


@pytest.fixture(scope="module")
def llama3():
    return get_tokenizer("llama3")


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def chat_config(*paths, seq_len=64, batch_size=2, weights=None, **kw):
    weights = weights or [1.0] * len(paths)
    return dict(tokenizer="byte", seq_len=seq_len, batch_size=batch_size, seed=0, holdout_every=0,
                sources=[dict(format="chat", path=p, weight=w) for p, w in zip(paths, weights)]) | kw


def turns(i, answer_len=None):
    answer = "abcdefg"[i % 7] * (answer_len if answer_len is not None else 1 + i % 11)
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer}]}


def segments(batch):
    """(row, token indices) of every chat in a batch."""
    for r, row in enumerate(batch["segment_ids"]):
        for s in np.unique(row[row > 0]):
            yield r, np.flatnonzero(row == s)


def test_assistant_mask_on_real_llama3_ids(tmp_path, llama3):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": DIALOG}])
    cfg = chat_config(path, seq_len=256, batch_size=1, holdout_every=1) | {"tokenizer": "llama3"}
    batch = next(make_batches(cfg, llama3, split="eval"))  # one pass over one chat: the chat, then padding
    n = int((batch["segment_ids"][0] == 1).sum())
    assert (batch["segment_ids"][0, n:] == 0).all()
    ids = batch["tokens"][0, :n]

    # Find every turn from the ids alone: <|start_header_id|> role <|end_header_id|> "\n\n" body, closed by eot/eom.
    trained, roles, closings, contents = set(), [], [], []
    for start in np.flatnonzero(ids == START_HEADER):
        end_header = start + np.flatnonzero(ids[start:] == END_HEADER)[0]
        assert ids[end_header + 1] == DOUBLE_NEWLINE
        body_start = end_header + 2
        close = body_start + np.flatnonzero(np.isin(ids[body_start:], [EOM, EOT]))[0]
        role = llama3.decode(ids[start + 1:end_header])
        roles.append(role)
        if role == "assistant":
            trained |= set(range(body_start, close + 1))  # content and its closing token
            closings.append(int(ids[close]))
            contents.append(llama3.decode(ids[body_start:close]))
    assert roles == [m["role"] for m in DIALOG]
    assert contents == ["4.", "<|python_tag|>" + DIALOG[4]["content"], DIALOG[6]["content"]]
    assert closings == [EOT, EOM, EOT]
    assert PYTHON_TAG in ids[sorted(trained)]  # the call's <|python_tag|> is the assistant's, so trained

    expected = np.array([t + 1 in trained for t in range(n - 1)], np.int32)  # target t is token t + 1
    np.testing.assert_array_equal(batch["targets"][0, :n - 1], ids[1:])
    np.testing.assert_array_equal(batch["loss_mask"][0, :n - 1], expected)
    assert batch["loss_mask"][0, n - 1:].sum() == 0
    assert expected.sum() == sum(len(llama3.encode(m["content"])) + 1 + m.get("tool_call", False)
                                 for m in DIALOG if m["role"] == "assistant")
    np.testing.assert_array_equal(ids, llama3.encode_dialog(DIALOG)[0])


def test_prompt_completion_trains_only_the_completion(llama3):
    prompt = DIALOG[:4]  # ends with the user's question; holds an assistant turn, which is context here
    ids, trained = encode_chat(llama3, {"prompt": prompt, "completion": "Sunny, 18 °C."})
    prompt_ids = llama3.encode_dialog(prompt, add_generation_prompt=True)[0]
    reply = llama3.encode("Sunny, 18 °C.") + [EOT]
    assert ids.tolist() == prompt_ids + reply
    assert trained.tolist() == [0] * len(prompt_ids) + [1] * len(reply)
    as_string, _ = encode_chat(llama3, {"prompt": "Hi", "completion": {"role": "assistant", "content": "Hello"}})
    assert as_string.tolist() == llama3.encode_dialog([{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Hello"}])[0]


def test_packed_rows_hold_whole_chats_as_one_chat_per_row_would(tmp_path):
    records = [turns(i) for i in range(40)]
    path = write_jsonl(tmp_path / "chats.jsonl", records)
    it = make_batches(chat_config(path, seq_len=96, batch_size=4), BYTE)
    expected = {}  # first bytes of each chat's user content -> the chat as one row: ids, trained
    for r in records:
        ids, trained = BYTE.encode_dialog(r["messages"])
        expected[r["messages"][0]["content"]] = (np.array(ids), np.array(trained))
    seen, chats_per_row = [[] for _ in range(4)], 0
    for _ in range(10):
        batch = next(it)
        assert set(batch) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
        assert all(v.shape == (4, 96) and v.dtype == np.int32 for v in batch.values())
        for r, where in segments(batch):
            row = np.append(batch["tokens"][r], batch["targets"][r, -1])  # the row's T + 1 tokens
            question = BYTE.decode(row[where]).split("<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
            ids, trained = expected[question]
            # A packed chat is exactly the chat alone: all its tokens in this row (never split), in one segment
            # (but for its last token when it ends the row, which is only a target), its positions, its mask.
            start, n = where[0], len(ids)
            np.testing.assert_array_equal(row[start:start + n], ids)
            assert len(where) == n or (len(where) == n - 1 and start + n == 96 + 1)
            np.testing.assert_array_equal(batch["positions"][r, where], np.arange(len(where)))
            np.testing.assert_array_equal(batch["loss_mask"][r, start:start + n - 1], trained[1:])
            if len(where) == n:  # its last token's target is the next chat's first token or padding
                assert batch["loss_mask"][r, where[-1]] == 0
            seen[r].append(question)
        chats_per_row = max(chats_per_row, batch["segment_ids"].max())
        assert batch["loss_mask"][batch["segment_ids"] == 0].sum() == 0
    assert chats_per_row >= 2  # several chats share rows
    # Row r reads positions r, r + 4, ... of the shuffled order: in an epoch, 10 chats each, all 40 between them.
    assert min(len(row) for row in seen) >= 10
    assert len({q for row in seen for q in row[:10]}) == 40


def test_chats_longer_than_the_row_are_cut_or_dropped(tmp_path):
    long_answer = turns(1, answer_len=200)
    long_prompt = {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "long.jsonl", [long_answer, long_prompt, turns(2)])
    it = make_batches(chat_config(path, seq_len=63, batch_size=1), BYTE)  # on_error="raise": drops still count
    rows = [next(it) for _ in range(4)]
    ids, trained = BYTE.encode_dialog(long_answer["messages"])
    cut = [b for b in rows if b["segment_ids"][0].all()]
    assert cut, "the long answer fills a row"
    np.testing.assert_array_equal(cut[0]["tokens"][0], ids[:63])
    np.testing.assert_array_equal(cut[0]["targets"][0], ids[1:64])
    np.testing.assert_array_equal(cut[0]["loss_mask"][0], trained[1:64])
    assert it.skipped == [f"{path}:2"] and "dropped" in it.sources[0].skipped[f"{path}:2"]
    assert not any("x" * 50 in BYTE.decode(b["tokens"][0]) for b in rows)


BAD_CHATS = [
    ({"messages": [{"role": "robot", "content": "beep"}]}, "role 'robot'"),
    ({"messages": [{"role": "tool", "content": "{}"}]}, "ipython"),
    ({"messages": [{"role": "user", "content": 3}]}, "content of type int"),
    ({"messages": [{"role": "user", "content": "q", "weight": 0}]}, r"key\(s\) \['weight'\]"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message: nothing in it would be trained"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q"}]}, "must end with the assistant's"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "cannot come at the start"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "system.*cannot come after a user"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "assistant", "content": "b"}]}, "cannot come after an assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "ipython", "content": "{}"},
                   {"role": "assistant", "content": "a"}]}, "ipython.*cannot come after a user"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c", "tool_call": True},
                   {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "user.*cannot come after a tool call"),
    ({"messages": [{"role": "user", "content": "q", "tool_call": True}]}, "only assistant messages make calls"),
    ({"prompt": "q"}, 'no "completion"'),
    ({"prompt": "q", "completion": "a", "messages": []}, 'either "messages" or "prompt"'),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "completion": "b"},
     "prompt ends with an assistant"),
    ({"prompt": "q", "completion": [{"role": "ipython", "content": "{}"}]}, "start and end with an assistant"),
    ("[1, 2]", "JSON object"),
    ("{not json", "malformed record"),
]


@pytest.mark.parametrize("record, message", BAD_CHATS)
def test_malformed_chats_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [turns(0), record])
    it = make_batches(chat_config(path, batch_size=1, seq_len=128), BYTE)
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}"):
        for _ in range(3):
            next(it)


def test_allowed_orders(tmp_path):
    """Llama 3.1's custom-tool layout: two user messages in a row, a JSON call without the flag, then ipython."""
    tool_dialog = [
        {"role": "system", "content": "Environment: ipython"},
        {"role": "user", "content": "You have a calculator tool ..."},
        {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": '{"name": "calculator", "parameters": {"expression": "6 * 7"}}'},
        {"role": "ipython", "content": "42"},
        {"role": "assistant", "content": "42."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "search", "tool_call": True},  # a chat may end with a call
    ]
    ids, trained = encode_chat(BYTE, {"messages": tool_dialog})
    assert (ids.tolist(), trained.tolist()) == tuple(BYTE.encode_dialog(tool_dialog))


def test_skips_are_counted_and_an_all_malformed_stream_raises(tmp_path):
    records = [turns(0), BAD_CHATS[0][0], turns(1), "{not json", turns(2), BAD_CHATS[5][0]]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    it = make_batches(chat_config(path, batch_size=1, seq_len=128, on_error="skip"), BYTE)
    questions = set()
    for _ in range(6):
        b = next(it)
        questions |= {q.split("<|eot_id|>")[0] for q in BYTE.decode(b["tokens"][0]).split("user<|end_header_id|>\n\n")}
    assert {"q0", "q1", "q2"} <= questions
    assert it.skipped == [f"{path}:{line}" for line in (2, 4, 6)]

    bad = write_jsonl(tmp_path / "all_bad.jsonl", [BAD_CHATS[i][0] for i in range(6)])
    it = make_batches(chat_config(bad, batch_size=2, on_error="skip"), BYTE)
    with pytest.raises(DataError, match=r"cannot make progress: .*all_bad.jsonl\): 6 record\(s\) skipped of 6 "
                                        r"in this split, e\.g\. .*all_bad.jsonl:\d: "):
        next(it)
    too_long = write_jsonl(tmp_path / "too_long.jsonl", [{"messages": [
        {"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "a"}]}] * 3)
    with pytest.raises(DataError, match="dropped: no trained token"):
        next(make_batches(chat_config(too_long, batch_size=1, seq_len=32), BYTE))


def test_formats_of_one_kind_per_config(tmp_path):
    chats = write_jsonl(tmp_path / "c.jsonl", [turns(0)])
    (tmp_path / "t.txt").write_text("plain text")
    mixed = chat_config(chats) | {"sources": [dict(format="chat", path=chats), dict(format="text",
                                                                                   path=str(tmp_path / "t.txt"))]}
    with pytest.raises(ConfigError, match="mix formats"):
        make_batches(mixed, BYTE)
    with pytest.raises(ConfigError, match="reads preference data, but data.sources are chat"):
        make_batches(chat_config(chats), BYTE, kind="preference")
    with pytest.raises(ConfigError, match="format 'chats' unknown"):
        make_batches(chat_config(chats) | {"sources": [dict(format="chats", path=chats)]}, BYTE)
    assert make_batches(chat_config(chats, batch_size=1), BYTE, kind="chat") is not None


# --- the same global batch, and resumption, on any number of processes ---

def mixture(tmp_path):
    a = [turns(i) for i in range(50)]
    b = [{"prompt": f"p{i}", "completion": "z" * (3 + i % 40)} for i in range(30)]
    a[7], b[12] = "{broken", {"messages": [{"role": "user", "content": "no answer"}]}
    return chat_config(write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b), seq_len=80,
                       batch_size=8, weights=[0.6, 0.4], holdout_every=5, on_error="skip", seed=4)






def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_global_batch_and_resume_on_any_number_of_processes(tmp_path):
    cfg = mixture(tmp_path)
    single = global_batches(processes(cfg, 1), 12)
    for count in (2, 4):
        assert_same(single, global_batches(processes(cfg, count), 12))
    saved_by_two = processes(cfg, 2)
    global_batches(saved_by_two, 5)
    state = merge_states([it.get_state() for it in saved_by_two])
    for count in (1, 4):
        assert_same(single[5:], global_batches(processes(cfg, count, state=state), 7))


def test_eval_split_is_held_out_and_the_same_on_any_number_of_processes(tmp_path):
    cfg = mixture(tmp_path)
    evals = global_batches(processes(cfg, 1, "eval"))
    assert 1 <= len(evals) < 20
    for count in (2, 4):
        assert_same(evals, global_batches(processes(cfg, count, "eval")))

    def questions(batches):
        text = "".join(BYTE.decode(b["tokens"][r]) for b in batches for r in range(len(b["tokens"])))
        return {q.split("<|eot_id|>")[0] for q in text.split("user<|end_header_id|>\n\n")[1:]}

    held_out = {f"q{i}" for i in range(0, 50, 5)} | {f"p{i}" for i in range(0, 30, 5)}
    assert questions(evals) == held_out  # every held-out chat once (none of them is malformed)
    assert not questions(global_batches(processes(cfg, 2), 10)) & held_out
