"""Phases: the batch ramp at the paper's numbers, a ramp followed by a long-context extension as one plan, and the
batches each phase shapes from its stream."""

import runpy

import numpy as np
import pytest
from conftest import ROOT

from llama_jax.errors import ConfigError
from llama_jax.train import phases
from llama_jax.train.build import model_config, plan_phases

MESH = dict(data=1, pipeline=1, fsdp=1, tensor=1, sequence=1)


def test_paper_batch_ramp():
    """4M tokens per step at seq 4096 -> 8M at seq 8192 after 252M tokens -> 16M after 2.87T tokens, all from
    one stream of 4M-token data batches (512 rows x 8192): 1, then 2, then 4 batches a step."""
    points = phases.parse_ramp([dict(start_tokens=0, seq_len=4096, batches=1),
                                dict(start_tokens=252e6, seq_len=8192, batches=2),
                                dict(start_tokens=2.87e12, seq_len=8192, batches=4)], data_seq_len=8192)
    per_batch = 512 * 8192  # 4,194,304 tokens
    plan = phases.Plan(tuple(phases.ramp_phases(points, data_rows=512, data_seq_len=8192, grad_accum=1, mesh=MESH)))
    first_8k = 61  # 60 steps of 4M tokens are 251.7M < 252M; after 61 steps, 255.9M
    first_16m = first_8k + 342_101  # (2.87e12 - 61 * 4M) / 8M = 342,100.2 -> 342,101 steps of 8M tokens
    assert [(p.start_step, p.end_step) for p in plan.phases] == [(0, first_8k), (first_8k, first_16m),
                                                                 (first_16m, None)]
    assert [(p.rows, p.seq_len, p.batches, p.batch_tokens) for p in plan.phases] == [
        (1024, 4096, 1, per_batch), (1024, 8192, 2, 2 * per_batch), (2048, 8192, 4, 4 * per_batch)]
    assert [p.microbatch_tokens for p in plan.phases] == [per_batch] * 3  # more microbatches, not larger ones
    assert plan.at(first_8k - 1).index == 0 and plan.at(first_8k).index == 1 and plan.at(10**9).index == 2
    tokens = first_8k * per_batch + (first_16m - first_8k) * 2 * per_batch
    assert tokens >= 2.87e12 > tokens - 2 * per_batch
    with pytest.raises(ConfigError, match="divide"):
        phases.parse_ramp([dict(start_tokens=0, seq_len=3000)], data_seq_len=8192)


def test_a_ramp_then_an_extension_is_one_plan_of_contiguous_phases():
    """The ramp's phases end where the extension starts (a ramp phase cut short there); the extension's phases
    are numbered after them and read their own streams; the learning rate follows each phase's own line."""
    c = runpy.run_path(str(ROOT / "configs" / "pretrain" / "tiny.py"))["get_config"]()
    c.data.update(seq_len=128, batch_size=4)
    c.schedule.ramp = [dict(start_tokens=0, seq_len=64, batches=1), dict(start_tokens=2048, seq_len=128, batches=2)]
    c.long_context.start_step = 6
    c.long_context.phases = [dict(seq_len=256, steps=3, lr=1e-3), dict(seq_len=512, steps=2)]
    plan, extension = plan_phases(c, model_config(c.model))
    got = [(p.index, p.start_step, p.end_step, p.rows, p.seq_len, p.batches, p.stream) for p in plan.phases]
    assert got == [(0, 0, 4, 8, 64, 1, -1), (1, 4, 6, 8, 128, 2, -1), (2, 6, 9, 2, 256, 1, 0),
                   (3, 9, 11, 1, 512, 1, 1)]  # the tokens of a data batch (4 x 128) per step
    assert extension.phases == plan.phases[2:] and plan.end_step == 11
    assert plan.owner(-1) is None and plan.owner(1) is plan.phases[3]
    schedule = plan.schedule(lambda step: 7.0)
    np.testing.assert_allclose([float(schedule(s)) for s in (5, 6, 8, 9)], [7.0, 1e-3, 1e-3, 7.0], rtol=1e-6)


class _Stream:
    """Numbered [rows, seq] batches: batch i holds i everywhere."""

    def __init__(self, rows, seq):
        self.rows, self.seq, self.count = rows, seq, 0

    def __next__(self):
        self.count += 1
        full = np.full((self.rows, self.seq), self.count, np.int32)
        return {"tokens": full, "positions": np.broadcast_to(np.arange(self.seq, dtype=np.int32), full.shape)}

    def get_state(self):
        return {"count": self.count}

    def set_state(self, state):
        self.count = state["count"]

    skipped = ()


def test_phased_batches_concatenate_cut_and_reorder_each_phases_rows():
    base = _Stream(2, 8)
    data = phases.PhasedBatches(base, lambda k: _Stream(1, 16), base_seq_len=8)
    ramp = phases.Phase(index=0, start_step=0, end_step=1, seq_len=4, rows=8, grad_accum=2, mesh=MESH, batches=2)
    data.enter(ramp)
    batch = next(data)
    assert batch["tokens"].shape == (8, 4) and sorted(set(batch["tokens"][:, 0])) == [1, 2]
    assert batch["positions"][0].tolist() == [0, 1, 2, 3] and batch["positions"][1].tolist() == [4, 5, 6, 7]
    ring = phases.Phase(index=1, start_step=1, end_step=2, seq_len=16, rows=1, grad_accum=1, stream=0,
                        mesh=dict(MESH, sequence=2))
    data.enter(ring)
    batch = next(data)
    assert batch["positions"][0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]  # zig-zag
    data.memo["reference_loss"] = 1.5
    state = data.get_state()
    assert state["phases"] == {"stream": 0, "memo": {"reference_loss": 1.5}} and state["count"] == 1
    resumed = phases.PhasedBatches(_Stream(2, 8), lambda k: _Stream(1, 16), base_seq_len=8)
    resumed.set_state(state)
    assert resumed.stream == 0 and resumed.memo == {"reference_loss": 1.5}
