"""Deprecated for one release: this command is now ``python -m llama_jax.posttrain.score``."""

import sys

from llama_jax.posttrain.score import main

if __name__ == "__main__":
    print("deprecated: python -m llama_jax.score -> use python -m llama_jax.posttrain.score", file=sys.stderr)
    raise SystemExit(main())
