"""Retrieval accuracy of a checkpoint over prompt lengths x needle depths.

    python -m llama_jax.eval.retrieval --checkpoint PATH [--tokenizer byte] --task passkey \\
        --lengths 256,1024,2048 --depths 0,0.25,0.5,0.75,1 --samples 4 --plot heatmap.png [--out result.json]

Progress and one line per length on stderr; the last line of stdout is the JSON summary (``out``: the file with
every reply, when ``--out`` is given).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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


class _DeprecatedFlag(argparse.Action):
    """An old spelling kept for one release: it works as ``new`` does and says so on stderr."""

    def __init__(self, option_strings, dest, *, new: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"deprecated: {option_string} -> use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


parser = cli.parser("python -m llama_jax.eval.retrieval", __doc__.split("\n")[0])
cli.add_checkpoint(parser)
parser.add_argument("--tokenizer", default=None, help="llama3 | byte | path (default: the checkpoint's)")
parser.add_argument("--task", choices=KINDS, default="passkey")
parser.add_argument("--needles", type=int, default=None, help="multi: number of needles (default 4)")
parser.add_argument("--ask", choices=ASKS, default="one", help="multi: ask for one needle or all of them")
parser.add_argument("--value", choices=VALUES, default="number", help="needle / multi: numbers or words")
parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="base",
                    help="base: the prompt ends with the answer's start; chat: a Llama 3 user turn")
parser.add_argument("--no-bos", action="store_true", help="base prompts without <|begin_of_text|>")
parser.add_argument("--lengths", type=_int_list, default=[256, 1024, 2048], help="prompt lengths in tokens")
parser.add_argument("--depths", type=_depth_list, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths")
parser.add_argument("--samples", type=int, default=4, help="prompts per (length, depth) cell")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the longest answer + 8")
parser.add_argument("--plot", default=None, help="write the heatmap to this image file (needs matplotlib)")
parser.add_argument("--out", default=None, metavar="PATH",
                    help="write the full result, every reply included, to this JSON file")
parser.add_argument("--json", dest="out", action=_DeprecatedFlag, new="--out")


def run(args: argparse.Namespace) -> dict:
    task = Task(args.task, needles=args.needles, ask=args.ask, value=args.value,
                prompt_format=args.prompt_format, bos=not args.no_bos)
    check_grid(args.lengths, args.depths, args.samples)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.plot:
        require_matplotlib()  # before the run, not after it
    generate_fn, tok = checkpoint_generate_fn(args.checkpoint, task, max(args.lengths), tokenizer=args.tokenizer,
                                              max_new_tokens=args.max_new_tokens)
    with cli.progress(total=len(args.lengths) * len(args.depths) * args.samples, desc=f"{task.kind} retrieval",
                      unit="prompt") as bar:
        result = evaluate(generate_fn, tok, task, args.lengths, args.depths, args.samples, seed=args.seed,
                          batch_size=args.batch_size, progress=bar.update)
    if args.out:
        result.save_json(args.out)
    if args.plot:
        plot_heatmap(result, args.plot)
    for length, row in zip(result.lengths, result.accuracy):
        cells = "  ".join(f"{d:.0%}: {a:.2f}" for d, a in zip(result.depths, row))
        cli.log(f"length {length}: {cells}")
    return {**result.summary(), "checkpoint": args.checkpoint, "plot": args.plot, "out": args.out}


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)
