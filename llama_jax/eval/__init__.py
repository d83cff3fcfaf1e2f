"""Evaluations of trained models, each a module with a Python API and a command (``python -m llama_jax.eval.<name>``).

    perplexity  per-token loss, perplexity and bits per byte on any data llama_jax.data reads (also
                ``python -m llama_jax.eval``)
    harness     the lm-evaluation-harness adapter: ``python -m llama_jax.eval.harness --model llama_jax ...``
    retrieval   needle-in-a-haystack, multi-needle and passkey retrieval over prompt lengths x needle depths
    word_count  a synthetic instruction ("Write N words about X.") with a program as judge: post-training data,
                annotation of samples and win rates (``make posttrain-demo``)
"""
