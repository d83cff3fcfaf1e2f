"""Tool prompts and tool-call turns equal llama-models' documented Llama 3.1 examples, token by token.

The reference is ``llama_models/llama3_1/prompt_format.md`` as installed: each "Input Prompt Format" /
"Model Response Format" block is parsed into turns and encoded by llama-models' own tokenizer and
``ChatFormat`` header code; ours comes from `llama_jax.tools` messages and `Tokenizer.encode_dialog`.
"""

import datetime
import importlib.resources
import re

import pytest

from llama_jax.errors import ConfigError
from llama_jax.tokenizer import get_tokenizer
from llama_jax.tools import calls, prompts

meta_tokenizer = pytest.importorskip("llama_models.llama3.tokenizer")
meta_chat_format = pytest.importorskip("llama_models.llama3.chat_format")
from llama_models.datatypes import RawMessage  # noqa: E402  (after the importorskip above)

TOK = get_tokenizer("llama3")
META_TOK = meta_tokenizer.Tokenizer.get_instance()
META_FORMAT = meta_chat_format.ChatFormat(META_TOK)
DOC_DAY = datetime.date(2024, 9, 21)
INSTRUCTION = "You are a helpful assistant."  # llama-models' template_data.INSTRUCTION
TURN = re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(<\|eot_id\|>|<\|eom_id\|>|$)", re.DOTALL)


def doc_examples() -> dict[str, list[tuple[str, str]]]:
    """Section title -> [(input prompt block, model response block)] from the installed prompt_format.md."""
    path = importlib.resources.files("llama_models") / "llama3_1" / "prompt_format.md"
    text = path.read_text()
    examples = {}
    for section in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        title = section.split("\n", 1)[0].strip()
        pairs = re.findall(r"##### Input Prompt Format\n```\n(.*?)\n```\n\n"
                           r"##### Model Response Format\n```\n(.*?)\n```", section, re.DOTALL)
        if pairs:
            examples[title] = pairs
    return examples


EXAMPLES = doc_examples()


def doc_turns(block: str) -> list[dict]:
    """A prompt block's turns: role, body, whether the body starts with <|python_tag|>, the closing token."""
    assert block.startswith("<|begin_of_text|>")
    turns = []
    for role, body, end in TURN.findall(block):
        tagged = body.startswith("<|python_tag|>")
        turns.append({"role": role, "body": body.removeprefix("<|python_tag|>"), "tagged": tagged, "end": end})
    return turns


def meta_ids(turns: list[dict], add_generation_prompt: bool) -> list[int]:
    """The documented turns encoded by llama-models: its header encoding and its tokenizer, per part."""
    ids = [META_TOK.special_tokens["<|begin_of_text|>"]]
    for turn in turns:
        ids += META_FORMAT._encode_header(turn["role"])
        ids += [META_TOK.special_tokens["<|python_tag|>"]] if turn["tagged"] else []
        ids += META_TOK.encode(turn["body"], bos=False, eos=False)
        ids.append(META_TOK.special_tokens[turn["end"]])
    if add_generation_prompt:
        ids += META_FORMAT._encode_header("assistant")
    return ids


def split_prompt(block: str) -> tuple[list[dict], list[dict]]:
    """(closed turns, ...) of an input prompt; the trailing empty assistant header is the generation prompt."""
    turns = doc_turns(block)
    assert turns[-1] == {"role": "assistant", "body": "", "tagged": False, "end": ""}
    return turns[:-1], turns


def as_messages(turns: list[dict]) -> list[dict]:
    return [{"role": t["role"], "content": t["body"], "tool_call": t["tagged"]} for t in turns]


def assert_same_ids(ours: list[int], theirs: list[int]) -> None:
    assert len(ours) == len(theirs), (TOK.decode(ours), META_TOK.decode(theirs))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, f"token {i}: ours {a} {TOK.decode([a])!r}, llama-models {b} {META_TOK.decode([b])!r}"


def check_prompt(title: str, messages: list[dict]) -> None:
    """Our messages + the documented user question encode to the documented prompt's ids."""
    (block, _), = EXAMPLES[title]
    turns, _ = split_prompt(block)
    user_question = turns[-1]
    assert user_question["role"] == "user"
    expected = meta_ids(turns, add_generation_prompt=True)
    ours, _ = TOK.encode_dialog(messages + [{"role": "user", "content": user_question["body"]}],
                                add_generation_prompt=True)
    assert_same_ids(ours, expected)


def response_ids(title: str) -> tuple[list[int], str]:
    """llama-models' ids of the documented model response (header included) and its decoded text."""
    (_, response), = EXAMPLES[title]
    turn, = doc_turns("<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\n" + response)
    return meta_ids([turn], add_generation_prompt=False)[1:], response


def trending_songs(n: int, genre: str = "all") -> list:
    """Returns the trending songs on a Music site

    Args:
        n: The number of songs to return
        genre: The genre of the songs to return
    """
    return []


TRENDING_SONGS_SCHEMA = {
    "type": "function",
    "function": {
        "name": "trending_songs",
        "description": "Returns the trending songs on a Music site",
        "parameters": {"type": "object", "required": ["n"], "properties": {
            "n": {"type": "integer", "description": "The number of songs to return"},
            "genre": {"type": "string", "description": "The genre of the songs to return"}}},
    },
}


def test_the_reference_examples_are_all_found():
    # A change of the installed document must fail loudly here, not skip the comparisons below.
    assert {"Builtin Tool Calling", "Builtin Code Interpreter", "Built-in tools full interaction",
            "JSON based tool calling", "`<function>` based tool calling"} <= set(EXAMPLES)


def test_meta_ids_equal_llama_models_chat_format_on_a_plain_dialog():
    # The helper that builds the expected ids agrees with llama-models' own ChatFormat where that applies.
    (block, _), = EXAMPLES["User and assistant conversation"]
    closed, _ = split_prompt(block)
    raw = [RawMessage(role=t["role"], content=t["body"]) for t in closed]
    assert meta_ids(closed, add_generation_prompt=True) == META_FORMAT.encode_dialog_prompt(raw).tokens


def test_builtin_tools_system_prompt():
    messages = prompts.tool_messages(["code_interpreter", "brave_search", "wolfram_alpha"],
                                     instruction=INSTRUCTION, today=DOC_DAY)
    assert [m["role"] for m in messages] == ["system"]
    check_prompt("Builtin Tool Calling", messages)


def test_builtin_call_response_parses_and_encodes_back():
    expected, response = response_ids("Builtin Tool Calling")
    call = calls.parse_reply(response)
    assert (call.name, call.arguments) == ("brave_search", {"query": "latest price of 1oz gold"})
    made = calls.builtin_call("brave_search", "latest price of 1oz gold")
    assert made == call
    assert_same_ids(TOK.encode_message(calls.to_message(made))[0], expected)


def test_code_interpreter_response_parses_and_encodes_back():
    (block, _), = EXAMPLES["Builtin Code Interpreter"]
    turns, all_turns = split_prompt(block)
    assert turns[0]["body"] == "Environment: ipython"  # a hand-written system prompt in the document
    assert_same_ids(TOK.encode_dialog(as_messages(turns), add_generation_prompt=True)[0],
                    meta_ids(all_turns[:-1], add_generation_prompt=True))
    expected, response = response_ids("Builtin Code Interpreter")
    call = calls.parse_reply(response)
    assert call.name == "code_interpreter" and call.arguments["code"].startswith("def is_prime(n):\n")
    assert call.arguments["code"].endswith("print(is_prime(7))  # Output: True")
    assert call == calls.code_call(call.arguments["code"])
    assert_same_ids(TOK.encode_message(calls.to_message(call))[0], expected)


def test_full_builtin_interaction_with_tool_call_and_ipython_turn():
    (block, response), = EXAMPLES["Built-in tools full interaction"]
    turns, _ = split_prompt(block)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "ipython"]
    call = calls.builtin_call("wolfram_alpha", "100th decimal of pi")
    messages = [as_messages(turns)[0], as_messages(turns)[1], calls.to_message(call),
                {"role": "ipython", "content": turns[3]["body"]}]
    assert_same_ids(TOK.encode_dialog(messages, add_generation_prompt=True)[0],
                    meta_ids(turns, add_generation_prompt=True))
    assert calls.parse_reply(response) is None  # "The 100th decimal of pi is 7." is the answer, not a call


@pytest.mark.parametrize("tool", [trending_songs, TRENDING_SONGS_SCHEMA], ids=["function", "json-schema"])
def test_json_custom_tools_prompt(tool):
    messages = prompts.tool_messages(custom_tools=[tool], instruction=INSTRUCTION, today=DOC_DAY)
    assert [m["role"] for m in messages] == ["system", "user"]  # the tools go in a user message
    check_prompt("JSON based tool calling", messages)


def test_json_custom_call_response_parses_and_encodes_back():
    expected, response = response_ids("JSON based tool calling")
    call = calls.parse_reply(response)
    assert (call.name, call.arguments, call.python_tag) == ("trending_songs", {"n": "10", "genre": "all"}, True)
    assert_same_ids(TOK.encode_message(calls.to_message(call))[0], expected)


@pytest.mark.parametrize("tool", [trending_songs, TRENDING_SONGS_SCHEMA], ids=["function", "json-schema"])
def test_function_tag_custom_tools_prompt(tool):
    messages = prompts.tool_messages(custom_tools=[tool], custom_format="function_tag", instruction=INSTRUCTION,
                                     today=DOC_DAY)
    check_prompt("`<function>` based tool calling", messages)


def test_function_tag_call_response_parses_and_encodes_back():
    expected, response = response_ids("`<function>` based tool calling")
    call = calls.parse_reply(response)
    assert (call.name, call.arguments, call.python_tag) == ("trending_songs", {"n": 10}, False)
    assert call == calls.custom_call("trending_songs", {"n": 10}, form="function_tag")
    assert_same_ids(TOK.encode_message(calls.to_message(call))[0], expected)  # no python tag, <|eot_id|>


def test_tool_specs_from_functions_and_dicts_agree():
    from_function = prompts.tool_spec(trending_songs)
    assert from_function == prompts.tool_spec(TRENDING_SONGS_SCHEMA)
    llama_models_style = {"tool_name": "trending_songs", "description": "Returns the trending songs on a Music site",
                          "parameters": {"n": {"param_type": "int", "description": "The number of songs to return"},
                                         "genre": {"param_type": "str", "required": False,
                                                   "description": "The genre of the songs to return"}}}
    assert prompts.tool_spec(llama_models_style) == from_function
    assert from_function.params == (
        prompts.Param("n", "int", "The number of songs to return", True),
        prompts.Param("genre", "str", "The genre of the songs to return", False))


def test_optional_hints_and_missing_docs():
    def lookup(key: str | None = None, *, limit: "int | None" = 3, **extra) -> str:
        return ""

    spec = prompts.tool_spec(lookup)
    assert spec == prompts.ToolSpec("lookup", "", (prompts.Param("key", "str", "", False),
                                                   prompts.Param("limit", "int", "", False)))


def test_dates_and_environment_lines():
    day = datetime.date(2025, 7, 5)
    assert prompts.system_prompt(today=day) == "Cutting Knowledge Date: December 2023\nToday Date: 05 July 2025\n"
    # The code interpreter alone: "Environment: ipython" and no Tools: line (Meta's template gives a blank line).
    assert prompts.system_prompt(["code_interpreter"], today=day).startswith(
        "Environment: ipython\n\nCutting Knowledge Date: December 2023\n")
    assert prompts.system_prompt(["wolfram_alpha"], instruction="Hi.", today=day) == (
        "Environment: ipython\nTools: wolfram_alpha\nCutting Knowledge Date: December 2023\n"
        "Today Date: 05 July 2025\n\nHi.\n")


def test_several_custom_tools_are_listed_in_order():
    def alpha(x: int) -> int:
        """First."""

    def beta(y: str) -> str:
        """Second."""

    text = prompts.json_tools_prompt([alpha, beta])
    assert text.index('"name": "alpha"') < text.index('"name": "beta"')
    assert "}\n{" in text and text.endswith("}\n\nReturn function calls in JSON format.")
    tagged = prompts.function_tag_tools_prompt([alpha, beta])
    assert "Use the function 'alpha' to 'First.':\n" in tagged and "Use the function 'beta' to 'Second.':\n" in tagged


def test_bad_tool_definitions_are_config_errors():
    with pytest.raises(ConfigError, match="unknown built-in tool 'python'"):
        prompts.tool_messages(["python"])
    with pytest.raises(ConfigError, match="share a name with a built-in"):
        prompts.tool_messages(custom_tools=[{"name": "brave_search", "parameters": {}}])
    with pytest.raises(ConfigError, match="has no 'name'"):
        prompts.tool_spec({"description": "nameless"})
    with pytest.raises(ConfigError, match="custom_format"):
        prompts.tool_messages(custom_tools=[trending_songs], custom_format="xml")
