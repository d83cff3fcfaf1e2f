"""Retrieval evaluation: prompts (length, depth, determinism), the exact-match metric on stub models, the CLI."""

import itertools
import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, env, train_command

from llama_jax import checkpoint, config, model
from llama_jax import generate as gen
from llama_jax.config import ModelConfig
from llama_jax.data import JsonlSource, make_batches
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.eval import retrieval as r
from llama_jax.eval.retrieval import command
from llama_jax.tokenizer import ByteTokenizer, get_tokenizer

BYTE = ByteTokenizer()

TASKS = [r.Task("passkey"), r.Task("needle"), r.Task("needle", value="word", prompt_format="chat"),
         r.Task("multi", needles=3), r.Task("multi", needles=3, ask="all", value="word"),
         r.Task("multi", ask="all", prompt_format="chat")]


@pytest.fixture(scope="module")
def llama3():
    return get_tokenizer("llama3")


# --- Stub models that read the prompt as text -----------------------------------------------------------

FACT = re.compile(r"The pass key is (\d+)\. Remember it\."
                  r"|The (?:special magic number|secret word) for (\w+) is (\w+)\.")
QUESTION = re.compile(r"What (?:is|are) the (?:pass key|(?:special magic numbers?|secret words?) for ([\w ,]+))\?")


def reading_model(tok, reach=1.0, wrong=False):
    """Answers from the needles within the first ``reach`` of the text before the question (a model whose
    memory reaches that far back); ``wrong`` alters every value it answers with."""

    def alter(value: str) -> str:
        if value.isdigit():
            return value[:-1] + str((int(value[-1]) + 1) % 10)
        return r.WORDS[(r.WORDS.index(value) + 1) % len(r.WORDS)]

    def answer(prompt):
        text = tok.decode(prompt)
        question = list(QUESTION.finditer(text))[-1]
        seen = {}
        for fact in FACT.finditer(text, 0, question.start()):
            if fact.start() <= reach * question.start():
                seen[fact.group(2)] = fact.group(1) or fact.group(3)  # passkey: key None
        keys = re.split(r", | and ", question.group(1)) if question.group(1) else [None]
        values = [alter(seen[k]) if wrong else seen[k] for k in keys if k in seen]
        return " " + ", ".join(values) + "." if values else " I do not know."

    return lambda prompts: [answer(p) for p in prompts]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"{t.kind}-{t.ask}-{t.value}-{t.prompt_format}")
def test_right_and_wrong_models_score_one_and_zero(task):
    lengths = [800, 1400] if task.kind == "multi" else [400, 700]
    right = r.evaluate(reading_model(BYTE), BYTE, task, lengths, [0, 0.5, 1], samples=3, batch_size=4)
    assert right.accuracy.shape == (2, 3) and np.all(right.accuracy == 1.0), right.records
    wrong = r.evaluate(reading_model(BYTE, wrong=True), BYTE, task, lengths, [0, 0.5, 1], samples=3)
    assert np.all(wrong.accuracy == 0.0), wrong.records


def test_right_model_scores_one_with_the_llama3_tokenizer(llama3):
    for task in (r.Task("passkey"), r.Task("multi", ask="all", prompt_format="chat")):
        result = r.evaluate(reading_model(llama3), llama3, task, [300, 1000], [0, 0.3, 1], samples=2)
        assert np.all(result.accuracy == 1.0), result.records


def test_heatmap_follows_a_model_that_only_reaches_the_first_half(tmp_path):
    depths = [0, 0.25, 0.5, 0.75, 1]
    result = r.evaluate(reading_model(BYTE, reach=0.6), BYTE, r.Task("passkey"), [512, 1024, 2048], depths,
                        samples=3)
    expected = np.array([[1.0, 1.0, 1.0, 0.0, 0.0]] * 3)
    np.testing.assert_array_equal(result.accuracy, expected)
    summary = json.loads(json.dumps(result.summary()))
    assert summary["accuracy"] == expected.tolist() and summary["mean_accuracy"] == 0.6
    fig = r.plot_heatmap(result, tmp_path / "heatmap.png")
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), expected.T)  # rows: depths, columns: lengths
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("reply", "correct"), [
    ("71432", True), (" 71432.", True), ("The pass key is 71432. Remember it.", True), ("71432 or 1", True),
    ("714320", False), ("7143", False), ("7 1432", False), ("", False), ("I do not know.", False),
    ("12345, then 71432", False), ("\u0667\u0661\u0664\u0663\u0662", False)])  # Arabic-Indic digits
def test_exact_match_of_the_first_number(reply, correct):
    sample = r.Sample(length=1, depth=0.0, tokens=[], answers=("71432",), needle_spans=(), haystack_span=(0, 0))
    assert r.is_correct(reply, sample, r.Task("passkey")) is correct


def test_exact_match_of_all_words_in_order():
    task = r.Task("multi", needles=2, ask="all", value="word")
    sample = r.Sample(length=1, depth=0.0, tokens=[], answers=("heron", "otter"), needle_spans=(), haystack_span=(0, 0))
    assert r.is_correct("Heron and otter.", sample, task)
    assert r.is_correct("The secret words for Rome and Oslo are heron, otter.", sample, task)
    assert not r.is_correct("otter and heron", sample, task)
    assert not r.is_correct("heron", sample, task)
    assert not r.is_correct("herons and otters", sample, task)


# --- Prompts: placement, length, tokenization, determinism -------------------------------------------------


def filler_before(sample, needle):
    """Filler tokens before a needle, and all filler tokens, from the sample's spans."""
    start, end = sample.needle_spans[needle]
    needle_tokens = sum(e - s for s, e in sample.needle_spans)
    before = start - sample.haystack_span[0] - sum(e - s for s, e in sample.needle_spans if e <= start)
    return before, sample.haystack_span[1] - sample.haystack_span[0] - needle_tokens


@pytest.mark.parametrize("tok_name", ["byte", "llama3"])
def test_needle_is_placed_at_the_depth_in_a_prompt_of_the_length(tok_name, llama3):
    tok = BYTE if tok_name == "byte" else llama3
    for task in TASKS:
        longest = max(map(len, r.encoded_filler(tok, task)))
        shortfall = r.max_shortfall(tok, task)
        assert shortfall <= (22 if tok_name == "byte" else 5)
        for length in (900, 3000):
            for depth in (0.0, 0.2, 0.5, 0.9, 1.0):
                sample = r.make_sample(tok, task, length, depth, seed=[7, length, int(depth * 10)])
                assert length - shortfall < len(sample.tokens) <= length
                text = tok.decode(sample.tokens)
                facts = [FACT.fullmatch(tok.decode(sample.tokens[s:e]).strip()) for s, e in sample.needle_spans]
                assert all(fact and text.count(fact.group()) == 1 for fact in facts)
                in_text_order = sorted(range(len(facts)), key=lambda i: sample.needle_spans[i])
                asked = [0] if task.ask == "one" else in_text_order
                assert sample.answers == tuple(facts[i].group(1) or facts[i].group(3) for i in asked)
                before, filler = filler_before(sample, 0)
                assert abs(before / filler - depth) <= 0.5 * longest / filler + 1e-9
                if tok_name == "llama3":  # the pieces are tokenized as the whole text would be
                    assert tok.encode(text, allowed_special="all") == sample.tokens
                keys = [facts[i].group(2) for i in asked]
                if task.prompt_format == "chat":
                    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
                    end = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                else:
                    assert text.startswith("<|begin_of_text|>" + task.intro())
                    end = " " + task.answer_prefix(keys)
                assert text.endswith(" " + task.question(keys) + end)


def test_prompts_are_determined_by_the_seed_and_cell():
    task = r.Task("multi", ask="all")
    grid = r.make_grid(BYTE, task, [600, 900], [0, 0.5], samples=3, seed=1)
    again = r.make_grid(BYTE, task, [600, 900], [0, 0.5], samples=3, seed=1)
    assert grid == again
    other = r.make_grid(BYTE, task, [600, 900], [0, 0.5], samples=3, seed=2)
    assert all(a.tokens != b.tokens for a, b in zip(grid, other))
    assert len({tuple(s.tokens) for s in grid}) == len(grid)  # samples of one cell differ
    wider = r.make_grid(BYTE, task, [1500, 600, 900], [0, 0.5], samples=3, seed=1)
    assert wider[6:] == grid  # adding a length leaves the other cells' prompts as they were


def test_filler_holds_no_digits_keys_or_vocabulary_words():
    texts = list(r.PASSKEY_FILLER + r.HAYSTACK_FILLER)
    for task in (r.Task(), r.Task("needle", value="word"), r.Task("multi", value="word")):
        texts += [task.intro(), task.question(["Paris", "Rome"]), task.answer_prefix(["Paris"])]
    words = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
    assert not words & set(r.WORDS)
    assert not words & {k.lower() for k in r.KEYS} - {"paris", "rome"}
    assert not any(re.search(r"\d", t) for t in texts)


def test_grid_and_task_errors_name_the_problem():
    with pytest.raises(ConfigError, match="too short"):
        r.make_sample(BYTE, r.Task("passkey"), 100, 0.5, 0)
    with pytest.raises(ConfigError, match="depths"):
        r.make_grid(BYTE, r.Task(), [500], [1.5], 1)
    with pytest.raises(ConfigError, match="seed"):
        r.make_grid(BYTE, r.Task(), [500], [0.5], 1, seed=-1)
    with pytest.raises(ConfigError, match="kind"):
        r.Task("haystack")
    with pytest.raises(ConfigError, match="needles"):
        r.Task("passkey", needles=3)


# --- Training corpus --------------------------------------------------------------------------------------


def test_training_corpus_is_deterministic_jsonl_with_answers(tmp_path):
    summary = r.write_training_corpus(tmp_path / "a.jsonl", BYTE, 40, 160, 256, seed=3)
    r.write_training_corpus(tmp_path / "b.jsonl", BYTE, 40, 160, 256, seed=3)
    r.write_training_corpus(tmp_path / "c.jsonl", BYTE, 40, 160, 256, seed=4)
    assert summary["documents"] == 40
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    docs = JsonlSource(str(tmp_path / "a.jsonl"))
    assert len(docs) == 40
    shortfall, lengths, depths = r.max_shortfall(BYTE, r.Task()), [], []
    for text in docs:
        passkey = re.search(r"The pass key is (\d+)\. Remember it\.", text).group(1)
        assert text.endswith(f"What is the pass key? The pass key is {passkey}.")
        prompt_tokens = 1 + len(BYTE.encode(text)) - len(f" {passkey}.")  # + <|begin_of_text|>, - the answer
        assert 160 - shortfall < prompt_tokens <= 256
        lengths.append(prompt_tokens)
        depths.append(text.index("The pass key is") / text.index("What is"))
    assert max(lengths) - min(lengths) > 50 and max(depths) - min(depths) > 0.5  # spread over the ranges
    # The library's data pipeline reads it: documents framed by <|begin_of_text|> ... <|end_of_text|>.
    batches = make_batches(dict(sources=[dict(format="jsonl", path=str(tmp_path / "a.jsonl"), weight=1.0)],
                                seq_len=256, batch_size=2, add_bos=True, seed=0, holdout_every=0), BYTE)
    row = next(batches)["tokens"][0].tolist()
    assert row[0] == BYTE.bos_id and BYTE.decode(row[1 : row.index(BYTE.eos_id)]) in list(docs)
    with pytest.raises(ConfigError, match="base"):
        next(r.training_documents(BYTE, 1, 200, 300, task=r.Task(prompt_format="chat")))


# --- CLI ----------------------------------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=BYTE.vocab_size, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                  rope_theta=10_000.0, max_seq_len=256)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    params = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(3))
    path = str(tmp_path_factory.mktemp("retrieval") / "ckpt")
    checkpoint.save_params(path, params, CFG, tokenizer={"name": BYTE.name, "sha256": BYTE.sha256})
    return path, params


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llama_jax.eval.retrieval", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env(), timeout=300)


@pytest.mark.slow  # 10 s on 2 busy cores
def test_cli_writes_json_and_heatmap_of_greedy_replies(tiny_checkpoint, tmp_path):
    path, params = tiny_checkpoint
    plot, full = tmp_path / "result.png", tmp_path / "result.json"
    proc = run_cli("--checkpoint", path, "--task", "passkey", "--lengths", "180,240", "--depths", "0,1",
                   "--per-cell", "2", "--max-new-tokens", "8", "--plot", "--out", str(full))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["out"] == str(full) and f"heatmap: {plot}" in proc.stderr
    assert result["lengths"] == [180, 240] and result["depths"] == [0.0, 1.0]
    assert np.array(result["accuracy"]).shape == (2, 2) and result["tokenizer"] == "byte"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "prompt" in proc.stderr  # the progress bar
    # The replies are the library's greedy generations on the grid's prompts (the checkpoint's byte tokenizer).
    records = json.loads(full.read_text())["records"]
    grid = r.make_grid(BYTE, r.Task("passkey"), [180, 240], [0, 1], 2)
    params, cfg = gen.inference_layout(params, CFG)
    outs = [out for cell in (grid[:4], grid[4:])  # batched per length like the command, to share its shapes
            for out in gen.generate(params, cfg, [s.tokens for s in cell], 8, stop_ids=BYTE.stop_ids)]
    expected = [BYTE.decode([t for t in out if t not in BYTE.stop_ids]) for out in outs]
    assert [rec["reply"] for rec in records] == expected
    assert [rec["correct"] for rec in records] == [r.is_correct(e, s, r.Task()) for e, s in zip(expected, grid)]


def passkey_grid(checkpoint_path, out, *extra):
    """The command a user runs on a fresh tiny model: its JSON summary and the --out file (asserts exit 0)."""
    proc = run_cli("--checkpoint", str(checkpoint_path), "--task", "passkey", "--lengths", "256,512", "--out", str(out),
                   *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), json.loads(out.read_text())


def test_cli_decodes_a_model_whose_vocabulary_is_larger_than_the_tokenizer(tmp_path):
    # The tiny preset's 512 ids at init, the step-0 state of a fresh `configs/pretrain/tiny.py` run: greedy replies
    # must come from the byte tokenizer's 264 ids, as `generate` and `chat` draw them.
    cfg = config.get("tiny", num_layers=1)
    params = model.init_params(cfg, jax.random.key(3))
    params["embedding"] = np.random.default_rng(3).standard_normal(params["embedding"].shape).astype(np.float32)
    checkpoint.save_params(str(tmp_path / "tiny"), params, cfg, tokenizer={"name": BYTE.name, "sha256": BYTE.sha256})
    summary, full = passkey_grid(tmp_path / "tiny", tmp_path / "grid.json", "--depths", "0,1", "--per-cell", "2")
    assert summary["lengths"] == [256, 512] and np.array(summary["accuracy"]).shape == (2, 2)
    assert len(full["records"]) == 2 * 2 * 2
    # The first length's replies are `generate`'s greedy ones over the tokenizer's ids, cut at the stop token.
    grid = r.make_grid(BYTE, r.Task("passkey"), [256, 512], [0.0, 1.0], 2)[:4]
    outs = gen.generate(*gen.inference_layout(params, cfg), [s.tokens for s in grid], r.default_max_new_tokens(
        BYTE, r.Task("passkey")), stop_ids=BYTE.stop_ids, vocab_size=BYTE.vocab_size)
    assert [rec["reply"] for rec in full["records"][:4]] == [
        BYTE.decode(itertools.takewhile(lambda t: t not in BYTE.stop_ids, out)) for out in outs]


@pytest.mark.slow  # 42 s on 2 busy cores: a training run and the whole default grid
def test_passkey_grid_of_a_fresh_tiny_run(corpus, tmp_path):
    done = subprocess.run([*train_command(corpus, tmp_path / "run"), "--config.train.steps=2"], env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary, full = passkey_grid(tmp_path / "run", tmp_path / "grid.json")
    assert summary["out"] == str(tmp_path / "grid.json") and summary["task"]["kind"] == "passkey"
    assert np.array(summary["accuracy"]).shape == (2, 5) and 0 <= summary["mean_accuracy"] <= 1
    assert [(rec["length"], rec["depth"]) for rec in full["records"][::4]] == [
        (length, depth) for length in (256, 512) for depth in (0.0, 0.25, 0.5, 0.75, 1.0)]


def test_cli_bad_arguments_are_errors_without_traceback(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    proc = run_cli("--checkpoint", path, "--lengths", "12x")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: argument --lengths")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for args, message in [(["--depths", "0,1.5"], "error: argument --depths"),
                          (["--task", "multi", "--needles", "1"], "error: multi hides 2"),
                          (["--lengths", "4096"], "error: length 4096 \\+ 15 new tokens exceeds"),
                          (["--lengths", "100"], "error: length 100 is too short")]:
        try:
            code = r.main(["--checkpoint", path, *args])
        except SystemExit as e:
            code = e.code
        assert code == 2
        assert re.match(message, capsys.readouterr().err.strip().splitlines()[-1]), args
    assert r.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    # The old spelling of --out works for one release and says so.
    assert command.parser.parse_args(["--checkpoint", path, "--json", "full.json"]).out == "full.json"
    assert capsys.readouterr().err == "deprecated: --json full.json -> use --out full.json\n"
    assert r.main(["--checkpoint", path, "--plot"]) == 2  # it draws beside --out
    assert capsys.readouterr().err.strip().endswith("give --out too")
    with pytest.raises(CheckpointError):  # the Python API raises; only the command prints
        r.evaluate_checkpoint(str(tmp_path / "missing"), r.Task(), [200], [0.5])


def test_copy_drills_repeat_one_random_string_and_are_deterministic(tmp_path):
    texts = list(r.copy_documents(200, seed=9))
    assert texts == list(r.copy_documents(200, seed=9)) and texts != list(r.copy_documents(200, seed=8))
    for text in texts:
        copies = text.split(" | ")
        assert len(copies) >= 2 and len(set(copies)) == 1  # everything after the first copy is a copy
        assert re.fullmatch(r"[0-9a-z]{3,7}( [0-9a-z]{3,7})*", copies[0])
    assert len({t.split(" | ")[0] for t in texts}) == 200  # a fresh string each time: nothing to memorise
    summary = r.write_copy_corpus(tmp_path / "copy.jsonl", 20, seed=9)
    assert summary["documents"] == 20 and list(JsonlSource(str(tmp_path / "copy.jsonl"))) == texts[:20]
