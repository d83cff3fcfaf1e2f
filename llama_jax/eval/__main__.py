"""``python -m llama_jax.eval``: per-token loss, perplexity and bits per byte of a checkpoint on any data
(``llama_jax.eval.perplexity``; ``--help`` lists the flags)."""

from llama_jax.eval.perplexity import main

if __name__ == "__main__":
    raise SystemExit(main())
