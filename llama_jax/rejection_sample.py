"""Deprecated for one release: this command is now ``python -m llama_jax.posttrain.rejection_sample``."""

import sys

from llama_jax.posttrain.rejection_sample import main

if __name__ == "__main__":
    print("deprecated: python -m llama_jax.rejection_sample -> use python -m llama_jax.posttrain.rejection_sample",
          file=sys.stderr)
    raise SystemExit(main())
