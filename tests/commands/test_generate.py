"""KV-cache generation against full forwards, transformers' greedy generate, one-by-one runs and the
sampling formulas; a sampled row does not depend on the rows batched with it. Low-rank adapters through the command:
unmerged over a base, token for token as the run merged on load, several in one process, a foreign base refused."""

import json
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, env

from llama_jax import checkpoint, config, lora, model
from llama_jax import generate as gen
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError, DataError
from llama_jax.formats import peft as peft_format
from llama_jax.formats.hf import params_to_hf
from llama_jax.tokenizer import get_tokenizer
from llama_jax.train import loop

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# GQA group 2, max_seq_len small enough to test the cache limit.
CFG = ModelConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=160,
                  rope_theta=10_000.0, max_seq_len=96)


@pytest.fixture(scope="module")
def params():
    p = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))
    # Unit-scale embeddings give peaked, well-separated logits (no near-ties between frameworks).
    p["embedding"] = np.random.default_rng(0).standard_normal(p["embedding"].shape).astype(np.float32)
    return p


def full_logits(params, ids):
    forward = jax.jit(lambda p, t: model.Llama(CFG).apply({"params": p}, t))
    return np.asarray(forward(params, jnp.asarray([ids], jnp.int32)))[0]


def test_cached_decoding_matches_full_forward_step_by_step(params):
    rng = np.random.default_rng(1)
    lengths = [5, 9, 2]
    prompts = [rng.integers(0, 256, n).tolist() for n in lengths]
    continuation = rng.integers(0, 256, (3, 6))
    tokens = np.zeros((3, 9), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p
    prefill = jax.jit(gen.prefill_logits, static_argnums=4)
    decode = jax.jit(gen.decode_logits, static_argnums=4)
    cache = model.init_cache(CFG, 3, 16)
    logits, cache = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(lengths), CFG)
    steps = [np.asarray(logits)]
    positions = jnp.asarray(lengths)
    for i in range(6):
        logits, cache = decode(params, cache, jnp.asarray(continuation[:, i]), positions + i, CFG)
        steps.append(np.asarray(logits))
    for row, prompt in enumerate(prompts):
        ids = prompt + continuation[row].tolist()
        reference = full_logits(params, ids)[len(prompt) - 1:]  # logits after each growing prefix
        np.testing.assert_allclose(np.stack([s[row] for s in steps]), reference, atol=2e-5, rtol=1e-5)


def hf_greedy(params, prompt, max_new_tokens, eos=None):
    hf_cfg = transformers.LlamaConfig(**config.to_hf(CFG))
    m = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params_to_hf(params, CFG).items()})
    with torch.no_grad():
        out = m.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_token_for_token(params):
    prompt = [3, 17, 200, 42, 9]
    ours = gen.generate(params, CFG, [prompt], 24, stop_ids=())[0]
    assert ours == hf_greedy(params, prompt, 24)
    assert len(set(ours)) > 3  # a real continuation, not one repeated token
    # Stopping: cut at the first occurrence of a chosen stop token, which is kept, as transformers does.
    stop = ours[7]
    stopped = gen.generate(params, CFG, [prompt], 24, stop_ids=(stop,))[0]
    assert stopped == ours[: ours.index(stop) + 1]
    assert stopped == hf_greedy(params, prompt, 24, eos=stop)


def test_batched_prompts_of_different_lengths_equal_one_by_one(params):
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 256, n).tolist() for n in (1, 7, 3, 12)]
    batched = gen.generate(params, CFG, prompts, 10, stop_ids=())
    assert batched == [gen.generate(params, CFG, [p], 10, stop_ids=())[0] for p in prompts]
    assert gen.generate(*gen.inference_layout(params, CFG), prompts, 10, stop_ids=()) == batched  # unrolled
    # Rows stopping at different steps: each ends at its own first stop token.
    stop_ids = (batched[0][2], batched[2][5])
    stopped = gen.generate(params, CFG, prompts, 10, stop_ids=stop_ids)
    for full, cut in zip(batched, stopped):
        ends = [i for i, t in enumerate(full) if t in stop_ids]
        assert cut == (full[: ends[0] + 1] if ends else full)


def test_streaming_reports_tokens_as_they_come(params):
    prompts = [[1, 2, 3], [4]]
    seen = []
    result = gen.generate(params, CFG, prompts, 6, stop_ids=(), on_token=lambda row, tok: seen.append((row, tok)))
    assert [t for r, t in seen if r == 0] == result[0] and [t for r, t in seen if r == 1] == result[1]
    assert seen[:2] == [(0, result[0][0]), (1, result[1][0])]  # step by step, not prompt by prompt
    stop = result[1][1]
    steps = list(gen.stream(params, CFG, prompts, 6, stop_ids=(stop,)))
    assert [s[1] for s in steps][:3] == [result[1][0], stop, None]  # a stopped row yields None


def distribution(probs, **sampling):
    """Empirical next-token frequencies from 20,000 rows of the same logits."""
    logits = jnp.log(jnp.asarray(np.tile(probs, (20_000, 1)), jnp.float32))
    draws = np.asarray(gen.sample(logits, jax.random.split(jax.random.key(0), len(logits)), gen.Sampling(**sampling)))
    return np.bincount(draws, minlength=len(probs)) / len(draws)


def test_sampling_follows_temperature_top_k_and_top_p_formulas():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(distribution(p, temperature=1.0), p, atol=0.015)
    hot = p ** (1 / 2.0) / (p ** (1 / 2.0)).sum()  # temperature 2 flattens: p^(1/T), renormalised
    np.testing.assert_allclose(distribution(p, temperature=2.0), hot, atol=0.015)
    np.testing.assert_allclose(distribution(p, temperature=1.0, top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
    # top_p=0.7: 0.5 alone is short of 0.7, so the nucleus is {0, 1}; 0.95 needs three tokens.
    np.testing.assert_allclose(distribution(p, temperature=1.0, top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0],
                               atol=0.015)
    np.testing.assert_allclose(distribution(p, temperature=1.0, top_p=0.95), [0.5, 0.3, 0.15, 0] / np.float64(0.95),
                               atol=0.015)
    assert distribution(p, temperature=0.0)[0] == 1.0


def test_sampled_generation_is_seeded(params):
    prompts = [[5, 6, 7]]
    kwargs = dict(temperature=1.0, top_k=50, top_p=0.95, stop_ids=())
    a = gen.generate(params, CFG, prompts, 16, seed=1, **kwargs)
    assert a == gen.generate(params, CFG, prompts, 16, seed=1, **kwargs)
    assert a != gen.generate(params, CFG, prompts, 16, seed=2, **kwargs)
    greedy = gen.generate(params, CFG, prompts, 16, stop_ids=())
    assert gen.generate(params, CFG, prompts, 16, seed=3, temperature=1.0, top_k=1, stop_ids=()) == greedy


def test_a_sampled_row_does_not_depend_on_the_rows_beside_it(params):
    prompts = [[5, 6, 7], [9, 1], [200, 3, 4, 8]]
    kwargs = dict(temperature=1.0, top_p=0.95, seed=4, stop_ids=())
    together = gen.generate(params, CFG, prompts, 12, **kwargs)
    assert len({tuple(row) for row in together}) == 3
    alone = [gen.generate(params, CFG, [p], 12, first_request=i, **kwargs)[0] for i, p in enumerate(prompts)]
    assert alone == together  # row r is request first_request + r, whatever else is in the batch
    assert gen.generate(params, CFG, prompts[1:], 12, first_request=1, **kwargs) == together[1:]
    assert gen.generate(params, CFG, prompts, 12, **{**kwargs, "seed": 5}) != together
    with pytest.raises(ConfigError, match="first_request"):
        gen.generate(params, CFG, prompts, 4, first_request=-1, **kwargs)


@pytest.mark.slow  # 8 s on 2 busy cores
def test_tensor_parallel_decode_equals_single_device():
    from llama_jax import sharding

    assert jax.device_count() >= 8, "tests/conftest.py sets 8 simulated CPU devices"
    cfg = CFG.replace(num_kv_heads=4)
    p = model.init_params(cfg, jax.random.key(3))
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    mesh = sharding.make_mesh("data=2,tensor=4")
    single = gen.generate(p, cfg, prompts, 12, stop_ids=())
    assert gen.generate(p, cfg, prompts, 12, stop_ids=(), mesh=mesh) == single
    sampled = dict(temperature=1.0, seed=2, stop_ids=())  # the requests' keys travel with their rows
    assert gen.generate(p, cfg, prompts, 12, mesh=mesh, **sampled) == gen.generate(p, cfg, prompts, 12, **sampled)
    with pytest.raises(ConfigError, match="not divisible"):  # 2 kv heads cannot split 4 ways
        gen.generate(model.init_params(CFG, jax.random.key(3)), CFG, prompts, 4, mesh=mesh)


def test_bad_input_raises_clear_errors(params):
    with pytest.raises(DataError, match="max_seq_len"):
        gen.generate(params, CFG, [[1] * 90], 10)  # 90 + 10 > 96 cache positions
    with pytest.raises(DataError, match="prompt 1 is empty"):
        gen.generate(params, CFG, [[1, 2], []], 4)
    with pytest.raises(DataError, match="non-empty list"):
        gen.generate(params, CFG, [], 4)
    with pytest.raises(DataError, match=r"prompt 0 has token id\(s\) \[256\]"):
        gen.generate(params, CFG, [[1, 256]], 4)
    with pytest.raises(DataError, match=r"\[-1\]"):
        gen.generate(params, CFG, [[-1, 3]], 4)
    with pytest.raises(DataError, match="is a str"):
        gen.generate(params, CFG, ["hello"], 4)
    with pytest.raises(ConfigError, match="top_p"):
        gen.generate(params, CFG, [[1]], 4, temperature=1.0, top_p=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        gen.generate(params, CFG, [[1]], 4, temperature=-1.0)
    assert gen.generate(params, CFG, [[1], [2]], 0) == [[], []]


# --- low-rank adapters through the command: run unmerged over a base, several in one process ------------------------

TOK = get_tokenizer("byte")
SMALL = config.get("tiny", num_layers=2, dim=64, ffn_dim=128, max_seq_len=256)  # holds the byte tokenizer's ids
PROMPTS = ["Say fig", "Pl"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("base") / "ckpt")
    checkpoint.save_params(path, jax.jit(model.init_params, static_argnums=0)(SMALL, jax.random.key(5)), SMALL,
                           tokenizer={"name": TOK.name, "sha256": TOK.sha256})
    return path


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """A PEFT adapter directory for ``base``: random A and B (B far from zero) on q, v and down."""
    cfg = SMALL.replace(lora=config.LoRA(rank=2, alpha=4.0, targets=("query", "value", "down")))
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(s.dtype),
                            lora.split(model.param_shapes(cfg))[1])
    path = tmp_path_factory.mktemp("peft") / "adapter"
    peft_format.write(path, adapters, cfg)
    return str(path)


def _generate(*args: str) -> subprocess.CompletedProcess:
    prompts = [word for prompt in PROMPTS for word in ("--prompt", prompt)]
    return subprocess.run([sys.executable, "-m", "llama_jax.generate", *args, *prompts, "--max-new-tokens", "12"],
                          env=env(), capture_output=True, text=True, timeout=300)


def _result(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _completions(params, cfg) -> list[str]:
    prompts = [TOK.encode(p, bos=True) for p in PROMPTS]
    outputs = gen.generate(params, cfg, prompts, 12, stop_ids=TOK.stop_ids, vocab_size=TOK.vocab_size)
    return [TOK.decode(ids) for ids in outputs]


def test_a_peft_adapter_runs_over_the_base_as_its_merged_weights_do(base, peft_adapter):
    done = _result(_generate("--checkpoint", base, "--adapter", f"theirs={peft_adapter}"))
    assert list(done["adapters"]) == ["theirs"]
    params, cfg, _ = checkpoint.load(base)
    adapters, spec = peft_format.read(peft_adapter, cfg)
    merged = lora.merge(lora.join(params, adapters), cfg.replace(lora=spec))  # the plain network, W + scale B A
    assert done["adapters"]["theirs"]["completions"] == _completions(merged, cfg)
    assert done["adapters"]["theirs"]["completions"] != _completions(params, cfg)  # the adapter changes the reply


@pytest.fixture(scope="module")
def sft_adapters(base, tmp_path_factory):
    """A short SFT run with adapters on every projection over ``base``, trained hard enough to change greedy
    completions (in this process: the commands under test read it)."""
    tmp = tmp_path_factory.mktemp("sft")
    chats = tmp / "chats.jsonl"
    words = np.random.default_rng(0).choice(["apple", "pear", "plum", "fig", "kiwi", "lime"], 40)
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                      {"role": "assistant", "content": f"{w.title()}!"}]}) + "\n"
                             for w in words))
    c = runpy.run_path(str(ROOT / "configs" / "sft" / "tiny.py"))["get_config"](str(chats))
    c.update(run_dir=str(tmp / "run"), init_from=base)
    c.model.update(num_layers=SMALL.num_layers, dim=SMALL.dim, ffn_dim=SMALL.ffn_dim, max_seq_len=SMALL.max_seq_len)
    c.data.update(seq_len=64, batch_size=8)
    c.lora.update(rank=4, alpha=8.0)
    c.train.steps = 2
    c.schedule.update(warmup_steps=1, peak_lr=5e-2)
    c.logging.eval_every = 0
    loop.run(c)
    return c.run_dir


@pytest.mark.slow  # 50 s: the adapters' run (20 s) and four commands
def test_adapters_run_unmerged_over_one_base_as_each_would_alone(base, sft_adapters, peft_adapter):
    both = _result(_generate("--checkpoint", base, "--adapter", f"sft={sft_adapters}", "--adapter",
                             f"theirs={peft_adapter}"))
    assert list(both["adapters"]) == ["sft", "theirs"]
    assert both["adapters"]["sft"] == _result(_generate("--checkpoint", sft_adapters))  # merged on load
    alone = _result(_generate("--checkpoint", base, "--adapter", peft_adapter))["adapters"][peft_adapter]
    assert both["adapters"]["theirs"] == alone
    plain = _result(_generate("--checkpoint", base))
    # Each adapter changed what the base says, differently: neither result is the base's or the other's.
    assert len({json.dumps(r["completions"]) for r in (plain, *both["adapters"].values())}) == 3


@pytest.mark.slow  # 25 s with the adapters' run
def test_adapters_over_another_base_are_refused(base, sft_adapters, tmp_path):
    other = str(tmp_path / "other")
    checkpoint.save_params(other, model.init_params(SMALL, jax.random.key(7)), SMALL,
                           tokenizer={"name": TOK.name, "sha256": TOK.sha256})
    done = _generate("--checkpoint", other, "--adapter", sft_adapters)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: --adapter {sft_adapters} was trained over {base} (checksum ")
    assert f"not over --checkpoint {other} (checksum " in error  # both bases named
