"""The reward model (Llama 3, section 4.1.2): the Llama backbone and a scalar head, trained with Bradley-Terry on
preference pairs.

    scores = reply_scores(params, cfg, batch, names=("chosen", "rejected"))   # {"chosen": [B], "rejected": [B]}
    packed = pack_replies(batch, ("chosen", "rejected", "edited"))            # the paper's one row per record
    python -m llama_jax.train --config configs/reward/tiny.py:prefs.jsonl --config.init_from=runs/demo

Parameters: the Llama tree plus ``reward_head`` [D] (logical axis ``embed``), zero at the start, so every reply
scores 0 and the first loss is ln 2. A reply's score is ``final hidden state . reward_head`` at the reply's last
token (its closing <|eot_id|>: the preference batch's ``score_mask``), never at a padding position.

Loss: Bradley-Terry without a margin term, ``-log sigmoid(r_better - r_worse)``; a record with an edited reply
(edited > chosen > rejected) averages its three ordered pairs, a record without one has the single pair. Records
weigh equally (a mean over records; gradient accumulation weighs microbatches by their records). Metrics: ``loss``;
``accuracy``, the pairs ranked right (a tie counts half), averaged like the loss; ``chosen_score``,
``rejected_score``, the mean scores. An accuracy of 0.5 is chance.

Packed rows (``reward.packed``, the paper's efficiency trick): a record is one row of ``data.seq_len`` tokens, the
prompt once (segment -1, positions 0..P-1), then each reply (segments 1, 2, 3, positions from P again), so the
prompt runs once rather than once per reply. ``ops.attention``'s shared-prefix rule lets each reply see the prompt
and itself only, so the scores equal those of separate rows. A record whose prompt and replies do not fit in one
row is a DataError, or with ``data.on_error="skip"`` an empty row counted in the run's skipped records. Packed
rows need the dense attention (``model.attention`` "dense"): the fused kernels refuse the rule.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import data, model
from llama_jax.config import ModelConfig
from llama_jax.data.sources import expand_paths
from llama_jax.errors import ConfigError, DataError
from llama_jax.losses import bradley_terry_loss
from llama_jax.train.step import LossFn, Stage

HEAD = "reward_head"
PAIRS = (("chosen", "rejected"), ("edited", "chosen"), ("edited", "rejected"))  # (better, worse)


def init_head(cfg: ModelConfig, rng: jax.Array) -> dict:
    """The extra leaf: a zero [D] head, boxed with its logical axis."""
    del rng  # zero: no reply is preferred before training
    return {HEAD: nn.Partitioned(jnp.zeros((cfg.dim,), jnp.dtype(cfg.param_dtype)), names=("embed",))}


def token_scores(params, cfg: ModelConfig, tokens, positions, segment_ids, rng: jax.Array | None = None
                 ) -> jax.Array:
    """[B, T] float32: the head applied to every position's final hidden state. ``rng``: a training step's key
    (adapter dropout)."""
    llama = {k: v for k, v in params.items() if k != HEAD}
    hidden = model.Llama(cfg).apply({"params": llama}, tokens, positions, segment_ids, output="hidden",
                                    rngs=model.dropout_rngs(rng))  # [B, T, D]
    return jnp.einsum("BTD,D->BT", hidden, params[HEAD].astype(hidden.dtype), preferred_element_type=jnp.float32)


def reply_scores(params, cfg: ModelConfig, batch: dict, *, names: Sequence[str], packed: bool = False,
                 rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """Each named reply's score [B] (0 where the row holds no such reply). Separate rows of every reply go through
    the network as one [len(names) * B, T] batch; packed rows (``pack_replies``) as they are."""
    if packed:
        rows = batch["packed"]
        scores = token_scores(params, cfg, rows["tokens"], rows["positions"], rows["segment_ids"], rng)
        return {n: (scores * batch[n]["score_mask"]).sum(-1) for n in names}
    rows = {k: jnp.concatenate([batch[n][k] for n in names]) for k in ("tokens", "positions", "segment_ids",
                                                                        "score_mask")}
    scores = token_scores(params, cfg, rows["tokens"], rows["positions"], rows["segment_ids"], rng)
    return dict(zip(names, jnp.split((scores * rows["score_mask"]).sum(-1), len(names))))


def make_loss_fn(cfg: ModelConfig, *, packed: bool = False, edited: bool = True) -> LossFn:
    """``loss_fn(params, batch, rng, frozen) -> (loss, metrics)`` (see the module docstring). ``edited``: rank the
    edited replies too (separate rows: one more forward row per record); False ignores them."""
    names = data.REPLIES if edited else data.REPLIES[:2]

    def loss_fn(params, batch, rng, frozen=None):
        del frozen
        scores = reply_scores(params, cfg, batch, names=names, packed=packed, rng=rng)
        present = {n: batch[n]["score_mask"].sum(-1) > 0 for n in names}  # [B]: padding rows hold no reply
        loss = correct = pairs = 0.0
        for better, worse in PAIRS:
            if better in names and worse in names:
                on = (present[better] & present[worse]).astype(jnp.float32)
                margin = scores[better] - scores[worse]
                loss += on * bradley_terry_loss(scores[better], scores[worse])
                correct += on * jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))
                pairs += on
        records = present["chosen"].astype(jnp.float32)
        count = jnp.maximum(records.sum(), 1.0)
        per_record = lambda x: (x / jnp.maximum(pairs, 1.0)).sum() / count  # noqa: E731
        mean_score = lambda s: (s * records).sum() / count  # noqa: E731
        metrics = {"accuracy": per_record(correct), "chosen_score": mean_score(scores["chosen"]),
                   "rejected_score": mean_score(scores["rejected"]), "loss_weight": records.sum()}
        return per_record(loss), metrics

    return loss_fn


def pack_replies(batch: dict, names: Sequence[str]) -> tuple[dict, list[tuple[int, int]]]:
    """A preference batch of separate rows (numpy, ``data.preference``'s layout) -> packed rows of the same length:
    ``{"packed": {tokens, positions, segment_ids}, name: {"score_mask"} for each name}``, and (row, tokens needed)
    of the records that do not fit (their rows are left empty)."""
    chosen = batch["chosen"]
    rows, length = chosen["tokens"].shape
    packed = {k: np.zeros((rows, length), np.int32) for k in ("tokens", "positions", "segment_ids")}
    masks = {n: np.zeros((rows, length), np.int32) for n in names}
    too_long = []
    for row in range(rows):
        if not chosen["score_mask"][row].any():
            continue  # a padding row
        prompt_len = int(np.argmax(chosen["loss_mask"][row])) + 1  # tokens up to the first trained target's input
        replies = [(n, batch[n]["tokens"][row, prompt_len:int(np.argmax(batch[n]["score_mask"][row])) + 1])
                   for n in names if batch[n]["score_mask"][row].any()]
        needed = prompt_len + sum(len(ids) for _, ids in replies)
        if needed > length:
            too_long.append((row, needed))
            continue
        packed["tokens"][row, :prompt_len] = chosen["tokens"][row, :prompt_len]
        packed["positions"][row, :prompt_len] = np.arange(prompt_len)
        packed["segment_ids"][row, :prompt_len] = -1  # the shared prefix
        start = prompt_len
        for segment, (name, ids) in enumerate(replies, start=1):
            end = start + len(ids)
            packed["tokens"][row, start:end] = ids
            packed["positions"][row, start:end] = np.arange(prompt_len, prompt_len + len(ids))
            packed["segment_ids"][row, start:end] = segment
            masks[name][row, end - 1] = 1
            start = end
    return {"packed": packed, **{n: {"score_mask": m} for n, m in masks.items()}}, too_long


class PackedBatches:
    """A preference batch stream with every batch packed (``pack_replies``); state and skips pass through."""

    def __init__(self, batches: data.BatchIterator, names: Sequence[str], on_error: str):
        self.batches, self.names, self.on_error = batches, tuple(names), on_error
        self._dropped: list[str] = []

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        step = self.batches.step
        packed, too_long = pack_replies(next(self.batches), self.names)
        for row, needed in too_long:
            why = (f"batch {step}, row {row}: the prompt and replies take {needed} tokens, more than a packed row "
                   f"of data.seq_len={self.batches.seq_len}")
            if self.on_error != "skip":
                raise DataError(f"{why}; raise data.seq_len, set reward.packed=False or data.on_error='skip'")
            self._dropped.append(why)
        return packed

    def get_state(self) -> dict:
        return self.batches.get_state()

    def set_state(self, state: dict) -> None:
        self.batches.set_state(state)

    @property
    def skipped(self) -> list[str]:
        return self.batches.skipped + self._dropped

    def reports(self) -> list[str]:
        return self.batches.reports()


def _loss_fn(cfg: ModelConfig, config, run_layers=None) -> LossFn:
    if run_layers is not None:
        raise ConfigError(f"the reward stage runs without a pipeline (config.pipeline.schedule="
                          f"{config.pipeline.schedule!r}); pipelines run the pretrain and sft stages")
    if config.reward.packed and model.attention_impl(cfg, cached=False) != "dense":
        raise ConfigError(f"reward.packed rows share the prompt through ops.attention's shared-prefix rule, which "
                          f"the fused kernels do not implement; set model.attention=dense (not {cfg.attention!r}) "
                          "or reward.packed=false")
    return make_loss_fn(cfg, packed=config.reward.packed, edited=ranks_edited(config))


def ranks_edited(config) -> bool:
    """Whether the run ranks edited replies: ``reward.edited`` and some record of the data has one. Decided once for
    the whole data, so every batch (and every process's share of it) has the same shape; without edited replies a
    batch holds no edited rows, which would be padding: a third of the forward pass spent on nothing."""
    return bool(config.reward.edited) and any(_has_edited(spec["path"]) for spec in config.data.sources
                                                if spec.get("path"))


def _has_edited(paths: str) -> bool:
    """Whether a record of the JSON Lines files ``paths`` has an edited reply (a non-null "edited"; only lines that
    mention one are parsed, and a malformed line is left to the data reader to report). One read of the files, as
    the data reader's index of their lines is."""
    for path in expand_paths(paths):
        with open(path, "rb") as f:
            for line in f:
                if b'"edited"' in line:
                    with contextlib.suppress(ValueError):
                        record = json.loads(line)
                        if isinstance(record, dict) and record.get("edited") is not None:
                            return True
    return False


def _batches(config, tokenizer, split: str):
    edited = ranks_edited(config)
    batches = data.make_batches(config.data, tokenizer, split=split, kind="preference", edited=edited)
    names = data.REPLIES if edited else data.REPLIES[:2]
    return PackedBatches(batches, names, config.data.on_error) if config.reward.packed else batches


STAGE = Stage(name="reward", make_loss_fn=_loss_fn, make_batches=_batches, extra_params=init_head)
