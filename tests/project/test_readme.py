"""The README is the front door: short, the two commands on top, links that resolve, and a command table whose
commands exist and whose tiny examples run.

The command table is the README's table whose header starts with ``| command |``; each row names a command, says
what it does and gives one example (a single code span), and its last column, ``tiny``, says ``yes`` when the
example needs nothing but ``runs/demo`` (the checkpoint ``make demo`` writes), the repository's ``configs/`` and the
Shakespeare corpus (``$LLAMA_JAX_SHAKESPEARE``), and writes only under ``runs/``. The slow tests build a short
``runs/demo`` in a temporary directory (the demo config, fewer steps) and run each tiny example there as a user
would, and the README's Python quickstart too.
"""

import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, env

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
MAX_README_LINES = 250
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"python -m (llama_jax(?:\.\w+)*)")


def _cells(line: str) -> list[str]:
    """A Markdown table row's cells (``\\|`` inside a cell is not a separator)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def command_table() -> list[dict[str, str]]:
    """The rows of the README's command table, each as {column header: cell}."""
    lines = README.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("| command |")]
    assert len(starts) == 1, "the README needs exactly one table whose header starts with '| command |'"
    header = _cells(lines[starts[0]])
    rows = []
    for line in lines[starts[0] + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, _cells(line), strict=True)))
    return rows


def example(row: dict[str, str]) -> str:
    """The row's example command (its example cell must be one code span)."""
    match = re.fullmatch(r"`([^`]+)`", row["example"])
    assert match, f"the example of {row['command']} is not one code span: {row['example']}"
    return match[1]


def tiny_examples() -> list[str]:
    return [example(row) for row in command_table() if row["tiny"] == "yes"]


def _headings(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code blocks)."""
    anchors, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def test_readme_is_at_most_250_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_make_demo_and_make_test_are_in_the_first_20_lines():
    top = "\n".join(README.read_text().splitlines()[:20])
    assert "make demo" in top and "make test" in top


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    """Every relative link names an existing file, and its #anchor (if any) a heading of that file."""
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.is_file():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in _headings(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_command_table_names_importable_commands_with_a_main():
    rows = command_table()
    assert len(rows) >= 10
    for row in rows:
        commands = COMMAND.findall(example(row))
        assert commands == [f"llama_jax.{row['command'].strip('`')}"], (row["command"], example(row))
        name = commands[0]
        spec = importlib.util.find_spec(name)
        assert spec is not None, f"{name} is not a module"
        module = importlib.import_module(f"{name}.__main__" if spec.submodule_search_locations else name)
        assert callable(getattr(module, "main", None)), f"{module.__name__} has no main()"


def test_the_table_marks_some_examples_tiny():
    assert {row["tiny"] for row in command_table()} <= {"yes", ""}
    assert len(tiny_examples()) >= 5


# --- slow: the tiny examples and the quickstart, run as a user runs them --------------------------------------

needs_shakespeare = pytest.mark.skipif(not os.environ.get("LLAMA_JAX_SHAKESPEARE"),
                                       reason="LLAMA_JAX_SHAKESPEARE is unset")


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A directory laid out like the repository after ``make demo``: configs/ and runs/demo (10 steps)."""
    work = tmp_path_factory.mktemp("readme")
    (work / "configs").symlink_to(ROOT / "configs")
    done = _run([sys.executable, "-m", "llama_jax.train", "--config", "configs/pretrain/demo.py",
                 "--config.train.steps=10"], work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "runs" / "demo" / "checkpoints").is_dir()
    return work


@pytest.mark.slow  # ~3 minutes in all on 2 busy CPU cores: the demo run, then 5-15 s per example
@needs_shakespeare
@pytest.mark.parametrize("command", tiny_examples(), ids=lambda c: COMMAND.search(c)[1])
def test_tiny_example_runs(command: str, demo_dir: Path):
    argv = shlex.split(command)
    assert argv[0] == "python"
    done = _run([sys.executable, *argv[1:]], demo_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])  # every command's last line of stdout
    assert isinstance(result, dict)
    if "--out" in argv:
        out = argv[argv.index("--out") + 1]
        assert (demo_dir / out).exists(), f"{out} was not written"


@pytest.mark.slow
@needs_shakespeare
def test_python_quickstart_runs(demo_dir: Path):
    text = README.read_text()
    section = text[text.index("\n## Python\n"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    done = _run([sys.executable, "-c", code], demo_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ROMEO." in done.stdout, done.stdout
