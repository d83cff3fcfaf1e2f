"""Tool-call parsing agrees with llama-models' parser; calls written back parse to themselves."""

import contextlib
import io
import json

import pytest

from llama_jax.errors import DataError
from llama_jax.tokenizer import ByteTokenizer
from llama_jax.tools import calls

chat_format = pytest.importorskip("llama_models.llama3.chat_format")
from llama_models.datatypes import StopReason  # noqa: E402  (after the importorskip above)
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer  # noqa: E402
from llama_models.llama3.tool_utils import ToolUtils  # noqa: E402

META_FORMAT = chat_format.ChatFormat(MetaTokenizer.get_instance())

# Replies as decoded text (<|python_tag|> and the end token written out, as llama-models decodes them).
AGREE = [
    # built-in tools
    '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>',
    '<|python_tag|>wolfram_alpha.call(query="integrate x^2 dx")<|eom_id|>',
    'brave_search.call(query="no python tag")<|eot_id|>',
    '<|python_tag|>brave_search.call(query="")<|eom_id|>',
    "<|python_tag|>photogen.call(query=\"a cat\")<|eom_id|>",
    'Let me look: brave_search.call(query="weather in Paris") and then answer.<|eot_id|>',
    # code interpreter
    "<|python_tag|>print(2 ** 100)<|eom_id|>",
    "<|python_tag|>import math\n\nprint(math.factorial(20))\n<|eom_id|>",
    "<|python_tag|>def f(x):\n    return {'a': x}\nf(3)<|eom_id|>",
    "<|python_tag|><|eom_id|>",
    # custom tools, JSON
    '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>',
    '<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n'
    '        "n": "10",\n        "genre": "all"\n    }\n}<|eom_id|>',
    '{"name": "get_time", "parameters": {}}<|eot_id|>',
    '{"name": "lookup", "parameters": {"ids": [1, 2, 3], "deep": true, "filter": null}}<|eot_id|>',
    # a JSON object that names a call is never code, even after <|python_tag|>: a call, or a plain reply when
    # malformed (no arguments object, no name)
    '<|python_tag|>{"name": "f", "parameters": null}<|eom_id|>',
    '{"type": "function", "name": "f", "parameters": null}<|eot_id|>',
    '<|python_tag|>{"type": "function", "name": "f", "parameters": null}<|eom_id|>',
    '<|python_tag|>{"name": null, "parameters": {}}<|eom_id|>',
    '<|python_tag|>{"type": "function", "name": "f", "parameters": {}, "id": 3}<|eom_id|>',
    '<|python_tag|>{"a": 1}<|eom_id|>',  # names no call: code for the interpreter
    # custom tools, <function> form
    '<function=trending_songs>{"n": 10}</function><|eot_id|>',
    '<function=getWeather>{"location":"New York","date":"2023-08-05"}<|eot_id|>',
    'Sure! <function=search>{"q": "llamas"}</function><|eot_id|>',
    '<function=f>{}</function><|eot_id|>',
    '<function=search>{"q": "x"}</function> or brave_search.call(query="y")<|eot_id|>',  # custom tools first
    # plain replies and malformed calls
    "The 100th decimal of pi is 7.<|eot_id|>",
    "<|eot_id|>",
    "Here is some JSON: {\"a\": 1}<|eot_id|>",
    '{"a": 1}<|eot_id|>',
    "[1, 2, 3]<|eot_id|>",
    '"just a string"<|eot_id|>',
    '<function=broken>{"n": 10</function><|eot_id|>',
    "<function=nobraces>n=10</function><|eot_id|>",
    '<function>{"n": 10}</function><|eot_id|>',
    'brave_search.call(query=unquoted)<|eot_id|>',
    "brave_search.call(query='single quotes')<|eot_id|>",
    '{"type": "function", "name": "f", "parameters": {"a": 1}<|eot_id|>',  # cut short
    "<|python_tag|>{not json<|eom_id|>",  # after the tag: code for the interpreter (a SyntaxError there)
]

# Where llama-models' parser crashes or misreads, with its answer and ours (name, arguments) or None.
DIFFER = [
    # llama-models raises KeyError on a JSON object with "name" but no "parameters", or the reverse.
    ('{"name": "f"}', KeyError, None),
    ('{"type": "function", "parameters": {"a": 1}}', KeyError, None),
    ('<|python_tag|>{"name": "f"}<|eom_id|>', KeyError, None),
    # ... AttributeError on a built-in tool's name with null parameters, IndexError with empty ones.
    ('<|python_tag|>{"name": "brave_search", "parameters": null}<|eom_id|>', AttributeError, None),
    ('{"name": "brave_search", "parameters": {}}', IndexError, ("brave_search", {})),
    # Its non-greedy regex stops at the first "}", so nested arguments are lost ...
    ('<function=f>{"a": {"b": 1}}</function>', None, ("f", {"a": {"b": 1}})),
    # ... and it turns every ' into ", which breaks strings holding an apostrophe.
    ('<function=f>{"q": "what\'s up"}</function>', None, ("f", {"q": "what's up"})),
    # Single-quoted pseudo-JSON is not JSON; llama-models accepts it through that same replacement.
    ("<function=f>{'a': 1}</function>", ("f", {"a": 1}), None),
    # A non-object "parameters" cannot be passed as keyword arguments.
    ('{"name": "f", "parameters": "x"}', ("f", "x"), None),
    ('<|python_tag|>{"name": "f", "parameters": "x"}<|eom_id|>', ("f", "x"), None),
    # It renames a custom-form call of a built-in tool's sole argument to "query".
    ('{"name": "brave_search", "parameters": {"q": "x"}}', ("brave_search", {"query": "x"}),
     ("brave_search", {"q": "x"})),
    ('{"name": "code_interpreter", "parameters": {"code": "1"}}', ("code_interpreter", {"query": "1"}),
     ("code_interpreter", {"code": "1"})),
    # Python-list calls are Llama 3.2's zero-shot format, not Llama 3.1's.
    ('[get_weather(city="Paris")]', ("get_weather", {"city": "Paris"}), None),
    ('<|python_tag|>[get_weather(city="Paris")]<|eom_id|>', ("get_weather", {"city": "Paris"}),
     ("code_interpreter", {"code": '[get_weather(city="Paris")]'})),
]


def llama_models_parse(text: str):
    """(tool name, arguments) as llama-models' ChatFormat decodes the reply, or None for a plain reply."""
    with contextlib.redirect_stdout(io.StringIO()):  # it prints JSON errors
        message = META_FORMAT.decode_assistant_message_from_content(text, StopReason.end_of_turn)
    if not message.tool_calls:
        return None
    call = message.tool_calls[0]
    return getattr(call.tool_name, "value", call.tool_name), call.arguments


def ours(text: str):
    call = calls.parse_reply(text)
    return None if call is None else (call.name, call.arguments)


@pytest.mark.parametrize("text", AGREE)
def test_parser_agrees_with_llama_models(text):
    assert ours(text) == llama_models_parse(text)


def test_agreement_set_is_varied():
    results = [ours(t) for t in AGREE]
    names = {r[0] for r in results if r}
    assert {"brave_search", "wolfram_alpha", "code_interpreter", "get_weather", "trending_songs"} <= names
    assert sum(r is None for r in results) >= 10  # plain and malformed replies


@pytest.mark.parametrize("text,theirs,expected", DIFFER)
def test_deliberate_differences_from_llama_models(text, theirs, expected):
    if isinstance(theirs, type):
        with pytest.raises(theirs):
            llama_models_parse(text)
    else:
        assert llama_models_parse(text) == theirs
    assert ours(text) == expected


def test_parse_never_raises_on_arbitrary_text():
    samples = ["", "<function=", "<function=x>", "<function=x>{", '{"name": 1, "parameters": {}}', "\x00\ud800",
               '<|python_tag|>{"name": "f", "parameters": []}', ".call(query=\"x\")", "{" * 5000, "<function=" * 300]
    for text in samples:
        calls.parse_reply(text)
        calls.parse(text, python_tag=True)
    assert calls.parse(None) is None
    assert calls.parse_message({"role": "user", "content": 'brave_search.call(query="x")'}) is None


MADE = [
    calls.builtin_call("brave_search", "who won the 2024 NBA finals?"),
    calls.builtin_call("wolfram_alpha", "solve x^2 = 2"),
    calls.code_call("import numpy as np\nprint(np.linalg.det([[1, 2], [3, 4]]))"),
    calls.code_call("x = {'a': [1, {'b': 2}]}\nprint(x)"),
    calls.custom_call("get_weather", {"city": "Zürich", "days": 3, "units": None, "tags": ["a", "b"]}),
    calls.custom_call("get_weather", {"city": "Paris", "nested": {"a": {"b": [1]}}}, form="function_tag"),
    calls.custom_call("no_args", {}),
]


@pytest.mark.parametrize("call", MADE, ids=lambda c: c.name)
def test_calls_round_trip_through_messages_and_tokens(call):
    assert calls.parse_message(calls.to_message(call)) == call
    # Through token ids too: the tokenizer's tool-call encoding, generated ids, decoded back.
    tok = ByteTokenizer()
    ids, mask = tok.encode_message(calls.to_message(call))
    body = ids[ids.index(tok.special_id("end_header_id")) + 3:]  # after "\n\n"
    assert calls.parse_reply(tok.decode(body)) == call
    assert body[-1] == (tok.eom_id if call.python_tag else tok.eot_id)


@pytest.mark.parametrize("call", MADE, ids=lambda c: c.name)
def test_written_calls_equal_llama_models_encoding(call):
    from llama_models.datatypes import BuiltinTool, ToolCall, ToolPromptFormat

    form = ToolPromptFormat.json if call.python_tag else ToolPromptFormat.function_tag
    tool_name = BuiltinTool(call.name) if call.name in BuiltinTool.__members__ else call.name
    # model_construct: llama-models' type for arguments admits one level of nesting only.
    meta_call = ToolCall.model_construct(call_id="0", tool_name=tool_name, arguments=call.arguments)
    theirs = ToolUtils.encode_tool_call(meta_call, form)
    assert call.raw == theirs


def test_calls_that_cannot_be_written_are_errors():
    with pytest.raises(DataError, match="without double quotes"):
        calls.builtin_call("brave_search", 'say "hi"')
    with pytest.raises(DataError, match="would not parse back"):
        calls.code_call('brave_search.call(query="x")')  # reads as a search, not as code
    with pytest.raises(DataError, match="would not parse back"):
        calls.custom_call("a>b", {}, form="function_tag")
    with pytest.raises(DataError, match="form must be"):
        calls.custom_call("f", {}, form="xml")


def test_parsed_json_keeps_the_model_text():
    text = '{ "name" : "f",  "parameters" : {"x": 1} }'
    call = calls.parse(text, python_tag=True)
    assert call.raw == text and call.arguments == {"x": 1}
    assert json.loads(calls.to_message(call)["content"]) == json.loads(text)
