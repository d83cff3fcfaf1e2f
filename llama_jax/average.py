"""Deprecated for one release: this command is now ``python -m llama_jax.posttrain.average``."""

import sys

from llama_jax.posttrain.average import main

if __name__ == "__main__":
    print("deprecated: python -m llama_jax.average -> use python -m llama_jax.posttrain.average", file=sys.stderr)
    raise SystemExit(main())
