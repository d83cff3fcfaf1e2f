"""Retrieval accuracy of a checkpoint over prompt lengths x needle depths.

    python -m llama_jax.eval.retrieval --checkpoint PATH [--tokenizer byte] --task passkey \\
        --lengths 256,1024,2048 --depths 0,0.25,0.5,0.75,1 --per-cell 4 [--out result.json [--plot]]

Progress and one line per length on stderr; the last line of stdout is the JSON summary (``out``: the file with
every reply, when ``--out`` is given; ``--plot`` draws the heatmap beside it, ``result.png``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from llama_jax import cli
from llama_jax.errors import ConfigError
from llama_jax.eval.retrieval.plot import plot_heatmap, require_matplotlib
from llama_jax.eval.retrieval.score import checkpoint_generate_fn, evaluate
from llama_jax.eval.retrieval.tasks import ASKS, KINDS, PROMPT_FORMATS, VALUES, Task, check_grid


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return values


def _depth_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0 <= v <= 1 for v in values):  # also rejects nan
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {text!r}")
    return values


parser = cli.parser("python -m llama_jax.eval.retrieval", __doc__.split("\n")[0])
cli.add_checkpoint(parser)
cli.add_tokenizer(parser)
parser.add_argument("--task", choices=KINDS, default="passkey")
parser.add_argument("--needles", type=int, default=None, help="multi: number of needles (default 4)")
parser.add_argument("--ask", choices=ASKS, default="one", help="multi: ask for one needle or all of them")
parser.add_argument("--value", choices=VALUES, default="number", help="needle / multi: numbers or words")
parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="base",
                    help="base: the prompt ends with the answer's start; chat: a Llama 3 user turn")
cli.add_no_bos(parser)
parser.add_argument("--lengths", type=_int_list, default=[256, 1024, 2048], help="prompt lengths in tokens")
parser.add_argument("--depths", type=_depth_list, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths")
parser.add_argument("--per-cell", type=int, default=4, metavar="N", help="prompts per (length, depth) cell")
cli.add_seed(parser)
cli.add_batch_size(parser, 8)
cli.add_max_new_tokens(parser, None)
parser.add_argument("--plot", nargs="?", const="", default=None, metavar="",
                    help="also draw the accuracy heatmap, as a PNG beside --out with its name (needs matplotlib)")
cli.add_out(parser, required=False)
cli.deprecate(parser, renamed={"--json": "--out", "--samples": "--per-cell"})


def run(args: argparse.Namespace) -> dict:
    task = Task(args.task, needles=args.needles, ask=args.ask, value=args.value,
                prompt_format=args.prompt_format, bos=not args.no_bos)
    check_grid(args.lengths, args.depths, args.per_cell)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    plot = _plot_path(args)
    if plot:
        require_matplotlib()  # before the run, not after it
    generate_fn, tok = checkpoint_generate_fn(args.checkpoint, task, max(args.lengths), tokenizer=args.tokenizer,
                                              max_new_tokens=args.max_new_tokens)
    with cli.progress(total=len(args.lengths) * len(args.depths) * args.per_cell, desc=f"{task.kind} retrieval",
                      unit="prompt") as bar:
        result = evaluate(generate_fn, tok, task, args.lengths, args.depths, args.per_cell, seed=args.seed,
                          batch_size=args.batch_size, progress=bar.update)
    if args.out:
        result.save_json(args.out)
    if plot:
        plot_heatmap(result, plot)
        cli.log(f"heatmap: {plot}")
    for length, row in zip(result.lengths, result.accuracy):
        cells = "  ".join(f"{d:.0%}: {a:.2f}" for d, a in zip(result.depths, row))
        cli.log(f"length {length}: {cells}")
    return {**result.summary(), "checkpoint": args.checkpoint, "out": args.out}


def _plot_path(args: argparse.Namespace) -> str | None:
    """Where ``--plot`` draws: beside ``--out`` (or, in the old spelling, the path it was given)."""
    if args.plot is None:
        return None
    if args.plot:
        cli.log("deprecated: --plot PATH -> use --plot with --out")
        return args.plot
    if not args.out:
        raise ConfigError("--plot draws the heatmap beside --out: give --out too")
    return str(Path(args.out).with_suffix(".png"))


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)
