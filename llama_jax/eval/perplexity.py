"""Per-token loss, perplexity and bits per byte of any checkpoint on any data llama_jax.data reads.

    python -m llama_jax.eval --checkpoint runs/demo                       # the run's own held-out data, as it logs it
    python -m llama_jax.eval --checkpoint Llama-3.2-1B/ --data wiki.txt --seq-len 2048 --mesh fsdp=8
    python -m llama_jax.eval --checkpoint runs/sft --data chats.jsonl     # chat: the assistant's tokens only
    python -m llama_jax.eval --checkpoint runs/8b --config configs/pretrain/llama3_8b.py:/data/*.jsonl

    scores = evaluate(params, cfg, batches, tokenizer, mesh=mesh)          # Python: any iterable of data batches
    scores.loss, scores.perplexity, scores.bits_per_byte
    scores.loss_by_position                                                # [T]: mean loss at each position

Data: ``--data PATH[:FORMAT]`` (repeatable; text, JSONL, .npy token arrays, chat JSONL; see ``data.source_spec``),
every document of it (``--split all``); or an experiment config's data section (``--config``), or without either the
data section the checkpoint was trained with: then the held-out documents (``--split heldout``), by default only
the batches the training loop evaluates (``logging.eval_batches``), in the same order and packing, so the result is
the run's logged eval loss. ``--max-batches 0`` scores the whole split. ``--batch-size`` rows per batch: the data
config's, 8 with --data. ``--tokenizer`` (else the checkpoint's, else the data config's) reads the data.

What is counted: every target the batch's ``loss_mask`` keeps (documents: each next token inside a document, its
end-of-text included; chats: the assistant's tokens). ``loss`` is their mean negative log-likelihood (nats),
``perplexity`` its exp, ``bits_per_byte`` the summed loss in bits over the UTF-8 bytes of those targets (special
tokens count in the loss, not in the bytes). ``batch_mean_loss`` is the mean of each batch's mean: the figure the
training loop logs as ``eval_loss`` (equal to ``loss`` when every batch has as many targets). The batches are
sharded over ``--mesh`` like training batches; the JSON result is the last line of stdout.

``loss_by_position[p]`` is the mean loss of the targets predicted at position ``p`` (the batch's ``positions``, which
restart per document: the token after the first ``p + 1`` tokens of its document), NaN where none was scored; it
shows how a model fares at and past the context length it was trained on. ``--by-position`` adds it (null for
NaN) and ``tokens_by_position`` to the JSON result.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import checkpoint, cli, model, sharding
from llama_jax.config import ModelConfig
from llama_jax.data import make_batches, source_kind
from llama_jax.data.batches import DEFAULTS
from llama_jax.errors import ConfigError
from llama_jax.losses import chunked_cross_entropy
from llama_jax.tokenizer import Tokenizer, from_identity

SPLITS = ("all", "heldout")


@dataclasses.dataclass
class Scores:
    """Sums over the scored targets of all batches."""

    nll: float = 0.0  # summed negative log-likelihood, nats
    tokens: int = 0  # targets scored
    bytes: int = 0  # UTF-8 bytes of those targets
    batches: int = 0
    batch_losses: list[float] = dataclasses.field(default_factory=list)  # each batch's mean loss
    nll_by_position: np.ndarray | None = None  # float64 [T]: summed loss of the targets predicted at position p
    tokens_by_position: np.ndarray | None = None  # int64 [T]: how many such targets were scored

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    @property
    def loss_by_position(self) -> np.ndarray:
        """float64 [T]: mean loss at each position (NaN where nothing was scored)."""
        if self.nll_by_position is None:
            return np.zeros(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.tokens_by_position > 0, self.nll_by_position / self.tokens_by_position, np.nan)

    @property
    def batch_mean_loss(self) -> float:
        return float(np.mean(self.batch_losses)) if self.batch_losses else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "batch_mean_loss": self.batch_mean_loss, "tokens": self.tokens, "bytes": self.bytes,
                "batches": self.batches}


def byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """int32 [V]: UTF-8 bytes of each id's text (0 for special and unused ids)."""
    lengths = np.zeros(vocab_size, np.int32)
    pieces = tokenizer.token_bytes()
    lengths[: len(pieces)] = [len(piece) for piece in pieces]
    return lengths


def make_scorer(cfg: ModelConfig, mesh: jax.sharding.Mesh, *, chunk_size: int | None = 8192):
    """``score(params, batch, lengths) -> {"nll", "tokens", "bytes", "nll_by_position", "tokens_by_position"}``: sums
    over a [B, T] batch (the last two per position, [T]), jitted on ``mesh``."""
    network = model.Llama(cfg)

    def sums(params, batch, lengths):
        hidden = network.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                               output="hidden")  # [B, T, D]
        head = model.lm_head_kernel(params, cfg).astype(jnp.dtype(cfg.dtype))  # [D, V]
        nll, _ = chunked_cross_entropy(hidden, head, batch["targets"], chunk_size,
                                       precision=cfg.resolved_matmul_precision)  # [B, T], as the training loss
        mask = batch["loss_mask"].astype(jnp.float32)
        length = batch["positions"].shape[1]  # data's positions restart per document and row: all < T
        per_position = [jax.ops.segment_sum(x.ravel(), batch["positions"].ravel(), num_segments=length)
                        for x in (nll * mask, mask)]  # 2 x [T]
        return {"nll": (nll * mask).sum(), "tokens": mask.sum(), "bytes": (lengths[batch["targets"]] * mask).sum(),
                "nll_by_position": per_position[0], "tokens_by_position": per_position[1]}

    jitted = jax.jit(sums)

    def score(params, batch: Mapping[str, np.ndarray], lengths) -> dict[str, Any]:
        with sharding.activate(mesh):
            out = jitted(params, sharding.shard_batch(batch, mesh), lengths)
        return {k: float(v) if v.ndim == 0 else np.asarray(v, np.float64) for k, v in jax.device_get(out).items()}

    return score


def evaluate(params, cfg: ModelConfig, batches: Iterable[Mapping[str, np.ndarray]], tokenizer: Tokenizer, *,
             mesh: jax.sharding.Mesh | None = None, chunk_size: int | None = 8192) -> Scores:
    """Scores of ``params`` on ``batches`` (dicts of int32 [B, T] arrays with llama_jax.data's keys)."""
    mesh = mesh or sharding.make_mesh()
    score = make_scorer(cfg, mesh, chunk_size=chunk_size)
    lengths = jax.device_put(byte_lengths(tokenizer, cfg.vocab_size),
                             jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    scores = Scores()
    for batch in batches:
        sums = score(params, batch, lengths)
        scores.nll += sums["nll"]
        scores.tokens += int(sums["tokens"])
        scores.bytes += int(sums["bytes"])
        scores.batches += 1
        scores.batch_losses.append(sums["nll"] / max(sums["tokens"], 1.0))
        if scores.nll_by_position is None:
            scores.nll_by_position = np.zeros_like(sums["nll_by_position"])
            scores.tokens_by_position = np.zeros(len(sums["tokens_by_position"]), np.int64)
        scores.nll_by_position += sums["nll_by_position"]
        scores.tokens_by_position += np.rint(sums["tokens_by_position"]).astype(np.int64)
    return scores


# --- CLI ---------------------------------------------------------------------------------------------


def _data_section(args: argparse.Namespace, metadata: Mapping) -> tuple[dict, Mapping | None]:
    """(the data config to read, the experiment config it came from or None for --data)."""
    if args.data:
        if args.config is not None:
            raise ConfigError("give --data or --config, not both")
        return {**DEFAULTS, "sources": cli.data_sources(args.data)}, None
    experiment = args.config.to_dict() if args.config is not None else metadata.get("stage_config")
    if not experiment or "data" not in experiment:
        raise ConfigError(f"{args.checkpoint} records no training data config: name the data with --data PATH[:FORMAT] "
                          "or --config")
    return {**DEFAULTS, **experiment["data"]}, experiment


parser = cli.parser("python -m llama_jax.eval", __doc__, config=True)
cli.add_checkpoint(parser)
cli.add_data(parser)
cli.add_mesh(parser)
cli.add_tokenizer(parser)
parser.add_argument("--split", choices=SPLITS, default=None,
                    help="all: every document; heldout: the documents the data config holds out for eval "
                         "(default: all with --data, heldout with a config)")
parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the data config's; with "
                                                              "--data the model's max_seq_len, at most 2048)")
cli.add_batch_size(parser, None)
parser.add_argument("--max-batches", type=int, default=None,
                    help="score at most this many batches, 0 for all (default: all with --data; with a config its "
                         "logging.eval_batches, i.e. what the training loop evaluates)")
parser.add_argument("--by-position", action="store_true",
                    help="add loss_by_position (mean loss of the targets predicted at each position of a document; "
                         "null where none) and tokens_by_position to the result")
parser.add_argument("--chunk", type=int, default=None, help="vocabulary columns per loss chunk (default: the "
                                                            "config's loss.vocab_chunk, else 8192; 0: all)")


def _vocab_chunk(experiment: dict | None) -> int:
    """The experiment's cross-entropy chunk (checkpoints of llama_jax before the loss section kept it under
    optimizer.loss_chunk)."""
    if experiment is None:
        return 8192
    if "loss" in experiment:
        return experiment["loss"]["vocab_chunk"]
    return experiment["optimizer"]["loss_chunk"]


def run(args: argparse.Namespace) -> dict:
    mesh = sharding.make_mesh(args.mesh or None)
    params, cfg, metadata = checkpoint.load(args.checkpoint, shardings=mesh, progress=lambda files: cli.progress(
        files, desc="reading", unit="file"))
    data_cfg, experiment = _data_section(args, metadata)
    tokenizer = from_identity(metadata.get("tokenizer"), args.tokenizer)
    if tokenizer is None and experiment is not None:
        tokenizer = from_identity({"name": data_cfg["tokenizer"]})
    if tokenizer is None:
        raise ConfigError(f"{args.checkpoint} does not record its tokenizer: pass --tokenizer")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids; the model only "
                          f"{cfg.vocab_size}: pass the tokenizer it was trained with (--tokenizer)")
    kind = source_kind(data_cfg)
    if kind == "preference":
        raise ConfigError("preference data has no single next-token loss; evaluate the chosen replies as chat data")

    split = args.split or ("all" if experiment is None else "heldout")
    if split == "all":
        data_cfg["holdout_every"] = 1  # every document is "held out": one pass over all of them
    elif not data_cfg["holdout_every"]:
        raise ConfigError("the data config holds nothing out (data.holdout_every = 0): use --split all")
    if args.seq_len:
        data_cfg["seq_len"] = args.seq_len
    elif experiment is None:
        data_cfg["seq_len"] = min(cfg.max_seq_len, 2048)
    if args.batch_size:
        data_cfg["batch_size"] = args.batch_size
    elif experiment is None:
        data_cfg["batch_size"] = 8
    max_batches = args.max_batches
    if max_batches is None:
        max_batches = 0 if experiment is None or split == "all" else int(experiment["logging"]["eval_batches"])
    chunk = args.chunk if args.chunk is not None else _vocab_chunk(experiment)

    batches = make_batches(data_cfg, tokenizer, split="eval", kind=kind)
    limited = itertools.islice(batches, max_batches or None)
    progress = cli.progress(limited, desc="eval", unit="batch", total=max_batches or None)
    scores = evaluate(params, cfg, progress, tokenizer, mesh=mesh, chunk_size=chunk or None)
    progress.close()
    cli.log(f"{scores.tokens:,} tokens in {scores.batches} batches: loss {scores.loss:.4f} nats/token, perplexity "
            f"{scores.perplexity:.3f}, {scores.bits_per_byte:.4f} bits/byte")
    result = {"checkpoint": args.checkpoint, "sources": data_cfg["sources"], "kind": kind, "split": split,
              "seq_len": data_cfg["seq_len"], "batch_size": data_cfg["batch_size"], "tokenizer": tokenizer.name,
              **scores.to_dict()}
    if args.by_position:
        result["loss_by_position"] = [None if math.isnan(x) else float(x) for x in scores.loss_by_position]
        result["tokens_by_position"] = [] if scores.tokens_by_position is None else scores.tokens_by_position.tolist()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
