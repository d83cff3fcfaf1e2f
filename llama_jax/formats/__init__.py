"""Weights in the world's formats: Hugging Face safetensors directories (`hf`) and Meta's consolidated .pth
directories (`meta`). Each module reads a directory into the llama_jax parameter tree (numpy, stored dtype kept)
and its ModelConfig, and writes one back; `llama_jax.checkpoint` is the front door (`load`, `export`)."""
