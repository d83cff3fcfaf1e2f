"""`python -m llama_jax.posttrain.average`: the weighted mean of checkpoints of any format equals NumPy's, mismatched
sources are refused naming the difference, and the averaged model loads and generates; the old spelling
`python -m llama_jax.average` still runs it for one release."""

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import env

from llama_jax import checkpoint, config, model
from llama_jax.posttrain import average

CFG = config.get("tiny", num_layers=2, dim=64, num_heads=4, num_kv_heads=2, ffn_dim=128, vocab_size=300)
BYTE = {"name": "byte", "sha256": "b" * 64}


def random_params(cfg, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(dtype), model.param_shapes(cfg))


def _run(*argv):
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=env(), timeout=300)


def test_the_old_spelling_runs_the_command_and_says_so():
    done = _run("llama_jax.average", "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.splitlines()[0] == \
        "deprecated: python -m llama_jax.average -> use python -m llama_jax.posttrain.average"
    assert "python -m llama_jax.posttrain.average" in done.stdout and "--weights" in done.stdout


def test_weighted_mean_of_mixed_formats_equals_numpy(tmp_path):
    a, b = random_params(CFG, 0), random_params(CFG, 1)
    checkpoint.save_params(str(tmp_path / "a"), a, CFG, tokenizer=BYTE)
    checkpoint.export(str(tmp_path / "b"), "hf", b, CFG)  # no tokenizer recorded: compatible with any
    done = _run("llama_jax.posttrain.average", "--checkpoint", str(tmp_path / "a"), "--checkpoint", str(tmp_path / "b"),
                "--weights", "3,1", "--out", str(tmp_path / "avg"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["weights"] == [3.0, 1.0] and result["sources"] == [str(tmp_path / "a"), str(tmp_path / "b")]

    got, cfg, metadata = checkpoint.load(str(tmp_path / "avg"))
    assert cfg.architecture_differences(CFG) == [] and metadata["stage"] == "average"
    assert metadata["stage_config"] == {"sources": result["sources"], "weights": [3.0, 1.0]}
    assert metadata["tokenizer"] == BYTE
    for x, y, z in zip(jax.tree.leaves(got), jax.tree.leaves(a), jax.tree.leaves(b)):
        # NumPy's float64 formula rounded once to float32, bit for bit.
        np.testing.assert_array_equal(np.asarray(x), ((3 * y.astype(np.float64) + z) / 4).astype(np.float32))

    shown = _run("llama_jax.generate", "--checkpoint", str(tmp_path / "avg"), "--prompt", "Hi",
                 "--max-new-tokens", "3", "--tokenizer", "byte")
    assert shown.returncode == 0 and json.loads(shown.stdout.splitlines()[-1])["tokens"] == [3], shown.stderr


def test_equal_checkpoints_average_to_themselves_exactly(tmp_path):
    params = random_params(CFG, 4)
    sources = []
    for i in range(3):
        checkpoint.save_params(str(tmp_path / str(i)), params, CFG)
        sources += ["--checkpoint", str(tmp_path / str(i))]
    done = _run("llama_jax.posttrain.average", *sources, "--out", str(tmp_path / "avg"))
    assert done.returncode == 0, done.stderr[-3000:]
    got, _, _ = checkpoint.load(str(tmp_path / "avg"))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.mean([y, y, y], axis=0, dtype=np.float64).astype(np.float32))
        np.testing.assert_array_equal(np.asarray(x), y)


@pytest.mark.slow  # 14 s on 2 busy cores
def test_bfloat16_is_accumulated_in_float64_and_rounded_once(tmp_path):
    cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
    sources = [random_params(cfg, seed, ml_dtypes.bfloat16) for seed in range(3)]
    for i, params in enumerate(sources):
        checkpoint.save_params(str(tmp_path / str(i)), params, cfg)
    got, _, _ = average.average([str(tmp_path / str(i)) for i in range(3)])
    for x, *ys in zip(jax.tree.leaves(got), *(jax.tree.leaves(s) for s in sources)):
        assert x.dtype == ml_dtypes.bfloat16
        exact = np.mean([y.astype(np.float64) for y in ys], axis=0)
        np.testing.assert_allclose(x.astype(np.float64), exact, rtol=2**-8, atol=1e-30)  # bf16 rounding only
        np.testing.assert_array_equal(x, exact.astype(ml_dtypes.bfloat16))


@pytest.mark.slow  # 19 s on 2 busy cores
def test_mismatched_sources_are_refused(tmp_path, capsys):
    checkpoint.save_params(str(tmp_path / "a"), random_params(CFG, 0), CFG, tokenizer=BYTE)
    wider = CFG.replace(ffn_dim=256)
    checkpoint.save_params(str(tmp_path / "wider"), random_params(wider, 1), wider, tokenizer=BYTE)
    headed = {**random_params(CFG, 2), "reward_head": np.zeros(CFG.dim, np.float32)}
    checkpoint.save_params(str(tmp_path / "headed"), headed, CFG, tokenizer=BYTE, extra_params=["reward_head"])
    other_tok = {"name": "llama3", "sha256": "c" * 64}
    checkpoint.save_params(str(tmp_path / "llama3"), random_params(CFG, 3), CFG, tokenizer=other_tok)
    for source, needle in (("wider", "ffn_dim: 128 vs 256"), ("headed", "['reward_head']"),
                           ("llama3", "tokenizer llama3")):
        out = str(tmp_path / f"avg-{source}")
        assert average.main(["--out", out, "--checkpoint", str(tmp_path / "a"), "--checkpoint",
                             str(tmp_path / source)]) == 2
        err = capsys.readouterr().err
        assert "error: " in err and needle in err.rsplit("error: ", 1)[1] and "Traceback" not in err, err
        assert not os.path.exists(out)
    assert average.main(["--out", str(tmp_path / "x"), "--checkpoint", str(tmp_path / "a"), "--weights", "1,2"]) == 2
    assert "one per source" in capsys.readouterr().err


def test_reward_heads_average_with_the_rest(tmp_path):
    trees = [{**random_params(CFG, s), "reward_head": np.full(CFG.dim, float(s), np.float32)} for s in (1, 3)]
    for i, tree in enumerate(trees):
        checkpoint.save_params(str(tmp_path / str(i)), tree, CFG, extra_params=["reward_head"])
    assert average.main(["--out", str(tmp_path / "avg"), "--checkpoint", str(tmp_path / "0"), "--checkpoint",
                         str(tmp_path / "1")]) == 0
    got, _, metadata = checkpoint.load(str(tmp_path / "avg"))
    assert metadata["extra_params"] == ["reward_head"]
    np.testing.assert_array_equal(np.asarray(got["reward_head"]), np.full(CFG.dim, 2.0, np.float32))


@pytest.mark.parametrize("weights", ["0,1", "1,x", "nan,1"])
def test_bad_weights(tmp_path, capsys, weights):
    checkpoint.save_params(str(tmp_path / "a"), random_params(CFG, 0), CFG)
    assert average.main(["--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "a"), "--checkpoint",
                         str(tmp_path / "a"), "--weights", weights]) == 2
    assert "error: " in capsys.readouterr().err
