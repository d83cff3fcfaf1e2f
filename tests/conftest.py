"""Suite-wide setup: 8 simulated CPU devices for sharding tests, no model-hub access and one XLA compilation cache;
and the helpers several test files share."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llama_jax.config import ModelConfig, RopeScaling  # imports no jax: the environment below still comes first

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite runs on the CPU; with libtpu (the [tpu] extra) installed jax would otherwise try, and fail, to start a
# TPU in every process. TPU compile-only devices (llama_jax.plan.aot) do not need that backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the session and every command its tests start: the suite compiles the same
# tiny programs again and again (each run of the training loop, each command), and XLA compiling dominates its time.
# A fresh directory per session (set JAX_COMPILATION_CACHE_DIR to keep one across sessions).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="llama_jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# --- helpers several test files share (plain functions: import them with `from conftest import ...`) -----------

ROOT = Path(__file__).resolve().parents[1]


def env(devices: int = 1) -> dict[str, str]:
    """The environment of a command run as a user runs it from the repository: this checkout first on PYTHONPATH
    (the caller's entries, such as libtpu's folder for the planner, after it), on the CPU with ``devices`` simulated
    devices."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": path}


def run_module(*args: str, devices: int = 1, timeout: float = 7200) -> str:
    """``python -m ARGS`` in ``env(devices)``; its stdout (asserts exit 0)."""
    done = subprocess.run([sys.executable, "-m", *args], env=env(devices), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A text file of ~200 short paragraphs of varied words (deterministic)."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = "the king queen lord night day love death sword crown heart fair foul sleep dream".split()
    paragraphs = [" ".join(rng.choice(words, size=rng.integers(5, 30))) + "." for _ in range(200)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


def preference_config(stage: str, prefs, run_dir, init_from=None, **sections):
    """configs/<stage>/tiny.py (dpo or reward) on the preference file ``prefs``: two layers, batches of 8 rows of 96
    tokens, every step logged, no eval; then each of ``sections`` updates its section."""
    import runpy

    c = runpy.run_path(str(ROOT / "configs" / stage / "tiny.py"))["get_config"](str(prefs))
    c.run_dir = str(run_dir)
    if init_from is not None:
        c.init_from = str(init_from)
    c.model.num_layers = 2
    c.data.update(batch_size=8, seq_len=96)
    c.logging.update(every=1, eval_every=0)
    for section, values in sections.items():
        c[section].update(values)
    return c


def train_command(corpus, run_dir, *overrides: str) -> list[str]:
    """The real ``python -m llama_jax.train`` on configs/pretrain/tiny.py, with a schedule long enough that only
    ``train.steps`` or a signal stops it."""
    return [sys.executable, "-m", "llama_jax.train", f"--config={ROOT / 'configs' / 'pretrain' / 'tiny.py'}:{corpus}",
            f"--config.run_dir={run_dir}", "--config.schedule.decay_steps=100000",
            "--config.schedule.total_steps=100000", "--config.logging.eval_every=0", *overrides]


def read_metrics(run_dir) -> list[dict]:
    """Every record a run logged to its metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir) -> dict[int, float]:
    """The training loss a run logged at each step."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def assert_trees_equal(a, b) -> None:
    """Same structure, and every leaf the same dtype, shape and bits."""
    import jax
    import numpy as np

    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


# Three shapes: GQA group 1 with plain RoPE; group 4 with llama3 scaling exercised far past the original
# context (64); tied embeddings with a head_dim that is not dim / heads.
PARITY_CONFIGS = {
    "mha": ModelConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=4, ffn_dim=160,
                       rope_theta=10_000.0, norm_eps=1e-6, max_seq_len=256),
    "gqa4_llama3_rope": ModelConfig(vocab_size=300, dim=128, num_layers=3, num_heads=8, num_kv_heads=2,
                                    ffn_dim=256, rope_scaling=RopeScaling(original_max_position=64),
                                    max_seq_len=512),
    "tied_head_dim": ModelConfig(vocab_size=200, dim=96, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=192,
                                 head_dim=32, tie_embeddings=True, max_seq_len=256),
}
SEQ_LEN = {"mha": 33, "gqa4_llama3_rope": 200, "tied_head_dim": 40}


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Init params made less regular than the defaults: unit-scale embeddings, non-trivial norm scales."""
    import jax
    import numpy as np

    from llama_jax import model

    params = model.init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    params["embedding"] = rng.standard_normal(params["embedding"].shape).astype(np.float32)

    def jitter_norms(path, x):
        return x + 0.2 * rng.standard_normal(x.shape).astype(np.float32) if "scale" in str(path) else x

    return jax.tree_util.tree_map_with_path(jitter_norms, params)


def our_logits(cfg, params, tokens, **kwargs):
    """Our logits for ``tokens`` (numpy)."""
    import jax.numpy as jnp
    import numpy as np

    from llama_jax import model

    return np.asarray(model.Llama(cfg).apply({"params": params}, jnp.asarray(tokens), **kwargs))


def successor_params(cfg, successor: dict):
    """A model whose greedy next token is successor[last token]: blocks zeroed (identity), one-hot embeddings,
    and an LM head mapping each token's direction to its successor's logit (needs cfg.dim >= cfg.vocab_size)."""
    import jax
    import numpy as np

    from llama_jax import model

    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), model.param_shapes(cfg))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: np.ones_like(x) if "norm" in jax.tree_util.keystr(p) else x, params)
    params["embedding"] = np.eye(cfg.vocab_size, cfg.dim, dtype=np.float32)
    head = np.zeros((cfg.dim, cfg.vocab_size), np.float32)
    for token, nxt in successor.items():
        head[token, nxt] = 1.0
    params["lm_head"] = head
    return params


def processes(data_cfg, count: int, split: str = "train", state=None, tokenizer=None) -> list:
    """The batch iterators of ``count`` simulated processes (``make_batches`` with process_index / count; byte
    tokenizer by default), resumed from ``state`` (round-tripped through JSON, as a checkpoint gives it back)."""
    import json

    from llama_jax.data import make_batches
    from llama_jax.tokenizer import ByteTokenizer

    tokenizer = tokenizer or ByteTokenizer()
    its = [make_batches(data_cfg, tokenizer, split=split, process_index=p, process_count=count) for p in range(count)]
    for it in its if state is not None else ():
        it.set_state(json.loads(json.dumps(state)))
    return its


def joined(parts: list) -> dict:
    """Process-local batches (nested dicts allowed) -> the global batch, rows in process order."""
    import numpy as np

    return {k: joined([p[k] for p in parts]) if isinstance(parts[0][k], dict) else np.concatenate([p[k] for p in parts])
            for k in parts[0]}


def global_batches(its: list, steps: int | None = None) -> list:
    """Global batches from every process's iterator, until ``steps`` or the end; all processes must end together."""
    out = []
    while steps is None or len(out) < steps:
        parts = [next(it, None) for it in its]
        if all(p is None for p in parts):
            break
        assert all(p is not None for p in parts), f"processes ended at different batches (batch {len(out)})"
        out.append(joined(parts))
    return out


def wait_for(predicate, proc, timeout: float = 120, poll: float = 0.002) -> bool:
    """Polls ``predicate`` until it holds (True) or ``timeout`` seconds pass (False); a training subprocess ``proc``
    that exits first is an AssertionError carrying its stderr."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(poll)
    return False
