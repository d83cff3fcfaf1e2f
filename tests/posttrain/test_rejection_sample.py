"""Rejection sampling: one shared prefill per prompt gives the samples of K separate prefills, the reward model picks
the best usable sample, a prompt without one is counted and not written, the samples do not depend on --batch-size,
and the command resumes after a real kill with exactly an uninterrupted run's records."""

import json
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import env, successor_params

from llama_jax import checkpoint, config, generate, model
from llama_jax.data import read_prompts
from llama_jax.errors import ConfigError
from llama_jax.posttrain.rejection_sample import Policy, Settings, best_of_k, sampled_messages
from llama_jax.posttrain.score import Scorer, encode_replies
from llama_jax.tokenizer import get_tokenizer
from llama_jax.train import reward

BYTE = get_tokenizer("byte")
CFG = config.get("tiny", num_layers=2, vocab_size=272)
# A policy whose reply is drawn from five equally likely first bytes after the prompt's closing "\n" (its blocks are
# identity, so each token depends on the previous one only), each leading to one kind of sample.
BRANCH_CFG = CFG.replace(num_layers=1, dim=272, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=256)
EOT, PYTHON_TAG = BYTE.eot_id, BYTE.special_tokens["<|python_tag|>"]
BRANCHES = {  # token -> its equally likely successors
    ord("\n"): [ord("h"), 0xC3, ord(" "), ord("x"), PYTHON_TAG],
    ord("h"): [ord("i"), ord("o")], ord("i"): [EOT], ord("o"): [EOT],  # "hi" or "ho": usable
    0xC3: [EOT],  # a lone UTF-8 lead byte: "\ufffd" if decoded leniently
    ord(" "): [EOT],  # blank
    ord("x"): [ord("x")],  # never ends: cut by --max-new-tokens
    PYTHON_TAG: [EOT],  # another special token
}
REASONS = {"not valid UTF-8", "blank", "no <|eot_id|> at the end", "a special token inside"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A policy and a reward model (random weights, a random head) saved as checkpoints."""
    base = tmp_path_factory.mktemp("models")
    params = model.init_params(CFG, jax.random.key(0))
    params["embedding"] = np.random.default_rng(0).standard_normal(params["embedding"].shape).astype(np.float32)
    tokenizer = {"name": "byte", "sha256": BYTE.sha256}
    checkpoint.save_params(str(base / "policy"), params, CFG, stage="sft", tokenizer=tokenizer)
    rm = {**params, reward.HEAD: np.random.default_rng(1).standard_normal(CFG.dim).astype(np.float32)}
    checkpoint.save_params(str(base / "rm"), rm, CFG, stage="reward", tokenizer=tokenizer)
    branching = successor_params(BRANCH_CFG, {})
    for token, successors in BRANCHES.items():
        branching["lm_head"][token, successors] = 10.0  # x sqrt(dim) after the final norm: the rest never drawn
    checkpoint.save_params(str(base / "branching"), branching, BRANCH_CFG, stage="sft", tokenizer=tokenizer)
    return base / "policy", base / "rm", base / "branching"


@pytest.mark.slow  # 10 s on 2 busy cores
def test_shared_prefill_gives_the_samples_of_separate_prefills(models):
    params, cfg, _ = generate.load_model(str(models[0]))
    prompts = [BYTE.encode_dialog([{"role": "user", "content": text}], add_generation_prompt=True)[0]
               for text in ("Write 3 words.", "Hi", "A longer prompt than the others, by far.")]
    kwargs = dict(temperature=1.0, top_p=0.95, seed=7, stop_ids=BYTE.stop_ids)
    shared = generate.generate(params, cfg, prompts, 12, samples_per_prompt=4, **kwargs)
    separate = generate.generate(params, cfg, [p for p in prompts for _ in range(4)], 12, **kwargs)
    assert shared == separate
    assert len({tuple(s) for s in shared[:4]}) > 1  # the K samples of a prompt differ
    assert shared != generate.generate(params, cfg, prompts, 12, samples_per_prompt=4, **{**kwargs, "seed": 8})


@pytest.mark.slow  # 8 s on 2 busy cores
def test_best_of_k_keeps_the_best_usable_sample(models, tmp_path):
    policy = Policy(*generate.load_model(str(models[2])))
    scorer = Scorer.load(str(models[1]), batch_size=5)
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "Write 2 words."}) + "\n"
                    + json.dumps({"id": "b", "prompt": [{"role": "system", "content": "Old."},
                                                        {"role": "user", "content": "Hi"}]}) + "\n")
    prompts, _ = read_prompts(str(path), BYTE)
    settings = Settings(samples=6, max_new_tokens=8, system_prompt="Be brief.", keep_samples=True, seed=3)
    records, dropped = best_of_k(policy, scorer, prompts, settings)
    assert records and [r["id"] for r in records] + list(dropped) == ["a", "b"][:len(records) + len(dropped)]
    for record in records:
        prompt = next(p for p in prompts if p.id == record["id"])
        assert record["messages"][:-1] == prompt.messages  # the steering prompt is not kept
        texts, scores, usable = record["samples"], np.array(record["scores"]), record["usable"]
        assert usable == [t in ("hi", "ho") for t in texts] and any(usable)
        # The scores are the reward model's for the prompt as recorded and each sample's text.
        np.testing.assert_allclose(scores, scorer.score(encode_replies(BYTE, prompt.messages, texts)), rtol=1e-5)
        assert record["best"] == max((j for j in range(6) if usable[j]), key=lambda j: (scores[j], -j))
        assert record["messages"][-1] == {"role": "assistant", "content": texts[record["best"]]}
    for problems in dropped.values():
        assert len(problems) == 6 and set(problems) <= REASONS
    assert sampled_messages(prompts[1].messages, "Be brief.")[0]["content"] == "Be brief.\n\nOld."
    kept, _ = best_of_k(policy, scorer, prompts[:1], Settings(samples=8, max_new_tokens=4, system_prompt="Be brief.",
                                                              keep_system_prompt=True, seed=1))
    assert kept[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    none, dropped = best_of_k(policy, scorer, prompts, Settings(samples=2, max_new_tokens=1))  # nothing ends
    assert none == [] and dropped == {"a": ["no <|eot_id|> at the end"] * 2, "b": ["no <|eot_id|> at the end"] * 2}
    with pytest.raises(ConfigError, match="identical"):
        Settings(samples=4, temperature=0.0)


def _command(models, prompts, out, *extra, batch_size=1):
    """The command on the branching policy (3 samples of at most 6 tokens per prompt)."""
    return [sys.executable, "-m", "llama_jax.posttrain.rejection_sample", f"--checkpoint={models[2]}",
            f"--reward={models[1]}", f"--input={prompts}", f"--out={out}", "--samples=3", "--max-new-tokens=6",
            f"--batch-size={batch_size}", "--seed=5", *extra]


def _prompts(path, count):
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Write {i % 5 + 1} words."}) + "\n"
                            for i in range(count)))
    return path


def _run(command):
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


@pytest.fixture(scope="module")
def sampled(models, tmp_path_factory):
    """Ten prompts through the command in batches of 3: (the output file, the result, stderr)."""
    base = tmp_path_factory.mktemp("sampled")
    out = base / "best.jsonl"
    return (out, *_run(_command(models, _prompts(base / "prompts.jsonl", 10), out, "--keep-samples", batch_size=3)))


def test_prompts_without_a_usable_sample_are_counted_and_not_written(sampled):
    out, result, stderr = sampled
    records = [json.loads(line) for line in out.read_text().splitlines()]
    written = [r["id"] for r in records]
    assert written == [f"p{i}" for i in range(10) if f"p{i}" in written]  # in the prompts' order
    assert 1 <= len(records) < 10
    for record in records:  # what SFT reads: a reply the policy ended, of valid UTF-8, not blank
        assert record["messages"][-1]["content"] in ("hi", "ho")
        assert record["usable"] == [text in ("hi", "ho") for text in record["samples"]]
    assert result["written"] == len(records) and result["dropped"] == 10 - len(records) and result["skipped"] == 0
    assert sum(result["dropped_samples"].values()) == 3 * result["dropped"]
    assert set(result["dropped_samples"]) <= REASONS
    samples = [text for record in records for text in record["samples"]]
    assert "not valid UTF-8" in result["dropped_samples"] or "\ufffd" in samples  # a lone lead byte was drawn
    assert f"{len(records)} records written, {result['dropped']} prompts without a usable sample not written" in stderr


def test_samples_do_not_depend_on_the_batch_size(sampled, models, tmp_path):
    out, result, _ = sampled  # in batches of 3
    other = tmp_path / "best.jsonl"
    again, _ = _run(_command(models, _prompts(tmp_path / "prompts.jsonl", 10), other, "--keep-samples", batch_size=1))
    samples = [[json.loads(line)["samples"] for line in path.read_text().splitlines()] for path in (other, out)]
    assert samples[0] == samples[1]
    assert other.read_bytes() == out.read_bytes()
    assert {**again, "out": None} == {**result, "out": None}


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_losses(models, tmp_path):
    prompts = _prompts(tmp_path / "prompts.jsonl", 16)
    straight = tmp_path / "straight.jsonl"
    result, _ = _run(_command(models, prompts, straight))
    assert result["sampled_prompts"] == 16 and result["resumed_prompts"] == 0
    total = len(straight.read_text().splitlines())

    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(_command(models, prompts, killed), env=env(), stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if killed.exists() and len(killed.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    lines = killed.read_text().splitlines()
    assert 2 <= len(lines) < total, f"the kill came too late to test anything ({len(lines)} of {total} records)"
    with open(killed, "a") as f:  # what a kill in the middle of a write leaves: half a record
        f.write(lines[-1][:40])
    # Resumed in batches of another size: the samples are the same.
    resumed, _ = _run(_command(models, prompts, killed, batch_size=4))
    assert resumed["resumed_prompts"] == int(json.loads(lines[-1])["id"][1:]) + 1  # after the last record's prompt
    assert killed.read_text() == straight.read_text()  # every usable prompt once, the same samples, in order

    other = subprocess.run(_command(models, prompts, killed, "--temperature=0.5"), env=env(), capture_output=True,
                           text=True, timeout=600)
    assert other.returncode == 2 and "other settings" in other.stderr
