"""Text generation with a KV cache: batched prefill, a jitted decode step, sampling, streaming.

    outs = generate(params, cfg, [[128000, 9906], [128000, 40, 1093]], max_new_tokens=32)   # greedy
    outs = generate(params, cfg, prompts, 64, temperature=0.7, top_p=0.9, seed=1)
    outs = generate(params, cfg, prompts, 64, temperature=1.0, samples_per_prompt=8)   # 8 rows per prompt
    outs = generate(params, cfg, prompts[8:16], 64, temperature=0.7, first_request=8)    # rows 8..15 of one batch
    for new in stream(params, cfg, prompts, 64): ...      # per step: one token (or None) per prompt

CLI: ``python -m llama_jax.generate --checkpoint PATH --prompt "Once upon a time" [--mesh tensor=8]``.
Low-rank adapters run unmerged over the checkpoint, several over one base loaded once, each prompt completed under
each (one result per adapter, under "adapters" in the JSON line):
``python -m llama_jax.generate --checkpoint BASE --adapter sft=runs/sft-lora --adapter theirs=peft-dir/ --prompt ..``.

How a batch of prompts of different lengths is run: prompts are right-padded to one length T and
prefilled together; pad slots get segment id 0, so no real token ever attends to them. Each row then
decodes at its own RoPE position (its prompt length + step) while all rows write the same cache slot
(T + step): the cache mask works by slot index, and the positions carry the true distances.

Several samples of one prompt (``samples_per_prompt`` K, rejection sampling's best-of-K): each prompt is
prefilled once, and its KV cache and next-token distribution are broadcast to its K rows (rows i K .. i K + K - 1),
which then decode as a batch of P K rows. That gives exactly the samples of K separate prefills of the prompt
(the same rows, the same random numbers), for 1 / K of the prefill compute.

Per-request keys, as serving engines give each request its own generator: row r of a call is request
``first_request + r``, and its token at position p is drawn with ``fold_in(fold_in(key(seed), request), p)``. A row's
samples so depend on the seed, its request number and its own tokens, never on the rows that share its batch: the
same prompts give the same samples in batches of any size (a caller that splits work into batches passes each batch's
``first_request``). Greedy decoding draws nothing.

The cache is preallocated at the model's GQA shape ``[L, B, S, K, H]`` and donated to every step, so
XLA updates it in place. The host reads step i's tokens while the device already runs step i + 1.
Generated lists include the stop token that ended them (callers see *why* a row stopped: a tool
call ends with <|eom_id|>, a turn with <|eot_id|>).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import checkpoint, cli, lora, model, sharding
from llama_jax.checkpoint import checksums
from llama_jax.config import LoRA, ModelConfig
from llama_jax.errors import CheckpointError, ConfigError, DataError
from llama_jax.formats import peft
from llama_jax.ops import quantized
from llama_jax.tokenizer import LLAMA3_STOP_IDS, Tokenizer, get_tokenizer  # stop ids beyond a small vocab never occur

_PROMPT_BUCKET, _CACHE_BUCKET = 32, 64  # lengths are rounded up to these multiples (fewer recompilations)

_CACHE_AXES = {  # logical axes of the KV cache, mapped to the mesh by the library's one rules table
    "k": ("layers", "batch", None, "kv_heads", "head_dim"),
    "v": ("layers", "batch", None, "kv_heads", "head_dim"),
    "positions": ("batch", None),
    "segment_ids": ("batch", None),
    "index": (),
}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits (hashable: it is a static argument of the jitted steps)."""

    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int | None = None  # keep only the k most likely tokens
    top_p: float | None = None  # keep the smallest set of most likely tokens whose mass reaches p
    vocab_size: int | None = None  # only ids below this are drawn: the tokenizer's, when the model's vocabulary
    #                                is padded beyond it (None: every id of the model)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise ConfigError(f"vocab_size must be a positive int or None, got {self.vocab_size!r}")


def sample(logits: jax.Array, keys: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B, V] float32 and one PRNG key per row [B] -> token ids [B] int32."""
    if sampling.vocab_size is not None and sampling.vocab_size < logits.shape[-1]:
        known = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) < sampling.vocab_size
        logits = jnp.where(known, logits, -jnp.inf)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth_largest = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The most likely token always has zero mass before it, so at least one token survives.
        cutoff = jnp.min(jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def token_keys(request_keys: jax.Array, positions: jax.Array) -> jax.Array:
    """The key of each row's next token [B]: its request's key [B] folded with the token's position [B]."""
    return jax.vmap(jax.random.fold_in)(request_keys, positions)


def request_keys(seed: int, first_request: int, rows: int) -> jax.Array:
    """The keys [rows] of requests ``first_request`` .. ``first_request + rows - 1`` of ``seed``."""
    if not isinstance(first_request, int) or not 0 <= first_request <= 2**32 - rows:
        raise ConfigError(f"first_request must be an int in [0, 2**32 - rows], got {first_request!r}")
    requests = np.arange(first_request, first_request + rows, dtype=np.uint32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), requests)


def inference_layout(params, cfg: ModelConfig):
    """(params, cfg) in the per-layer layout that decodes fastest, made once. Decode is memory-bound: per layer,
    XLA reads each weight in place, where a scan copies every layer's slice each step (~1.5x faster decode on CPU;
    slicing a stacked tree inside the step is no cure: XLA then materialises all slices)."""
    if cfg.scan_layers:
        params = model.unstack_layers(params, cfg.num_layers)
    return params, cfg.replace(scan_layers=False)


def prefill_logits(params, cache, tokens, lengths, cfg: ModelConfig):
    """Right-padded prompts [B, T] with true ``lengths`` [B] -> (logits [B, V] after each prompt, cache)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)  # pads: 0, never attended to
    hidden, cache = model.Llama(cfg).apply({"params": params}, tokens, positions, segment_ids, cache=cache,
                                           output="hidden")  # [B, T, D]
    last = hidden[jnp.arange(b), lengths - 1]  # [B, D]: only each prompt's last position needs logits
    head = model.lm_head_kernel(params, cfg).astype(last.dtype)
    logits = jnp.einsum("BD,DV->BV", last, head, preferred_element_type=jnp.float32,
                        precision=cfg.resolved_matmul_precision)
    return logits, cache


def decode_logits(params, cache, tokens, positions, cfg: ModelConfig):
    """One token per row [B] at RoPE ``positions`` [B], written to the cache's next slot -> (logits [B, V], cache)."""
    logits, cache = model.Llama(cfg).apply({"params": params}, tokens[:, None], positions[:, None],
                                           jnp.ones_like(tokens)[:, None], cache=cache)  # [B, 1, V]
    return logits[:, 0], cache


def _constrain(cache: dict) -> dict:
    return {name: nn.with_logical_constraint(x, _CACHE_AXES[name]) for name, x in cache.items()}


def broadcast_cache(cache: dict, samples: int) -> dict:
    """A prefilled cache of P rows -> P * samples rows, row i repeated ``samples`` times (rows i K .. i K + K - 1)."""
    batch_axis = {"k": 1, "v": 1, "positions": 0, "segment_ids": 0}
    return {name: x if name == "index" else jnp.repeat(x, samples, axis=batch_axis[name]) for name, x in cache.items()}


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "cache_len", "samples"))
def _prefill(params, tokens, lengths, keys, *, cfg: ModelConfig, sampling: Sampling, cache_len: int,
             samples: int = 1):
    """Creates the cache (laid out by its logical axes when a mesh is active), fills it with the prompts, and
    broadcasts it and the next-token logits to ``samples`` rows per prompt; ``keys``: one per row, the requests'."""
    cache = _constrain(model.init_cache(cfg, tokens.shape[0], cache_len))
    logits, cache = prefill_logits(params, cache, tokens, lengths, cfg)
    if samples > 1:
        logits, cache = jnp.repeat(logits, samples, axis=0), _constrain(broadcast_cache(cache, samples))
    return sample(logits, token_keys(keys, jnp.repeat(lengths, samples)), sampling), cache  # the first new position


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"), donate_argnames=("cache",))
def _decode_step(params, cache, tokens, positions, keys, *, cfg: ModelConfig, sampling: Sampling):
    """Feeds ``tokens`` [B] at ``positions`` [B]; returns the tokens [B] drawn for positions + 1 with the requests'
    ``keys`` [B], positions + 1 and the updated cache."""
    logits, cache = decode_logits(params, cache, tokens, positions, cfg)
    return sample(logits, token_keys(keys, positions + 1), sampling), positions + 1, cache


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_prompts(prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int) -> None:
    """Raises DataError for prompts the model cannot continue by ``max_new_tokens`` tokens."""
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise DataError("prompts must be a non-empty list of token-id lists")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise DataError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) or not len(prompt):
            raise DataError(f"prompt {i} is {'a str' if isinstance(prompt, str) else 'empty'}; each prompt must be "
                            "a non-empty list of token ids (start it with <|begin_of_text|>)")
        ids = np.asarray(prompt)
        if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1:
            raise DataError(f"prompt {i} must be a flat list of int token ids, got {ids.dtype} shape {ids.shape}")
        bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
        if bad.size:
            raise DataError(f"prompt {i} has token id(s) {sorted(set(bad.tolist()))[:8]} outside the model's "
                            f"vocabulary [0, {cfg.vocab_size})")
        if len(prompt) + max_new_tokens > cfg.max_seq_len:
            raise DataError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it needs "
                            f"{len(prompt) + max_new_tokens} positions but the model's max_seq_len (KV cache "
                            f"limit) is {cfg.max_seq_len}")


def stream(
    params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_ids: Sequence[int] = LLAMA3_STOP_IDS,
    mesh=None,
    vocab_size: int | None = None,
    samples_per_prompt: int = 1,
    first_request: int = 0,
) -> Iterator[list[int | None]]:
    """Yields, step by step, one new token per row (None once that row has stopped).

    A row stops after emitting one of ``stop_ids`` or ``max_new_tokens`` tokens; the iteration ends
    when every row has stopped. ``mesh`` (from ``llama_jax.sharding.make_mesh``) runs the steps
    sharded by the library's logical-axis rules, e.g. tensor-parallel decode on ``"tensor=8"``.
    ``vocab_size``: draw only ids below it (pass the tokenizer's, so every id decodes; the tiny preset's 512 ids
    hold the byte tokenizer's 264, and a random or briefly trained model gives the others mass).
    ``samples_per_prompt`` K: K rows per prompt (rows i K .. i K + K - 1 continue prompt i) from one prefill
    of each prompt (see the module docstring). Row r samples as request ``first_request + r`` of ``seed``, whatever
    rows share its call (see the module docstring).
    """
    check_prompts(prompts, cfg, max_new_tokens)
    sampling = Sampling(temperature, top_k, top_p, vocab_size)
    if not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
        raise ConfigError(f"samples_per_prompt must be an int >= 1, got {samples_per_prompt!r}")
    if max_new_tokens == 0:
        return
    cfg = cfg.replace(remat="none")  # nothing to recompute without a backward pass
    lengths = np.array([len(p) for p in prompts], np.int32)
    # Padded prompt length and cache slots (the padded prompt, then one per fed-back token: the last new
    # token is never fed back) are rounded up, so calls of similar length reuse the compiled steps.
    batch = len(prompts)
    prompt_len = min(_round_up(int(lengths.max()), _PROMPT_BUCKET), cfg.max_seq_len - max_new_tokens + 1)
    cache_len = min(_round_up(prompt_len + max_new_tokens - 1, _CACHE_BUCKET), cfg.max_seq_len)
    tokens = np.zeros((batch, prompt_len), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    rows = batch * samples_per_prompt
    keys = request_keys(seed, first_request, rows)
    if mesh is not None:
        params = _shard_for_decode(params, cfg, mesh, rows, cache_len)
    prefill = _on_mesh(mesh, functools.partial(_prefill, cfg=cfg, sampling=sampling, cache_len=cache_len,
                                               samples=samples_per_prompt))
    decode_step = _on_mesh(mesh, functools.partial(_decode_step, cfg=cfg, sampling=sampling))
    new, cache = prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), keys)
    positions = jnp.asarray(np.repeat(lengths, samples_per_prompt))
    stops = np.asarray(list(stop_ids), np.int64)
    active = np.ones(rows, bool)
    for step in range(max_new_tokens):
        current = new
        if step + 1 < max_new_tokens:  # queue the next step before reading this one back to the host
            new, positions, cache = decode_step(params, cache, current, positions, keys)
        host = np.asarray(current)
        yield [int(tok) if alive else None for tok, alive in zip(host, active)]
        active &= ~np.isin(host, stops)
        if not active.any():
            return


def generate(
    params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_ids: Sequence[int] = LLAMA3_STOP_IDS,
    mesh=None,
    on_token: Callable[[int, int], None] | None = None,
    vocab_size: int | None = None,
    samples_per_prompt: int = 1,
    first_request: int = 0,
) -> list[list[int]]:
    """Continues each prompt (a list of token ids); returns the new ids per row, prompt excluded (with
    ``samples_per_prompt`` K, K rows per prompt: row i K + j is prompt i's sample j).

    Greedy when ``temperature`` is 0, otherwise sampled (optionally restricted by ``top_k`` / ``top_p``)
    with a PRNG seeded by ``seed``, row r as request ``first_request + r`` (independent of the other rows).
    ``on_token(row, token)`` is called for each token as it is produced.
    ``vocab_size``: draw only ids below it (the tokenizer's; see ``stream``).
    """
    rows = len(prompts) * samples_per_prompt if not isinstance(prompts, (str, bytes)) else 0
    outputs: list[list[int]] = [[] for _ in range(rows)]
    for new in stream(params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, mesh,
                      vocab_size, samples_per_prompt, first_request):
        for row, token in enumerate(new):
            if token is not None:
                outputs[row].append(token)
                if on_token is not None:
                    on_token(row, token)
    return outputs


# --- Sharded decode ---------------------------------------------------------------------------------

def _on_mesh(mesh, fn):
    """``fn`` called with ``mesh`` current and the logical rules installed (unchanged when mesh is None)."""
    if mesh is None:
        return fn

    def run(*args):
        with sharding.activate(mesh):
            return fn(*args)

    return run


def param_shardings(params, cfg: ModelConfig, mesh):
    """NamedShardings for ``params`` by their logical axes, quantized trees included (a kernel's per-channel
    scale is split like the kernel's output axis)."""
    return sharding.logical_to_sharding(quantized.logical_axes(params, model.logical_axes(cfg)), mesh)


def _shard_for_decode(params, cfg: ModelConfig, mesh, batch: int, cache_len: int):
    """Params placed on the mesh, after checking that it divides them and the cache it will shard."""
    target = param_shardings(params, cfg, mesh)
    sharding.check_divisible(params, target)
    cache_shapes = jax.eval_shape(lambda: model.init_cache(cfg, batch, cache_len))
    sharding.check_divisible(cache_shapes, sharding.logical_to_sharding(
        {name: jax.sharding.PartitionSpec(*a) for name, a in _CACHE_AXES.items()}, mesh))
    return jax.device_put(params, target)


# --- CLI ---------------------------------------------------------------------------------------------


def load_model(path: str, tokenizer: str | None = None, adapter: str | None = None):
    """(params in the per-layer inference layout, its cfg, tokenizer) from any checkpoint ``checkpoint.load`` reads;
    with ``adapter`` (see ``read_adapters``), params and cfg run those adapters unmerged over it."""
    [(params, cfg)], tok = load_variants(path, tokenizer, [adapter] if adapter else [])
    return params, cfg, tok


def load_variants(path: str, tokenizer: str | None, adapters: Sequence[str]) -> tuple[list[tuple[Any, ModelConfig]],
                                                                                       Tokenizer]:
    """The model at ``path`` loaded once, and for each of ``adapters`` (paths: see ``read_adapters``) its (params,
    cfg) with those adapters run unmerged over it; the base alone, [(params, cfg)], without adapters. In the
    per-layer inference layout; the base's arrays are shared by every variant. And the tokenizer."""
    params, cfg, metadata = checkpoint.load(path)
    name = tokenizer or (metadata.get("tokenizer") or {}).get("name") or "llama3"
    tok = get_tokenizer(name)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer {tok.name!r} has {tok.vocab_size} ids but the checkpoint's model only "
                          f"{cfg.vocab_size}; pass the tokenizer it was trained with (--tokenizer)")
    if not adapters:
        return [inference_layout(params, cfg)], tok
    if not cfg.scan_layers:
        params, cfg = model.stack_layers(params, cfg.num_layers), cfg.replace(scan_layers=True)
    # What a run with adapters pinned as its base (train/build.start_from): the Llama leaves, stacked.
    digest = checksums.tree_digest({k: params[k] for k in model.param_shapes(cfg)})
    read = [read_adapters(adapter, cfg, digest, path) for adapter in adapters]
    base, base_cfg = inference_layout(params, cfg)
    del params  # the stacked copy: the variants share the per-layer one
    return [(lora.join(base, model.unstack_layers(tree, cfg.num_layers)), base_cfg.replace(lora=spec))
            for tree, spec in read], tok


def read_adapters(path: str, cfg: ModelConfig, base_digest: str, base_path: str) -> tuple[dict, LoRA]:
    """(adapters, their LoRA) for the base model of ``cfg`` (stacked), whose ``checksums.tree_digest`` is
    ``base_digest``. ``path``: a PEFT adapter directory (its shapes checked against the base by ``formats.peft``), or
    a llama_jax run or step directory trained with config.lora, refused unless its pinned base (init_from) is this
    one, by checksum."""
    if os.path.isfile(os.path.join(path, peft.CONFIG_FILE)):
        return peft.read(path, cfg)
    if not (checkpoint.is_checkpoint_dir(path) or os.path.isdir(os.path.join(path, checkpoint.CHECKPOINTS_DIR))):
        raise ConfigError(f"--adapter {path} is neither a PEFT adapter directory ({peft.CONFIG_FILE}) nor a llama_jax "
                          "run or step directory")
    adapters, adapter_cfg, metadata = checkpoint.load(path, merge_adapters=False)
    if adapter_cfg.lora is None:
        raise ConfigError(f"--adapter {path} holds no adapters (it was not trained with config.lora); a full "
                          "checkpoint is a --checkpoint")
    pinned = metadata.get("init_from") or {}
    if pinned.get("checksum") != base_digest:
        raise CheckpointError(f"--adapter {path} was trained over {pinned.get('source_dir')} (checksum "
                              f"{str(pinned.get('checksum'))[:16]}...), not over --checkpoint {base_path} (checksum "
                              f"{base_digest[:16]}...): run it over the base it was trained on")
    return adapters, adapter_cfg.lora


def named_adapters(specs: Sequence[str]) -> dict[str, str]:
    """``--adapter`` values, ``[NAME=]PATH``, as {name: path}; a name is its path unless given."""
    named: dict[str, str] = {}
    for spec in specs:
        name, equals, path = spec.partition("=")
        name, path = (name, path) if equals and name and "/" not in name else (spec, spec)
        if name in named:
            raise ConfigError(f"--adapter {spec}: the name {name!r} is taken by --adapter {named[name]}; name each "
                              "adapter once (NAME=PATH)")
        named[name] = path
    return named


def print_stream(tok, token_stream: Iterator[int], out=None) -> list[int]:
    """Writes decoded text to ``out`` (default stdout) as tokens arrive, holding back incomplete UTF-8;
    returns the ids."""
    out = out or sys.stdout
    ids: list[int] = []
    shown = ""
    for token in token_stream:
        ids.append(token)
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):  # a multi-byte character may still be incomplete
            out.write(text[len(shown):])
            out.flush()
            shown = text
    out.write(tok.decode(ids)[len(shown):])
    out.flush()
    return ids


parser = cli.parser("python -m llama_jax.generate", __doc__.split("\n")[0])
cli.add_checkpoint(parser)
cli.add_adapter(parser, repeated=True)
cli.add_tokenizer(parser)
cli.add_sampling(parser)
cli.add_max_new_tokens(parser)
cli.add_seed(parser)
cli.add_mesh(parser)
parser.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable: a batch)")
cli.add_no_bos(parser)


def run(args: argparse.Namespace) -> dict:
    adapters = named_adapters(args.adapter)
    variants, tok = load_variants(args.checkpoint, args.tokenizer, list(adapters.values()))
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    texts = [cli.terminal_text(text, f"--prompt {i + 1}") for i, text in enumerate(args.prompt)]
    prompts = [tok.encode(text, bos=not args.no_bos) for text in texts]
    sampling = dict(cli.sampling_kwargs(args), stop_ids=tok.stop_ids, mesh=mesh, vocab_size=tok.vocab_size)
    if not adapters:
        [(params, cfg)] = variants
        return complete(params, cfg, tok, texts, prompts, args.max_new_tokens, sampling)
    # Every adapter gets the same prompts and the same seed: each result is what that adapter alone would give.
    results = {}
    for name, (params, cfg) in zip(adapters, variants):
        if len(adapters) > 1:
            print(f"[adapter {name}]")
        results[name] = complete(params, cfg, tok, texts, prompts, args.max_new_tokens, sampling)
    return {"adapters": results}


def complete(params, cfg: ModelConfig, tok, texts: list[str], prompts: list[list[int]], max_new_tokens: int,
             sampling: dict) -> dict:
    """Prints each prompt's text and its continuation (streamed when there is one prompt); the completions."""
    if len(prompts) == 1:  # stream a single prompt as it is generated
        sys.stdout.write(texts[0])
        steps = stream(params, cfg, prompts, max_new_tokens, **sampling)
        outputs = [print_stream(tok, (new[0] for new in steps))]
        sys.stdout.write("\n")
    else:
        outputs = generate(params, cfg, prompts, max_new_tokens, **sampling)
        for text, ids in zip(texts, outputs):
            print(text + tok.decode(ids))
    return {"completions": [tok.decode(ids) for ids in outputs], "tokens": [len(ids) for ids in outputs]}


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
