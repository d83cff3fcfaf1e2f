"""Prompt-only records for rejection sampling: templated ids, stable ids, file order, errors and skips."""

import json

import pytest

from llama_jax.data import read_prompts
from llama_jax.errors import DataError
from llama_jax.tokenizer import get_tokenizer

TOK = get_tokenizer("llama3")


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_prompts_in_order_with_ids_and_templated_tokens(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Hi", "id": "greeting"}, {"prompt": messages}])
    (tmp_path / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text() + "\n")  # a blank line is no record
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Count to 3.", "id": 7, "extra": "ignored"}])
    prompts, skipped = read_prompts(str(tmp_path / "*.jsonl"), TOK)
    assert [p.id for p in prompts] == ["greeting", "a.jsonl:2", "7"] and skipped == {}
    assert prompts[0].messages == [{"role": "user", "content": "Hi"}]
    # <|begin_of_text|> <|start_header_id|> user <|end_header_id|> \n\n Hi <|eot_id|> + the assistant's header
    assert prompts[0].ids == [128000, 128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271]
    assert prompts[1].ids == TOK.encode_dialog(messages, add_generation_prompt=True)[0]
    assert prompts[2].where == f"{tmp_path / 'b.jsonl'}:1"


def test_bad_prompts_raise_or_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "fine"},
        {"text": "no prompt"},
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"prompt": "bad id", "id": [1]},
        "not json",
        {"prompt": "also fine", "id": "x"},
    ])
    with pytest.raises(DataError, match=r"p.jsonl:2: .*\"prompt\" field"):
        read_prompts(path, TOK)
    prompts, skipped = read_prompts(path, TOK, on_error="skip")
    assert [p.id for p in prompts] == ["p.jsonl:1", "x"]
    assert sorted(skipped) == [f"{path}:{line}" for line in (2, 3, 4, 5)]
    assert "ends with an assistant" in skipped[f"{path}:3"]

    duplicate = write_jsonl(tmp_path / "dup.jsonl", [{"prompt": "a", "id": "one"}, {"prompt": "b", "id": "one"}])
    with pytest.raises(DataError, match=r"dup.jsonl:2: prompt id 'one' is already used at .*dup.jsonl:1"):
        read_prompts(duplicate, TOK)
