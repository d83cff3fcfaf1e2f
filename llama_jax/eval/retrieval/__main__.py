"""``python -m llama_jax.eval.retrieval``: retrieval accuracy of a checkpoint (``llama_jax.eval.retrieval.command``;
``--help`` lists the flags)."""

from llama_jax.eval.retrieval.command import main

if __name__ == "__main__":
    raise SystemExit(main())
