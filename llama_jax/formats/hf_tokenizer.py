"""Our tokenizers as Hugging Face tokenizer files: ``tokenizer.json`` (a fast-tokenizer byte-level BPE built from
our ranks), ``tokenizer_config.json`` (with the Llama 3 chat template), ``special_tokens_map.json``, and the
``generation_config.json`` that stops at the chat's end tokens.

    files = tokenizer_files(get_tokenizer("llama3"), model_max_length=131_072)    # file name -> JSON dict
    config_ids(tok, vocab_size)          # {"bos_token_id", "eos_token_id"}: those the model's vocabulary holds
    generation_config(tok, vocab_size)   # the same, eos_token_id listing every stop id (end of text, message, turn)

``transformers.AutoTokenizer.from_pretrained(dir)`` then encodes like ours: text with <|begin_of_text|> first
(``encode(text, bos=True)``; ``add_special_tokens=False`` leaves it out) and chats with ``apply_chat_template``
like ``encode_dialog`` (content is not stripped; a tool call is <|python_tag|>content<|eom_id|>).

Why BPE merges reproduce tiktoken: tiktoken emits a pre-token found whole in the vocabulary as one id (the BPE
model's ``ignore_merges``), else repeatedly merges the adjacent pair whose concatenation has the lowest rank. The
merge list holds every split (a, b) of every token into two tokens, ordered by the rank of a + b, so the fast
tokenizer's "lowest merge first" picks the same pair.
"""

from __future__ import annotations

from typing import Any

from llama_jax.tokenizer import LLAMA3_PATTERN, Llama3Tokenizer, Tokenizer

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# The chat format of Tokenizer.encode_dialog, as a transformers chat template.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message.tool_call %}{{- '<|python_tag|>' + message['content'] + '<|eom_id|>' }}"
    "{%- else %}{{- message['content'] + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _byte_chars() -> list[str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table): printable Latin-1 bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _merges(vocab: list[str]) -> list[list[str]]:
    """Every split of every token into two tokens, ordered by the merged token's rank (then by the parts')."""
    rank = {token: i for i, token in enumerate(vocab)}
    merges = []
    for token in vocab:
        splits = [[token[:i], token[i:]] for i in range(1, len(token)) if token[:i] in rank and token[i:] in rank]
        merges += sorted(splits, key=lambda pair: (rank[pair[0]], rank[pair[1]]))
    return merges


def tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
    """The ``tokenizer.json`` of the tokenizers library for ``tok``."""
    chars = _byte_chars()
    vocab = ["".join(chars[b] for b in token) for token in tok.token_bytes()]  # one character per byte
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    if isinstance(tok, Llama3Tokenizer):  # split like tiktoken's pattern first; the byte tokenizer needs no split
        split = {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False}
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [split, byte_level]}
    else:
        pre_tokenizer = byte_level
    bos_id = tok.special_tokens[BOS]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for s, i in sorted(tok.special_tokens.items(), key=lambda item: item[1])],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
            "vocab": {token: i for i, token in enumerate(vocab)},
            "merges": _merges(vocab),
        },
    }


def config_ids(tok: Tokenizer | None, vocab_size: int) -> dict[str, int]:
    """``bos_token_id`` / ``eos_token_id`` for ``config.json``: each only where the model's vocabulary holds it."""
    if tok is None:
        return {}
    return {key: i for key, i in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)) if i < vocab_size}


def generation_config(tok: Tokenizer | None, vocab_size: int) -> dict[str, Any]:
    """``generation_config.json``: generation stops at end of text, end of message (a tool call) or end of turn."""
    config = config_ids(tok, vocab_size)
    stops = [] if tok is None else [i for i in (tok.eos_id, tok.eom_id, tok.eot_id) if i < vocab_size]
    if stops:
        config["eos_token_id"] = stops
    return config


def tokenizer_files(tok: Tokenizer, *, model_max_length: int) -> dict[str, dict[str, Any]]:
    """File name -> JSON dict of every tokenizer file of an HF model directory."""
    specials = {"bos_token": BOS, "eos_token": EOS}
    return {
        "tokenizer.json": tokenizer_json(tok),
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", **specials, "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
            "chat_template": CHAT_TEMPLATE,
        },
        "special_tokens_map.json": specials,
    }
