"""A tiny model learns to call a calculator and to answer with its result (issue 17, item 5), measured before/after.

The start is a tiny byte-level model that can copy: the base run of configs/pretrain/tiny_long_context.py (5,000
steps at 256 tokens with copy drills; fresh parameters SFT-trained the same way learn the call's fixed text but copy
no digits: 0 of 32 right answers, README "Tool use"). It is SFT-trained by the real command (`python -m
llama_jax.train --config configs/sft/tiny.py:calc.jsonl --config.init_from=...`) on synthetic calculator dialogs and
measured before and after through the real tool loop (`tools.run_turn` with the model's generator and the local
calculator: `synthetic.tool_use_rates`) on held-out questions whose expressions the training data never holds.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_module

from llama_jax import generate
from llama_jax.tools import calls, runner, synthetic

SFT_TINY = ROOT / "configs" / "sft" / "tiny.py"
TINY_LONG = ROOT / "configs" / "pretrain" / "tiny_long_context.py"
FORM = "wolfram_alpha"  # Llama 3.1's built-in math tool: a ~250-byte dialog (the JSON form's is ~1,060)
TRAIN_DIALOGS, HELD_OUT, STEPS = 2000, 32, 200


def expression(record: dict) -> str:
    return calls.parse_message(record["messages"][2]).arguments["query"]


def rates(path: Path, records: list[dict]) -> dict[str, float]:
    params, cfg, tok = generate.load_model(str(path), "byte")
    return synthetic.tool_use_rates(records, runner.model_generator(params, cfg, tok, max_new_tokens=64), tok)


def train(*overrides: str) -> None:
    run_module("llama_jax.train", *overrides, "--config.logging.progress=False")


@pytest.mark.slow  # ~25 minutes on 2 quiet cores, most of it the base run
@pytest.mark.skipif(not os.environ.get("LLAMA_JAX_SHAKESPEARE"), reason="LLAMA_JAX_SHAKESPEARE is unset")
def test_tiny_model_learns_to_call_the_calculator_and_use_its_result(tmp_path):
    train_dialogs = synthetic.calculator_dialogs(TRAIN_DIALOGS, seed=0, form=FORM)
    seen = {expression(r) for r in train_dialogs}
    held_out = [r for r in synthetic.calculator_dialogs(4 * HELD_OUT, seed=1, form=FORM)
                if expression(r) not in seen][:HELD_OUT]
    synthetic.write_jsonl(tmp_path / "calc.jsonl", train_dialogs)

    base, sft = tmp_path / "base", tmp_path / "sft"
    subprocess.run([sys.executable, str(TINY_LONG), str(tmp_path / "data")], check=True)  # the base run's corpora
    train(f"--config={TINY_LONG}:{tmp_path / 'data'}", f"--config.run_dir={base}", "--config.train.steps=5000")
    before = rates(base, held_out)
    # The longest dialog has ~290 bytes: one per row of 320.
    train(f"--config={SFT_TINY}:{tmp_path / 'calc.jsonl'}", f"--config.init_from={base}", f"--config.run_dir={sft}",
          "--config.data.seq_len=320", f"--config.train.steps={STEPS}", f"--config.schedule.total_steps={STEPS}",
          f"--config.schedule.decay_steps={STEPS}", "--config.schedule.peak_lr=2e-3",
          "--config.schedule.warmup_steps=20", "--config.logging.eval_every=0", f"--config.checkpoint.every={STEPS}")
    after = rates(sft, held_out)
    print(f"on {HELD_OUT} held-out questions, well-formed calls / right answers from the tool: before SFT "
          f"{before['calls']:.2f} / {before['answers']:.2f}, after {after['calls']:.2f} / {after['answers']:.2f}; "
          f"load average {os.getloadavg()[0]:.1f}")
    assert before == {"calls": 0.0, "answers": 0.0}  # the base never saw a tool prompt
    assert after["calls"] >= 0.75  # 1.00 measured (and from fresh parameters: 32 of 32)
    # A right answer needs both copies (the question's numbers into the call, the tool's result into the reply);
    # guessing a 1-7 digit number is hopeless and a model that cannot copy gets none (fresh start: 0 of 32).
    # Measured 19 of 32 by hand with these commands; 8 of 32 leaves room for another run's base.
    assert after["answers"] >= 0.25
