"""Training: the train state and the one generic step (step.py), one module per stage (pretrain.py), the loop."""

from llama_jax.train.step import (
    TrainState,
    abstract_state,
    create_state,
    make_eval_step,
    make_train_step,
    state_shardings,
)

__all__ = ["TrainState", "abstract_state", "create_state", "make_eval_step", "make_train_step", "state_shardings"]
