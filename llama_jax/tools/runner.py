"""The tool loop: generate, find a call, run the tool, add its ipython turn, generate again.

    messages = tool_messages(["code_interpreter"], [get_weather])
    messages.append({"role": "user", "content": "Is it warmer in Paris than 2**4 degrees?"})
    tools = {"code_interpreter": code_interpreter, "get_weather": get_weather}
    new = run_turn(messages, model_generator(params, cfg, tok), tok, tools)   # streams to stdout

``generate(prompt_ids)`` may be any callable that yields (or returns) the reply's token ids, so a test
can script the model. The turn ends when a reply holds no tool call (the model's answer, normally
closed by <|eot_id|>), when a reply stops without a stop token (out of tokens: a cut-off call is never
run), or after ``max_tool_calls`` calls. Built-in tools get the query (brave_search, wolfram_alpha) or
the code (code_interpreter); custom tools get the call's arguments as keywords. What a tool returns
becomes the ipython turn: strings as they are, anything else as JSON. A tool that raises produces a
``failed`` turn with the error, for the model to read; it does not end the chat.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TextIO

from llama_jax import generate as gen
from llama_jax.config import ModelConfig
from llama_jax.errors import DataError
from llama_jax.tokenizer import Tokenizer
from llama_jax.tools import calls

ASSISTANT, TOOL = "assistant> ", "tool> "
GenerateFn = Callable[[list[int]], Iterable[int]]


def model_generator(params, cfg: ModelConfig, tokenizer: Tokenizer, *, max_new_tokens: int = 512,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int = 0) -> GenerateFn:
    """A `GenerateFn` that streams a model's reply; the k-th call samples with seed ``seed + k``."""
    seeds = itertools.count(seed + 1)

    def generate(prompt: list[int]) -> Iterator[int]:
        max_new = min(max_new_tokens, cfg.max_seq_len - len(prompt))
        if max_new < 1:
            raise DataError(f"the dialog has {len(prompt)} tokens and fills the model's context (max_seq_len "
                            f"{cfg.max_seq_len})")
        steps = gen.stream(params, cfg, [prompt], max_new, temperature, top_k, top_p, next(seeds),
                           tokenizer.stop_ids, vocab_size=tokenizer.vocab_size)
        return (new[0] for new in steps)

    return generate


def execute(call: calls.ToolCall, tools: Mapping[str, Callable[..., Any]]) -> str:
    """The ipython turn's content for ``call``, run by ``tools[call.name]``."""
    tool = tools.get(call.name)
    if tool is None:
        return f"failed\n[stderr]there is no tool {call.name!r}; the tools are {sorted(tools)}[/stderr]"
    try:
        if call.name == "code_interpreter":
            result = tool(call.arguments["code"])
        elif call.name in ("brave_search", "wolfram_alpha"):
            result = tool(call.arguments["query"])
        else:
            result = tool(**call.arguments)
    except Exception as e:  # the tool's failure (a wrong argument, a service down) is the model's to read
        return f"failed\n[stderr]{type(e).__name__}: {e}[/stderr]"
    return result if isinstance(result, str) else json.dumps(result, default=str)


def run_turn(messages: list[dict[str, Any]], generate: GenerateFn, tokenizer: Tokenizer,
             tools: Mapping[str, Callable[..., Any]], *, max_tool_calls: int = 5,
             out: TextIO | None = None) -> list[dict[str, Any]]:
    """Continues ``messages`` (ending with the user's turn) until the assistant has answered.

    Appends the assistant's replies and the ipython turns to ``messages`` and returns them; the
    transcript streams to ``out`` (default stdout) as ``assistant> ...`` and ``tool> ...`` lines.
    """
    out = out or sys.stdout
    new: list[dict[str, Any]] = []
    for calls_made in itertools.count():
        message, stopped = _reply(messages, generate, tokenizer, out)
        messages.append(message)
        new.append(message)
        call = calls.parse_message(message) if stopped else None
        if call is None:
            return new
        if calls_made == max_tool_calls:
            out.write(f"[stopped: {max_tool_calls} tool calls in this turn]\n")
            return new
        result = {"role": "ipython", "content": execute(call, tools)}
        out.write(f"{TOOL}{result['content']}\n")
        messages.append(result)
        new.append(result)


def _reply(messages, generate: GenerateFn, tokenizer: Tokenizer, out: TextIO) -> tuple[dict[str, Any], bool]:
    """Generates and streams one assistant message; also says whether it ended with a stop token."""
    prompt, _ = tokenizer.encode_dialog(messages, add_generation_prompt=True)
    tokens = iter(generate(prompt))
    out.write(ASSISTANT)
    first = next(tokens, None)
    tool_call = first == tokenizer.special_id("python_tag")
    if tool_call:
        out.write("[tool call] ")
    elif first is not None:
        tokens = itertools.chain([first], tokens)
    stop: list[int] = []

    def until_stop() -> Iterator[int]:
        for token in tokens:
            if token in tokenizer.stop_ids:
                stop.append(token)
                return
            yield token

    ids = gen.print_stream(tokenizer, until_stop(), out)
    out.write("\n")
    return {"role": "assistant", "content": tokenizer.decode(ids), "tool_call": tool_call}, bool(stop)
