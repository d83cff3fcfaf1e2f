"""llama_jax: Meta's Llama 3.1 / 3.2 models and their training recipe in JAX and Flax."""

__version__ = "0.1.0"
