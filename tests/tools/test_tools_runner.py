"""The tool loop with a scripted model, with real tiny models, and through ``python -m llama_jax.chat --tools``."""

import io
import json

import jax
import pytest
from conftest import successor_params

from llama_jax import chat, checkpoint, model
from llama_jax.config import ModelConfig
from llama_jax.errors import DataError
from llama_jax.tokenizer import ByteTokenizer, get_tokenizer
from llama_jax.tools import calls, prompts, runner
from llama_jax.tools.interpreter import code_interpreter

LLAMA3 = get_tokenizer("llama3")
BYTES = ByteTokenizer()
CFG = ModelConfig(vocab_size=BYTES.vocab_size, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                  rope_theta=10_000.0, max_seq_len=1024)


class ScriptedModel:
    """A `GenerateFn` that replies with prepared texts and records the prompts it was given."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.prompts = tok, list(replies), []

    def __call__(self, prompt):
        self.prompts.append(list(prompt))
        text = self.replies.pop(0)
        return self.tok.encode(text, allowed_special="all")


def test_scripted_model_goes_through_two_tool_calls_and_answers():
    searches = []

    def fake_search(query):
        searches.append(query)
        return '{"results": ["2**10 is 1024"]}'

    messages = prompts.tool_messages(["code_interpreter", "brave_search"], instruction="Be brief.")
    messages.append({"role": "user", "content": "What is 2**10, and is that well known?"})
    start = [dict(m) for m in messages]
    scripted = ScriptedModel(LLAMA3, [
        "<|python_tag|>print(2**10)<|eom_id|>",
        '<|python_tag|>brave_search.call(query="1024 well known number")<|eom_id|>',
        "It is 1024, the number of bytes in a kibibyte.<|eot_id|>",
    ])
    out = io.StringIO()
    new = runner.run_turn(messages, scripted, LLAMA3, {"code_interpreter": code_interpreter,
                                                       "brave_search": fake_search}, out=out)
    expected = [
        calls.to_message(calls.code_call("print(2**10)")),
        {"role": "ipython", "content": "completed\n[stdout]1024\n[/stdout]"},
        calls.to_message(calls.builtin_call("brave_search", "1024 well known number")),
        {"role": "ipython", "content": '{"results": ["2**10 is 1024"]}'},
        {"role": "assistant", "content": "It is 1024, the number of bytes in a kibibyte.", "tool_call": False},
    ]
    assert new == expected and messages == start + expected and searches == ["1024 well known number"]
    # Each generation saw the whole dialog so far, ipython turns included, in the chat format.
    for k, prompt in enumerate(scripted.prompts):
        assert prompt == LLAMA3.encode_dialog(start + expected[:2 * k], add_generation_prompt=True)[0]
    assert out.getvalue() == (
        "assistant> [tool call] print(2**10)\ntool> completed\n[stdout]1024\n[/stdout]\n"
        'assistant> [tool call] brave_search.call(query="1024 well known number")\n'
        'tool> {"results": ["2**10 is 1024"]}\n'
        "assistant> It is 1024, the number of bytes in a kibibyte.\n")


def test_custom_tools_in_both_forms_get_their_arguments():
    def get_weather(city: str, unit: str = "celsius") -> dict:
        """Weather now."""
        return {"city": city, "unit": unit, "temp": 21}

    scripted = ScriptedModel(LLAMA3, [
        '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>',
        '<function=get_weather>{"city": "Oslo", "unit": "kelvin"}</function><|eot_id|>',  # no tag, eot
        "Paris 21 C, Oslo 21 K.<|eot_id|>",
    ])
    messages = prompts.tool_messages(custom_tools=[get_weather]) + [{"role": "user", "content": "Weather?"}]
    new = runner.run_turn(messages, scripted, LLAMA3, {"get_weather": get_weather}, out=io.StringIO())
    assert [m["content"] for m in new if m["role"] == "ipython"] == [
        '{"city": "Paris", "unit": "celsius", "temp": 21}', '{"city": "Oslo", "unit": "kelvin", "temp": 21}']
    assert new[-1]["content"] == "Paris 21 C, Oslo 21 K."


def test_tool_errors_unknown_tools_and_the_cap_are_turns_not_crashes():
    def broken(x: int) -> str:
        raise RuntimeError("service down")

    scripted = ScriptedModel(LLAMA3, [
        '<|python_tag|>{"name": "broken", "parameters": {"x": 1}}<|eom_id|>',
        '<|python_tag|>{"name": "broken", "parameters": {"y": 1}}<|eom_id|>',
        '<|python_tag|>wolfram_alpha.call(query="1+1")<|eom_id|>',
        "<|python_tag|>print('one call too many')<|eom_id|>",
    ])
    out = io.StringIO()
    messages = [{"role": "user", "content": "Go."}]
    new = runner.run_turn(messages, scripted, LLAMA3, {"broken": broken}, max_tool_calls=3, out=out)
    results = [m["content"] for m in new if m["role"] == "ipython"]
    assert results[0] == "failed\n[stderr]RuntimeError: service down[/stderr]"
    assert results[1].startswith("failed\n[stderr]TypeError: ") and "'y'" in results[1]
    assert results[2] == "failed\n[stderr]there is no tool 'wolfram_alpha'; the tools are ['broken'][/stderr]"
    assert len(new) == 7 and new[-1]["tool_call"] and scripted.replies == []  # the 4th call is never run
    assert out.getvalue().endswith("[stopped: 3 tool calls in this turn]\n")


def test_a_call_cut_off_by_the_token_limit_is_not_run():
    ran = []
    scripted = ScriptedModel(LLAMA3, ["<|python_tag|>print('unfinished"])  # no <|eom_id|>
    new = runner.run_turn([{"role": "user", "content": "Hi"}], scripted, LLAMA3,
                          {"code_interpreter": ran.append}, out=io.StringIO())
    assert ran == [] and len(new) == 1 and new[0]["tool_call"]


def random_params(seed=0):
    return jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(seed))


@pytest.mark.parametrize("as_code", [False, True], ids=["as-is", "as-code"])
@pytest.mark.slow  # 15 s on 2 busy cores
def test_real_tiny_model_runs_through_the_loop(as_code):
    """A random model's replies, as they come and wrapped as tool calls (its garbage run as code)."""
    model_reply = runner.model_generator(random_params(), CFG, BYTES, max_new_tokens=24, temperature=1.5, seed=3)
    tag, stops = BYTES.special_id("python_tag"), BYTES.stop_ids

    def as_tool_call(prompt):
        return [tag, *(t for t in model_reply(prompt) if t not in stops), BYTES.eom_id]

    messages = prompts.tool_messages(["code_interpreter"]) + [{"role": "user", "content": "2+2?"}]
    new = runner.run_turn(messages, as_tool_call if as_code else model_reply, BYTES,
                          {"code_interpreter": code_interpreter}, max_tool_calls=2, out=io.StringIO())
    roles = [m["role"] for m in new]
    assert roles == (["assistant", "ipython"] * 2 + ["assistant"] if as_code else ["assistant"])
    for i, message in enumerate(new):  # ipython turns only ever answer a call
        if message["role"] == "ipython":
            assert calls.parse_message(new[i - 1]) is not None and message["content"].startswith("failed\n")
    BYTES.encode_dialog(messages)  # the grown dialog still encodes


def test_model_generator_refuses_a_full_context():
    generate = runner.model_generator(random_params(), CFG.replace(max_seq_len=64), BYTES)
    with pytest.raises(DataError, match="fills the model's context"):
        generate(list(range(64)))




@pytest.mark.slow  # 9 s on 2 busy cores
def test_chat_command_with_tools_runs_code_in_the_sandbox(tmp_path, monkeypatch, capsys):
    cfg = CFG.replace(dim=272)  # one-hot embeddings need dim >= vocab
    chain = [BYTES.special_id("python_tag"), *map(ord, "print(6*7)"), BYTES.eom_id]  # distinct characters
    successor = {ord("\n"): chain[0], **dict(zip(chain, chain[1:]))}  # the assistant header ends with "\n\n"
    path = str(tmp_path / "ckpt")
    checkpoint.save_params(path, successor_params(cfg, successor), cfg,
                           tokenizer={"name": BYTES.name, "sha256": BYTES.sha256})
    monkeypatch.setattr("sys.stdin", io.StringIO("compute it\n"))
    argv = ["--checkpoint", path, "--tools", "code_interpreter", "--max-tool-calls", "1", "--max-new-tokens", "16"]
    assert chat.main(argv) == 0
    # The model calls the interpreter, reads 42, and calls it again: the cap of 1 ends the turn.
    call = "assistant> [tool call] print(6*7)\n"
    human, _, result = capsys.readouterr().out.rpartition("\n{")
    assert human + "\n" == (chat.USER + call + "tool> completed\n[stdout]42\n[/stdout]\n" + call
                            + "[stopped: 1 tool calls in this turn]\n" + chat.USER + "\n")
    assert json.loads("{" + result) == {"turns": 1}


def test_chat_command_rejects_unknown_tools(tmp_path, capsys):
    assert chat.main(["--checkpoint", str(tmp_path), "--tools", "code_interpreter,shell"]) == 2
    assert "error: unknown built-in tool 'shell'" in capsys.readouterr().err


def test_chat_tools_prompt_and_terminal_answers(monkeypatch):
    system = prompts.system_prompt(["code_interpreter", "wolfram_alpha"], instruction="Be brief.")
    assert system.startswith("Environment: ipython\nTools: wolfram_alpha\nCutting Knowledge Date: December 2023\n")
    tools = chat.terminal_tools(["wolfram_alpha"])
    monkeypatch.setattr("sys.stdin", io.StringIO("x = 2\n"))
    assert list(tools) == ["wolfram_alpha"] and tools["wolfram_alpha"]("solve x + 1 = 3") == "x = 2"
