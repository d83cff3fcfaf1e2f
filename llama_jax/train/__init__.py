"""Training: the generic train state and step (state.py), stages' loss functions (pretrain.py), the loop."""

from llama_jax.train.state import (
    TrainState,
    abstract_state,
    create_state,
    make_eval_step,
    make_train_step,
    state_shardings,
)

__all__ = ["TrainState", "abstract_state", "create_state", "make_eval_step", "make_train_step", "state_shardings"]
