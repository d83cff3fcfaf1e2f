"""The DPO stage: log-probs and the formatting mask on real chat ids against full-softmax NumPy, the NLL term's
normalisation, ln 2 at the first step (accumulated, sharded), precomputed reference == reference model, learning on
held-out pairs, and stages chained through the real train command."""

import json
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import (
    ROOT,
    assert_trees_equal,
    env,
    losses_by_step,
    preference_config,
    read_metrics,
)

from llama_jax import checkpoint, config, data, model, optim, sharding
from llama_jax.checkpoint import CheckpointManager, checksums
from llama_jax.data.preference import FORMATTING_TOKENS
from llama_jax.errors import CheckpointError, DataError
from llama_jax.eval import word_count
from llama_jax.posttrain import reference_logps
from llama_jax.tokenizer import get_tokenizer
from llama_jax.train import build, create_state, dpo, loop, make_train_step, state_shardings

BYTE = get_tokenizer("byte")
TINY = config.get("tiny", num_layers=2)
LN2 = float(np.float32(np.log(2)))
TOOL_REPLY = [
    {"role": "assistant", "content": 'wiki.call(query="Italy capital")', "tool_call": True},
    {"role": "ipython", "content": "Rome"},
    {"role": "assistant", "content": "Rome."},
]
RECORDS = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Italy?"}],
     "chosen": TOOL_REPLY, "rejected": "Milan, I think."},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def eval_batch(path, tok, seq_len=128):
    cfg = dict(data.batches.DEFAULTS, tokenizer=tok.name, seq_len=seq_len, batch_size=2, holdout_every=1,
               sources=[dict(format="preference", path=str(path))])
    return next(data.make_batches(cfg, tok, split="eval"))


def numpy_logps(params, cfg, rows):
    """Per-target log p from the full softmax of model.apply's logits, float64 [R, T]."""
    logits = np.asarray(model.Llama(cfg).apply({"params": params}, rows["tokens"], rows["positions"],
                                               rows["segment_ids"]), np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.take_along_axis(log_probs, rows["targets"][..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def llama3_case(tmp_path_factory):
    """Real Llama 3 chat ids, and a small model over the whole Llama 3 vocabulary."""
    tok = get_tokenizer("llama3")
    cfg = config.get("tiny", vocab_size=tok.vocab_size, dim=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_dim=64)
    params = model.init_params(cfg, jax.random.key(0))
    batch = eval_batch(write_jsonl(tmp_path_factory.mktemp("dpo") / "p.jsonl", RECORDS), tok)
    return tok, cfg, params, batch


@pytest.mark.slow  # 9 s on 2 busy cores
def test_log_probs_sum_over_the_reply_without_formatting_tokens(llama3_case):
    tok, cfg, params, batch = llama3_case
    formatting = [tok.special_id(t) for t in FORMATTING_TOKENS]
    rows = batch["chosen"]
    per_target = numpy_logps(params, cfg, rows)
    content = rows["loss_mask"] * ~np.isin(rows["targets"], formatting)
    sums, lengths = dpo.reply_logps(params, cfg, rows, chunk_size=40_000)  # chunked over the vocabulary
    np.testing.assert_allclose(sums["dpo_mask"], (per_target * content).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(sums["loss_mask"], (per_target * rows["loss_mask"]).sum(-1), rtol=1e-5)
    np.testing.assert_array_equal(lengths, rows["loss_mask"].sum(-1))
    trained_formatting = rows["targets"][(rows["loss_mask"] == 1) & ~content.astype(bool)]
    assert sorted(set(trained_formatting.tolist())) == [tok.eom_id, tok.eot_id]  # the call's and the answer's ends

    # The reply's closing <|eot_id|> changed (as target and as the last input): no DPO log-prob changes.
    end = int(np.flatnonzero(rows["score_mask"][0])[0])
    changed = {k: v.copy() for k, v in rows.items()}
    changed["targets"][0, end - 1] = changed["tokens"][0, end] = tok.eom_id
    after, _ = dpo.reply_logps(params, cfg, changed, chunk_size=None)
    before, _ = dpo.reply_logps(params, cfg, rows, chunk_size=None)
    np.testing.assert_allclose(after["dpo_mask"], before["dpo_mask"], rtol=1e-6)
    assert abs(float(after["loss_mask"][0] - before["loss_mask"][0])) > 1e-3
    # A content token changed: the DPO log-prob changes.
    first = int(np.argmax(rows["loss_mask"][0]))
    changed = {k: v.copy() for k, v in rows.items()}
    changed["targets"][0, first] = changed["tokens"][0, first + 1] = tok.encode("Paris")[0]
    after, _ = dpo.reply_logps(params, cfg, changed, chunk_size=None)
    assert abs(float(after["dpo_mask"][0] - before["dpo_mask"][0])) > 1e-3


@pytest.mark.slow  # 9 s on 2 busy cores
def test_nll_term_is_each_chosen_replys_token_mean_averaged_over_pairs(llama3_case):
    _, cfg, params, batch = llama3_case
    per_target = numpy_logps(params, cfg, batch["chosen"])
    mask = batch["chosen"]["loss_mask"]
    expected_nll = np.mean(-(per_target * mask).sum(-1) / mask.sum(-1))  # closing tokens included
    loss, metrics = dpo.make_loss_fn(cfg, nll_coef=0.2, chunk_size=None)(params, batch, None, params)
    np.testing.assert_allclose(metrics["nll_loss"], expected_nll, rtol=1e-5)
    assert float(metrics["dpo_loss"]) == pytest.approx(LN2, abs=1e-6)  # policy == reference
    np.testing.assert_allclose(loss, metrics["dpo_loss"] + 0.2 * expected_nll, rtol=1e-5)
    _, unmasked = dpo.make_loss_fn(cfg, mask_formatting=False, chunk_size=None)(params, batch, None, params)
    np.testing.assert_allclose(unmasked["chosen_logp"], np.mean((per_target * mask).sum(-1)), rtol=1e-5)


@pytest.fixture(scope="module")
def word_pairs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pairs")
    return word_count.write_datasets(base, seed=0, sft=8, preference=240, prompts=4, heldout=4)["preference"]


def train_batches(path, n, rows=8, seq_len=96):
    cfg = dict(data.batches.DEFAULTS, tokenizer="byte", seq_len=seq_len, batch_size=rows, holdout_every=0,
               sources=[dict(format="preference", path=str(path))])
    it = data.make_batches(cfg, BYTE)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("mesh_spec,accumulate", [
    ("fsdp=1", False),
    pytest.param("fsdp=1", True, marks=pytest.mark.slow),  # 9 s on 2 busy cores
    pytest.param("data=2,fsdp=2,tensor=2", True, marks=pytest.mark.slow),  # 9 s on 2 busy cores
])
def test_first_step_with_policy_equal_to_reference_is_ln2(word_pairs, mesh_spec, accumulate):
    devices = jax.devices()[:1] if mesh_spec == "fsdp=1" else None
    mesh = sharding.make_mesh(mesh_spec, devices=devices)
    schedule = optim.lr_schedule(1e-3, 0, 100)  # a real update at step 0, so step 1 shows the change
    tx = optim.adamw(schedule)
    start = model.init_params(TINY, jax.random.key(1))
    state = create_state(TINY, tx, mesh, stage=dpo.STAGE, params=start)
    loss_fn = dpo.make_loss_fn(TINY, nll_coef=0.0, chunk_size=None)
    step = make_train_step(loss_fn, tx, mesh, state_shardings(TINY, tx, mesh, dpo.STAGE),
                           microbatch_tokens=2 * 96 if accumulate else None)
    first, second = train_batches(word_pairs, 2)
    state, metrics = step(state, first)
    assert float(metrics["loss"]) == pytest.approx(LN2, abs=2e-7), float(metrics["loss"]) - LN2
    assert abs(float(metrics["margin"])) < 1e-6 and float(metrics["accuracy"]) == 0.5
    assert float(metrics["loss_weight"]) == 8
    _, metrics = step(state, second)
    assert float(metrics["loss"]) < LN2 and float(metrics["margin"]) > 0  # the policy moved, the reference did not


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    path = tmp_path_factory.mktemp("start") / "sft"
    checkpoint.save_params(str(path), model.init_params(TINY, jax.random.key(2)), TINY, stage="sft",
                           tokenizer={"name": "byte", "sha256": BYTE.sha256})
    return path


@pytest.mark.slow  # 18 s on 2 busy cores
def test_precomputed_reference_gives_the_same_losses(word_pairs, start, tmp_path):
    annotated = tmp_path / "prefs.ref.jsonl"
    args = [f"--config={ROOT / 'configs' / 'dpo' / 'tiny.py'}:{word_pairs}", f"--config.init_from={start}",
            "--config.model.num_layers=2", "--config.data.seq_len=96", f"--out={annotated}", "--batch-size=32"]
    assert reference_logps.main(args) == 0
    column = json.loads(annotated.read_text().splitlines()[0])["reference_logps"]
    assert column["checkpoint"] == checkpoint.identity(str(start)) and column["seq_len"] == 96
    steps = dict(train=dict(steps=3))
    loop.run(preference_config("dpo", word_pairs, tmp_path / "model", start, **steps))
    loop.run(preference_config("dpo", annotated, tmp_path / "precomputed", start, dpo=dict(reference="precomputed"),
                               **steps))
    model_losses, precomputed = losses_by_step(tmp_path / "model"), losses_by_step(tmp_path / "precomputed")
    assert model_losses[1] == pytest.approx(LN2 + 0.2 * 5.0, abs=2.0)  # sanity: ln 2 + 0.2 x a per-token NLL
    np.testing.assert_allclose([precomputed[s] for s in (1, 2, 3)], [model_losses[s] for s in (1, 2, 3)], rtol=2e-5)
    spec = {"mask": "dpo_mask", "checkpoint": checkpoint.identity(str(start))}
    data_cfg = dict(data.batches.DEFAULTS, tokenizer="byte", batch_size=8, sources=[dict(format="preference",
                                                                                          path=str(annotated))])
    with pytest.raises(DataError, match="seq_len"):  # the column was computed for rows of 96 tokens
        next(data.make_batches(dict(data_cfg, seq_len=128), BYTE, reference=spec))
    with pytest.raises(DataError, match="checkpoint"):  # computed by another model than the one DPO starts from
        next(data.make_batches(dict(data_cfg, seq_len=96), BYTE, reference={**spec, "checkpoint": {"path": "x"}}))
    moved_on = {**spec["checkpoint"], "step": 99}  # init_from, a run directory, now resolves to a newer step
    made = spec["checkpoint"]["step"]
    with pytest.raises(DataError, match=f"computed with step {made} .*resolves to step 99 .*step {made}'s directory"):
        next(data.make_batches(dict(data_cfg, seq_len=96), BYTE, reference={**spec, "checkpoint": moved_on}))
    with pytest.raises(DataError, match="no \"reference_logps\" column"):
        next(data.make_batches(dict(data_cfg, seq_len=96, sources=[dict(format="preference", path=str(word_pairs))]),
                               BYTE, reference=spec))


@pytest.mark.slow  # 15 s on 2 busy cores
def test_a_short_run_grows_the_margin_and_ranks_held_out_pairs_better(start, tmp_path):
    """A preference a program states and a model learns fast from random weights: the same reply in lower case
    (chosen) or in capitals (rejected). Held-out pairs are other prompts and other words."""
    rng = np.random.default_rng(0)
    replies = [" ".join(rng.choice(word_count.WORDS, size=rng.integers(1, 6))) + "." for _ in range(400)]
    path = write_jsonl(tmp_path / "case.jsonl", [{"prompt": f"Say something about {rng.choice(word_count.TOPICS)}.",
                                                  "chosen": r, "rejected": r.upper()} for r in replies])
    c = preference_config("dpo", path, tmp_path / "run", start, train=dict(steps=30),
                          schedule=dict(peak_lr=1e-3, warmup_steps=3, decay_steps=30, total_steps=30),
                          logging=dict(every=5, eval_every=30, eval_batches=6))
    run = loop.build(c)
    held_out = [b for _, b in zip(range(6), run.stage.make_batches(c, run.tokenizer, "eval"))]
    before = [jax.device_get(run.eval_step(run.state, b)) for b in held_out]
    summary = loop.fit(run)
    assert float(np.mean([m["accuracy"] for m in before])) == 0.5  # policy == reference: every pair a tie
    first = losses_by_step(tmp_path / "run")
    assert summary["margin"] > 0.1 and summary["eval_margin"] > 0.1 and summary["loss"] < first[5]
    # 48 held-out pairs: 0.5 + 3 binomial standard deviations (3 x sqrt(0.25 / 48) = 0.22) is 0.72.
    assert summary["eval_accuracy"] >= 0.72, summary


@pytest.mark.slow
def test_dpo_starts_from_sft_and_resumes_in_fresh_processes(word_pairs, start, tmp_path):
    def command(run_dir, steps):
        return [sys.executable, "-m", "llama_jax.train", f"--config={ROOT / 'configs/dpo/tiny.py'}:{word_pairs}",
                f"--config.init_from={start}", f"--config.run_dir={run_dir}", "--config.model.num_layers=2",
                "--config.data.batch_size=8", "--config.data.seq_len=96", "--config.logging.every=1",
                "--config.logging.eval_every=0", f"--config.train.steps={steps}"]

    for steps in (2, 4):  # two fresh processes: the second resumes the first's checkpoint
        done = subprocess.run(command(tmp_path / "split", steps), env=env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(command(tmp_path / "straight", 4), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["step"] == 4
    assert losses_by_step(tmp_path / "split") == losses_by_step(tmp_path / "straight")
    assert [m["resumed_from"] for m in read_metrics(tmp_path / "split") if "resumed_from" in m] == [2]
    saved = checkpoint.read_metadata(checkpoint.resolve_step_dir(str(tmp_path / "split")))
    assert saved["stage"] == "dpo" and saved["init_from"]["stage"] == "sft"


def dpo_command(prefs, run_dir, *overrides: str) -> list[str]:
    """The real ``python -m llama_jax.train`` on configs/dpo/tiny.py: two layers, 8 pairs of 96 tokens a step."""
    return [sys.executable, "-m", "llama_jax.train", f"--config={ROOT / 'configs/dpo/tiny.py'}:{prefs}",
            f"--config.run_dir={run_dir}", "--config.model.num_layers=2", "--config.data.batch_size=8",
            "--config.data.seq_len=96", "--config.logging.every=1", "--config.logging.eval_every=0", *overrides]


def run_command(command) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)


def pretrain_command(run_dir, steps: int) -> list[str]:
    """configs/pretrain/tiny.py on Shakespeare, two layers, a checkpoint every 5 steps."""
    return [sys.executable, "-m", "llama_jax.train", f"--config={ROOT / 'configs/pretrain/tiny.py'}",
            f"--config.run_dir={run_dir}", "--config.model.num_layers=2", f"--config.train.steps={steps}",
            "--config.logging.eval_every=0", "--config.checkpoint.every=5"]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A pretraining run of the tiny model (two layers) on Shakespeare, with checkpoints at steps 5 and 10."""
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    done = run_command(pretrain_command(run_dir, 10))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.slow  # 20-37 s on 2 busy cores, the pretraining run included
def test_dpo_from_a_pretrained_run_starts_at_exact_ties_and_counts_the_rows_it_runs(pretrained_run, word_pairs,
                                                                                    tmp_path):
    done = run_command(dpo_command(word_pairs, tmp_path / "dpo", f"--config.init_from={pretrained_run}",
                                   "--config.train.steps=4", "--config.schedule.peak_lr=0"))
    assert done.returncode == 0, done.stderr[-3000:]
    logged = read_metrics(tmp_path / "dpo")
    # No update (a learning rate of 0): policy == reference on 4 batches, every pair a tie, bit for bit (trained
    # weights showed accuracies of 0.44-0.56 before).
    assert [(m["accuracy"], m["margin"]) for m in logged] == [(0.5, 0.0)] * 4, logged
    first = logged[0]
    # The chosen and rejected rows run, not the edited ones; the reference's forward pass is a third more FLOPs.
    assert first["tokens_per_step"] == 2 * 8 * 96
    flops = 4 / 3 * config.get("tiny", num_layers=2).flops_per_token(96)
    assert first["mfu"] == pytest.approx(flops * first["tokens_per_s"] / 0.1e12, rel=1e-6)  # peak_tflops=0.1
    # The starting point is pinned: the step the run directory resolved to, and its parameters' checksum.
    pinned = checkpoint.read_metadata(checkpoint.resolve_step_dir(str(tmp_path / "dpo")))["init_from"]
    assert pinned["source_dir"] == str(pretrained_run / "checkpoints" / "10") and pinned["step"] == 10
    assert pinned["checksum"] == checksums.tree_digest(checkpoint.load(str(pretrained_run))[0])


def test_dpo_without_init_from_is_refused_when_the_run_is_built(word_pairs, tmp_path):
    done = run_command(dpo_command(word_pairs, tmp_path / "dpo", "--config.train.steps=1"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "error: dpo.reference='model' needs config.init_from" in done.stderr
    assert not (tmp_path / "dpo" / "checkpoints").exists()


def test_a_resume_reads_the_reference_from_the_step_it_pinned(tmp_path):
    """Older checkpoints record the run directory and its step: the step's own directory is read, not the run's
    newest; a directory that changed or went is refused, naming the step."""
    steps = {}
    with CheckpointManager(tmp_path / "run", async_save=False) as manager:
        for step in (3, 7):
            steps[step] = model.init_params(TINY, jax.random.key(step))
            manager.save(step, params=steps[step], cfg=TINY, stage="pretrain")
    mesh = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
    params, _, source = build.start_from(str(tmp_path / "run"), TINY, mesh)
    assert source["source_dir"] == str(tmp_path / "run" / "checkpoints" / "7") and source["step"] == 7
    old = {"path": str(tmp_path / "run"), "format": "llama_jax", "step": 3, "stage": "pretrain"}
    start, upgraded = build.pinned_start(old, TINY, mesh)
    assert_trees_equal(start, steps[3])
    assert upgraded["source_dir"] == str(tmp_path / "run" / "checkpoints" / "3")
    assert upgraded["checksum"] == checksums.tree_digest(steps[3])
    start, _ = build.pinned_start(source, TINY, mesh)
    assert_trees_equal(start, params)

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "7")  # another run saved step 7 again, with other weights
    with CheckpointManager(tmp_path / "run", async_save=False) as manager:
        manager.save(7, params=steps[3], cfg=TINY, stage="pretrain")
    with pytest.raises(CheckpointError, match="init_from step 7 .*no longer holds"):
        build.pinned_start(source, TINY, mesh)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "3")
    gone = re.escape(f"init_from step 3 ({tmp_path / 'run' / 'checkpoints' / '3'})")
    with pytest.raises(CheckpointError, match=f"{gone}.* is gone"):
        build.pinned_start(old, TINY, mesh)


@pytest.mark.slow  # 30 s on 2 busy cores (after the pretraining fixture)
def test_a_resumed_dpo_run_keeps_its_reference_after_the_start_run_moves_on(pretrained_run, word_pairs, tmp_path):
    start = tmp_path / "pretrained"
    shutil.copytree(pretrained_run, start)  # newest step: 10
    straight = run_command(dpo_command(word_pairs, tmp_path / "straight", f"--config.init_from={start}",
                                       "--config.train.steps=2"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    split = dpo_command(word_pairs, tmp_path / "split", f"--config.init_from={start}")
    done = run_command([*split, "--config.train.steps=1"])
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_command(pretrain_command(start, 15))  # the start run saves step 15
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_command([*split, "--config.train.steps=2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses_by_step(tmp_path / "split") == losses_by_step(tmp_path / "straight")  # the reference: step 10

    shutil.rmtree(start / "checkpoints" / "10")
    done = run_command([*split, "--config.train.steps=3"])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"error: init_from step 10 ({start / 'checkpoints' / '10'})" in done.stderr
