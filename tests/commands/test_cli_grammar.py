"""Every command speaks the one grammar (notes: inputs --checkpoint/--data/--input/--reward, output --out, no
positional arguments, one flag = one meaning and one help text, --json never a path, the written path under "out"),
checked on the parser objects in process; old spellings still work for one release and say so on stderr.

Commands are found, not listed: every module of llama_jax with a module-level ``parser`` and a ``main``, and every
``__main__.py`` (its parser is that of the module its ``main`` comes from). Modules with a ``main`` but no parser are
not commands of the grammar: ``eval.harness`` is lm-eval's own command line, ``tools.sandbox_child`` the code
interpreter's child process. A module other than ``__main__.py`` whose only code is ``from <command> import main``, run
under ``__main__`` (an old path kept for one release, such as ``llama_jax.average``), is an alias of that command.
"""

import argparse
import ast
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import jax
import numpy as np
import pytest
from conftest import ROOT, env

from llama_jax import checkpoint, cli, config, model

PACKAGE = ROOT / "llama_jax"
MULTI_HOST = {"--coordinator", "--num-processes", "--process-id", "-h", "--help"}
# The flags a path may go through; any other flag whose help or metavar speaks of a file, directory or path is wrong.
PATH_FLAGS = {"--checkpoint", "--adapter", "--reward", "--baseline", "--data", "--input", "--out", "--config",
              "--tokenizer"}
PATH_WORDS = re.compile(r"\b(file|directory|dir|path)\b", re.IGNORECASE)
# Keys a result must not name its written path with: that is "out".
PATH_KEYS = {"output", "output_path", "path", "json", "file", "plot"}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _is_command(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    return path.name == "__main__.py" or ("parser" in assigned and "main" in defined)


def _alias_target(path: Path) -> str | None:
    """The module whose ``main`` an alias module re-exports and runs (None when ``path`` is not an alias): its only
    statements are a docstring, imports (one of them ``from <module> import main``) and ``if __name__ ...``. A
    ``__main__.py`` has that shape too, but it is its package's command."""
    if path.name == "__main__.py":
        return None
    tree = ast.parse(path.read_text())
    targets = [node.module for node in tree.body if isinstance(node, ast.ImportFrom)
               and [alias.name for alias in node.names] == ["main"]]
    only_glue = all(isinstance(node, (ast.Import, ast.ImportFrom, ast.If)) or
                    (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in tree.body)
    return targets[0] if len(targets) == 1 and only_glue else None


def _aliases() -> dict[str, str]:
    """Old command name -> the module it runs, for every alias module of llama_jax."""
    return {_module_name(path).removeprefix("llama_jax."): target for path in sorted(PACKAGE.rglob("*.py"))
            if (target := _alias_target(path))}


def _commands() -> dict[str, ModuleType]:
    """Command name (``python -m llama_jax.<name>``) -> the module that declares its parser; the shortest name of
    each."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if not _is_command(path):
            continue
        module = importlib.import_module(_module_name(path))
        if not hasattr(module, "parser"):  # a __main__.py that runs another module's main
            module = sys.modules[module.main.__module__]
        name = _module_name(path).removeprefix("llama_jax.").removesuffix(".__main__")
        if hasattr(module, "parser") and (module not in found or len(name) < len(found[module])):
            found[module] = name
    return {name: module for module, name in found.items()}


COMMANDS = _commands()


def _parsers(parser: argparse.ArgumentParser, name: str):
    """(name, parser) of a command and of each of its subcommands."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _parsers(subparser, f"{name} {sub}")


def _options(name: str):
    """(where, flag, action) of every option of a command and its subcommands, the multi-host flags left out."""
    for where, parser in _parsers(COMMANDS[name].parser, name):
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in MULTI_HOST:
                    yield where, flag, action


def _meaning(action: argparse.Action) -> tuple:
    return action.help, action.type, action.nargs, tuple(action.choices or ())


def _shared_flags() -> dict[str, argparse.Action]:
    """The flags cli declares once: every ``cli.add_*`` on one parser."""
    p = cli.parser("reference", None, config=True)
    for add in (cli.add_checkpoint, cli.add_adapter, cli.add_reward, cli.add_input, cli.add_out, cli.add_mesh,
                cli.add_data, cli.add_tokenizer, cli.add_seed, cli.add_on_error, cli.add_max_new_tokens,
                cli.add_sampling, cli.add_no_bos):
        add(p)
    cli.add_batch_size(p, 8)
    cli.add_samples(p, 4)
    return {flag: action for action in p._actions for flag in action.option_strings}


SHARED = _shared_flags()


POSTTRAIN = {"average", "score", "rejection_sample", "reference_logps"}


def test_the_scan_finds_the_commands():
    assert {*(f"posttrain.{name}" for name in POSTTRAIN), "generate", "chat", "convert", "quantize", "eval",
            "eval.word_count", "tools.synthetic", "train"} <= set(COMMANDS), sorted(COMMANDS)
    assert {"eval.harness", "tools.sandbox_child", *POSTTRAIN}.isdisjoint(COMMANDS)


def test_old_paths_are_aliases_of_the_commands_that_moved(capsys):
    """Each old path runs the command's own main, and importing it prints nothing (only ``-m`` says deprecated)."""
    aliases = _aliases()
    assert aliases == {name: f"llama_jax.posttrain.{name}" for name in POSTTRAIN}
    for old, target in aliases.items():
        assert importlib.import_module(f"llama_jax.{old}").main is importlib.import_module(target).main
        assert COMMANDS[target.removeprefix("llama_jax.")].__name__ == target
    assert capsys.readouterr() == ("", "")


def test_the_alias_scan_tells_an_alias_from_a_command(tmp_path):
    alias = tmp_path / "alias.py"
    alias.write_text('"""Old path."""\n\nimport sys\n\nfrom llama_jax.posttrain.score import main\n\n'
                     'if __name__ == "__main__":\n    raise SystemExit(main())\n')
    assert _alias_target(alias) == "llama_jax.posttrain.score"
    alias.write_text(alias.read_text() + "\n\ndef extra():\n    return 1\n")
    assert _alias_target(alias) is None
    assert _alias_target(PACKAGE / "posttrain" / "score.py") is None
    assert _alias_target(PACKAGE / "eval" / "__main__.py") is None


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_no_positional_arguments(name):
    for where, parser in _parsers(COMMANDS[name].parser, name):
        positional = [a.dest for a in parser._actions
                      if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
        assert not positional, f"{where}: positional {positional}: name inputs --input/--checkpoint/..., outputs --out"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_flag_means_one_thing_everywhere(name):
    """A flag cli declares has cli's help, type, nargs and choices; a flag that two commands spell the same is one of
    cli's."""
    others = COMMANDS.keys() - {name}
    for where, flag, action in _options(name):
        if flag in SHARED:
            assert _meaning(action) == _meaning(SHARED[flag]), f"{where} {flag}: declare it with cli.add_*"
            continue
        for other in sorted(others):
            elsewhere = [w for w, f, _ in _options(other) if f == flag]
            assert not elsewhere, f"{where} {flag} is also a flag of {elsewhere[0]}: declare it once in cli"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_json_is_a_switch_never_a_path(name):
    for where, flag, action in _options(name):
        if flag == "--json":
            assert action.nargs == 0, f"{where} --json takes a value: a path is --out"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_paths_go_through_the_grammar_flags(name):
    for where, flag, action in _options(name):
        if flag not in PATH_FLAGS and action.nargs != 0 and action.choices is None and action.type in (None, str):
            text = f"{action.help or ''} {action.metavar or ''}"
            assert not (PATH_WORDS.search(text) or action.metavar in ("PATH", "DIR", "FILE")), \
                f"{where} {flag} takes a path ({action.help!r}): inputs are --checkpoint/--data/--input/..., the " \
                "output --out"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_written_path_is_under_out(name):
    """The dicts a command's ``run`` returns name no path with another key than "out"."""
    path = Path(COMMANDS[name].__file__)
    run = next(node for node in ast.parse(path.read_text()).body
               if isinstance(node, ast.FunctionDef) and node.name == "run")
    keys = {key.value for node in ast.walk(run) if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict)
            for key in node.value.keys if isinstance(key, ast.Constant)}
    assert not keys & PATH_KEYS, f"{name} returns {sorted(keys & PATH_KEYS)}: the path it wrote is \"out\""


# --- old spellings ------------------------------------------------------------------------------------------------


def _old_and_new(**deprecations) -> cli.ArgumentParser:
    p = cli.parser("demo", None)
    cli.add_checkpoint(p, repeated=True)
    cli.add_out(p)
    cli.add_input(p)
    p.add_argument("--weights")
    p.add_argument("--keep", action="store_true")
    cli.deprecate(p, **deprecations)
    return p


def test_old_positional_arguments_become_flags(capsys):
    p = _old_and_new(positional=("--out", "--checkpoint"))
    args = p.parse_args(["OUT", "--weights", "-1", "A", "--keep", "--input", "i", "B"])
    assert (args.out, args.checkpoint, args.weights, args.keep, args.input) == ("OUT", ["A", "B"], "-1", True, "i")
    assert capsys.readouterr().err == "deprecated: OUT A B -> use --out OUT --checkpoint A --checkpoint B\n"
    args = p.parse_args(["--input", "x", "--", "-OUT", "A"])  # after "--", "-OUT" is a value
    assert (args.out, args.checkpoint, args.input) == ("-OUT", ["A"], "x")
    assert capsys.readouterr().err.count("deprecated: ") == 1


def test_renamed_flags_and_new_spellings(capsys):
    p = _old_and_new(positional=("--input", "--out"), renamed={"--reward": "--checkpoint"})
    args = p.parse_args(["--reward=R", "in.jsonl", "out.jsonl"])
    assert (args.checkpoint, args.input, args.out) == (["R"], "in.jsonl", "out.jsonl")
    assert capsys.readouterr().err == ("deprecated: --reward=R in.jsonl out.jsonl -> use --checkpoint=R --input "
                                       "in.jsonl --out out.jsonl\n")
    args = p.parse_args(["--checkpoint", "R", "--input", "i", "--out", "o"])
    assert (args.checkpoint, args.input, args.out) == (["R"], "i", "o") and capsys.readouterr().err == ""
    with pytest.raises(SystemExit):  # no old spelling registered: a positional argument is an error
        _old_and_new().parse_args(["--input", "i", "--out", "o", "--checkpoint", "c", "stray"])


@pytest.mark.slow  # 6 s on 2 busy cores
def test_the_old_average_spelling_still_works_from_the_shell(tmp_path):
    cfg = config.get("tiny", num_layers=1, dim=32, num_heads=2, num_kv_heads=1, ffn_dim=64)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), model.param_shapes(cfg))
    sources = [str(tmp_path / name) for name in "ab"]
    for source in sources:
        checkpoint.save_params(source, zeros, cfg, tokenizer={"name": "byte", "sha256": "-"})
    out = str(tmp_path / "avg")
    done = subprocess.run([sys.executable, "-m", "llama_jax.posttrain.average", out, *sources], capture_output=True,
                          text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"deprecated: {out} {sources[0]} {sources[1]} -> use --out {out} --checkpoint {sources[0]} --checkpoint " \
           f"{sources[1]}\n" in done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["out"] == out and os.path.isdir(out)
