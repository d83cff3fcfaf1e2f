# Requirements are ranges, so llama_jax installs next to an existing stack (Colab, a GPU image, next month's numpy).
# Each lower bound is a version set tested together (tests/project/test_packaging.py installs the built wheel with
# every bound below pinned to its minimum); upper bounds only where a break is known. The exact versions `make test`,
# `make demo`, `make notebooks` and CI install are pinned in constraints.txt.
from setuptools import find_packages, setup

JAX = "jax>=0.9.2"

setup(
    name="llama_jax",
    version="0.1.0",
    description="Llama 3.1 / 3.2 in JAX and Flax: model, pretraining, SFT, tool use, FP8 inference",
    license="Apache-2.0",
    python_requires=">=3.11",  # jax >= 0.9 requires it
    packages=find_packages(include=["llama_jax", "llama_jax.*"]),
    install_requires=[
        JAX,
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12.3",  # older releases write no commit_success.txt on local disks (a save's end mark)
        "numpy>=2.3.0",
        "ml_dtypes>=0.5.0",
        "ml_collections>=1.0.0",
        "tiktoken>=0.9.0",
        "safetensors>=0.5.3",
        "tqdm>=4.66.0",
        "tensorboardX>=2.6.2.2",
    ],
    extras_require={
        "cuda": [JAX.replace("jax", "jax[cuda12]")],  # NVIDIA GPUs, CUDA 12 wheels from PyPI
        "cuda13": [JAX.replace("jax", "jax[cuda13]")],
        "tpu": [JAX.replace("jax", "jax[tpu]")],  # TPUs; also plan --aot --topology v5p:... without one (libtpu)
        # plan --aot --topology h100:8 without a GPU: jax's CUDA plugin compiles for a described H100 (no CUDA
        # libraries needed); it must be jaxlib's version (constraints.txt pins both).
        "cuda-aot": [JAX.replace("jax", "jax-cuda12-plugin")],
        "tokenizer": ["llama-models>=0.3.0"],  # ships Meta's Llama 3 tokenizer.model
        "plots": ["matplotlib>=3.9.0"],  # 3.8 wheels are built against numpy 1
        "eval": ["lm_eval>=0.4.13"],  # the lm-evaluation-harness adapter (llama_jax.eval.harness)
        "notebooks": ["matplotlib>=3.9.0", "nbconvert>=7.17.2", "ipykernel>=7.4.0"],
        "test": [
            "pytest>=9.0.0",
            "torch>=2.13.0",
            "transformers>=5.24.0",
            "llama-models>=0.3.0",
            "ruff>=0.17.6",
            "matplotlib>=3.9.0",
            "lm_eval>=0.4.13",
            "accelerate>=1.15.0",  # lm-eval's own hf model: the reference the lm-eval adapter is compared with
            "peft>=0.22.0",  # the reference our LoRA adapters are compared with (llama_jax.lora)
            "nbclient>=0.11.0",
            "ipykernel>=7.4.0",
        ],
    },
)
