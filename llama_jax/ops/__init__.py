"""Kernels below the network: attention (the mask, dense, context-parallel) and the quantized matmul.

Nothing here knows the Llama module; `llama_jax.model` calls these with explicit choices from its config.
"""
