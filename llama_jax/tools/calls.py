"""Tool calls in an assistant's reply: parsed into a `ToolCall`, and written back as an assistant turn.

    call = parse_message({"role": "assistant", "content": 'brave_search.call(query="gold price")',
                          "tool_call": True})
    call.name, call.arguments               # 'brave_search', {'query': 'gold price'}
    to_message(call)                        # the same message: parse_message(to_message(c)) == c
    to_message(custom_call("get_weather", {"city": "Paris"}))   # <|python_tag|>{"type": "function", ...}

What counts as a call (the forms of llama-models' ``llama3_1/prompt_format.md``, tried in the order of
its ``ToolUtils`` / ``ChatFormat.decode_assistant_message``):
  1. ``<function=name>{json object}</function>`` anywhere in the reply (custom tool, ``<function>`` form);
  2. a reply that is one JSON object naming a call (a ``name``, or ``"type": "function"``): a custom tool's
     call if ``name`` is a string and ``parameters`` an object, else a plain reply (``"parameters": null``
     too), never code, even after <|python_tag|>;
  3. ``tool.call(query="...")`` anywhere in the reply (brave_search, wolfram_alpha);
  4. any other reply that starts with <|python_tag|>: Python code for the code interpreter.
Anything else, malformed calls included, is a plain reply: `parse` returns None and never raises.
Where llama-models' parser crashes (a JSON call without ``parameters``) or misreads (nested JSON
arguments, apostrophes in strings, non-object ``parameters``) the result here differs on purpose;
tests/tools/test_tools_calls.py lists each case next to llama-models' own answer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from llama_jax.errors import DataError

PYTHON_TAG = "<|python_tag|>"
END_TOKENS = ("<|eom_id|>", "<|eot_id|>")
_BUILTIN_CALL = re.compile(r'\b(?P<name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
_FUNCTION_TAG = re.compile(r"<function=(?P<name>[^>]+)>")
_JSON = json.JSONDecoder()


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call found in an assistant reply."""

    name: str  # "brave_search", "wolfram_alpha", "code_interpreter" or a custom tool's name
    arguments: dict[str, Any]  # {"query": ...}, {"code": ...}, or the custom tool's parameters
    raw: str  # the reply's text as the model wrote it (without <|python_tag|> and the end token)
    python_tag: bool  # whether the reply started with <|python_tag|> (it then ends with <|eom_id|>)


def parse(content: str, python_tag: bool = False) -> ToolCall | None:
    """The call in a reply's text (``python_tag``: the reply began with <|python_tag|>), or None."""
    if not isinstance(content, str):
        return None
    found = _function_tag_call(content)
    if found is None:
        named = _json_naming_a_call(content)
        if named is not None:
            found = _json_call(named)
        else:
            found = _builtin_call(content) or (("code_interpreter", {"code": content}) if python_tag else None)
    return ToolCall(found[0], found[1], content, python_tag) if found else None


def parse_message(message: Mapping[str, Any]) -> ToolCall | None:
    """The call in an assistant message ``{"role": "assistant", "content": ..., "tool_call": bool}``, or None."""
    if message.get("role") != "assistant":
        return None
    return parse(message.get("content"), bool(message.get("tool_call", False)))


def parse_reply(text: str) -> ToolCall | None:
    """The call in decoded reply text that may start with <|python_tag|> and end with <|eom_id|>/<|eot_id|>."""
    python_tag = text.startswith(PYTHON_TAG)
    text = text.removeprefix(PYTHON_TAG)
    for end in END_TOKENS:
        text = text.removesuffix(end)
    return parse(text, python_tag)


def _function_tag_call(content: str) -> tuple[str, dict] | None:
    match = _FUNCTION_TAG.search(content)
    if match is None:
        return None
    try:
        arguments, _ = _JSON.raw_decode(content, match.end())
    except json.JSONDecodeError:
        return None
    return (match["name"], arguments) if isinstance(arguments, dict) else None


def _json_naming_a_call(content: str) -> dict | None:
    """The reply as a JSON object if it names a call as llama-models reads one (a "name", or "type": "function")."""
    try:
        value = json.loads(content)
    except json.JSONDecodeError:
        return None
    names_a_call = isinstance(value, dict) and ("name" in value or value.get("type") == "function")
    return value if names_a_call else None


def _json_call(value: dict) -> tuple[str, dict] | None:
    name, arguments = value.get("name"), value.get("parameters")
    return (name, arguments) if isinstance(name, str) and isinstance(arguments, dict) else None


def _builtin_call(content: str) -> tuple[str, dict] | None:
    match = _BUILTIN_CALL.search(content)
    return (match["name"], {"query": match["query"]}) if match else None


def to_message(call: ToolCall) -> dict[str, Any]:
    """The assistant message that made ``call``; the tokenizer encodes it as the model wrote it."""
    return {"role": "assistant", "content": call.raw, "tool_call": call.python_tag}


def builtin_call(name: Literal["brave_search", "wolfram_alpha"], query: str) -> ToolCall:
    """``<|python_tag|>name.call(query="...")<|eom_id|>``, as Llama 3.1 calls a built-in tool."""
    if not re.fullmatch(r"\w+", name) or '"' in query:
        raise DataError(f"cannot write the built-in call {name}.call(query={query!r}): the documented form "
                        'takes a word for the tool and a query without double quotes')
    return _checked(ToolCall(name, {"query": query}, f'{name}.call(query="{query}")', True))


def code_call(code: str) -> ToolCall:
    """``<|python_tag|>code<|eom_id|>``: code for the code interpreter."""
    return _checked(ToolCall("code_interpreter", {"code": code}, code, True))


def custom_call(name: str, arguments: Mapping[str, Any], form: Literal["json", "function_tag"] = "json") -> ToolCall:
    """A custom tool call as llama-models writes it: JSON after <|python_tag|>, or a ``<function>`` tag."""
    arguments = dict(arguments)
    if form == "json":
        raw = json.dumps({"type": "function", "name": name, "parameters": arguments})
    elif form == "function_tag":
        raw = f"<function={name}>{json.dumps(arguments)}</function>"
    else:
        raise DataError(f"form must be 'json' or 'function_tag', got {form!r}")
    return _checked(ToolCall(name, arguments, raw, form == "json"))


def _checked(call: ToolCall) -> ToolCall:
    """``call`` if its text parses back to it (so the dialog holds exactly that call), else DataError."""
    if parse(call.raw, call.python_tag) != call:
        raise DataError(f"the text {call.raw!r} would not parse back to a call of {call.name} with "
                        f"{call.arguments!r}")
    return call
