"""Pipeline parallelism: the block stack split over the mesh's ``pipeline`` axis, one slice of consecutive layers per
pipeline rank, microbatches moved from rank to rank with ``shard_map`` + ``ppermute``.

    mesh = sharding.make_mesh("pipeline=4,fsdp=2")
    run_layers = pipeline.make_run_layers(cfg, mesh, schedule="circular", microbatches=8, circular_repeats=2)
    hidden = model.Llama(cfg).apply({"params": params}, tokens, positions, segment_ids, output="hidden",
                                    run_layers=run_layers)      # under sharding.activate(mesh), inside jit

Schedules, for S pipeline ranks, M microbatches and R repeats (``circular_repeats``), L layers:
  * ``gpipe``: rank s holds layers [s L / S, (s + 1) L / S) (exactly the shard the ``layers -> pipeline`` rule gives
    it) and runs every microbatch through them once; M + S - 1 ticks, bubble (S - 1) / (M + S - 1).
  * ``circular`` (interleaved): the layers are cut into S x R blocks of L / (S R); block v lives on rank v mod S,
    so a microbatch goes round the ring of ranks R times. M R + S - 1 ticks of L / (S R) layers each: the same
    work, with a bubble R times smaller, (S - 1) / (M R + S - 1). Needs M >= S (a microbatch back at rank 0 must
    find it free). Its blocks are not the rank's contiguous shard: each step moves them there in R ``ppermute``
    rounds of one block per rank (``circular_rounds``; the gradients go back the same way), which GPipe does not
    need.
On tick t, rank s works on item t - s (microbatch (t - s) mod M, round (t - s) div M) and hands its output to
rank s + 1; the last rank's outputs come back to rank 0, which keeps them until their next round or the end.
Ticks outside [0, M R) are the bubble: the rank computes on placeholder data that never reaches a result.

The backward pass is ``jax.grad`` of this forward loop: every rank keeps what its layers save (under the
model's remat policy) for all M R of its items until the backward pass, like GPipe. A 1F1B schedule, which
interleaves backward steps to keep only S microbatches in flight, is not implemented.

Embedding, final norm and loss run outside the pipeline: the embedding on every rank alike (rank 0 uses it),
the final norm and loss on 1 / S of the tokens per rank (when the length divides). The parameter tree and
checkpoints are the unpipelined ones (``layers`` sharded over ``pipeline`` by the rules table), so a checkpoint
restores onto any mesh, pipelined or not.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax import model
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError

SCHEDULES = ("none", "gpipe", "circular")
TICKS_SCOPE = "pipeline_ticks"
RunLayers = Callable[[model.Params, jax.Array, jax.Array, jax.Array], jax.Array]


def check(cfg: ModelConfig, ranks: int, schedule: str, microbatches: int, circular_repeats: int) -> None:
    """Raises ConfigError for a schedule that ``ranks`` pipeline ranks cannot run on this model."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"pipeline.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "none":
        if ranks > 1:
            raise ConfigError(f"the mesh has pipeline={ranks}: set pipeline.schedule to 'gpipe' or 'circular'")
        return
    repeats = circular_repeats if schedule == "circular" else 1
    if microbatches < 1 or repeats < 1:
        raise ConfigError(f"pipeline.microbatches ({microbatches}) and circular_repeats ({circular_repeats}) must "
                          "be positive")
    if cfg.num_layers % (ranks * repeats):
        divisors = [n for n in range(1, cfg.num_layers + 1) if cfg.num_layers % n == 0]
        raise ConfigError(f"{cfg.num_layers} layers do not split into pipeline={ranks} x repeats={repeats} equal "
                          f"blocks; pipeline x repeats must be one of {divisors}")
    if repeats > 1 and microbatches < ranks:
        raise ConfigError(f"the circular schedule needs at least as many microbatches as pipeline ranks; got "
                          f"microbatches={microbatches}, pipeline={ranks}")
    if not cfg.scan_layers:
        raise ConfigError("pipelining needs stacked layers (ModelConfig.scan_layers=True)")


def bubble_fraction(ranks: int, microbatches: int, repeats: int = 1) -> float:
    """The share of ticks a pipeline rank idles: (S - 1) / (M R + S - 1)."""
    return (ranks - 1) / (microbatches * repeats + ranks - 1)


def make_run_layers(cfg: ModelConfig, mesh: Mesh, *, schedule: str, microbatches: int,
                    circular_repeats: int = 2) -> RunLayers | None:
    """The ``run_layers`` hook of ``model.Llama`` for ``schedule`` on ``mesh`` (None for "none": the plain scan)."""
    check(cfg, mesh.shape["pipeline"], schedule, microbatches, circular_repeats)
    if schedule == "none":
        return None
    repeats = circular_repeats if schedule == "circular" else 1

    def run_layers(layers, x, positions, segment_ids):
        return _pipeline(cfg, mesh, layers, x, positions, segment_ids, microbatches=microbatches, repeats=repeats)

    return run_layers


def _to_microbatches(x: jax.Array, count: int) -> jax.Array:
    """[B, ...] -> [M, B / M, ...]; microbatch i = rows i, i + M, ...: every data-parallel rank keeps a share of
    every microbatch (rows are sharded in contiguous blocks)."""
    if x.shape[0] % count:
        raise ConfigError(f"a batch of {x.shape[0]} rows does not split into pipeline.microbatches={count}")
    return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)


def _from_microbatches(x: jax.Array) -> jax.Array:
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def circular_rounds(ranks: int, repeats: int) -> list[list[tuple[int, int, int, int]]]:
    """How the circular schedule's blocks reach their pipeline ranks: ``repeats`` rounds of (source rank, its local
    block, target rank, target slot), each round a permutation of the ranks (one ``ppermute``).

    Rank s stores the contiguous layer blocks v = s R + j (j < R: the ``layers -> pipeline`` shard) and runs blocks
    v = r S + t on rank t in round r. Every rank sends R blocks and receives R, so the moves form an R-regular
    bipartite graph, which splits into R perfect matchings (Koenig); each is found by augmenting paths."""
    moves = {s: [(j, (s * repeats + j) % ranks, (s * repeats + j) // ranks) for j in range(repeats)]
             for s in range(ranks)}
    rounds = []
    for _ in range(repeats):
        owner = _perfect_matching(moves, ranks)
        rounds.append([])
        for source, index in sorted(owner.values(), reverse=True):  # higher indices first: lower ones stay valid
            block, target, slot = moves[source].pop(index)
            rounds[-1].append((source, block, target, slot))
    return rounds


def _perfect_matching(moves: dict, ranks: int) -> dict[int, tuple[int, int]]:
    """target rank -> (source rank, index into moves[source]), every rank once on each side (Kuhn's algorithm)."""
    owner: dict[int, tuple[int, int]] = {}

    def claim(source: int, seen: set) -> bool:
        for index, (_, target, _) in enumerate(moves[source]):
            if target not in seen:
                seen.add(target)
                if target not in owner or claim(owner[target][0], seen):
                    owner[target] = (source, index)
                    return True
        return False

    for source in range(ranks):
        claim(source, set())
    return owner


def _gather_rounds(local, rank, rounds):
    """This rank's contiguous blocks [R, L / (S R), ...] -> the blocks it runs, by round [R, L / (S R), ...]."""
    out = jnp.zeros_like(local)
    for moves in rounds:
        send = jnp.asarray([block for _, block, _, _ in sorted(moves)])[rank]
        slot = jnp.asarray([slot for _, _, _, slot in sorted(moves, key=lambda m: m[2])])[rank]
        arrived = jax.lax.ppermute(local[send], "pipeline", [(source, target) for source, _, target, _ in moves])
        out = jax.lax.dynamic_update_index_in_dim(out, arrived, slot, 0)
    return out


def _pipeline(cfg, mesh, layers, x, positions, segment_ids, *, microbatches: int, repeats: int) -> jax.Array:
    ranks = mesh.shape["pipeline"]
    per_block = cfg.num_layers // (ranks * repeats)
    inputs, positions, segment_ids = (_to_microbatches(a, microbatches) for a in (x, positions, segment_ids))
    ticks = microbatches * repeats + ranks - 1
    ring = [(s, (s + 1) % ranks) for s in range(ranks)]
    rounds = circular_rounds(ranks, repeats) if repeats > 1 else None

    def rank_loop(layers, inputs, positions, segment_ids):
        rank = jax.lax.axis_index("pipeline")
        # This rank's shard [L / S, ...] as R blocks; GPipe runs them as they are, circular gets its own first.
        blocks = jax.tree.map(lambda w: w.reshape(repeats, per_block, *w.shape[1:]), layers)
        if rounds is not None:
            blocks = jax.tree.map(lambda w: _gather_rounds(w, rank, rounds), blocks)

        def tick(carry, t):
            slots, incoming = carry  # slots [M, mb, T, D]: rank 0's input of each microbatch's next round
            item = t - rank
            micro, round_ = item % microbatches, jnp.clip(item // microbatches, 0, repeats - 1)
            x = jnp.where(rank == 0, slots[micro], incoming)
            weights = jax.tree.map(lambda w: w[round_], blocks)
            y = model.apply_layers(cfg, weights, x, positions[micro], segment_ids[micro])
            incoming = jax.lax.ppermute(y, "pipeline", ring)
            # On rank 0, `incoming` is the last rank's output of item t - (S - 1): file it under its microbatch.
            done = t - (ranks - 1)
            slot = done % microbatches
            keep = jnp.where((rank == 0) & (done >= 0), incoming, slots[slot])
            return (jax.lax.dynamic_update_index_in_dim(slots, keep, slot, 0), incoming), None

        with jax.named_scope(TICKS_SCOPE):  # names the loop in the compiled program (aot reads its trip count)
            (slots, _), _ = jax.lax.scan(tick, (inputs, jnp.zeros_like(inputs[0])), jnp.arange(ticks))
        return slots[None]

    per_rank = jax.shard_map(
        rank_loop, mesh=mesh, axis_names={"pipeline"}, check_vma=False,
        in_specs=(PartitionSpec("pipeline"), PartitionSpec(), PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec("pipeline"),
    )
    outputs = _from_microbatches(per_rank(layers, inputs, positions, segment_ids)[0])  # on rank 0's devices
    # Leave split over the pipeline ranks along the length (when it divides), so that the final norm and the loss run
    # once, on 1 / S of the tokens per device, rather than S times on all of them.
    if outputs.shape[1] % (mesh.shape["sequence"] * ranks) == 0:
        spread = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), ("sequence", "pipeline")))
        outputs = jax.lax.with_sharding_constraint(outputs, spread)
    return outputs
