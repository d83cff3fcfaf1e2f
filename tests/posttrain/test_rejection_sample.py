"""Rejection sampling: one shared prefill per prompt gives the samples of K separate prefills, the reward model picks
the best usable sample, and the command resumes after a real kill with exactly an uninterrupted run's records."""

import json
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import env

from llama_jax import checkpoint, config, generate, model
from llama_jax.data import read_prompts
from llama_jax.errors import ConfigError
from llama_jax.posttrain.rejection_sample import Policy, Settings, best_of_k, sampled_messages
from llama_jax.posttrain.score import Scorer, encode_replies
from llama_jax.tokenizer import get_tokenizer
from llama_jax.train import reward

BYTE = get_tokenizer("byte")
CFG = config.get("tiny", num_layers=2, vocab_size=272)


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
    return base / "policy", base / "rm"


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
    policy = Policy(*generate.load_model(str(models[0])))
    scorer = Scorer.load(str(models[1]), batch_size=5)
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "Write 2 words."}) + "\n"
                    + json.dumps({"id": "b", "prompt": [{"role": "system", "content": "Old."},
                                                        {"role": "user", "content": "Hi"}]}) + "\n")
    prompts, _ = read_prompts(str(path), BYTE)
    settings = Settings(samples=6, max_new_tokens=8, system_prompt="Be brief.", keep_samples=True)
    records = best_of_k(policy, scorer, prompts, settings, seed=3)
    for prompt, record in zip(prompts, records):
        assert record["messages"][:-1] == prompt.messages  # the steering prompt is not kept
        texts, scores, usable = record["samples"], np.array(record["scores"]), record["usable"]
        # The scores are the reward model's for the prompt as recorded and each sample's text.
        np.testing.assert_allclose(scores, scorer.score(encode_replies(BYTE, prompt.messages, texts)), rtol=1e-5)
        ranked = [j for j in range(6) if usable[j]] or list(range(6))
        assert record["best"] == max(ranked, key=lambda j: (scores[j], -j))
        assert record["messages"][-1] == {"role": "assistant", "content": texts[record["best"]]}
    assert sampled_messages(prompts[1].messages, "Be brief.")[0]["content"] == "Be brief.\n\nOld."
    kept = best_of_k(policy, scorer, prompts[:1], Settings(samples=2, max_new_tokens=4, system_prompt="Be brief.",
                                                           keep_system_prompt=True), seed=0)
    assert kept[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(ConfigError, match="identical"):
        Settings(samples=4, temperature=0.0)


def _command(models, prompts, out, *extra):
    return [sys.executable, "-m", "llama_jax.posttrain.rejection_sample", f"--checkpoint={models[0]}",
            f"--reward={models[1]}", f"--input={prompts}", f"--out={out}", "--samples=3", "--max-new-tokens=24",
            "--batch-size=1", "--seed=5", *extra]


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_losses(models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Write {i % 5 + 1} words."}) + "\n"
                               for i in range(8)))
    straight = tmp_path / "straight.jsonl"
    done = subprocess.run(_command(models, prompts, straight), env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["sampled_batches"] == 8

    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(_command(models, prompts, killed), env=env(), stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if killed.exists() and len(killed.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    cut = len(killed.read_text().splitlines())
    assert 2 <= cut < 8, f"the kill came too late to test anything ({cut} records)"
    with open(killed, "a") as f:  # what a kill in the middle of a write leaves: half a record
        f.write(killed.read_text().splitlines()[-1][:40])
    resumed = subprocess.run(_command(models, prompts, killed), env=env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.splitlines()[-1])["resumed_batches"] == cut
    assert killed.read_text() == straight.read_text()  # every prompt once, the same samples, in order

    other = subprocess.run(_command(models, prompts, killed, "--temperature=0.5"), env=env(), capture_output=True,
                           text=True, timeout=600)
    assert other.returncode == 2 and "other settings" in other.stderr
