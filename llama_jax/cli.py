"""What every ``python -m llama_jax.<command>`` shares: flags, start-up, experiment configs, errors, output.

    parser = cli.parser("python -m llama_jax.posttrain.score", __doc__)
    cli.add_checkpoint(parser)                  # --checkpoint, spelled, typed and explained the same in every command
    cli.add_input(parser)                       # --input records.jsonl
    cli.add_out(parser)                         # --out scored.jsonl
    cli.add_mesh(parser)                        # --mesh data=2,fsdp=4
    cli.deprecate(parser, positional=("--input", "--out"), renamed={"--reward": "--checkpoint"})  # for one release
    def run(args) -> dict: ...                  # human lines on stdout / progress on stderr; returns the result
    def main(argv=None) -> int:
        return cli.main(parser, run, argv)

One grammar for all commands: the model is ``--checkpoint`` (a second one is named by its role: ``--reward``), records
come in through ``--data`` (training-style sources) or ``--input`` (a file of records to process), what the command
writes is ``--out``; no positional arguments. A flag shared by commands is declared here once (``add_*``), with one
help text; a command's description says what its inputs are. Old spellings registered with ``deprecate`` still work
and print ``deprecated: <old> -> use <new>`` on stderr.

One policy for all commands:
- multi-host first: ``--coordinator``, ``--num-processes``, ``--process-id`` (or the JAX_* environment, SLURM and
  TPU VM detection) are handed to ``distributed.initialize()`` before anything touches a device;
- a ``LlamaJaxError`` prints ``error: <message>`` on stderr and exits 2, never a traceback; so do bad flags;
- progress bars go to stderr (process 0 only); the result is one JSON object on the last line of stdout, the path
  the command wrote under ``out``.

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
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import tqdm

from llama_jax import data, distributed, experiment
from llama_jax.errors import ConfigError, LlamaJaxError

if TYPE_CHECKING:
    import ml_collections

CONFIG_PREFIX = "--config."


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the library's error policy (``error: <message>`` on stderr, exit status 2) and the old
    spellings that ``deprecate`` registered, rewritten to the grammar before parsing."""

    old_positional: tuple[str, ...] = ()
    old_flags: dict[str, str] = {}

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        # Subcommands' parsers are called here too, each with its own words.
        args = list(sys.argv[1:] if args is None else args)
        if self.old_positional or self.old_flags:
            args = self._modern(args)
        return super().parse_known_args(args, namespace)

    def _modern(self, argv: list[str]) -> list[str]:
        """``argv`` with the old spellings replaced by the new ones; says so in one line on stderr."""
        modern, old, new, positional, i = [], [], [], 0, 0
        while i < len(argv):
            token = argv[i]
            if token == "--" or not token.startswith("-") or token == "-" or _is_number(token):
                for value in argv[i + 1:] if token == "--" else [token]:
                    flag = self._positional_flag(positional)
                    positional += 1
                    modern.append(value if flag is None else f"{flag}={value}")  # "=": "-x" stays a value
                    if flag is not None:
                        old.append(value)
                        new += [flag, value]
                i = len(argv) if token == "--" else i + 1
                continue
            name, equals, value = token.partition("=")
            current = self.old_flags.get(name, name)
            values = argv[i + 1:i + 1 + (0 if equals else self._values_after(current, argv[i + 1:]))]
            modern += [current + equals + value, *values]
            if current != name:
                old += [token, *values]
                new += [current + equals + value, *values]
            i += 1 + len(values)
        if old:
            print(f"deprecated: {shlex.join(old)} -> use {shlex.join(new)}", file=sys.stderr)
        return modern

    def _positional_flag(self, index: int) -> str | None:
        """The flag the ``index``-th old positional argument now is: extra ones repeat the last if it repeats."""
        if index < len(self.old_positional):
            return self.old_positional[index]
        last = self.old_positional[-1] if self.old_positional else None
        action = self._option_string_actions.get(last)
        return last if isinstance(action, argparse._AppendAction) else None

    def _values_after(self, name: str, following: list[str]) -> int:
        """How many of the ``following`` words are values of option ``name``."""
        action = self._option_string_actions.get(name)
        if action is None:  # an abbreviation argparse will resolve, if unique
            matches = [a for flag, a in self._option_string_actions.items() if flag.startswith(name)]
            action = matches[0] if len(set(map(id, matches))) == 1 else None
        if action is None or action.nargs == 0:
            return 0
        if action.nargs is None or isinstance(action.nargs, int):
            return action.nargs or 1
        values = 0
        while values < len(following) and not (following[values].startswith("-") and len(following[values]) > 1):
            values += 1
        return min(values, 1) if action.nargs == "?" else values


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def deprecate(p: ArgumentParser, *, positional: Sequence[str] = (), renamed: dict[str, str] | None = None) -> None:
    """Old spellings ``p`` accepts for one release: ``positional`` names the flag each old positional argument
    becomes, in order (extra ones repeat the last flag where it repeats); ``renamed`` maps old flags to new ones.
    They work and print ``deprecated: <old> -> use <new>`` on stderr."""
    p.old_positional, p.old_flags = tuple(positional), dict(renamed or {})


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


# --- the shared flags: one spelling, one meaning, one help text (a command's description says the rest) --------


def add_checkpoint(p: argparse.ArgumentParser, *, required: bool = True, repeated: bool = False) -> None:
    """``--checkpoint``; ``repeated``: a command that takes several (``--checkpoint A --checkpoint B``)."""
    p.add_argument("--checkpoint", required=required, metavar="PATH", action="append" if repeated else "store",
                   help="llama_jax run or step directory, Hugging Face directory or Meta directory")


def add_adapter(p: argparse.ArgumentParser, *, repeated: bool = False) -> None:
    """``--adapter``; ``repeated``: a command that runs several over one base (``--adapter A --adapter NAME=B``)."""
    p.add_argument("--adapter", metavar="[NAME=]PATH" if repeated else "PATH", action="append" if repeated else "store",
                   default=[] if repeated else None,
                   help="low-rank adapters run unmerged over --checkpoint: a llama_jax run or step directory trained "
                        "with config.lora (its base must be --checkpoint) or a PEFT adapter directory; where a "
                        "command takes several, NAME= names one (default: its path)")


def add_reward(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward", required=True, metavar="PATH",
                   help="the reward model: a reward-stage run or step directory")


def add_input(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, metavar="PATH",
                   help="JSON Lines file of the records the command reads (their fields: see the description)")


def add_out(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--out", required=required, metavar="PATH",
                   help="the file or directory the command writes (see the description)")


def add_mesh(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default="", metavar="SPEC",
                   help="device mesh, e.g. 'tensor=8' or 'data=2,fsdp=-1' (default: every device on fsdp)")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", metavar="PATH[:FORMAT]", help=(
        "a data source (file, directory or glob; repeat for a mixture of equal weights). FORMAT: text, jsonl, "
        "tokens, chat, preference; default from the extension: .txt/.md text (a document per blank-line-separated "
        "paragraph), .npy tokens, .jsonl chat / preference / jsonl by the keys of its first record"))


def data_sources(specs: Sequence[str]) -> list[dict]:
    """``--data`` values as ``data.sources`` entries (``llama_jax.data.source_spec``)."""
    return [data.source_spec(spec) for spec in specs]


def add_tokenizer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, metavar="NAME|PATH",
                   help="llama3 | byte | path of a tokenizer.model (default: the checkpoint's)")


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the command's random draws (the same seed, the same "
                                                       "result)")


def add_batch_size(p: argparse.ArgumentParser, default: int | None) -> None:
    p.add_argument("--batch-size", type=int, default=default, metavar="N",
                   help="records (prompts, replies or rows) that go through the model together")


def add_on_error(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="a record the command cannot use: raise an error naming its file and line, or skip it "
                        "(left out and counted in the result)")


def add_max_new_tokens(p: argparse.ArgumentParser, default: int | None = 256) -> None:
    p.add_argument("--max-new-tokens", type=int, default=default, metavar="N", help="tokens sampled per reply at most")


def add_samples(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("--samples", type=int, default=default, metavar="K", help="replies sampled per prompt")


def add_temperature(p: argparse.ArgumentParser, default: float = 0.0) -> None:
    p.add_argument("--temperature", type=float, default=default, help="sampling temperature (0: greedy)")


def add_sampling(p: argparse.ArgumentParser, temperature: float = 0.0) -> None:
    """``--temperature``, ``--top-k``, ``--top-p``: how tokens are drawn (``sampling_kwargs`` adds ``--seed``)."""
    add_temperature(p, temperature)
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="draw from the K likeliest tokens only")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="draw from the likeliest tokens whose probabilities add up to P only")


def add_no_bos(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-bos", action="store_true", help="do not start prompts with <|begin_of_text|>")


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
        lines = experiment.describe(load_config(spec))
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
        moved = key and next((new for old, new in experiment.RENAMED.items() if old.endswith(key[1])), None)
        raise ConfigError(f"config file {path} sets unknown key {key[1] if key else e}"
                          + (f" (now {moved})" if moved else f" (did you mean {hint[1]!r}?)" if hint else "")
                          ) from None
    if not isinstance(config, _config_dict()):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict")
    config.lock()
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"write config overrides as {override}=<value>")
        key, _, value = override[len(CONFIG_PREFIX):].partition("=")
        if key in experiment.RENAMED:
            print(f"deprecated: --config.{key} -> use --config.{experiment.RENAMED[key]}", file=sys.stderr)
            key = experiment.RENAMED[key]
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
