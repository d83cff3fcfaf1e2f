"""Training: the state and the one generic step (step.py), one module per stage (pretrain, sft, reward, dpo), what
changes over time (phases.py, long_context.py), a run built from its config (build.py) and the loop (loop.py)."""

from llama_jax.train.step import (
    TrainState,
    abstract_state,
    create_state,
    make_eval_step,
    make_train_step,
    state_shardings,
)

__all__ = ["TrainState", "abstract_state", "create_state", "make_eval_step", "make_train_step", "state_shardings"]
