"""The synthetic calculator dataset: correct results, the assistant mask on the right tokens, the command."""

import io
import json
import subprocess
import sys

import pytest
from conftest import env

from llama_jax.errors import DataError
from llama_jax.tokenizer import get_tokenizer
from llama_jax.tools import calls, runner, synthetic

TOK = get_tokenizer("llama3")


def segments(tok, ids):
    """(role, body ids, body start) per turn, found from the header tokens alone."""
    start, end = tok.special_id("start_header_id"), tok.special_id("end_header_id")
    heads = [i for i, t in enumerate(ids) if t == start] + [len(ids)]
    out = []
    for here, nxt in zip(heads, heads[1:]):
        close = ids.index(end, here)
        role = tok.decode(ids[here + 1:close])
        body_start = close + 1 + len(tok.encode("\n\n"))
        out.append((role, ids[body_start:nxt], body_start))
    return out


@pytest.mark.parametrize("form", ["json", "function_tag", "wolfram_alpha"])
def test_records_tokenise_with_the_mask_on_the_assistant_turns_only(form):
    for record in synthetic.calculator_dialogs(20, seed=1, form=form):
        messages = record["messages"]
        ids, mask = TOK.encode_dialog(messages)
        turns = segments(TOK, ids)
        tool_description = [] if form == "wolfram_alpha" else ["user"]  # the built-in tool needs none
        assert [role for role, _, _ in turns] == ["system", *tool_description, "user", "assistant", "ipython",
                                                  "assistant"]
        expected = [0] * len(ids)
        for role, body, start in turns:
            if role == "assistant":
                expected[start:start + len(body)] = [1] * len(body)
        assert mask == expected
        (_, call_ids, _), (_, result_ids, result_start), (_, answer_ids, _) = turns[-3:]
        # The call, <|python_tag|> and <|eom_id|> included, is trained; the tool's output is not.
        if form != "function_tag":
            assert call_ids[0] == TOK.special_id("python_tag") and call_ids[-1] == TOK.eom_id
        else:
            assert call_ids[-1] == TOK.eot_id and TOK.special_id("python_tag") not in call_ids
        assert mask[result_start:result_start + len(result_ids)] == [0] * len(result_ids)
        assert TOK.decode(result_ids[:-1]) == messages[-2]["content"]
        assert answer_ids[-1] == TOK.eot_id


@pytest.mark.parametrize("form", ["json", "wolfram_alpha"])
def test_results_are_right_and_the_answer_uses_them(form):
    for record in synthetic.calculator_dialogs(200, seed=2, form=form):
        question, call_message, result, answer = record["messages"][-4:]
        call = calls.parse_message(call_message)
        assert call_message["tool_call"] is True
        if form == "json":
            assert call.name == "calculator" and call.raw.startswith('{"type": "function", "name": "calculator"')
            expression = call.arguments["expression"]
        else:
            assert call.name == "wolfram_alpha" and call.raw == f'wolfram_alpha.call(query="{call.arguments["query"]}")'
            expression = call.arguments["query"]
        assert question["content"].count(expression) == 1
        assert result["content"] == str(eval(expression))  # trusted: the generator's own integers
        assert answer["content"].rstrip(".").endswith(result["content"])


def test_records_are_what_the_tool_loop_produces():
    # Replaying the assistant's turns through the loop runs the calculator and gives the same dialogs.
    for record in synthetic.calculator_dialogs(5, seed=3, form="function_tag"):
        messages = record["messages"]
        replies = [TOK.encode(calls.PYTHON_TAG if m.get("tool_call") else "", allowed_special="all")
                   + TOK.encode(m["content"]) + [TOK.eom_id if m.get("tool_call") else TOK.eot_id]
                   for m in messages if m["role"] == "assistant"]
        dialog = messages[:3]
        replay = iter(replies)
        runner.run_turn(dialog, lambda prompt, replay=replay: next(replay), TOK,
                        {"calculator": synthetic.calculator}, out=io.StringIO())
        assert [{k: v for k, v in m.items() if v is not False} for m in dialog] == messages


def test_same_seed_same_data_and_variety():
    first, again = synthetic.calculator_dialogs(50, seed=4), synthetic.calculator_dialogs(50, seed=4)
    assert first == again and first != synthetic.calculator_dialogs(50, seed=5)
    assert len({r["messages"][2]["content"] for r in first}) == 50


def test_tool_use_rates_count_calls_and_answers_from_the_tool():
    """Scripted replies to four questions: right call and answer; wrong expression (the calculator's result is not
    the record's); a call then another call; no call; a malformed call (Python code to the loop); an answer that does
    not end on the result."""
    records = synthetic.calculator_dialogs(6, seed=6, form="wolfram_alpha")
    queries = [calls.parse_message(r["messages"][2]).arguments["query"] for r in records]
    results = [r["messages"][3]["content"] for r in records]
    script = [
        f'<|python_tag|>wolfram_alpha.call(query="{queries[0]}")<|eom_id|>', f"It is {results[0]}.<|eot_id|>",
        f'<|python_tag|>wolfram_alpha.call(query="{queries[1]} + 1")<|eom_id|>', f"It is {results[1]}.<|eot_id|>",
        f'<|python_tag|>wolfram_alpha.call(query="{queries[2]}")<|eom_id|>',
        f'<|python_tag|>wolfram_alpha.call(query="{queries[2]}")<|eom_id|>',
        f"It is {results[3]}.<|eot_id|>",
        f'<|python_tag|>wolfram_alpha.call(q="{queries[4]}")<|eom_id|>', "Sorry.<|eot_id|>",  # code, for no tool
        f'<|python_tag|>wolfram_alpha.call(query="{queries[5]}")<|eom_id|>', f"It is {results[5]}1.<|eot_id|>",
    ]
    replies = iter(script)
    rates = synthetic.tool_use_rates(records, lambda prompt: TOK.encode(next(replies), allowed_special="all"), TOK)
    assert rates == {"calls": 4 / 6, "answers": 1 / 6} and next(replies, None) is None


def test_calculator_refuses_anything_but_arithmetic():
    assert synthetic.calculator("(2 + 3) * 4 - 7 / 2") == "16.5"
    assert synthetic.calculator("2 ** 10 // 3 % 7") == "5"
    for bad in ["__import__('os').system('true')", "x + 1", "2 ** 1000", "1 / 0", "[1, 2]", "(1"]:
        with pytest.raises(DataError):
            synthetic.calculator(bad)


def test_command_writes_jsonl(tmp_path):
    out = tmp_path / "calc.jsonl"
    proc = subprocess.run([sys.executable, "-m", "llama_jax.tools.synthetic", "--out", str(out), "--num", "7",
                           "--seed", "9", "--form", "function_tag"], capture_output=True, text=True, check=True,
                          env=env())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"out": str(out), "records": 7, "seed": 9,
                                                                "form": "function_tag"}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == synthetic.calculator_dialogs(7, seed=9, form="function_tag")
