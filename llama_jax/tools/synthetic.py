"""A small synthetic tool-use SFT dataset: arithmetic questions answered through a calculator tool.

    records = calculator_dialogs(1000, seed=0)     # [{"messages": [...]}, ...]
    ids, mask = tokenizer.encode_dialog(records[0]["messages"])   # mask: the assistant's call and answer

    rates = tool_use_rates(held_out_records, tools.model_generator(params, cfg, tok), tok)  # through the tool loop

    python -m llama_jax.tools.synthetic --out calculator.jsonl --num 1000 [--seed 0] [--form function_tag]

Each record is one dialog in the Llama 3.1 tool format: the system prompt with ``Environment: ipython``,
the user message describing the `calculator` tool (JSON or ``<function>`` form, see `prompts`; or no such
message with ``form="wolfram_alpha"``: the calculator stands behind Llama 3.1's built-in math tool), the
question, the assistant's call, the ``ipython`` turn with the calculator's result, and the answer. SFT
trains on the assistant's turns only (the call included, the tool's output not): the tokenizer's mask.
The questions are built from seeded random integers; every result is computed by `calculator`.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import io
import json
import operator
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from llama_jax import cli
from llama_jax.errors import DataError
from llama_jax.tokenizer import Tokenizer
from llama_jax.tools import calls, prompts, runner

Form = Literal["json", "function_tag", "wolfram_alpha"]
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
              ast.UAdd: operator.pos}
QUESTIONS = ("What is {}?", "Compute {}.", "How much is {}?", "Calculate {} for me.", "What do you get for {}?",
             "Please work out {}.")
ANSWERS = ("{} = {}.", "The answer is {1}.", "{} equals {}.", "It is {1}.", "That comes to {1}.")


def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression

    Args:
        expression: An arithmetic expression with numbers, + - * / // % ** and parentheses, e.g. 12 * (3 + 4)
    """
    try:
        value = _evaluate(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ZeroDivisionError, OverflowError) as e:
        raise DataError(f"cannot evaluate {expression!r}: {e}") from None
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:  # keeps the numbers (and the time) small
            raise DataError(f"exponent {right} is too large for the calculator")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise DataError(f"the calculator takes numbers and arithmetic only, not {ast.dump(node)[:60]}")


def random_expression(rng: random.Random) -> str:
    """Two or three small integers joined by +, - or *, sometimes with parentheses."""
    numbers = [rng.randint(0, 999 if rng.random() < 0.7 else 99) for _ in range(rng.choice((2, 2, 3)))]
    ops = [rng.choice("+-*") for _ in numbers[1:]]
    if len(numbers) == 3 and rng.random() < 0.4:
        return f"({numbers[0]} {ops[0]} {numbers[1]}) {ops[1]} {numbers[2]}"
    return " ".join(str(n) if i == 0 else f"{ops[i - 1]} {n}" for i, n in enumerate(numbers))


def calculator_dialog(rng: random.Random, form: Form = "json") -> dict[str, Any]:
    """One record: the tool prompt, a question, the call, the tool's result and the answer."""
    expression = random_expression(rng)
    result = calculator(expression)
    today = datetime.date(2024, 1, 1) + datetime.timedelta(days=rng.randrange(730))
    if form == "wolfram_alpha":  # the calculator behind Llama 3.1's built-in math tool: a prompt of ~200 bytes
        call = calls.builtin_call("wolfram_alpha", expression)
        messages = prompts.tool_messages(["wolfram_alpha"], today=today)
    else:
        call = calls.custom_call("calculator", {"expression": expression}, form=form)
        messages = prompts.tool_messages(custom_tools=[calculator], custom_format=form, today=today)
    messages += [
        {"role": "user", "content": rng.choice(QUESTIONS).format(expression)},
        {"role": "assistant", "content": call.raw, **({"tool_call": True} if call.python_tag else {})},
        {"role": "ipython", "content": result},
        {"role": "assistant", "content": rng.choice(ANSWERS).format(expression, result)},
    ]
    return {"messages": messages}


def calculator_dialogs(num: int, seed: int = 0, form: Form = "json") -> list[dict]:
    """``num`` records, the same for the same seed."""
    rng = random.Random(seed)
    return [calculator_dialog(rng, form) for _ in range(num)]


def tool_use_rates(records: Sequence[dict], generate: runner.GenerateFn, tokenizer: Tokenizer) -> dict[str, float]:
    """How a model uses the calculator on ``records``' questions, asked through the tool loop (`runner.run_turn`).

    ``calls``: the share whose first reply is a well-formed call of the record's tool (its name and argument
    names); ``answers``: the share whose call got the record's result from the calculator and whose final answer
    (the next reply, not another call) ends on that number, as every answer in the data does.
    """
    tools = {"calculator": calculator, "wolfram_alpha": calculator}
    called = answered = 0
    for record in records:
        messages = record["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        want_call, want_result = calls.parse_message(messages[first]), messages[first + 1]["content"]
        new = runner.run_turn(messages[:first], generate, tokenizer, tools, max_tool_calls=1, out=io.StringIO())
        call = calls.parse_message(new[0])
        if call is None or call.name != want_call.name or call.arguments.keys() != want_call.arguments.keys():
            continue
        called += 1
        if len(new) == 3 and new[1]["content"] == want_result and not new[2]["tool_call"]:
            answered += re.findall(r"-?\d+(?:\.\d+)?", new[2]["content"])[-1:] == [want_result]
    return {"calls": called / len(records), "answers": answered / len(records)}


def write_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


parser = cli.parser("python -m llama_jax.tools.synthetic", __doc__.split("\n")[0])
cli.add_out(parser)
parser.add_argument("--num", type=int, default=1000, help="number of dialogs")
cli.add_seed(parser)
parser.add_argument("--form", choices=get_args(Form), default="json", help="how the tool is offered")


def run(args: argparse.Namespace) -> dict:
    write_jsonl(args.out, calculator_dialogs(args.num, args.seed, args.form))
    cli.log(f"wrote {args.num} dialogs to {args.out}")
    return {"out": args.out, "records": args.num, "seed": args.seed, "form": args.form}


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
