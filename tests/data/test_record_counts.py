"""Records cut to fit a row or dropped are counted per source (in the data state, so the counts survive a resume and
are the same on any number of processes), logged once per source, and reported in the banner and every metrics line
of ``python -m llama_jax.train``; DPO reads no edited replies, so an edited reply equal to the chosen one is no error
there (the reward stage, which ranks it, still refuses the record)."""

import json
import runpy
import subprocess
import sys

import jax
import pytest
from conftest import ROOT, env, processes, read_metrics

from llama_jax import checkpoint, config, model
from llama_jax.data import encode_pair, make_batches, merge_states, record_counts
from llama_jax.errors import DataError
from llama_jax.tokenizer import get_tokenizer
from llama_jax.train import reward

BYTE = get_tokenizer("byte")
LONG_REPLY = "Hello there, " * 40  # 520 bytes: no row of these tests holds it whole
LONG_CHAT = {"messages": [{"role": "user", "content": "Greet me."}, {"role": "assistant", "content": LONG_REPLY}]}
# Its only trained tokens lie after the 400-byte question: no row of these tests keeps any of them.
UNUSABLE_CHAT = {"messages": [{"role": "user", "content": "q" * 400}, {"role": "assistant", "content": "ok"}]}
SHORT_CHAT = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]}
LONG_PAIR = {"prompt": "Greet me.", "chosen": LONG_REPLY, "rejected": "No."}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def chat_config(*paths, seq_len=128, batch_size=1):
    return dict(tokenizer="byte", seq_len=seq_len, batch_size=batch_size, seed=0, holdout_every=0,
                sources=[dict(format="chat", path=p, weight=1.0) for p in paths])


def counts_after(it, steps):
    for _ in range(steps):
        next(it)
    return record_counts(merge_states([it.get_state()]))


def test_each_cut_chat_and_each_dropped_one_is_counted_for_its_source(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [LONG_CHAT, LONG_CHAT, UNUSABLE_CHAT, LONG_CHAT])
    # One row; each long chat is cut to the whole row, so batch k holds the k-th long chat, and the row reads on past
    # it while what it reads is dropped: after 3 batches it has read all 4 records, whatever the shuffled order.
    it = make_batches(chat_config(path), BYTE)
    assert counts_after(it, 3) == {"data/truncated/0": 3, "data/dropped/0": 1}
    again = counts_after(it, 3)  # the next epoch counts them again (the row may read a third one's first record)
    assert again["data/truncated/0"] == 6 and again["data/dropped/0"] in (2, 3)


def test_whole_records_count_nothing(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [SHORT_CHAT] * 4)
    assert counts_after(make_batches(chat_config(path), BYTE), 5) == {"data/truncated/0": 0, "data/dropped/0": 0}


def test_counts_are_the_same_on_any_number_of_processes_and_survive_a_resume(tmp_path):
    cut = write_jsonl(tmp_path / "cut.jsonl", [LONG_CHAT, SHORT_CHAT, UNUSABLE_CHAT] * 3)
    whole = write_jsonl(tmp_path / "whole.jsonl", [SHORT_CHAT, UNUSABLE_CHAT] * 4)
    cfg = chat_config(cut, whole, batch_size=4)
    straight = make_batches(cfg, BYTE)
    expected = counts_after(straight, 6)
    assert expected["data/truncated/0"] > 0 and expected["data/dropped/1"] > 0 and expected["data/truncated/1"] == 0

    two = processes(cfg, 2)
    for _ in range(3):
        for it in two:
            next(it)
    resumed = make_batches(cfg, BYTE)
    resumed.set_state(json.loads(json.dumps(merge_states([it.get_state() for it in two]))))
    assert counts_after(resumed, 3) == expected


def test_a_state_saved_before_the_counts_were_kept_resumes_with_them_at_zero(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [LONG_CHAT] * 3)
    it = make_batches(chat_config(path), BYTE)
    next(it)
    old = merge_states([it.get_state()])
    old["rows"] = {r: state[:3] for r, state in old["rows"].items()}  # [draws, offset, taken]
    resumed = make_batches(chat_config(path), BYTE)
    resumed.set_state(old)
    assert counts_after(resumed, 2) == {"data/truncated/0": 2, "data/dropped/0": 0}


def test_a_preference_record_with_a_reply_cut_is_counted_and_says_what_was_cut(tmp_path):
    pair = encode_pair(BYTE, LONG_PAIR, seq_len=96)
    prompt_len = len(BYTE.encode_dialog([{"role": "user", "content": "Greet me."}], add_generation_prompt=True)[0])
    assert pair.cut == f"reply 'chosen' cut from {len(LONG_REPLY) + 1} to {96 - prompt_len} tokens"  # + <|eot_id|>
    assert not encode_pair(BYTE, {"prompt": "Hi", "chosen": "Hello!", "rejected": "No."}, seq_len=96).cut

    path = write_jsonl(tmp_path / "prefs.jsonl", [LONG_PAIR, {"prompt": "Hi", "chosen": "Hello!", "rejected": "No."}])
    cfg = dict(tokenizer="byte", seq_len=96, batch_size=1, seed=0, holdout_every=0,
               sources=[dict(format="preference", path=path, weight=1.0)])
    assert counts_after(make_batches(cfg, BYTE), 4) == {"data/truncated/0": 2, "data/dropped/0": 0}


def test_the_first_cut_and_the_first_dropped_record_of_a_source_are_reported_once(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [UNUSABLE_CHAT, LONG_CHAT, LONG_CHAT])
    it = make_batches(chat_config(path), BYTE)
    assert it.reports() == []
    counts_after(it, 2)
    reports = it.reports()
    assert len(reports) == 2 and it.reports() == []
    cut = next(r for r in reports if "data/truncated/0" in r)
    ids = BYTE.encode_dialog(LONG_CHAT["messages"])[0]
    assert f"{path}:2: a chat of {len(ids)} tokens cut to the row's 129" in cut or f"{path}:3: a chat" in cut
    assert "<|eot_id|>" in cut  # what is lost
    dropped = next(r for r in reports if "data/dropped/0" in r)
    assert f"{path}:1" in dropped and "no trained token" in dropped


# --- through the command -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny two-layer checkpoint to start post-training from (random weights: only the data matters here)."""
    path = tmp_path_factory.mktemp("start") / "sft"
    cfg = config.get("tiny", num_layers=2)
    checkpoint.save_params(str(path), model.init_params(cfg, jax.random.key(0)), cfg, stage="sft",
                           tokenizer={"name": "byte", "sha256": BYTE.sha256})
    return path


def train(stage, data_path, run_dir, *overrides):
    command = [sys.executable, "-m", "llama_jax.train", f"--config={ROOT / 'configs' / stage / 'tiny.py'}:{data_path}",
               f"--config.run_dir={run_dir}", "--config.model.num_layers=2", "--config.data.batch_size=1",
               "--config.data.holdout_every=0", "--config.logging.every=1", "--config.logging.eval_every=0",
               "--config.train.steps=3", *overrides]
    return subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)


def test_sft_reports_cut_and_dropped_chats_in_its_banner_metrics_and_log(tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", [LONG_CHAT, LONG_CHAT, UNUSABLE_CHAT, LONG_CHAT])
    done = train("sft", chats, tmp_path / "sft", "--config.data.seq_len=128")
    assert done.returncode == 0, done.stderr[-3000:]
    banner = done.stderr.splitlines()[0]
    assert "data/truncated/0 0" in banner and "data/dropped/0 0" in banner
    metrics = [m for m in read_metrics(tmp_path / "sft") if "loss" in m]
    assert [m["data/truncated/0"] for m in metrics] == [1, 2, 3]  # one long chat per step, every one cut
    assert metrics[-1]["data/dropped/0"] == 1
    ids = BYTE.encode_dialog(LONG_CHAT["messages"])[0]
    assert f"a chat of {len(ids)} tokens cut to the row's 129" in done.stderr
    assert f"{chats}:3" in done.stderr and "no trained token" in done.stderr  # the dropped one, by file and line


def test_dpo_reports_cut_replies_and_takes_edited_replies_equal_to_chosen_ones_which_it_never_reads(start, tmp_path):
    same = dict(LONG_PAIR, edited=LONG_PAIR["chosen"])  # cut like the others: every record counts once
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [LONG_PAIR, same, LONG_PAIR])
    done = train("dpo", prefs, tmp_path / "dpo", f"--config.init_from={start}", "--config.data.seq_len=96")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [m for m in read_metrics(tmp_path / "dpo") if "loss" in m]
    assert [m["data/truncated/0"] for m in metrics] == [1, 2, 3]  # one record per step, every one cut
    assert f"reply 'chosen' cut from {len(LONG_REPLY) + 1} to" in done.stderr and f"{prefs}:" in done.stderr


def test_the_reward_stage_refuses_an_edited_reply_equal_to_the_chosen_one_unless_it_ranks_none(start, tmp_path):
    same = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "edited": "Hi!"}
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [same, {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go."}])
    refused = train("reward", prefs, tmp_path / "reward", f"--config.init_from={start}", "--config.data.seq_len=96")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"error: {prefs}:1: malformed record (replies 'chosen' and 'edited' are identical" in refused.stderr
    # Without edited replies the stage ranks chosen over rejected only: the record is usable there.
    c = runpy.run_path(str(ROOT / "configs" / "reward" / "tiny.py"))["get_config"](prefs)
    c.data.update(batch_size=2, seq_len=96, holdout_every=0)
    c.reward.edited = False
    batch = next(reward.STAGE.make_batches(c, BYTE, "train"))
    assert batch["chosen"]["score_mask"].sum() == 2 and "edited" not in batch  # no rows it would not run


def test_encode_pair_reads_edited_replies_only_when_asked():
    same = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "edited": "Hi!"}
    with pytest.raises(DataError, match="'chosen' and 'edited' are identical"):
        encode_pair(BYTE, same, seq_len=96)
    assert sorted(encode_pair(BYTE, same, seq_len=96, edited=False).replies) == ["chosen", "rejected"]
