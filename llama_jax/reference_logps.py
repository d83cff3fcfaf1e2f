"""Deprecated for one release: this command is now ``python -m llama_jax.posttrain.reference_logps``."""

import sys

from llama_jax.posttrain.reference_logps import main

if __name__ == "__main__":
    print("deprecated: python -m llama_jax.reference_logps -> use python -m llama_jax.posttrain.reference_logps",
          file=sys.stderr)
    raise SystemExit(main())
