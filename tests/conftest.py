"""Suite-wide setup: 8 simulated CPU devices for sharding tests, and no model-hub access."""

import os

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite runs on the CPU; with libtpu (the [tpu] extra) installed jax would otherwise try, and fail, to start a
# TPU in every process. TPU compile-only devices (llama_jax.aot) do not need that backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
