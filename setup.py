from setuptools import find_packages, setup

setup(
    name="llama_jax",
    version="0.1.0",
    description="Llama 3.1 / 3.2 in JAX and Flax: model, pretraining, SFT, DPO, FP8 inference",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["llama_jax", "llama_jax.*"]),
    install_requires=[
        "jax==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "numpy==2.4.6",
        "ml_collections==1.1.0",
        "tiktoken==0.14.0",
        "safetensors==0.8.0",
        "grain==0.2.18",
        "tqdm",
        "tensorboardX==2.6.5",
    ],
    extras_require={
        "tokenizer": ["llama-models==0.3.0"],
        # Compile-only devices for `python -m llama_jax.plan --aot --topology ...` (no accelerator needed):
        "tpu": ["jax[tpu]==0.10.2"],  # TPU slices, through libtpu
        "cuda-aot": ["jax-cuda12-plugin==0.10.2"],  # H100s, through jax's CUDA plugin
        "test": [
            "pytest==9.0.3",
            "torch==2.13.0",
            "transformers==5.24.0",
            "llama-models==0.3.0",
            "ruff==0.17.6",
        ],
    },
)
