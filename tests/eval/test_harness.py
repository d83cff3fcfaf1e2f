"""The lm-evaluation-harness adapter: loglikelihood, loglikelihood_rolling and generate_until equal a direct
computation with the model (every sequence alone, log-softmax in float64 NumPy, greedy decoding by repeated full
forward passes), and ``lm_eval`` runs two local tasks (no network) end to end with the metrics those direct
computations imply."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import env, run_module

from llama_jax import checkpoint, lora, model
from llama_jax import config as config_lib
from llama_jax.formats import peft
from llama_jax.tokenizer import ByteTokenizer

pytest.importorskip("lm_eval", reason="the adapter's tests need lm-eval: pip install 'llama_jax[eval]'")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402

from llama_jax.eval import harness  # noqa: E402

TOK = ByteTokenizer()
MAX_LENGTH = 64
QUESTIONS = [  # (question, choices, gold): multiple choice by loglikelihood
    ("The sky is", [" blue", " green", " loud"], 0),
    ("Two plus two is", [" four", " five"], 0),
    ("Paris is in", [" France", " Spain", " Peru", " Chad"], 0),
    ("Ice is", [" cold", " hot"], 0),
]
PROMPTS = [("Say A:", "A"), ("Count: 1 2 3", " 4"), ("x", "y")]  # (prompt, answer): generate_until


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # The byte tokenizer's vocabulary exactly, so that greedy decoding never picks an id it cannot decode.
    cfg = config_lib.get("tiny", num_layers=2, max_seq_len=256, vocab_size=TOK.vocab_size)
    params = jax.tree.map(np.asarray, model.init_params(cfg, jax.random.key(3)))
    path = str(tmp_path_factory.mktemp("harness") / "ckpt")
    checkpoint.save_params(path, params, cfg, tokenizer={"name": TOK.name, "sha256": TOK.sha256})
    return path, params, cfg


def _log_probs_many(params, cfg, sequences):
    """Per sequence, [len(ids) - 1] log p(ids[t + 1] | ids[: t + 1]) and whether ids[t + 1] is the argmax, each
    sequence as if alone (right-padded into one batch: causal attention keeps the padding out), float64."""
    length = max(len(ids) for ids in sequences) - 1
    tokens = np.array([ids[:-1] + [0] * (length - len(ids) + 1) for ids in sequences])
    logits = np.asarray(model.Llama(cfg).apply({"params": params}, tokens), np.float64)  # [N, T, V]
    top = logits.max(-1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    out = []
    for i, ids in enumerate(sequences):
        n = len(ids) - 1
        out.append((log_softmax[i, np.arange(n), ids[1:]], logits[i, :n].argmax(-1) == np.array(ids[1:])))
    return out


def _log_probs(params, cfg, ids):
    return _log_probs_many(params, cfg, [ids])[0]


def _direct_loglikelihoods(params, cfg, pairs):
    """(summed log p(continuation | <bos> context), greedy?) per pair, both cut to the last MAX_LENGTH + 1 ids."""
    sequences = [([TOK.bos_id] + TOK.encode(c) + TOK.encode(x))[-(MAX_LENGTH + 1):] for c, x in pairs]
    out = []
    for (log_probs, greedy), (_, continuation) in zip(_log_probs_many(params, cfg, sequences), pairs):
        n = len(TOK.encode(continuation))
        out.append((float(log_probs[-n:].sum()), bool(greedy[-n:].all())))
    return out


def _direct_greedy(params, cfg, prompts, new_tokens):
    """Greedy continuations (text, up to a stop id), by full forward passes over the whole sequence each step."""
    rows = [[TOK.bos_id] + TOK.encode(p) for p in prompts]
    outs, stopped = [[] for _ in prompts], [False] * len(prompts)
    for _ in range(new_tokens):
        length = max(len(r) for r in rows)
        tokens = np.array([r + [0] * (length - len(r)) for r in rows])  # right padding: causal, never attended
        logits = np.asarray(model.Llama(cfg).apply({"params": params}, tokens))
        for i, row in enumerate(rows):
            token = int(logits[i, len(row) - 1].argmax())
            stopped[i] = stopped[i] or token in TOK.stop_ids
            if not stopped[i]:
                outs[i].append(token)
            row.append(token)
    return [TOK.decode(out) for out in outs]


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def lm(tiny):
    return harness.LlamaJaxLM(checkpoint=tiny[0], batch_size=3, max_length=MAX_LENGTH, mesh="data=2,fsdp=4")


class _LmEvalEncoding(TemplateLM):
    """lm-eval's own split of a request into context and continuation ids (``TemplateLM.loglikelihood`` and
    ``_encode_pair``, which its ``hf`` model inherits), with ``tok_encode`` as that model does it for our exported
    tokenizer: <|begin_of_text|> first unless ``add_special_tokens=False``. Scoring returns the ids it was given."""

    eot_token_id = TOK.eos_id
    prefix_token_id = TOK.bos_id
    loglikelihood_rolling = generate_until = None  # not needed to encode loglikelihood requests

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return ([TOK.bos_id] if add_special_tokens is not False else []) + TOK.encode(string)

    def _loglikelihood_tokens(self, requests, **kwargs):
        return [(context, continuation) for _, context, continuation in requests]


def test_an_adapter_is_scored_as_its_merged_weights(tiny, tmp_path):
    path, params, cfg = tiny
    spec = config_lib.LoRA(rank=4, alpha=8.0, targets=("query", "down"))
    adapters = jax.tree.map(lambda x: x + 0.05 * np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype),
                            lora.init(cfg.replace(lora=spec), jax.random.key(1)))
    peft.write(tmp_path / "adapter", adapters, cfg.replace(lora=spec))
    adapted = harness.LlamaJaxLM(checkpoint=path, adapter=str(tmp_path / "adapter"), batch_size=2,
                                 max_length=MAX_LENGTH)
    merged = lora.merge(lora.join(params, adapters), cfg.replace(lora=spec))
    pairs = [(q, c) for q, choices, _ in QUESTIONS[:2] for c in choices]
    got = adapted.loglikelihood(_requests("loglikelihood", pairs))
    want, base = _direct_loglikelihoods(merged, cfg, pairs), _direct_loglikelihoods(params, cfg, pairs)
    for (log_prob, _), (expected, _), (plain, _) in zip(got, want, base):
        assert log_prob == pytest.approx(expected, rel=1e-5, abs=1e-4) and abs(log_prob - plain) > 1e-3


# Contexts ending in each kind of whitespace (lm-eval moves all of it into the continuation), and an empty one.
WHITESPACE_PAIRS = [("Answer: ", "yes"), ("Label:\t", "x"), ("Answer in one word\n", "Yes"), ("Q:\n\n", " A"),
                    ("Mixed \t\n ", "end"), ("Line\r\n", "two"), ("No space", " after"), ("", "Hello"),
                    ("   ", "only spaces")]


def test_requests_split_as_lm_eval_splits_them(lm, monkeypatch):
    scored = []
    monkeypatch.setattr(lm, "_score_requests", lambda pairs, with_greedy: scored.extend(pairs) or [(0.0, True)] * len(
        pairs))
    lm.loglikelihood(_requests("loglikelihood", WHITESPACE_PAIRS))
    want = _LmEvalEncoding().loglikelihood(_requests("loglikelihood", WHITESPACE_PAIRS))
    assert [(list(c), list(x)) for c, x in scored] == want


@pytest.mark.slow  # 10 s on 2 busy cores
def test_loglikelihood_equals_a_direct_computation(tiny, lm):
    _, params, cfg = tiny
    pairs = [(q, c) for q, choices, _ in QUESTIONS for c in choices]
    pairs += [("", "Hello there"), ("A context longer than max_length, " * 4 + "so", " cut from its start")]
    got = lm.loglikelihood(_requests("loglikelihood", pairs))
    for pair, (log_prob, greedy), (want, want_greedy) in zip(pairs, got, _direct_loglikelihoods(params, cfg, pairs)):
        assert log_prob == pytest.approx(want, rel=1e-5, abs=1e-4), pair
        assert greedy == want_greedy
    # lm-eval's convention: a space that ends the context belongs to the continuation.
    spaced = lm.loglikelihood(_requests("loglikelihood", [("Answer: ", "yes")]))[0][0]
    assert spaced == pytest.approx(_direct_loglikelihoods(params, cfg, [("Answer:", " yes")])[0][0], rel=1e-5)
    # Continuations that are greedy by construction: the model's own argmax, where that is a printable byte.
    contexts = [f"Context {i:02d}:" for i in range(40)]  # one length: one batch
    logits = model.Llama(cfg).apply({"params": params}, np.array([[TOK.bos_id] + TOK.encode(c) for c in contexts]))
    printable = [(c, chr(i)) for c, i in zip(contexts, np.asarray(logits)[:, -1].argmax(-1)) if 32 <= i < 127]
    assert printable and all(greedy for _, greedy in lm.loglikelihood(_requests("loglikelihood", printable)))


def test_loglikelihood_rolling_equals_a_direct_computation(tiny, lm):
    _, params, cfg = tiny
    short = "A short text of one window."
    ids = [TOK.bos_id] + TOK.encode(short)
    assert lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,)]))[0] == pytest.approx(
        _log_probs(params, cfg, ids)[0].sum(), rel=1e-5)

    # 150 bytes, windows of 64 predictions (lm-eval's LM.loglikelihood_rolling docstring): <bos> t[0:63] predicts
    # t[0:64]; t[63:127] predicts t[64:128]; the last window keeps a full context, t[85:149] predicting t[86:150],
    # of which t[128:150] are scored.
    text = ("The rolling windows see at most sixty-four bytes. " * 3)[:150]
    t = TOK.encode(text)
    assert len(t) == 150
    want = _log_probs(params, cfg, [TOK.bos_id] + t[0:64])[0].sum()
    want += _log_probs(params, cfg, t[63:128])[0].sum()
    want += _log_probs(params, cfg, t[85:150])[0][-22:].sum()
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))[0]
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow  # 13 s on 2 busy cores
def test_generate_until_equals_greedy_decoding(tiny, lm):
    _, params, cfg = tiny
    args = [(prompt, {"until": ["\n\n"], "max_gen_toks": 6}) for prompt, _ in PROMPTS]
    got = lm.generate_until(_requests("generate_until", args))
    assert got == [text.split("\n\n")[0] for text in _direct_greedy(params, cfg, [p for p, _ in PROMPTS], 6)]
    stop = got[0][2:3] if len(got[0]) > 2 else None
    if stop:  # an `until` string cuts the text before it
        cut = lm.generate_until(_requests("generate_until", [(PROMPTS[0][0], {"until": [stop], "max_gen_toks": 6})]))
        assert cut == [got[0].split(stop)[0]]


def _write_task(folder: Path, name: str, records: list[dict], config: str):
    """A local lm-eval task ``name``: ``records`` as its JSON test split, ``config`` the rest of its YAML."""
    data = folder / f"{name}.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    data.write_text("\n".join(json.dumps(record) for record in records))
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n"
                                         f"  data_files: {{test: {data}}}\ntest_split: test\n"
                                         + textwrap.dedent(config) + "metadata:\n  version: 1.0\n")


CHOICE_TASK = """
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: gold
    target_delimiter: ""
    metric_list:
      - metric: acc
      - metric: acc_norm
    """


def _write_tasks(folder: Path):
    _write_task(folder, "local_choice", [{"question": q, "choices": c, "gold": g} for q, c, g in QUESTIONS],
                CHOICE_TASK)
    _write_task(folder, "local_answer", [{"prompt": p, "answer": a} for p, a in PROMPTS], """
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{answer}}"
        target_delimiter: ""
        generation_kwargs:
          until: ["\\n\\n"]
          max_gen_toks: 6
        metric_list:
          - metric: exact_match
        """)


def _offline_env(tmp_path) -> dict[str, str]:
    return {**env(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}


@pytest.mark.slow  # lm-eval's command in a subprocess: ~35 s of CPU
def test_lm_eval_runs_two_local_tasks_end_to_end(tiny, tmp_path):
    path, params, cfg = tiny
    _write_tasks(tmp_path / "tasks")
    done = subprocess.run(
        [sys.executable, "-m", "llama_jax.eval.harness", "--model", "llama_jax", "--model_args",
         f"checkpoint={path},max_length={MAX_LENGTH}", "--tasks", "local_choice,local_answer", "--include_path",
         str(tmp_path / "tasks"), "--batch_size", "8", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=_offline_env(tmp_path), timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]

    scores = [[ll for ll, _ in _direct_loglikelihoods(params, cfg, [(q, c) for c in choices])]
              for q, choices, _ in QUESTIONS]
    choice_acc = np.mean([int(np.argmax(s)) == gold for s, (_, _, gold) in zip(scores, QUESTIONS)])
    greedy = _direct_greedy(params, cfg, [p for p, _ in PROMPTS], 6)
    answer_match = np.mean([text.split("\n\n")[0] == a for text, (_, a) in zip(greedy, PROMPTS)])
    assert results["local_choice"]["acc,none"] == pytest.approx(choice_acc)
    assert results["local_answer"]["exact_match,none"] == pytest.approx(answer_match)


# Contexts ending in spaces, tabs and newlines (lm-eval scores that whitespace as part of the continuation).
WHITESPACE_CHOICES = [("Label:\t", ["pos", "neg"], 0), ("Answer in one word\n", ["Yes", "No", "Maybe"], 1),
                      ("The sky is ", ["blue", "green"], 0), ("Q: two plus two?\n\n", [" four", "five"], 0),
                      ("Mixed \t\n ", ["a", "b"], 1), ("No whitespace:", ["x", " y"], 0)]
WHITESPACE_CONTINUATIONS = [("Sentiment:\t", "happy"), ("Translate to French\n", "Bonjour"),
                            ("Count: 1 2 3 ", "4"), ("Done.\r\n", "Next")]


def _logged_loglikelihoods(out: Path) -> dict[tuple, float]:
    """(task, doc id, context, continuation) -> log-likelihood, from the samples ``--log_samples`` wrote."""
    scores = {}
    for samples in out.rglob("samples_*.jsonl"):
        task = samples.name.removeprefix("samples_").rsplit("_", 1)[0]
        for sample in map(json.loads, samples.read_text().splitlines()):
            for args, response in zip(sample["arguments"].values(), sample["resps"]):
                scores[(task, sample["doc_id"], args["arg_0"], args["arg_1"])] = float(response[0][0])
    return scores


@pytest.mark.slow  # ~50 s on 2 busy cores: convert --to hf, then lm_eval with each model, as subprocesses
def test_agrees_with_lm_evals_hf_model_on_the_same_weights(tiny, tmp_path):
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (the test extra installs it)")
    tasks = tmp_path / "tasks"
    _write_task(tasks, "space_choice", [{"question": q, "choices": c, "gold": g} for q, c, g in WHITESPACE_CHOICES],
                CHOICE_TASK)
    _write_task(tasks, "space_loglikelihood", [{"context": c, "continuation": x} for c, x in WHITESPACE_CONTINUATIONS],
                """
        output_type: loglikelihood
        doc_to_text: "{{context}}"
        doc_to_target: "{{continuation}}"
        target_delimiter: ""
        metric_list:
          - metric: perplexity
        """)
    hf_dir = tmp_path / "hf"
    run_module("llama_jax.convert", "--checkpoint", tiny[0], "--to", "hf", "--out", str(hf_dir))
    common = ["--tasks", "space_choice,space_loglikelihood", "--include_path", str(tasks), "--batch_size", "8",
              "--log_samples"]
    scores = {}
    for name, command in [("ours", ["llama_jax.eval.harness", "--model", "llama_jax", "--model_args",
                                     f"checkpoint={hf_dir}"]),
                          ("hf", ["lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32",
                                  "--device", "cpu"])]:
        done = subprocess.run([sys.executable, "-m", *command, *common, "--output_path", str(tmp_path / name)],
                              capture_output=True, text=True, env=_offline_env(tmp_path), timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
        scores[name] = _logged_loglikelihoods(tmp_path / name)
    assert len(scores["hf"]) == sum(len(c) for _, c, _ in WHITESPACE_CHOICES) + len(WHITESPACE_CONTINUATIONS)
    assert scores["ours"].keys() == scores["hf"].keys()
    for request, want in scores["hf"].items():
        assert scores["ours"][request] == pytest.approx(want, abs=1e-3), request
