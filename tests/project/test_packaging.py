"""The built wheel installs next to other versions of its dependencies than the locked ones: in a fresh venv, with
every requirement of setup.py at its lowest allowed version (jax 0.9 and numpy 2.3 where constraints.txt has 0.10
and 2.4), it resolves, imports, trains, resumes, evaluates, samples, converts and tokenizes. Needs PyPI; slow
(~300 MB of wheels on the first run)."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

EXTRAS = ("tokenizer", "plots")

SMOKE = textwrap.dedent("""
    import json, subprocess, sys
    import jax, numpy, llama_jax
    from matplotlib.figure import Figure
    from llama_jax.tokenizer import get_tokenizer

    def command(*argv):
        done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1])

    config, corpus, run = sys.argv[1:4]
    train = ["llama_jax.train", "--config", f"{config}:{corpus}", f"--config.run_dir={run}",
             "--config.logging.progress=false", "--config.logging.eval_every=2"]
    first = command(*train, "--config.train.steps=2")
    resumed = command(*train, "--config.train.steps=3")
    scored = command("llama_jax.eval", "--checkpoint", run, "--data", corpus, "--max-batches", "2")
    sample = command("llama_jax.generate", "--checkpoint", run, "--prompt", "the", "--max-new-tokens", "4")
    command("llama_jax.convert", "--checkpoint", run, "--to", "hf", "--out", run + "-hf")
    figure = Figure(); figure.add_subplot().plot([1, 2]); figure.savefig(run + ".png")
    print(json.dumps({"jax": jax.__version__, "numpy": numpy.__version__, "llama_jax": llama_jax.__file__,
                      "steps": [first["step"], resumed["step"]], "eval_loss": first["eval_loss"],
                      "scored_tokens": scored["tokens"], "sample_tokens": sample["tokens"][0],
                      "llama3_ids": get_tokenizer("llama3").encode("Hello world! This is a test.")}))
""")


def _lowest(requirements: list[str]) -> list[str]:
    """``name>=x`` -> ``name==x`` (extras and markers dropped: the floor of every requirement)."""
    pinned = []
    for line in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*\(?>=\s*([^,;)\s]+)\)?(;.*)?", line.strip())
        assert match, f"requirement without a lower bound: {line}"
        pinned.append(f"{match[1]}{match[2] or ''}=={match[3]}")
    return pinned


def _requires(wheel: Path) -> tuple[list[str], dict[str, list[str]]]:
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    base, extras = [], {}
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist: "):
            requirement = line.removeprefix("Requires-Dist: ")
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
            target = extras.setdefault(extra[1], []) if extra else base
            target.append(requirement.split(";")[0].strip())
    return base, extras


def _locked(name: str) -> str:
    line = next(x for x in (ROOT / "constraints.txt").read_text().splitlines() if x.lower().startswith(name + "=="))
    return line.split("==")[1]


@pytest.mark.slow
def test_wheel_installs_with_the_lowest_allowed_versions(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree, and an egg-info on the path
    # would tell pip that llama_jax is already installed.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "llama_jax", source / "llama_jax", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, timeout=600, env=env)
    wheel = next((tmp_path / "dist").glob("llama_jax-*.whl"))
    base, extras = _requires(wheel)
    floors = _lowest(base + [r for extra in EXTRAS for r in extras[extra]])
    by_name = dict(f.split("==") for f in floors)
    # The point of the test: minor versions other than the locked ones.
    for name in ("jax", "numpy"):
        assert by_name[name].split(".")[:2] != _locked(name).split(".")[:2], (name, by_name[name])

    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", f"{wheel}[{','.join(EXTRAS)}]", *floors],
                             capture_output=True, text=True, timeout=1800, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=300, env=env)
    assert check.returncode == 0, check.stdout

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i}: the king and the queen walk at night." for i in range(200)))
    smoke = subprocess.run([python, "-c", SMOKE, str(ROOT / "configs" / "pretrain" / "tiny.py"), str(corpus),
                            str(tmp_path / "run")], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=1200)
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    result = json.loads(smoke.stdout.splitlines()[-1])
    print(result)
    assert (result["jax"], result["numpy"]) == (by_name["jax"], by_name["numpy"])
    assert result["llama_jax"].startswith(str(tmp_path / "venv"))  # the wheel, not this checkout
    assert result["steps"] == [2, 3] and 0 < result["eval_loss"] < 7 and 1 <= result["sample_tokens"] <= 4
    assert result["scored_tokens"] > 500
    assert result["llama3_ids"] == [9906, 1917, 0, 1115, 374, 264, 1296, 13]
