"""The system and user messages that turn on Llama 3.1's tools, in the layout Meta documents.

    def get_weather(city: str, unit: str = "celsius") -> str:
        '''Current weather in a city.

        Args:
            city: the city's name
            unit: celsius or fahrenheit
        '''

    messages = tool_messages(["code_interpreter", "brave_search"], [get_weather], instruction="Be brief.")
    messages.append({"role": "user", "content": "Weather in Paris?"})
    ids, _ = tokenizer.encode_dialog(messages, add_generation_prompt=True)

Built-in tools (``BUILTIN_TOOLS``) are named in the system prompt: ``Environment: ipython`` turns on the
code interpreter, a ``Tools:`` line adds brave_search / wolfram_alpha. Custom tools are described in a
user message, in JSON (the model answers ``<|python_tag|>{"name": ..., "parameters": ...}<|eom_id|>``)
or in the ``<function=...>`` form (it answers ``<function=name>{...}</function><|eot_id|>``). The reference
is llama-models' ``llama3_1/prompt_format.md``: every string here reproduces its examples exactly, down
to their quirks (the JSON form calls every parameter ``"type": "object"``; the ``<function>`` form writes
parameters as sorted JSON).

A tool definition is a `ToolSpec`, a JSON-schema dict (OpenAI style, with or without the
``{"type": "function", "function": ...}`` wrapper), a llama-models style dict (``parameters`` as
``{name: {"param_type", "description", "required"}}``), or a Python function: its name, docstring
(first paragraph; ``Args:`` entries describe parameters), type hints and defaults.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from llama_jax.errors import ConfigError

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")
KNOWLEDGE_CUTOFF = "December 2023"
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # spelled out here so the date does not depend on the C locale
# JSON-schema type names -> the Python names llama-models writes as param_type.
_SCHEMA_TYPES = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "array": "list",
                 "object": "dict"}


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: str  # "str", "int", ... (a Python type name, as in llama-models' examples)
    description: str = ""
    required: bool = True


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """A custom tool as the prompt describes it."""

    name: str
    description: str
    params: tuple[Param, ...] = ()


ToolLike = ToolSpec | Mapping[str, Any] | Callable[..., Any]


def tool_spec(tool: ToolLike) -> ToolSpec:
    """A `ToolSpec` from a spec, a JSON-schema or llama-models style dict, or a type-hinted Python function."""
    if isinstance(tool, ToolSpec):
        return tool
    if isinstance(tool, Mapping):
        return _spec_from_dict(tool)
    if callable(tool):
        return _spec_from_function(tool)
    raise ConfigError(f"a tool must be a ToolSpec, a dict or a function, got {type(tool).__name__}")


def _spec_from_dict(tool: Mapping[str, Any]) -> ToolSpec:
    fn = tool.get("function", tool) if tool.get("type") == "function" else tool
    name = fn.get("name", fn.get("tool_name"))
    if not isinstance(name, str) or not name:
        raise ConfigError(f"tool definition {dict(tool)!r} has no 'name'")
    parameters = fn.get("parameters") or {}
    if "properties" in parameters:  # JSON schema
        required = set(parameters.get("required", ()))
        params = tuple(
            Param(p, _SCHEMA_TYPES.get(s.get("type"), s.get("type", "str")), s.get("description", ""), p in required)
            for p, s in parameters["properties"].items())
    else:  # llama-models' {name: {"param_type", "description", "required"}}
        params = tuple(Param(p, s.get("param_type", "str"), s.get("description") or "", s.get("required", True))
                       for p, s in parameters.items())
    return ToolSpec(name, fn.get("description") or "", params)


def _spec_from_function(fn: Callable[..., Any]) -> ToolSpec:
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n")[0].strip()
    arg_docs = dict(re.findall(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$", doc.split("Args:", 1)[1], re.MULTILINE)
                    ) if "Args:" in doc else {}
    hints = typing.get_type_hints(fn)
    params = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint = hints.get(p.name, str)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[int] -> int
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        type_name = getattr(typing.get_origin(hint) or hint, "__name__", str(hint))
        params.append(Param(p.name, type_name, arg_docs.get(p.name, ""), p.default is inspect.Parameter.empty))
    return ToolSpec(fn.__name__, summary, tuple(params))


def format_date(day: datetime.date) -> str:
    """"21 September 2024": llama-models' ``%d %B %Y``, independent of the locale."""
    return f"{day.day:02d} {_MONTHS[day.month - 1]} {day.year}"


def system_prompt(builtin_tools: Sequence[str] = (), *, custom_tools: bool = False, instruction: str | None = None,
                  today: datetime.date | None = None) -> str:
    """The system message's content: environment and tools, knowledge and today's date, then the instruction."""
    for name in builtin_tools:
        if name not in BUILTIN_TOOLS:
            raise ConfigError(f"unknown built-in tool {name!r}; expected some of {BUILTIN_TOOLS}")
    text = ""
    if builtin_tools or custom_tools:
        # The code interpreter needs no Tools: entry; "Environment: ipython" alone turns it on.
        named = [name for name in builtin_tools if name != "code_interpreter"]
        text = "Environment: ipython\n" + (f"Tools: {', '.join(named)}" if named else "") + "\n"
    text += f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {format_date(today or datetime.date.today())}"
    if instruction:
        text += "\n\n" + instruction
    return text + "\n"


def json_tools_prompt(tools: Sequence[ToolLike]) -> str:
    """The user message that offers custom tools in JSON form."""
    blocks = "".join(_json_block(tool_spec(t)) + "\n" for t in tools)
    return ("Answer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            "Here is a list of functions in JSON format:\n" + blocks + "\nReturn function calls in JSON format.")


def _json_block(spec: ToolSpec) -> str:
    # Written by hand, not json.dumps, to keep llama-models' layout: properties as a list of one-key
    # objects, each typed "object", strings pasted unescaped.
    properties = ",".join(
        f'\n                {{\n                    "{p.name}": {{\n                        "type": "object",\n'
        f'                        "description": "{p.description}"\n                    }}\n                }}'
        for p in spec.params)
    required = _tojson([p.name for p in spec.params if p.required])
    return ('{\n    "type": "function",\n    "function": {\n'
            f'        "name": "{spec.name}",\n        "description": "{spec.description}",\n'
            '        "parameters": {\n            "type": "object",\n'
            f'            "properties": [{properties}\n            ],\n            "required": {required}\n'
            '        }\n    }\n}')


def function_tag_tools_prompt(tools: Sequence[ToolLike]) -> str:
    """The user message that offers custom tools in the ``<function=name>{...}</function>`` form."""
    blocks = ""
    for spec in map(tool_spec, tools):
        params = _tojson({p.name: {"param_type": p.type, "description": p.description, "required": p.required}
                          for p in spec.params})
        blocks += (f"Use the function '{spec.name}' to '{spec.description}':\n"
                   f'{{"name": "{spec.name}", "description": "{spec.description}", "parameters": {params}}}\n\n')
    return (
        "You have access to the following functions:\n\n" + blocks
        + "Think very carefully before calling functions.\n"
        "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
        '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
        "Reminder:\n"
        "- If looking for real time information use relevant functions before falling back to brave_search\n"
        "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
        "- Required parameters MUST be specified\n"
        "- Only call one function at a time\n"
        "- Put the entire function call reply on one line"
    )


def _tojson(value: Any) -> str:
    """JSON as Jinja's ``tojson`` writes it (llama-models' templates): sorted keys, HTML-safe characters."""
    text = json.dumps(value, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("'", "\\u0027")


def tool_messages(builtin_tools: Sequence[str] = (), custom_tools: Sequence[ToolLike] = (), *,
                  custom_format: Literal["json", "function_tag"] = "json", instruction: str | None = None,
                  today: datetime.date | None = None) -> list[dict[str, str]]:
    """The messages that open a dialog with tools: the system message, then (with custom tools) the user
    message describing them. Append the user's question and encode with ``Tokenizer.encode_dialog``."""
    specs = [tool_spec(t) for t in custom_tools]
    clash = [s.name for s in specs if s.name in BUILTIN_TOOLS]
    if clash:
        raise ConfigError(f"custom tools {clash} share a name with a built-in tool")
    if custom_format not in ("json", "function_tag"):
        raise ConfigError(f"custom_format must be 'json' or 'function_tag', got {custom_format!r}")
    messages = [{"role": "system", "content": system_prompt(builtin_tools, custom_tools=bool(specs),
                                                            instruction=instruction, today=today)}]
    if specs:
        describe = json_tools_prompt if custom_format == "json" else function_tag_tools_prompt
        messages.append({"role": "user", "content": describe(specs)})
    return messages
