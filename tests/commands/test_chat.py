"""The chat and generate CLIs end to end on saved tiny checkpoints, read non-interactively from stdin; chat with
low-rank adapters run unmerged over its checkpoint."""

import io
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import env, successor_params

from llama_jax import chat, checkpoint, lora, model
from llama_jax import generate as gen
from llama_jax.config import LoRA, ModelConfig
from llama_jax.formats import peft
from llama_jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
CFG = ModelConfig(vocab_size=TOK.vocab_size, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                  rope_theta=10_000.0, max_seq_len=256)


def save(tmp_path, params, cfg=CFG, name="ckpt"):
    path = str(tmp_path / name)
    checkpoint.save_params(path, params, cfg, tokenizer={"name": TOK.name, "sha256": TOK.sha256})
    return path


def run(main, argv, stdin, monkeypatch, capsys) -> str:
    """The command's human output; its last line, the JSON result, is checked to parse and cut off."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(argv) == 0
    human, _, result = capsys.readouterr().out.rstrip("\n").rpartition("\n")
    assert isinstance(json.loads(result), dict)
    return human + "\n"


@pytest.mark.slow  # 53 s on 2 busy cores
def test_chat_turns_follow_the_dialog_format(tmp_path, monkeypatch, capsys):
    params = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))
    path = save(tmp_path, params)
    out = run(chat.main, ["--checkpoint", path, "--system", "Be brief.", "--max-new-tokens", "12"],
              "Hello!\nAnd again?\n", monkeypatch, capsys)
    # The reference: the library's generate on the dialog encoded by the tokenizer, turn after turn.
    dialog = [{"role": "system", "content": "Be brief."}]
    expected = ""
    for user in ("Hello!", "And again?"):
        dialog.append({"role": "user", "content": user})
        prompt, _ = TOK.encode_dialog(dialog, add_generation_prompt=True)
        ids = gen.generate(params, CFG, [prompt], 12, stop_ids=TOK.stop_ids)[0]
        ids = ids[:-1] if ids and ids[-1] in TOK.stop_ids else ids
        assert TOK.special_id("python_tag") not in ids[:1]
        dialog.append({"role": "assistant", "content": TOK.decode(ids)})
        expected += chat.USER + chat.ASSISTANT + TOK.decode(ids) + "\n"
    assert out == expected + chat.USER + "\n"




@pytest.mark.slow  # 38 s on 2 busy cores
def test_tool_call_turns_are_shown_and_answered(tmp_path, monkeypatch, capsys):
    cfg = CFG.replace(dim=272)  # one-hot embeddings need dim >= vocab
    code = [ord(c) for c in "print(1)"]  # distinct characters, so a successor chain spells it
    chain = [TOK.special_id("python_tag"), *code, TOK.eom_id]
    successor = {ord("\n"): chain[0], **dict(zip(chain, chain[1:]))}  # assistant header ends with "\n\n"
    path = save(tmp_path, successor_params(cfg, successor), cfg)
    out = run(chat.main, ["--checkpoint", path, "--max-new-tokens", "20"], "run it\n1\n", monkeypatch, capsys)
    call = chat.ASSISTANT + "[tool call] print(1)\n"
    assert out == chat.USER + call + chat.TOOL + call + chat.TOOL + "\n"

    c = chat.Chat(*gen.load_model(path), out=io.StringIO())
    reply = c.say("user", "run it")
    assert reply == {"role": "assistant", "content": "print(1)", "tool_call": True}
    c.say("ipython", "1")
    assert [m["role"] for m in c.messages] == ["user", "assistant", "ipython", "assistant"]


@pytest.mark.slow  # 24 s on 2 busy cores
def test_generate_cli_streams_a_continuation(tmp_path, monkeypatch, capsys):
    params = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(1))
    path = save(tmp_path, params)
    out = run(gen.main, ["--checkpoint", path, "--prompt", "Once", "--max-new-tokens", "10"], "", monkeypatch, capsys)
    ids = gen.generate(params, CFG, [TOK.encode("Once", bos=True)], 10, stop_ids=TOK.stop_ids)[0]
    assert out == "Once" + TOK.decode(ids) + "\n"
    out = run(gen.main, ["--checkpoint", path, "--prompt", "a", "--prompt", "bc", "--max-new-tokens", "5"], "",
              monkeypatch, capsys)
    batch = gen.generate(params, CFG, [TOK.encode("a", bos=True), TOK.encode("bc", bos=True)], 5,
                         stop_ids=TOK.stop_ids)
    assert out == f"a{TOK.decode(batch[0])}\nbc{TOK.decode(batch[1])}\n"


def test_unknown_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert gen.main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert chat.main(["--checkpoint", str(tmp_path / "empty")]) == 2
    assert "neither a llama_jax checkpoint" in capsys.readouterr().err


@pytest.mark.slow  # 10 s: the command and the reference replies (the fast set: the refusal below)
def test_chat_with_an_adapter_replies_as_its_merged_weights_do(tmp_path):
    params = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(2))
    path = save(tmp_path, params)
    spec = LoRA(rank=2, alpha=4.0, targets=("key", "out", "up"))
    rng = np.random.default_rng(3)
    adapters = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(s.dtype),
                            lora.split(model.param_shapes(CFG.replace(lora=spec)))[1])
    peft.write(tmp_path / "adapter", adapters, CFG.replace(lora=spec))
    done = subprocess.run([sys.executable, "-m", "llama_jax.chat", "--checkpoint", path, "--adapter",
                           str(tmp_path / "adapter"), "--max-new-tokens", "12"], input="Hello!\n", env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def reply(weights) -> str:
        return chat.Chat(weights, CFG, TOK, max_new_tokens=12, out=io.StringIO()).say("user", "Hello!")["content"]

    merged = lora.merge(lora.join(params, adapters), CFG.replace(lora=spec))  # W + scale B A: the plain network
    assert done.stdout.rpartition("\n" + chat.USER)[0] == chat.USER + chat.ASSISTANT + reply(merged)
    assert reply(merged) != reply(params)  # the adapter changes the reply


def test_chat_refuses_an_adapter_that_holds_none(tmp_path, capsys):
    path = save(tmp_path, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), model.param_shapes(CFG)))
    assert chat.main(["--checkpoint", path, "--adapter", path]) == 2
    assert capsys.readouterr().err == (f"error: --adapter {path} holds no adapters (it was not trained with "
                                       "config.lora); a full checkpoint is a --checkpoint\n")
