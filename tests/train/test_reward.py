"""The reward stage: packed rows score like separate rows, the loss averages ordered pairs as the formula says, the
score command, the run resumes from its own checkpoints and starts from a pretrained one."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, env, losses_by_step, preference_config, read_metrics

from llama_jax import checkpoint, config, data, model
from llama_jax.checkpoint import CheckpointManager
from llama_jax.errors import ConfigError, DataError
from llama_jax.eval import word_count
from llama_jax.posttrain.score import Scorer, encode_replies
from llama_jax.tokenizer import get_tokenizer
from llama_jax.train import loop, reward

BYTE = get_tokenizer("byte")
CFG = config.get("tiny", num_layers=2)
RECORDS = [
    {"prompt": "Write 3 words about the sea.", "chosen": "Salt and foam.", "rejected": "Salt.",
     "edited": "Salt, foam, waves."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "How are you?"}],
     "chosen": "Well, thanks!", "rejected": "Go away, you."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A colour is a property of light."},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def eval_batch(path, seq_len=128, rows=3):
    """Every record held out, one per row, in file order."""
    cfg = dict(tokenizer="byte", seq_len=seq_len, batch_size=rows, seed=0, holdout_every=1,
               sources=[dict(format="preference", path=str(path))])
    return next(data.make_batches(cfg, BYTE, split="eval"))


@pytest.fixture(scope="module")
def params():
    p = model.init_params(CFG, jax.random.key(0))
    return {**p, reward.HEAD: np.random.default_rng(1).normal(size=CFG.dim).astype(np.float32)}


@pytest.mark.slow  # 12 s on 2 busy cores
def test_packed_rows_score_like_separate_rows(params, tmp_path):
    batch = eval_batch(write_jsonl(tmp_path / "p.jsonl", RECORDS))
    packed, too_long = reward.pack_replies(batch, data.REPLIES)
    assert too_long == []
    row = packed["packed"]
    assert (row["segment_ids"][0] == -1).sum() == int(np.argmax(batch["chosen"]["loss_mask"][0])) + 1
    separate = reward.reply_scores(params, CFG, batch, names=data.REPLIES)
    together = reward.reply_scores(params, CFG, packed, names=data.REPLIES, packed=True)
    for name in data.REPLIES:
        np.testing.assert_allclose(together[name], separate[name], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(separate["chosen"]) != 0) and float(separate["edited"][1]) == 0.0  # record 1: none
    # Each reply scored alone, in its own unpadded row, scores the same too.
    for i, record in enumerate(RECORDS):
        ids = encode_replies(BYTE, record["prompt"], [record["chosen"]])[0]
        alone = reward.token_scores(params, CFG, np.array([ids]), np.arange(len(ids))[None], np.ones((1, len(ids))))
        np.testing.assert_allclose(alone[0, -1], separate["chosen"][i], rtol=1e-5, atol=1e-5)


def test_packed_batches_refuse_or_count_records_that_do_not_fit(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    cfg = dict(tokenizer="byte", seq_len=64, batch_size=3, seed=0, holdout_every=1,
               sources=[dict(format="preference", path=path)])
    with pytest.raises(DataError, match="more than a packed row"):
        next(reward.PackedBatches(data.make_batches(cfg, BYTE, split="eval"), data.REPLIES, "raise"))
    skipping = reward.PackedBatches(data.make_batches(cfg, BYTE, split="eval"), data.REPLIES, "skip")
    batch = next(skipping)
    assert len(skipping.skipped) == 3 and not batch["chosen"]["score_mask"].any()


def bt(better, worse):
    return np.log1p(np.exp(-(np.float64(better) - worse)))


def test_loss_averages_the_ordered_pairs_of_each_record(params, tmp_path):
    batch = eval_batch(write_jsonl(tmp_path / "p.jsonl", RECORDS[:2]), rows=3)  # row 2: padding
    scores = {k: np.asarray(v, np.float64) for k, v in
              reward.reply_scores(params, CFG, batch, names=data.REPLIES).items()}
    c, r, e = scores["chosen"], scores["rejected"], scores["edited"]
    record0 = (bt(c[0], r[0]) + bt(e[0], c[0]) + bt(e[0], r[0])) / 3  # edited > chosen > rejected
    record1 = bt(c[1], r[1])
    loss, metrics = reward.make_loss_fn(CFG)(params, batch, None)
    np.testing.assert_allclose(loss, (record0 + record1) / 2, rtol=1e-5)
    right = ((c[0] > r[0]) + (e[0] > c[0]) + (e[0] > r[0])) / 3, float(c[1] > r[1])
    np.testing.assert_allclose(metrics["accuracy"], np.mean(right), rtol=1e-6)
    np.testing.assert_allclose(metrics["chosen_score"], c[:2].mean(), rtol=1e-5)
    assert float(metrics["loss_weight"]) == 2
    without_edited, _ = reward.make_loss_fn(CFG, edited=False)(params, batch, None)
    np.testing.assert_allclose(without_edited, (bt(c[0], r[0]) + record1) / 2, rtol=1e-5)
    fresh = {**params, reward.HEAD: np.zeros(CFG.dim, np.float32)}  # a new head scores every reply 0
    loss, metrics = reward.make_loss_fn(CFG)(fresh, batch, None)
    assert float(loss) == np.float32(np.log(2)) and float(metrics["accuracy"]) == 0.5


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 'pretrained' checkpoint (random weights) and word-count preference data."""
    base = tmp_path_factory.mktemp("reward")
    params = model.init_params(CFG, jax.random.key(3))
    checkpoint.save_params(str(base / "pretrained"), params, CFG, stage="pretrain",
                           tokenizer={"name": "byte", "sha256": BYTE.sha256})
    paths = word_count.write_datasets(base / "data", seed=0, sft=8, preference=200, prompts=4, heldout=4)
    return base / "pretrained", paths["preference"]


@pytest.mark.slow  # 30 s on 2 busy cores
def test_reward_run_starts_from_pretrained_and_resumes_exactly(pretrained, tmp_path):
    start, prefs = pretrained
    straight = preference_config("reward", prefs, tmp_path / "a", train=dict(steps=4))
    straight.init_from = str(start)
    assert loop.run(straight)["step"] == 4
    split = preference_config("reward", prefs, tmp_path / "b", train=dict(steps=2))
    split.init_from = str(start)
    loop.run(split)
    split.train.steps = 4
    loop.run(split)
    losses = [losses_by_step(tmp_path / run) for run in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert losses[0][1] == pytest.approx(np.log(2), abs=1e-6)  # the fresh head
    a, b = (CheckpointManager(tmp_path / run).restore(4) for run in ("a", "b"))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(x, y)
    assert a.metadata["extra_params"] == [reward.HEAD] and a.metadata["stage"] == "reward"
    assert a.metadata["init_from"]["path"] == os.path.abspath(start)
    assert np.abs(a.params[reward.HEAD]).sum() > 0
    scorer = Scorer.load(str(tmp_path / "a"))
    assert scorer.score([[1, 2, 3]]).shape == (1,)


def test_score_command(pretrained, tmp_path):
    start, _ = pretrained
    rm = tmp_path / "rm"
    params, cfg, _ = checkpoint.load(str(start))
    params[reward.HEAD] = np.random.default_rng(2).normal(size=cfg.dim).astype(np.float32)
    checkpoint.save_params(str(rm), params, cfg, stage="reward", tokenizer={"name": "byte", "sha256": BYTE.sha256})
    records = [{"prompt": "Hi", "response": "Hello!", "id": 1},
               {"prompt": [{"role": "user", "content": "2+2?"}], "responses": ["4", {"role": "assistant",
                                                                                    "content": "Four."}]}]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n" + '{"prompt": "x"}\n')
    command = [sys.executable, "-m", "llama_jax.posttrain.score", f"--checkpoint={rm}", f"--input={src}",
               f"--out={tmp_path / 'out.jsonl'}"]
    bad = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and f"error: {src}:4:" in bad.stderr and "Traceback" not in bad.stderr
    good = subprocess.run([*command, "--on-error=skip", "--batch-size=2"], env=env(), capture_output=True, text=True,
                          timeout=300)
    assert good.returncode == 0, good.stderr[-2000:]
    summary = json.loads(good.stdout.splitlines()[-1])
    assert summary["records"] == 2 and summary["replies"] == 3 and summary["skipped"] == 1
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    scorer = Scorer.load(str(rm))
    expected = scorer.score(encode_replies(BYTE, "Hi", ["Hello!"]) + encode_replies(BYTE, "2+2?", ["4", "Four."]))
    assert out[0]["id"] == 1
    np.testing.assert_allclose([out[0]["score"], *out[1]["scores"]], expected, rtol=1e-5)


def test_bad_records_are_clear_errors_or_counted_skips(tmp_path):
    bad = [{"prompt": "Hi", "chosen": " ", "rejected": "No."},  # an empty reply
           {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},  # identical replies
           {"prompt": "x" * 500, "chosen": "A.", "rejected": "B."},  # the prompt fills the row
           {"prompt": "Hi", "rejected": "No."}]  # no chosen reply
    path = write_jsonl(tmp_path / "bad.jsonl", RECORDS[:1] + bad)
    c = preference_config("reward", path, tmp_path / "run")
    c.data.update(holdout_every=1, batch_size=5)  # the eval pass: records in file order
    for line, (record, why) in enumerate(zip(bad, ["empty", "identical", "fills the row", '"chosen"']), start=2):
        only = write_jsonl(tmp_path / f"bad{line}.jsonl", [record])
        c.data.sources = [dict(format="preference", path=only, weight=1.0)]
        with pytest.raises(DataError, match=why):
            next(reward.STAGE.make_batches(c, BYTE, "eval"))
    c.data.sources = [dict(format="preference", path=path, weight=1.0)]
    with pytest.raises(DataError, match="bad.jsonl:2"):
        next(reward.STAGE.make_batches(c, BYTE, "eval"))
    c.data.on_error = "skip"
    batches = reward.STAGE.make_batches(c, BYTE, "eval")
    batch = next(batches)
    assert batch["chosen"]["score_mask"].sum() == 1 and len(batches.skipped) == 4


@pytest.mark.slow  # 9 s on 2 busy cores
def test_reward_model_ranks_held_out_pairs_after_a_short_run(pretrained, tmp_path):
    """Packed rows through the whole loop, on a preference a program states and a model learns fast from random
    weights: the same reply in lower case (chosen) or in capitals (rejected); held-out pairs have other prompts."""
    start, _ = pretrained
    rng = np.random.default_rng(0)
    replies = [" ".join(rng.choice(word_count.WORDS, size=rng.integers(1, 6))) + "." for _ in range(400)]
    path = write_jsonl(tmp_path / "case.jsonl", [{"prompt": f"Say something about {rng.choice(word_count.TOPICS)}.",
                                                  "chosen": r, "rejected": r.upper()} for r in replies])
    c = preference_config("reward", path, tmp_path / "run", train=dict(steps=30), reward=dict(packed=True),
                          schedule=dict(warmup_steps=3, decay_steps=30, total_steps=30),
                          logging=dict(every=5, eval_every=30, eval_batches=6))
    c.init_from, c.data.seq_len = str(start), 128
    summary = loop.run(c)
    assert summary["loss"] < np.log(2) and summary["chosen_score"] > summary["rejected_score"]
    # 48 held-out pairs: 0.5 + 3 binomial standard deviations (3 x sqrt(0.25 / 48) = 0.22) is 0.72.
    assert summary["eval_accuracy"] >= 0.72, summary


def test_packed_rows_refuse_the_fused_attention(tmp_path):
    c = preference_config("reward", write_jsonl(tmp_path / "p.jsonl", RECORDS), tmp_path / "run",
                          reward=dict(packed=True))
    c.model.attention = "flash"
    with pytest.raises(ConfigError, match="model.attention=dense"):
        reward.STAGE.make_loss_fn(loop.model_config(c.model), c)


def test_without_edited_replies_only_chosen_and_rejected_rows_run(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{k: v for k, v in r.items() if k != "edited"} for r in RECORDS * 8])
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "llama_jax.train", f"--config={ROOT / 'configs/reward/tiny.py'}:{plain}",
               f"--config.run_dir={run_dir}", "--config.model.num_layers=2", "--config.data.batch_size=8",
               "--config.data.seq_len=96", "--config.logging.every=1", "--config.logging.eval_every=0",
               "--config.train.steps=1"]
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first = read_metrics(run_dir)[0]
    assert first["tokens_per_step"] == 2 * 8 * 96  # no edited rows: 2 of every record's 3 sub-batches
    flops = config.get("tiny", num_layers=2).flops_per_token(96)
    assert first["mfu"] == pytest.approx(flops * first["tokens_per_s"] / 0.1e12, rel=1e-6)  # peak_tflops=0.1
    # With an edited reply in the data, every batch carries the edited rows (one shape for the whole run).
    c = preference_config("reward", write_jsonl(tmp_path / "p.jsonl", RECORDS), tmp_path / "b")
    c.data.update(holdout_every=1, batch_size=3)
    assert sorted(next(reward.STAGE.make_batches(c, BYTE, "eval"))) == sorted(data.REPLIES)
    c.data.sources = [dict(format="preference", path=plain, weight=1.0)]
    assert sorted(next(reward.STAGE.make_batches(c, BYTE, "eval"))) == ["chosen", "rejected"]
