"""The SFT stage: loss only on the assistant's tokens, packing changes nothing, it starts from a pretraining run or a
transformers checkpoint in a fresh process, and what it saves loads in generate and converts to Hugging Face."""

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, env, losses_by_step, read_metrics

from llama_jax import checkpoint, config, data, generate, losses, model
from llama_jax.tokenizer import get_tokenizer
from llama_jax.train import loop, pretrain, sft

SFT_TINY = ROOT / "configs" / "sft" / "tiny.py"
PRETRAIN_TINY = ROOT / "configs" / "pretrain" / "tiny.py"
NAMES = "Ann Bob Cara Dan Eve Finn Gus Hal Ivy Jo Kim Lou Max Ned Oli Pam Quin Rae Sam Tom Uma Val Wes Zed".split()


def write_chats(path: Path, count: int, seed: int = 0) -> Path:
    """Greeting chats (a system prompt sometimes, one or two turns): `Say hello to NAME.` -> `Hello, NAME!`."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(count):
            messages = [{"role": "system", "content": "Be polite."}] if rng.random() < 0.3 else []
            for _ in range(rng.integers(1, 3)):
                name = NAMES[rng.integers(len(NAMES))]
                messages += [{"role": "user", "content": f"Say hello to {name}."},
                             {"role": "assistant", "content": f"Hello, {name}!"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def test_untrained_positions_get_exactly_zero_gradient_on_real_llama3_ids():
    tok = get_tokenizer("llama3")
    chat = {"messages": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "What is 6 times 7?"},
        {"role": "assistant", "content": "Let me compute it.", "tool_call": False},
        {"role": "user", "content": "Use the interpreter."},
        {"role": "assistant", "content": "print(6 * 7)", "tool_call": True},
        {"role": "ipython", "content": "42"},
        {"role": "assistant", "content": "6 times 7 is 42."},
    ]}
    ids, trained = data.encode_chat(tok, chat)
    tokens, targets, mask = ids[None, :-1], ids[None, 1:], trained[None, 1:]
    # The mask holds exactly the assistant contents and their closing tokens, found here from the specials alone.
    headers = np.flatnonzero(ids == tok.special_id("end_header_id"))
    closers = np.flatnonzero(np.isin(ids, [tok.eot_id, tok.eom_id]))
    expected = np.zeros_like(trained)
    for start, end in zip(headers, closers):
        role = tok.decode(ids[np.flatnonzero(ids[:start] == tok.special_id("start_header_id"))[-1] + 1:start])
        if role == "assistant":
            expected[start + 2:end + 1] = 1  # after <|end_header_id|> and its "\n\n" (one id), up to the closer
    np.testing.assert_array_equal(trained, expected)
    assert expected.sum() > 10 and tok.eom_id in ids[expected == 1] and tok.special_id("python_tag") in ids

    dim = 8
    hidden = jax.random.normal(jax.random.key(0), (1, tokens.shape[1], dim))
    head = jax.random.normal(jax.random.key(1), (dim, tok.vocab_size)) * 0.1
    grad = jax.grad(lambda h: losses.next_token_loss(h, head, jnp.asarray(targets), jnp.asarray(mask),
                                                     chunk_size=None)[0])(hidden)
    assert np.all(np.asarray(grad)[0][mask[0] == 0] == 0.0)  # exactly: no untrained token moves anything
    assert np.all(np.abs(np.asarray(grad)[0][mask[0] == 1]).sum(-1) > 0)


def _unpack(batch: dict) -> dict:
    """Each chat of a packed batch in a row of its own, padded: the same chats one per row."""
    rows = []
    for r in range(batch["tokens"].shape[0]):
        for segment in sorted(set(batch["segment_ids"][r].tolist()) - {0}):
            where = batch["segment_ids"][r] == segment
            rows.append({k: v[r][where] for k, v in batch.items()})
    length = max(len(row["tokens"]) for row in rows)
    return {k: np.stack([np.pad(row[k], (0, length - len(row[k]))) for row in rows]) for k in batch}


def test_packed_rows_give_the_loss_and_gradients_of_one_chat_per_row(tmp_path):
    path = write_chats(tmp_path / "chats.jsonl", 40)
    data_cfg = dict(tokenizer="byte", sources=[dict(format="chat", path=str(path))], seq_len=400, batch_size=2,
                    seed=0, holdout_every=0, on_error="raise")
    packed = next(data.make_batches(data_cfg, get_tokenizer("byte"), kind="chat"))
    assert (packed["segment_ids"].max(axis=1) >= 3).all()  # several chats in every row
    separate = _unpack(packed)
    cfg = config.get("tiny", num_layers=2)
    params = model.init_params(cfg, jax.random.key(0))
    loss_fn = jax.jit(jax.value_and_grad(lambda p, b: pretrain.make_loss_fn(cfg, chunk_size=None)(
        p, b, None)[0]))
    (want, want_grads), (got, got_grads) = loss_fn(params, separate), loss_fn(params, packed)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny pretraining run (byte text) to start SFT from."""
    tmp = tmp_path_factory.mktemp("pretrain")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(f"Hello there, {n}. How are you today?" for n in NAMES * 4))
    c = runpy.run_path(str(PRETRAIN_TINY))["get_config"](str(corpus))
    c.run_dir = str(tmp / "run")
    c.train.steps = 4
    c.logging.eval_every = 0
    loop.run(c)
    return tmp / "run"


@pytest.fixture(scope="module")
def transformers_dir(tmp_path_factory):
    """A checkpoint that transformers itself wrote, with the tiny preset's shape."""
    import torch
    import transformers

    cfg = config.get("tiny")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf(cfg)))
    path = tmp_path_factory.mktemp("hf") / "tiny-hf"
    hf.save_pretrained(path)
    return path


def _sft_command(chats, run_dir, init_from, *extra):
    return [sys.executable, "-m", "llama_jax.train", f"--config={SFT_TINY}:{chats}", f"--config.run_dir={run_dir}",
            f"--config.init_from={init_from}", "--config.train.steps=2", "--config.logging.every=1",
            "--config.logging.eval_every=0", *extra]


@pytest.mark.parametrize("source", ["pretrained", "transformers_dir"])
@pytest.mark.slow  # 61 s on 2 busy cores
def test_sft_starts_from_a_checkpoint_in_a_fresh_process(source, request, tmp_path):
    start = request.getfixturevalue(source)
    chats = write_chats(tmp_path / "chats.jsonl", 60)
    run_dir = tmp_path / "sft"
    done = subprocess.run(_sft_command(chats, run_dir, start), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started from" in done.stderr  # the banner says where the run began

    # The first step's loss is the starting weights' loss on the first batch: the run began from them.
    c = runpy.run_path(str(SFT_TINY))["get_config"](str(chats))
    params, _, _ = checkpoint.load(str(start))
    batch = next(sft.STAGE.make_batches(c, get_tokenizer("byte"), "train"))
    want = float(pretrain.loss_fn_from_config(loop.model_config(c.model), c)(params, batch, None)[0])
    first = read_metrics(run_dir)[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(want, rel=1e-4)

    _, _, metadata = checkpoint.load(str(run_dir))
    assert metadata["stage"] == "sft" and metadata["init_from"]["path"] == str(Path(start).resolve())
    assert metadata["init_from"]["format"] == ("hf" if source == "transformers_dir" else "llama_jax")


@pytest.mark.slow  # 52 s on 2 busy cores
def test_sft_checkpoint_generates_and_converts_to_transformers(pretrained, tmp_path):
    import torch
    import transformers

    chats = write_chats(tmp_path / "chats.jsonl", 60)
    c = runpy.run_path(str(SFT_TINY))["get_config"](str(chats))
    c.update(run_dir=str(tmp_path / "sft"), init_from=str(pretrained))
    c.train.steps = 2
    c.logging.eval_every = 0
    loop.run(c)
    generated = subprocess.run([sys.executable, "-m", "llama_jax.generate", "--checkpoint", c.run_dir, "--prompt",
                                "Hi", "--max-new-tokens", "4"], env=env(), capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert json.loads(generated.stdout.splitlines()[-1])["tokens"] == [4]
    converted = subprocess.run([sys.executable, "-m", "llama_jax.convert", "--checkpoint", c.run_dir, "--to", "hf",
                                "--out", str(tmp_path / "hf")], env=env(), capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr[-3000:]
    params, cfg, _ = checkpoint.load(c.run_dir)
    tokens = np.arange(1, 17)[None]
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.Llama(cfg).apply({"params": params}, tokens)), theirs, atol=1e-4)


@pytest.mark.slow  # 44 s on 2 busy cores
def test_sft_resume_is_bit_identical(pretrained, tmp_path):
    """6 SFT steps straight == 3, stop, resume, 3 more (the pretraining resume test, for this stage)."""
    chats = write_chats(tmp_path / "chats.jsonl", 80)

    def config(run_dir, steps):
        c = runpy.run_path(str(SFT_TINY))["get_config"](str(chats))
        c.update(run_dir=str(tmp_path / run_dir), init_from=str(pretrained))
        c.train.steps = steps
        c.logging.update(every=1, eval_every=0)
        return c

    loop.run(config("straight", 6))
    loop.run(config("resumed", 3))
    loop.run(config("resumed", 6))
    straight = losses_by_step(tmp_path / "straight")
    assert losses_by_step(tmp_path / "resumed") == straight and sorted(straight) == [1, 2, 3, 4, 5, 6]
    a, b = checkpoint.load(str(tmp_path / "straight"))[0], checkpoint.load(str(tmp_path / "resumed"))[0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def reply_rates(run_dir, names) -> tuple[float, float]:
    """(fraction of greedy replies in the trained format "Hello, <Name>!", fraction with the right name) to
    `Say hello to NAME.` for ``names`` the SFT data never held."""
    params, cfg, tok = generate.load_model(str(run_dir), "byte")
    prompts = [tok.encode_dialog([{"role": "user", "content": f"Say hello to {n}."}], add_generation_prompt=True)[0]
               for n in names]
    replies = [tok.decode([t for t in out if t not in tok.stop_ids])
               for out in generate.generate(params, cfg, prompts, 24, stop_ids=tok.stop_ids)]
    formatted = [re.fullmatch(r"Hello, ([A-Z][a-z]+)!", r) for r in replies]
    exact = [m is not None and m.group(1) == n for m, n in zip(formatted, names)]
    return float(np.mean([m is not None for m in formatted])), float(np.mean(exact))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LLAMA_JAX_SHAKESPEARE"), reason="LLAMA_JAX_SHAKESPEARE is unset")
def test_tiny_model_learns_a_chat_behaviour_it_did_not_have(tmp_path):
    """Pretrained on Shakespeare, the tiny model never answers `Say hello to X.` with `Hello, X!`; after a short SFT
    on such chats (other names), it does for names it never saw in them."""
    c = runpy.run_path(str(PRETRAIN_TINY))["get_config"]()
    c.run_dir = str(tmp_path / "pretrain")
    c.data.update(seq_len=128, batch_size=16)
    c.schedule.update(warmup_steps=10, decay_steps=150, total_steps=150)
    c.train.steps = 150
    c.logging.update(every=50, eval_every=0)
    loop.run(c)
    held_out = ["Arlo", "Bea", "Cole", "Dina", "Ezra", "Faye", "Gil", "Hope", "Iris", "Jude", "Kai", "Lena"]
    before = reply_rates(c.run_dir, held_out)

    chats = write_chats(tmp_path / "chats.jsonl", 400)
    s = runpy.run_path(str(SFT_TINY))["get_config"](str(chats))
    s.update(run_dir=str(tmp_path / "sft"), init_from=c.run_dir)
    s.schedule.update(peak_lr=1e-3, warmup_steps=10, decay_steps=150, total_steps=150)
    s.logging.update(every=50, eval_every=0)
    loop.run(s)
    after = reply_rates(s.run_dir, held_out)
    print(f"format / exact-name rate on {len(held_out)} held-out names: before SFT {before}, after {after}")
    assert before[0] <= 1 / len(held_out)  # at most one accidental match
    assert after[0] >= 0.75
