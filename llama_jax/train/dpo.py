"""Direct preference optimisation as Llama 3 did it (section 4.1.4): the policy trained against a frozen reference,
beta 0.1, learning rate 1e-5, and the paper's two changes.

    python -m llama_jax.train --config configs/dpo/tiny.py:prefs.jsonl --config.init_from=runs/sft
    logps, lengths = reply_logps(params, cfg, rows)   # per row: sums of log p over its dpo_mask / loss_mask targets

A reply's log-prob is the SUM of log p(token) over its targets; chosen and rejected rows go through the network as
one [2B, T] batch. The reference's log-probs come from the same function, run on a frozen copy of the starting
parameters (``dpo.reference="model"``: the stage's frozen tree, sharded like the policy) or from the data
(``"precomputed"``: the column ``python -m llama_jax.posttrain.reference_logps`` writes with the checkpoint of
``init_from``; no copy in memory). ``init_from`` is required either way (a random start could not be rebuilt on
resume); a resumed run rebuilds its reference from the step directory it started from, verified by its checksum
(``train.build.pinned_start``). A record's edited reply, if any, is not used here: the batches leave its rows out.

At the start, policy == reference, so every pair is an exact tie (accuracy 0.5): the policy's cross-entropy is
rematerialised inside the gradient computation (``_cross_entropy``), so that its forward pass is the very
computation the reference runs and gives the same bits.

The paper's changes, each a switch (for ablations):
  dpo.mask_formatting  the formatting tokens (<|start_header_id|>, <|end_header_id|>, <|eom_id|>, <|eot_id|>) are
                       left out of the chosen and the rejected log-probs of the DPO term (the batch's dpo_mask, not
                       its loss_mask): both replies share them, and pushing them up and down at once destabilises
  dpo.nll_coef         + coef x the chosen reply's NLL, each reply's a mean over its tokens (loss_mask: the closing
                       token included), averaged over pairs; 0.2 in the paper, 0 turns it off

loss = mean over pairs of ``losses.dpo_loss`` + nll_coef x mean over pairs of the chosen NLL. Metrics: ``dpo_loss``
and ``nll_loss`` (the two terms, nll unscaled); ``chosen_reward``, ``rejected_reward`` (beta x log-ratio to the
reference, means) and ``margin`` (their mean difference); ``accuracy`` (pairs whose chosen reward is the higher, a
tie counting half: 0.5 at the start, where policy == reference); ``chosen_logp``, ``rejected_logp`` (the policy's
log-probs of the DPO term, means: without the NLL term the chosen one tends to fall, why the paper adds it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llama_jax import checkpoint, data, model
from llama_jax.config import ModelConfig
from llama_jax.data.preference import REFERENCE_MASKS
from llama_jax.errors import ConfigError
from llama_jax.experiment import DPO
from llama_jax.losses import chunked_cross_entropy, dpo_loss
from llama_jax.train.step import LossFn, Stage

ROW_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "dpo_mask")
_PAPER = DPO()  # the section's defaults: the paper's beta and NLL coefficient


def reply_logps(params, cfg: ModelConfig, rows: dict, *, chunk_size: int | None = 8192, rng: jax.Array | None = None
                ) -> tuple[dict[str, jax.Array], jax.Array]:
    """Preference rows ([R, T] arrays) -> ({"dpo_mask": [R], "loss_mask": [R]}, the sums of log p(target) over
    each mask; the number of loss_mask targets [R]). ``rng``: a training step's key (adapter dropout)."""
    hidden = model.Llama(cfg).apply({"params": params}, rows["tokens"], rows["positions"], rows["segment_ids"],
                                    output="hidden", rngs=model.dropout_rngs(rng))  # [R, T, D]
    head = model.lm_head_kernel(params, cfg).astype(hidden.dtype)
    nll, _ = _cross_entropy(hidden, head, rows["targets"], chunk_size)  # [R, T]
    return {mask: -(nll * rows[mask]).sum(-1) for mask in REFERENCE_MASKS}, rows["loss_mask"].sum(-1)


def _cross_entropy(hidden, head, targets, chunk_size: int | None):
    """``chunked_cross_entropy``, its forward pass the same inside a gradient computation as outside. Its
    single-matmul path keeps the logits for the backward pass, and XLA then fuses the log-softmax otherwise than in
    a plain forward pass (log-probs 1 ulp apart, so a policy equal to its reference showed margins of ~3e-7 and an
    accuracy of 0.44-0.56 at step 0). Rematerialised, the logits are computed again in the backward pass (one more
    [R, T, D] x [D, V] matmul); the chunked path rematerialises each chunk already."""
    if chunk_size is None or chunk_size >= head.shape[1]:
        return jax.checkpoint(chunked_cross_entropy, static_argnums=(3,))(hidden, head, targets, chunk_size)
    return chunked_cross_entropy(hidden, head, targets, chunk_size)


def make_loss_fn(cfg: ModelConfig, *, beta: float = _PAPER.beta, nll_coef: float = _PAPER.nll_coef,
                 mask_formatting: bool = _PAPER.mask_formatting, precomputed: bool = False,
                 chunk_size: int | None = 8192) -> LossFn:
    """``loss_fn(params, batch, rng, frozen) -> (loss, metrics)``; ``frozen`` is the reference's parameters, or None
    when ``precomputed`` (the batch then carries ``reference_logps``)."""
    mask = "dpo_mask" if mask_formatting else "loss_mask"

    def loss_fn(params, batch, rng, frozen=None):
        chosen, rejected = batch["chosen"], batch["rejected"]
        pairs = {k: jnp.concatenate([chosen[k], rejected[k]]) for k in ROW_KEYS}  # [2B, T]: one forward pass
        logps, lengths = reply_logps(params, cfg, pairs, chunk_size=chunk_size, rng=rng)
        policy_chosen, policy_rejected = jnp.split(logps[mask], 2)
        if precomputed:
            reference_chosen = chosen["reference_logps"].sum(-1)
            reference_rejected = rejected["reference_logps"].sum(-1)
        else:
            reference, _ = reply_logps(jax.lax.stop_gradient(frozen), cfg, pairs, chunk_size=chunk_size)
            reference_chosen, reference_rejected = jnp.split(reference[mask], 2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                            reference_rejected, beta)
        chosen_tokens = jnp.split(lengths, 2)[0]
        chosen_nll = -jnp.split(logps["loss_mask"], 2)[0] / jnp.maximum(chosen_tokens, 1)  # per reply, per token
        pairs_present = (chosen_tokens > 0).astype(jnp.float32)  # padding rows (the end of an eval pass) hold none
        count = jnp.maximum(pairs_present.sum(), 1.0)
        mean = lambda x: (x * pairs_present).sum() / count  # noqa: E731
        margin = chosen_rewards - rejected_rewards
        dpo_term, nll_term = mean(losses), mean(chosen_nll)
        metrics = {
            "dpo_loss": dpo_term, "nll_loss": nll_term, "chosen_reward": mean(chosen_rewards),
            "rejected_reward": mean(rejected_rewards), "margin": mean(margin),
            "accuracy": mean(jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))),
            "chosen_logp": mean(policy_chosen), "rejected_logp": mean(policy_rejected),
            "loss_weight": pairs_present.sum(),
        }
        return dpo_term + nll_coef * nll_term, metrics

    return loss_fn


def _loss_fn(cfg: ModelConfig, config, run_layers=None) -> LossFn:
    if run_layers is not None:
        raise ConfigError(f"the dpo stage runs without a pipeline (config.pipeline.schedule="
                          f"{config.pipeline.schedule!r}); pipelines run the pretrain and sft stages")
    d = config.dpo
    return make_loss_fn(cfg, beta=d.beta, nll_coef=d.nll_coef, mask_formatting=d.mask_formatting,
                        precomputed=d.reference == "precomputed", chunk_size=config.loss.vocab_chunk or None)


def reference_spec(config) -> dict:
    """What precomputed reference log-probs must have been made with: the mask of the DPO term, and the checkpoint
    the policy starts from (``init_from``), by identity."""
    if not config.init_from:
        raise ConfigError("dpo.reference='precomputed' needs config.init_from: the reference log-probs must be "
                          "those of the checkpoint the policy starts from")
    return {"mask": "dpo_mask" if config.dpo.mask_formatting else "loss_mask",
            "checkpoint": checkpoint.identity(config.init_from)}


def _batches(config, tokenizer, split: str):
    reference = reference_spec(config) if config.dpo.reference == "precomputed" else None
    return data.make_batches(config.data, tokenizer, split=split, kind="preference", reference=reference,
                             edited=False)


def _configure(config) -> Stage:
    if config.dpo.reference == "precomputed":
        return dataclasses.replace(STAGE, frozen=None, configure=None, flops_factor=1.0)
    if not config.init_from:
        raise ConfigError("dpo.reference='model' needs config.init_from: the frozen reference is the checkpoint the "
                          "policy starts from (an SFT run), and a random start could not be rebuilt on resume")
    return STAGE


# The policy's forward and backward passes, and the reference model's forward pass (a third more FLOPs).
STAGE = Stage(name="dpo", make_loss_fn=_loss_fn, make_batches=_batches, frozen=lambda params: params,
              configure=_configure, flops_factor=4 / 3)
