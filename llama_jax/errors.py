"""The library's exceptions: every message names the file, key, shape or line at fault."""


class LlamaJaxError(Exception):
    """Base class of every error llama_jax raises on purpose."""


class ConfigError(LlamaJaxError, ValueError):
    """A model/experiment config, preset name or parameter tree that does not fit."""


class CheckpointError(LlamaJaxError):
    """A checkpoint or weight file that is missing, truncated or inconsistent."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files no longer hold what was saved (checksum mismatch, truncated, missing item)."""


class DataError(LlamaJaxError, ValueError):
    """Malformed input data: records, token ids, batch shapes."""


class TokenizerError(LlamaJaxError):
    """A tokenizer file that cannot be used, or text/ids it cannot handle."""
