"""What Hugging Face and Meta directories do not say about a model, kept in a ``llama_jax.json`` next to the weights:
the tokenizer it was trained with (name + sha256) and, for Meta's params.json, the context length.

    write(path, cfg, tokenizer)             # by formats.hf.write and formats.meta.write
    tokenizer_identity(path, cfg)           # {"name", "sha256"} or None
    recorded_max_seq_len(path)              # int or None

Directories we did not write: the tokenizer is a ``tokenizer.model`` found there (Meta's releases ship one), else
the Llama 3 tokenizer when the vocabulary is Llama 3's 128,256 ids, else unknown (None: commands then ask for
``--tokenizer``). ``formats.meta`` infers the context length from the RoPE scaling when nothing records it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import llama_jax
from llama_jax.config import ModelConfig
from llama_jax.errors import CheckpointError, TokenizerError
from llama_jax.tokenizer import LLAMA3_NUM_RANKS, LLAMA3_NUM_SPECIALS, Llama3Tokenizer, Tokenizer, default_model_path

FILE = "llama_jax.json"
TOKENIZER_MODEL = "tokenizer.model"


def identity(tok: Tokenizer | None) -> dict[str, Any] | None:
    """What a checkpoint records of a tokenizer."""
    return None if tok is None else {"name": tok.name, "sha256": tok.sha256}


def write(path: str, cfg: ModelConfig, tokenizer: Tokenizer | None) -> None:
    with open(os.path.join(path, FILE), "w") as f:
        json.dump({"llama_jax_version": llama_jax.__version__, "tokenizer": identity(tokenizer),
                   "max_seq_len": cfg.max_seq_len}, f, indent=2)


def _read(path: str) -> dict[str, Any]:
    file = os.path.join(path, FILE)
    if not os.path.isfile(file):
        return {}
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from e


def recorded_max_seq_len(path: str) -> int | None:
    return _read(path).get("max_seq_len")


def _installed_llama3_sha256() -> str | None:
    try:
        return hashlib.sha256(default_model_path().read_bytes()).hexdigest()
    except (TokenizerError, OSError):  # llama-models is not installed
        return None


def tokenizer_identity(path: str, cfg: ModelConfig) -> dict[str, Any] | None:
    """The tokenizer of the HF or Meta directory ``path`` (see the module docstring), or None if unknown."""
    recorded = _read(path)
    if "tokenizer" in recorded:
        return recorded["tokenizer"]
    model_file = os.path.join(path, TOKENIZER_MODEL)
    if os.path.isfile(model_file):
        try:
            found = Llama3Tokenizer(model_file)
        except TokenizerError:
            return None  # another kind of tokenizer.model (a SentencePiece one): not ours to read
        same = found.sha256 == _installed_llama3_sha256()
        return {"name": "llama3" if same else os.path.abspath(model_file), "sha256": found.sha256}
    if cfg.vocab_size == LLAMA3_NUM_RANKS + LLAMA3_NUM_SPECIALS:
        return {"name": "llama3", "sha256": _installed_llama3_sha256()}
    return None
