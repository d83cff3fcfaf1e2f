"""Preference data: one record per row, identical prompt parts, the reply / DPO / score masks, truncation, bad
records, and the same global batch on any number of processes."""

import json

import numpy as np
import pytest
from conftest import global_batches, processes

from llama_jax.data import PAIR_KEYS, REPLIES, concat_batches, encode_pair, make_batches, merge_states, split_rows
from llama_jax.data.preference import EncodedPair, PairRows
from llama_jax.errors import DataError
from llama_jax.tokenizer import get_tokenizer

BYTE = get_tokenizer("byte")
PROMPT = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
TOOL_REPLY = [  # a reply of several messages: a call, its result, the answer
    {"role": "assistant", "content": 'wiki.call(query="Italy capital")', "tool_call": True},
    {"role": "ipython", "content": "Rome"},
    {"role": "assistant", "content": "Rome."},
]
RECORDS = [
    {"prompt": PROMPT, "chosen": "Rome is the capital of Italy.", "rejected": "Milan.", "edited": "Rome."},
    {"prompt": "Say hi.", "chosen": {"role": "assistant", "content": "Hi!"}, "rejected": "No.", "edited": None},
    {"prompt": PROMPT, "chosen": TOOL_REPLY, "rejected": "Turin, I think."},
]


@pytest.fixture(scope="module", params=["byte", "llama3"])
def tok(request):
    return get_tokenizer(request.param)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def pref_config(*paths, tokenizer="byte", seq_len=128, batch_size=3, **kw):
    return dict(tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=0, holdout_every=0,
                sources=[dict(format="preference", path=p) for p in paths]) | kw


T = 256  # tokens per row, enough for every record of RECORDS whole


def in_file_order(path, tok, **kw):
    """The eval pass with every record held out and one row per record: row i holds record i."""
    cfg = pref_config(path, tokenizer=tok.name, seq_len=T, batch_size=len(RECORDS), holdout_every=1, **kw)
    return next(make_batches(cfg, tok, split="eval"))


def expected_reply(tok, reply):
    """A reply's ids after the prompt's generation header and which of them the assistant writes, built by hand
    from the format (llama3-spec.md): content, then <|eot_id|>; a call is <|python_tag|> call <|eom_id|>."""
    sid = tok.special_id
    if isinstance(reply, str):
        reply = [{"role": "assistant", "content": reply}]
    elif isinstance(reply, dict):
        reply = [reply]
    ids, trained = [], []
    for i, m in enumerate(reply):
        if i:
            header = [sid("start_header_id"), *tok.encode(m["role"]), sid("end_header_id"), *tok.encode("\n\n")]
            ids += header
            trained += [0] * len(header)
        body = [sid("python_tag")] * m.get("tool_call", False) + tok.encode(m["content"])
        body.append(sid("eom_id") if m.get("tool_call") else sid("eot_id"))
        ids += body
        trained += [int(m["role"] == "assistant")] * len(body)
    return ids, trained


def test_rows_share_the_prompt_and_mark_each_reply(tmp_path, tok):
    batch = in_file_order(write_jsonl(tmp_path / "p.jsonl", RECORDS), tok)
    assert set(batch) == set(REPLIES)
    formatting = [tok.special_id(t) for t in ("start_header_id", "end_header_id", "eom_id", "eot_id")]
    for i, record in enumerate(RECORDS):
        prompt = record["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        prompt_ids = tok.encode_dialog(prompt, add_generation_prompt=True)[0]
        for name in REPLIES:
            rows = {k: v[i] for k, v in batch[name].items()}
            assert set(rows) == set(PAIR_KEYS) and all(v.dtype == np.int32 for v in rows.values())
            if record.get(name) is None:  # no edited reply: the row is all zeros
                assert not any(v.any() for v in rows.values())
                continue
            reply_ids, reply_trained = expected_reply(tok, record[name])
            n = len(prompt_ids) + len(reply_ids)
            np.testing.assert_array_equal(rows["tokens"][:n], prompt_ids + reply_ids)
            np.testing.assert_array_equal(rows["targets"][:n - 1], (prompt_ids + reply_ids)[1:])
            np.testing.assert_array_equal(rows["segment_ids"], np.arange(T) < n)
            np.testing.assert_array_equal(rows["positions"][:n], np.arange(n))
            loss = np.zeros(T, np.int32)
            loss[len(prompt_ids) - 1:n - 1] = reply_trained  # target t is token t + 1
            np.testing.assert_array_equal(rows["loss_mask"], loss)
            dpo = loss * ~np.isin(rows["targets"], formatting)
            np.testing.assert_array_equal(rows["dpo_mask"], dpo)
            closings = sum(m["role"] == "assistant" for m in record[name]) if isinstance(record[name], list) else 1
            assert dpo.sum() == loss.sum() - closings  # only each assistant message's closing token goes
            np.testing.assert_array_equal(rows["score_mask"], np.arange(T) == n - 1)
            assert rows["tokens"][n - 1] == tok.eot_id
        # The prompt part is the same in every reply's row, and it is the templated prompt.
        for name in ("rejected", "edited"):
            if record.get(name) is not None:
                np.testing.assert_array_equal(batch[name]["tokens"][i, :len(prompt_ids)],
                                              batch["chosen"]["tokens"][i, :len(prompt_ids)])


def test_dpo_mask_ignores_formatting_tokens_and_not_content(tok):
    """Log-probs from a fixed table [T, V]: swapping a formatting token for another changes nothing under dpo_mask
    (while loss_mask sees it); swapping a content token changes the DPO log-prob."""
    seq_len = 96
    pair = encode_pair(tok, {"prompt": "Hi", "chosen": TOOL_REPLY, "rejected": "Bye"}, seq_len=seq_len)
    layout = PairRows(seq_len, tok)
    table = np.random.default_rng(0).normal(size=(seq_len, tok.vocab_size))

    def logps(ids):
        replies = dict(pair.replies, chosen=(np.asarray(ids, np.int32), pair.replies["chosen"][1]))
        rows = layout.batch([[EncodedPair(replies, pair.prompt_len)]])["chosen"]
        picked = table[np.arange(seq_len), rows["targets"][0]]
        return (rows["dpo_mask"][0] * picked).sum(), (rows["loss_mask"][0] * picked).sum()

    ids = pair.replies["chosen"][0].tolist()
    base_dpo, base_nll = logps(ids)
    eom_at, eot_at = ids.index(tok.eom_id), len(ids) - 1
    for at, other in [(eom_at, tok.eot_id), (eot_at, tok.eom_id)]:
        swapped = ids[:at] + [other] + ids[at + 1:]
        dpo, nll = logps(swapped)
        assert dpo == base_dpo and nll != base_nll
    first_content = pair.prompt_len + 1  # after <|python_tag|>
    ordinary = ids[first_content] + 1 if ids[first_content] + 1 < 256 else ids[first_content] - 1
    assert logps(ids[:first_content] + [ordinary] + ids[first_content + 1:])[0] != base_dpo
    python_tag_at = pair.prompt_len  # <|python_tag|> is the assistant's choice of a call: not a formatting token
    assert logps(ids[:python_tag_at] + [ordinary] + ids[python_tag_at + 1:])[0] != base_dpo


def test_truncation_cuts_the_prompt_start_then_the_reply_end(tmp_path):
    question = "And of Italy?"
    tail = BYTE.encode_dialog([{"role": "user", "content": question}], add_generation_prompt=True)[0][1:]
    long_start = {"prompt": [{"role": "system", "content": "s" * 300}, {"role": "user", "content": question}],
                  "chosen": "Rome, of course.", "rejected": "Milan."}
    pair = encode_pair(BYTE, long_start, seq_len=80)
    chosen_ids = pair.replies["chosen"][0].tolist()
    reply = BYTE.encode("Rome, of course.") + [BYTE.eot_id]
    full_prompt = BYTE.encode_dialog(long_start["prompt"], add_generation_prompt=True)[0]
    # Just enough of the prompt's start is cut, after <|begin_of_text|>: prompt + longest reply = 80 tokens.
    assert chosen_ids == [BYTE.bos_id] + full_prompt[-(80 - 1 - len(reply)):] + reply
    assert chosen_ids[-len(reply) - len(tail):-len(reply)] == tail  # the last message and generation header stay
    assert pair.prompt_len == 80 - len(reply) and len(pair) == 80

    long_replies = {"prompt": [{"role": "system", "content": "s" * 300}, {"role": "user", "content": question}],
                    "chosen": "R" * 200, "rejected": "M" * 10}
    pair = encode_pair(BYTE, long_replies, seq_len=80)
    assert pair.prompt_len == 1 + len(tail)  # the whole of the prompt that may go is gone
    chosen_ids, chosen_trained = (a.tolist() for a in pair.replies["chosen"])
    assert chosen_ids == [BYTE.bos_id] + tail + [ord("R")] * (80 - 1 - len(tail))  # cut at its end
    assert pair.replies["rejected"][0].tolist() == [BYTE.bos_id] + tail + BYTE.encode("M" * 10) + [BYTE.eot_id]
    rows = PairRows(80, BYTE).batch([[pair]])["chosen"]
    assert rows["score_mask"][0, 79] == 1 and rows["score_mask"].sum() == 1  # the last kept reply token
    assert rows["dpo_mask"].sum() == rows["loss_mask"].sum() == 80 - 1 - len(tail) == sum(chosen_trained)

    fills = {"prompt": "q" * 100, "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match="the prompt fills the row"):
        encode_pair(BYTE, fills, seq_len=80)
    same_start = {"prompt": "q", "chosen": "x" * 100 + "1", "rejected": "x" * 100 + "2"}
    with pytest.raises(DataError, match="'chosen' and 'rejected' are identical after truncation to 80 tokens"):
        encode_pair(BYTE, same_start, seq_len=80)


BAD_RECORDS = [
    ({"prompt": "q", "rejected": "b"}, 'no "chosen"'),
    ({"chosen": "a", "rejected": "b"}, 'no "prompt"'),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "reply 'chosen' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": " \n"}, "reply 'rejected' is empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "edited": "a"}, "'chosen' and 'edited' are identical"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "reply 'chosen' must be a non-empty list"),
    ({"prompt": "q", "chosen": TOOL_REPLY[:2], "rejected": "b"}, "start and end with an assistant"),
    ({"prompt": PROMPT[:3], "chosen": "a", "rejected": "b"}, "prompt ends with an assistant"),
    ({"prompt": [{"role": "user", "content": None}], "chosen": "a", "rejected": "b"}, "content of type NoneType"),
    ({"prompt": "q" * 200, "chosen": "a", "rejected": "b"}, "the prompt fills the row"),
    ("[]", "a preference record is a JSON object"),
]


@pytest.mark.parametrize("record, message", BAD_RECORDS)
def test_bad_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[1], record])
    it = make_batches(pref_config(path, batch_size=1), BYTE)
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}"):
        for _ in range(3):
            next(it)


def test_bad_records_are_counted_skips_and_never_empty_rows(tmp_path):
    records = [RECORDS[0], BAD_RECORDS[0][0], RECORDS[1], BAD_RECORDS[4][0], RECORDS[2], BAD_RECORDS[10][0]]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    it = make_batches(pref_config(path, batch_size=2, on_error="skip"), BYTE)
    for _ in range(6):
        batch = next(it)
        for name in ("chosen", "rejected"):  # every row holds a usable pair: no empty masks to divide by
            assert (batch[name]["loss_mask"].sum(1) > 0).all() and (batch[name]["dpo_mask"].sum(1) > 0).all()
            assert (batch[name]["score_mask"].sum(1) == 1).all()
    assert it.skipped == [f"{path}:{line}" for line in (2, 4, 6)]
    reasons = it.sources[0].skipped
    assert "no \"chosen\"" in reasons[f"{path}:2"] and "fills the row" in reasons[f"{path}:6"]

    all_bad = write_jsonl(tmp_path / "all_bad.jsonl", [r for r, _ in BAD_RECORDS[:6]])
    with pytest.raises(DataError, match=r"cannot make progress: none of the 6 records .* 6 record\(s\) skipped of 6"):
        next(make_batches(pref_config(all_bad, batch_size=2, on_error="skip"), BYTE))


def test_batches_of_several_data_batches_and_no_windows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    it = make_batches(pref_config(path, batch_size=2), BYTE)
    a, b = next(it), next(it)
    joined = concat_batches([a, b])
    for name in REPLIES:
        for key in PAIR_KEYS:
            assert joined[name][key].shape == (4, 128)
            np.testing.assert_array_equal(joined[name][key][::2], a[name][key])
            np.testing.assert_array_equal(joined[name][key][1::2], b[name][key])
    with pytest.raises(DataError, match="cannot split rows of a batch of sub-batches"):
        split_rows(a, 64)


# --- the same global batch, and resumption, on any number of processes ---

def mixture(tmp_path):
    a = [{"prompt": f"question {i}", "chosen": "y" * (1 + i % 9), "rejected": "n" * (2 + i % 5),
          **({"edited": "Y" * (1 + i % 4)} if i % 3 == 0 else {})} for i in range(40)]
    b = [{"prompt": [{"role": "user", "content": f"ask {i}"}], "chosen": TOOL_REPLY, "rejected": f"no {i}"}
         for i in range(25)]
    a[6], b[9] = BAD_RECORDS[0][0], "{broken"  # both in the training split
    return pref_config(write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b), seq_len=96,
                       batch_size=8, holdout_every=4, on_error="skip", seed=2)








def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in REPLIES:
            for k in PAIR_KEYS:
                np.testing.assert_array_equal(x[name][k], y[name][k], err_msg=f"{name} {k}")


def test_global_batch_resume_and_eval_on_any_number_of_processes(tmp_path):
    cfg = mixture(tmp_path)
    single = global_batches(processes(cfg, 1), 8)
    assert single[0]["chosen"]["tokens"].shape == (8, 96)
    for count in (2, 4):
        assert_same(single, global_batches(processes(cfg, count), 8))
    saved_by_two = processes(cfg, 2)
    global_batches(saved_by_two, 3)
    state = merge_states([it.get_state() for it in saved_by_two])
    for count in (1, 4):
        assert_same(single[3:], global_batches(processes(cfg, count, state=state), 5))

    evals = global_batches(processes(cfg, 1, "eval"))
    for count in (2, 4):
        assert_same(evals, global_batches(processes(cfg, count, "eval")))
    prompts = [BYTE.decode(b["chosen"]["tokens"][r]).split("user<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
               for b in evals for r in range(8) if b["chosen"]["segment_ids"][r].any()]
    held_out = {f"question {i}" for i in range(0, 40, 4)} | {f"ask {i}" for i in range(0, 25, 4)}
    assert sorted(prompts) == sorted(held_out)  # each held-out record once, one per row
