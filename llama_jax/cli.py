"""What every ``python -m llama_jax.<command>`` shares: flags, start-up, experiment configs, errors, output.

    parser = cli.parser("python -m llama_jax.generate", __doc__)
    cli.add_checkpoint(parser)                  # --checkpoint, spelled the same in every command
    cli.add_mesh(parser)                        # --mesh data=2,fsdp=4
    def run(args) -> dict: ...                  # human lines on stdout / progress on stderr; returns the result
    def main(argv=None) -> int:
        return cli.main(parser, run, argv)

One policy for all commands:
- multi-host first: ``--coordinator``, ``--num-processes``, ``--process-id`` (or the JAX_* environment, SLURM and
  TPU VM detection) are handed to ``distributed.initialize()`` before anything touches a device;
- a ``LlamaJaxError`` prints ``error: <message>`` on stderr and exits 2, never a traceback; so do bad flags;
- progress bars go to stderr (process 0 only); the result is one JSON object on the last line of stdout.

Experiment configs (``configs/<stage>/<name>.py``, a ``get_config([arg])`` returning an ml_collections ConfigDict)
are loaded with ``--config path.py[:arg]`` and changed with ``--config.<section>.<key>=<value>``: scalars parse as
the type of the key they replace, lists and dicts as JSON or Python literals; an unknown key is an error.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import tqdm

from llama_jax import data, distributed
from llama_jax.errors import ConfigError, LlamaJaxError

if TYPE_CHECKING:
    import ml_collections

CONFIG_PREFIX = "--config."


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the library's error policy: ``error: <message>`` on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(prog: str, doc: str | None, *, config: bool = False) -> ArgumentParser:
    """A command's parser with the multi-host flags; ``config=True`` adds ``--config path.py[:arg]``."""
    p = ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if config:
        p.add_argument("--config", metavar="PATH.py[:ARG]",
                       help="experiment config file; then --config.<section>.<key>=<value> changes any key "
                            "(--help with --config lists them)")
    group = p.add_argument_group("multi-host (default: JAX_* environment, SLURM or TPU VM detection, else one process)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index in [0, N)")
    return p


def add_checkpoint(p: argparse.ArgumentParser, *, required: bool = True, help: str | None = None) -> None:
    p.add_argument("--checkpoint", required=required, metavar="PATH",
                   help=help or "llama_jax run or step directory, Hugging Face directory or Meta directory")


def add_mesh(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default="", metavar="SPEC",
                   help="device mesh, e.g. 'tensor=8' or 'data=2,fsdp=-1' (default: every device on fsdp)")


def add_data(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--data", action="append", metavar="PATH[:FORMAT]", help=help or (
        "a data source (file, directory or glob; repeat for a mixture of equal weights). FORMAT: text, jsonl, "
        "tokens, chat, preference; default from the extension: .txt/.md text (a document per blank-line-separated "
        "paragraph), .npy tokens, .jsonl chat / preference / jsonl by the keys of its first record"))


def data_sources(specs: Sequence[str]) -> list[dict]:
    """``--data`` values as ``data.sources`` entries (``llama_jax.data.source_spec``)."""
    return [data.source_spec(spec) for spec in specs]


def add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, help="llama3 | byte | path of a tokenizer.model (default: the "
                                                     "checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def terminal_text(text: str, what: str) -> str:
    """Text as a terminal, a pipe or argv delivered it, made valid Unicode: Python keeps bytes that are not UTF-8
    as lone surrogates ("surrogateescape"), which no tokenizer can encode; each becomes U+FFFD, with a warning
    naming ``what`` (e.g. "--prompt 1")."""
    bad = sum("\ud800" <= c <= "\udfff" for c in text)
    if not bad:
        return text
    log(f"warning: {what} holds {bad} byte(s) that are not UTF-8 text; each was replaced by U+FFFD")
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


def main(p: ArgumentParser, run: Callable[[argparse.Namespace], dict | None], argv: Sequence[str] | None = None,
         ) -> int:
    """Parses ``argv``, joins the other processes, runs ``run(args)`` and prints its result as JSON (see above)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    takes_config = any(action.dest == "config" for action in p._actions)
    overrides = [a for a in argv if a.startswith(CONFIG_PREFIX)] if takes_config else []
    try:
        if takes_config and {"-h", "--help"} & set(argv):
            _list_config_keys(p, argv)
        args = p.parse_args([a for a in argv if a not in overrides])
        if takes_config:
            if overrides and not args.config:
                raise ConfigError(f"{overrides[0]} needs --config")
            args.config = load_config(args.config, overrides) if args.config else None
        joined = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        try:
            result = run(args)
        finally:
            if joined:
                distributed.shutdown()
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if result is not None and distributed.is_main_process():
        print(json.dumps(result, default=str))
    return 0


def _list_config_keys(p: ArgumentParser, argv: list[str]) -> None:
    """With ``--config`` given, ``--help`` ends with every key of that config and its default."""
    # Read --config alone: the command's required flags need not be given with --help.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config")
    spec = config.parse_known_args(argv)[0].config
    if spec:
        lines = describe_config(load_config(spec))
        p.epilog = f"keys of {spec} (override any with --config.<key>=<value>):\n" + "\n".join(lines)


def progress(iterable: Iterable | None = None, **kwargs) -> tqdm.tqdm:
    """A progress bar on stderr, shown by process 0 only."""
    kwargs.setdefault("disable", not distributed.is_main_process())
    return tqdm.tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def log(message: str) -> None:
    """One line of what the command is doing, on stderr, from process 0 only."""
    if distributed.is_main_process():
        print(message, file=sys.stderr, flush=True)


# --- experiment configs -----------------------------------------------------------------------------


def _config_dict() -> type:
    # ml_collections is imported on first use: generate and chat import this module, and the benchmarks that use
    # them run on machines without ml_collections (the GPU machines benchmarks/gpu.sh is written for have none).
    import ml_collections

    return ml_collections.ConfigDict


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``path.py[:arg]`` -> its ``get_config([arg])``, locked, with ``--config.<key>=<value>`` overrides applied."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"llama_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} does not parse: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (AttributeError, KeyError) as e:  # ml_collections' words for a key a locked config does not have
        key, hint = re.search(r'Key "([^"]+)"', str(e)), re.search(r'Did you mean "([^"]+)"', str(e))
        raise ConfigError(f"config file {path} sets unknown key {key[1] if key else e}"
                          + (f" (did you mean {hint[1]!r}?)" if hint else "")) from None
    if not isinstance(config, _config_dict()):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict")
    config.lock()
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"write config overrides as {override}=<value>")
        key, _, value = override[len(CONFIG_PREFIX):].partition("=")
        set_key(config, key, value)
    return config


def set_key(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets ``config.<dotted>`` from command-line text, parsed as the type of the value it replaces."""
    ConfigDict = _config_dict()  # noqa: N806 (a class)
    *parents, leaf = dotted.split(".")
    node = config
    for i, name in enumerate(parents):
        if not isinstance(node, ConfigDict) or name not in node:
            raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r} (in --config.{dotted})")
        node = node[name]
    if not isinstance(node, ConfigDict) or leaf not in node:
        known = sorted(node.keys()) if isinstance(node, ConfigDict) else []
        raise ConfigError(f"unknown config key {dotted!r}; keys there: {known}")
    current = node[leaf]
    if isinstance(current, ConfigDict):
        raise ConfigError(f"config key {dotted!r} is a section; set its keys one by one (--config.{dotted}.<key>=...)")
    try:
        node[leaf] = parse_value(text, current)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--config.{dotted}={text}: {e}") from None


def parse_value(text: str, current: Any) -> Any:
    """Command-line text as the type of ``current``: bool, int, float, str, or a literal (lists, dicts, None)."""
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false for a boolean key, got {text!r}")
        return lowered in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if current is None:
                return text
            raise ValueError(f"expected a JSON or Python literal for a {type(current).__name__} key") from None


def describe_config(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """``key = value`` lines for every leaf of a config (what ``--help`` shows with ``--config``)."""
    lines = []
    for key in config.keys():
        value = config[key]
        if isinstance(value, _config_dict()):
            lines += describe_config(value, f"{prefix}{key}.")
        else:
            lines.append(f"  --config.{prefix}{key}={json.dumps(value, default=str)}")
    return lines
