"""Long-context retrieval (needle in a haystack, multi-needle, passkey) over prompt lengths x needle depths: prompts
(``tasks``), exact-match scoring (``score``), the heatmap (``plot``), training corpora (``corpus``), the command."""

from llama_jax.eval.retrieval.command import main
from llama_jax.eval.retrieval.corpus import (
    copy_documents,
    training_documents,
    write_copy_corpus,
    write_training_corpus,
)
from llama_jax.eval.retrieval.plot import plot_heatmap
from llama_jax.eval.retrieval.score import (
    GenerateFn,
    RetrievalResult,
    checkpoint_generate_fn,
    evaluate,
    evaluate_checkpoint,
    is_correct,
    model_generate_fn,
)
from llama_jax.eval.retrieval.tasks import (
    HAYSTACK_FILLER,
    KEYS,
    PASSKEY_FILLER,
    WORDS,
    Sample,
    Task,
    default_max_new_tokens,
    encoded_filler,
    make_grid,
    make_sample,
    max_shortfall,
)

__all__ = ["HAYSTACK_FILLER", "KEYS", "PASSKEY_FILLER", "WORDS", "GenerateFn", "RetrievalResult", "Sample", "Task",
           "checkpoint_generate_fn", "copy_documents", "default_max_new_tokens", "encoded_filler", "evaluate",
           "evaluate_checkpoint", "is_correct", "main", "make_grid", "make_sample", "max_shortfall",
           "model_generate_fn", "plot_heatmap", "training_documents", "write_copy_corpus", "write_training_corpus"]
