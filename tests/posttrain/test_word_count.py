"""The word-count task: the judge, the datasets it writes, annotation of samples, and win rates of two models whose
replies are known in advance."""

import json

import numpy as np
import pytest
from conftest import successor_params

from llama_jax import checkpoint, config
from llama_jax.data import encode_pair, read_prompts
from llama_jax.errors import ConfigError, DataError
from llama_jax.eval import word_count as wc
from llama_jax.tokenizer import get_tokenizer

BYTE = get_tokenizer("byte")


def test_judge():
    assert wc.asked_words("Write 3 words about the sea.") == 3
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "Write 1 word about x."}]
    assert wc.asked_words(messages) == 1
    assert wc.judge("Write 3 words about the sea.", "Salt and  foam.") == 0
    assert wc.judge("Write 3 words about the sea.", "Salt.") == -2
    assert wc.judge("Write 2 words about love.", "") == -2
    assert wc.prefer("Write 2 words about love.", "Sweet heart.", "Sweet.") == 1
    assert wc.prefer("Write 2 words about love.", "A b c.", "A.") == 0
    with pytest.raises(ConfigError, match="not a word-count prompt"):
        wc.asked_words("Tell me a story.")


def test_datasets(tmp_path):
    paths = wc.write_datasets(tmp_path, seed=0, sft=400, preference=400, prompts=20, heldout=20)
    read = {name: [json.loads(line) for line in open(path)] for name, path in paths.items()}
    obeys = [wc.judge(r["prompt"], r["completion"]) == 0 for r in read["sft"]]
    assert 0.4 < np.mean(obeys) < 0.6  # sft_accuracy=0.5: the SFT data leave room to improve
    assert all(wc.judge(r["prompt"], r["completion"]) >= -2 for r in read["sft"])
    edited = 0
    for r in read["preference"]:
        assert wc.judge(r["prompt"], r["chosen"]) > wc.judge(r["prompt"], r["rejected"])
        if "edited" in r:
            edited += 1
            assert wc.judge(r["prompt"], r["edited"]) == 0 > wc.judge(r["prompt"], r["chosen"])
        encode_pair(BYTE, r, seq_len=128)  # usable preference data: no empty or identical replies, fits
    assert 0.2 < edited / 400 < 0.4
    assert {r["id"] for r in read["prompts"]}.isdisjoint({r["id"] for r in read["heldout"]})
    assert read_prompts(paths["heldout"], BYTE)[0][0].messages == [{"role": "user",
                                                                    "content": read["heldout"][0]["prompt"]}]
    again = wc.write_datasets(tmp_path / "again", seed=0, sft=400, preference=400, prompts=20, heldout=20)
    assert all(open(paths[k]).read() == open(again[k]).read() for k in paths)  # reproducible from the seed


def test_annotate_ranks_samples_by_the_judge():
    prompt = [{"role": "user", "content": "Write 2 words about love."}]
    records = [
        {"messages": [*prompt, {"role": "assistant", "content": "A."}], "usable": [True, True, False, True],
         "samples": ["A.", "Sweet heart.", "Sweet heart", "One two three four."]},
        {"messages": [*prompt, {"role": "assistant", "content": "A b."}], "usable": [True, True],
         "samples": ["A b.", "C d."]},  # the judge cannot tell them apart: no pair
    ]
    assert wc.annotate(records) == [{"prompt": prompt, "chosen": "Sweet heart.", "rejected": "One two three four."}]
    with pytest.raises(DataError, match="--keep-samples"):
        wc.annotate([{"messages": prompt}])


def test_the_commands_write_where_out_says(tmp_path, capsys):
    data = tmp_path / "data"
    assert wc.main(["data", "--out", str(data), "--sft", "2", "--preference", "2", "--prompts", "2",
                    "--heldout", "2"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["out"] == str(data) and len((data / "prompts.jsonl").read_text().splitlines()) == 2
    samples, pairs = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    samples.write_text(json.dumps({"messages": [{"role": "user", "content": "Write 2 words about love."},
                                                {"role": "assistant", "content": "A."}],
                                   "usable": [True, True], "samples": ["Sweet heart.", "A."]}) + "\n")
    assert wc.main(["annotate", "--input", str(samples), "--out", str(pairs)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"out": str(pairs), "pairs": 1}
    assert json.loads(pairs.read_text())["chosen"] == "Sweet heart."


@pytest.mark.slow  # 13 s on 2 busy cores
def test_win_rates_of_models_with_known_replies(tmp_path):
    """Two models whose greedy reply is fixed: "A." (1 word) and "A B." (2 words)."""
    cfg = config.get("tiny", vocab_size=272, dim=272, num_layers=1, num_heads=4, num_kv_heads=2, ffn_dim=64)
    newline, space, dot = ord("\n"), ord(" "), ord(".")
    one = successor_params(cfg, {newline: ord("A"), ord("A"): dot, dot: BYTE.eot_id})
    two = successor_params(cfg, {newline: ord("A"), ord("A"): space, space: ord("B"), ord("B"): dot,
                                 dot: BYTE.eot_id})
    tokenizer = {"name": "byte", "sha256": BYTE.sha256}
    for name, params in (("one", one), ("two", two)):
        params["lm_head"] *= 100.0  # the successor's probability ~1: sampling at temperature 1 is deterministic
        checkpoint.save_params(str(tmp_path / name), params, cfg, stage="sft", tokenizer=tokenizer)
    paths = wc.write_datasets(tmp_path / "data", seed=1, sft=1, preference=1, prompts=1, heldout=40)
    asked = np.array([wc.asked_words(json.loads(line)["prompt"]) for line in open(paths["heldout"])])
    rows = wc.win_rates({"one": str(tmp_path / "one"), "two": str(tmp_path / "two")}, paths["heldout"],
                        baseline="one", samples=3, max_new_tokens=8)
    one_row, two_row = rows
    assert one_row["example"] == "A." and two_row["example"] == "A B."
    assert one_row["compliance"] == np.mean(asked == 1) and two_row["compliance"] == np.mean(asked == 2)
    assert one_row["greedy_compliance"] == one_row["compliance"]
    assert one_row["words_off"] == np.mean(np.abs(asked - 1)) and one_row["win_rate"] == 0.5
    assert two_row["win_rate"] == np.mean(asked >= 2)  # "A B." is closer for N >= 2, further for N = 1
    assert "| two | " in wc.format_table(rows, "one")
