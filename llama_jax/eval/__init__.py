"""Evaluations of trained models, each a module with a Python API and a command (``python -m llama_jax.eval.<name>``).

    retrieval   needle-in-a-haystack, multi-needle and passkey retrieval over prompt lengths x needle depths
"""
