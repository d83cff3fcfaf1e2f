"""A tiny model learns to call a calculator (issue 17, item 5), measured; whether it answers with the result, too.

Fresh tiny parameters are SFT-trained by the real command (`python -m llama_jax.train --config
configs/sft/tiny.py:calc.jsonl --config.init_from=...`) on the synthetic calculator dialogs, and measured before
and after through the real tool loop (`tools.run_turn` with the model's generator and the local calculator:
`synthetic.tool_use_rates`) on held-out questions whose expressions the training data never holds.

Measured (2 shared CPU cores: 3.7 min at load average 5-8.5, 15 min at ~21; README "Tool use"): well-formed calls
0.00 before, 1.00 after 200 steps (32 of 32); right answers from the tool 0.00 before and after. The call's fixed
text is learnt; the digits are not copied yet (the question's expression into the call, the tool's result into the
answer: the per-byte loss on digits stays high after 400 SFT steps, and after 400 steps of pretraining on
arithmetic text), so answers are reported, not asserted.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from llama_jax import checkpoint, config, generate, model
from llama_jax.tokenizer import ByteTokenizer
from llama_jax.tools import calls, runner, synthetic

ROOT = Path(__file__).resolve().parents[1]
SFT_TINY = ROOT / "configs" / "sft" / "tiny.py"
FORM = "wolfram_alpha"  # Llama 3.1's built-in math tool: a ~250-byte dialog (the JSON form's is ~1,060)
TRAIN_DIALOGS, HELD_OUT, STEPS = 2000, 32, 200


def expression(record: dict) -> str:
    return calls.parse_message(record["messages"][2]).arguments["query"]


def rates(path: Path, records: list[dict]) -> dict[str, float]:
    params, cfg, tok = generate.load_model(str(path), "byte")
    return synthetic.tool_use_rates(records, runner.model_generator(params, cfg, tok, max_new_tokens=64), tok)


@pytest.mark.slow
def test_tiny_model_learns_to_call_the_calculator(tmp_path):
    train = synthetic.calculator_dialogs(TRAIN_DIALOGS, seed=0, form=FORM)
    seen = {expression(r) for r in train}
    held_out = [r for r in synthetic.calculator_dialogs(4 * HELD_OUT, seed=1, form=FORM)
                if expression(r) not in seen][:HELD_OUT]
    synthetic.write_jsonl(tmp_path / "calc.jsonl", train)

    tok = ByteTokenizer()
    cfg = config.get("tiny")
    start = tmp_path / "fresh"
    checkpoint.save_params(str(start), model.init_params(cfg, jax.random.key(0)), cfg,
                           tokenizer={"name": tok.name, "sha256": tok.sha256})
    before = rates(start, held_out)

    # The longest dialog has ~290 bytes: one per row of 320.
    command = [sys.executable, "-m", "llama_jax.train", f"--config={SFT_TINY}:{tmp_path / 'calc.jsonl'}",
               f"--config.init_from={start}", f"--config.run_dir={tmp_path / 'sft'}", "--config.data.seq_len=320",
               f"--config.train.steps={STEPS}", f"--config.schedule.total_steps={STEPS}",
               f"--config.schedule.decay_steps={STEPS}", "--config.schedule.peak_lr=2e-3",
               "--config.schedule.warmup_steps=20", "--config.logging.eval_every=0", "--config.logging.every=50",
               "--config.logging.progress=False", f"--config.checkpoint.every={STEPS}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["step"] == STEPS
    after = rates(tmp_path / "sft", held_out)
    print(f"on {HELD_OUT} held-out questions, well-formed calls / right answers from the tool: before SFT "
          f"{before['calls']:.2f} / {before['answers']:.2f}, after {after['calls']:.2f} / {after['answers']:.2f}; "
          f"load average {os.getloadavg()[0]:.1f}")
    assert before == {"calls": 0.0, "answers": 0.0}  # random weights never write a call's ~40 exact bytes
    # 1.00 measured here; 0.92 and 1.00 in runs with other batch shapes and learning rates (150-200 steps).
    assert after["calls"] >= 0.75
