"""Pipeline parallelism: the block stack split into stages over the mesh's ``stage`` axis, microbatches moved
from stage to stage with ``shard_map`` + ``ppermute``.

    mesh = sharding.make_mesh("stage=4,fsdp=2")
    run_layers = pipeline.make_run_layers(cfg, mesh, schedule="circular", microbatches=8, circular_repeats=2)
    hidden = model.Llama(cfg).apply({"params": params}, tokens, positions, segment_ids, output="hidden",
                                    run_layers=run_layers)      # under sharding.activate(mesh), inside jit

Schedules, for S stages, M microbatches and R repeats (``circular_repeats``), L layers:
  * ``gpipe``: stage s holds layers [s L / S, (s + 1) L / S) (exactly the shard the ``layers -> stage`` rule gives
    it) and runs every microbatch through them once; M + S - 1 ticks, bubble (S - 1) / (M + S - 1).
  * ``circular`` (interleaved): the layers are cut into S x R blocks of L / (S R); block v lives on stage v mod S,
    so a microbatch goes round the ring of stages R times. M R + S - 1 ticks of L / (S R) layers each: the same
    work, with a bubble R times smaller, (S - 1) / (M R + S - 1). Needs M >= S (a microbatch back at stage 0 must
    find it free). Its blocks are not the stage's contiguous shard: each step moves them there in R ``ppermute``
    rounds of one block per stage (``circular_rounds``; the gradients go back the same way), which GPipe does not
    need.
On tick t, stage s works on item t - s (microbatch (t - s) mod M, round (t - s) div M) and hands its output to
stage s + 1; the last stage's outputs come back to stage 0, which keeps them until their next round or the end.
Ticks outside [0, M R) are the bubble: the stage computes on placeholder data that never reaches a result.

The backward pass is ``jax.grad`` of this forward loop: every stage keeps what its layers save (under the
model's remat policy) for all M R of its items until the backward pass, like GPipe. A 1F1B schedule, which
interleaves backward steps to keep only S microbatches in flight, is not implemented.

Embedding, final norm and loss run outside the pipeline: the embedding on every stage alike (stage 0 uses it),
the final norm and loss on 1 / S of the tokens per stage (when the length divides). The parameter tree and
checkpoints are the unpipelined ones (``layers`` sharded over ``stage`` by the rules table), so a checkpoint
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


def check(cfg: ModelConfig, stages: int, schedule: str, microbatches: int, circular_repeats: int) -> None:
    """Raises ConfigError for a schedule that ``stages`` pipeline stages cannot run on this model."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"pipeline.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "none":
        if stages > 1:
            raise ConfigError(f"the mesh has stage={stages}: set pipeline.schedule to 'gpipe' or 'circular'")
        return
    repeats = circular_repeats if schedule == "circular" else 1
    if microbatches < 1 or repeats < 1:
        raise ConfigError(f"pipeline.microbatches ({microbatches}) and circular_repeats ({circular_repeats}) must "
                          "be positive")
    if cfg.num_layers % (stages * repeats):
        divisors = [n for n in range(1, cfg.num_layers + 1) if cfg.num_layers % n == 0]
        raise ConfigError(f"{cfg.num_layers} layers do not split into stage={stages} x repeats={repeats} equal "
                          f"blocks; stages x repeats must be one of {divisors}")
    if repeats > 1 and microbatches < stages:
        raise ConfigError(f"the circular schedule needs at least as many microbatches as stages; got "
                          f"microbatches={microbatches}, stage={stages}")
    if not cfg.scan_layers:
        raise ConfigError("pipelining needs stacked layers (ModelConfig.scan_layers=True)")


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The share of ticks a stage idles: (S - 1) / (M R + S - 1)."""
    return (stages - 1) / (microbatches * repeats + stages - 1)


def make_run_layers(cfg: ModelConfig, mesh: Mesh, *, schedule: str, microbatches: int,
                    circular_repeats: int = 2) -> RunLayers | None:
    """The ``run_layers`` hook of ``model.Llama`` for ``schedule`` on ``mesh`` (None for "none": the plain scan)."""
    check(cfg, mesh.shape["stage"], schedule, microbatches, circular_repeats)
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


def circular_rounds(stages: int, repeats: int) -> list[list[tuple[int, int, int, int]]]:
    """How the circular schedule's blocks reach their stages: ``repeats`` rounds of (source stage, its local block,
    target stage, target slot), each round a permutation of the stages (one ``ppermute``).

    Stage s stores the contiguous layer blocks v = s R + j (j < R: the ``layers -> stage`` shard) and runs blocks
    v = r S + t on stage t in round r. Every stage sends R blocks and receives R, so the moves form an R-regular
    bipartite graph, which splits into R perfect matchings (Koenig); each is found by augmenting paths."""
    moves = {s: [(j, (s * repeats + j) % stages, (s * repeats + j) // stages) for j in range(repeats)]
             for s in range(stages)}
    rounds = []
    for _ in range(repeats):
        owner = _perfect_matching(moves, stages)
        rounds.append([])
        for source, index in sorted(owner.values(), reverse=True):  # higher indices first: lower ones stay valid
            block, target, slot = moves[source].pop(index)
            rounds[-1].append((source, block, target, slot))
    return rounds


def _perfect_matching(moves: dict, stages: int) -> dict[int, tuple[int, int]]:
    """target stage -> (source stage, index into moves[source]), every stage once on each side (Kuhn's algorithm)."""
    owner: dict[int, tuple[int, int]] = {}

    def claim(source: int, seen: set) -> bool:
        for index, (_, target, _) in enumerate(moves[source]):
            if target not in seen:
                seen.add(target)
                if target not in owner or claim(owner[target][0], seen):
                    owner[target] = (source, index)
                    return True
        return False

    for source in range(stages):
        claim(source, set())
    return owner


def _gather_rounds(local, stage, rounds):
    """This stage's contiguous blocks [R, L / (S R), ...] -> the blocks it runs, by round [R, L / (S R), ...]."""
    out = jnp.zeros_like(local)
    for moves in rounds:
        send = jnp.asarray([block for _, block, _, _ in sorted(moves)])[stage]
        slot = jnp.asarray([slot for _, _, _, slot in sorted(moves, key=lambda m: m[2])])[stage]
        arrived = jax.lax.ppermute(local[send], "stage", [(source, target) for source, _, target, _ in moves])
        out = jax.lax.dynamic_update_index_in_dim(out, arrived, slot, 0)
    return out


def _pipeline(cfg, mesh, layers, x, positions, segment_ids, *, microbatches: int, repeats: int) -> jax.Array:
    stages = mesh.shape["stage"]
    per_block = cfg.num_layers // (stages * repeats)
    inputs, positions, segment_ids = (_to_microbatches(a, microbatches) for a in (x, positions, segment_ids))
    ticks = microbatches * repeats + stages - 1
    ring = [(s, (s + 1) % stages) for s in range(stages)]
    rounds = circular_rounds(stages, repeats) if repeats > 1 else None

    def stage_loop(layers, inputs, positions, segment_ids):
        stage = jax.lax.axis_index("stage")
        # This stage's shard [L / S, ...] as R blocks; GPipe runs them as they are, circular gets its own first.
        blocks = jax.tree.map(lambda w: w.reshape(repeats, per_block, *w.shape[1:]), layers)
        if rounds is not None:
            blocks = jax.tree.map(lambda w: _gather_rounds(w, stage, rounds), blocks)

        def tick(carry, t):
            slots, incoming = carry  # slots [M, mb, T, D]: stage 0's input of each microbatch's next round
            item = t - stage
            micro, round_ = item % microbatches, jnp.clip(item // microbatches, 0, repeats - 1)
            x = jnp.where(stage == 0, slots[micro], incoming)
            weights = jax.tree.map(lambda w: w[round_], blocks)
            y = model.apply_layers(cfg, weights, x, positions[micro], segment_ids[micro])
            incoming = jax.lax.ppermute(y, "stage", ring)
            # On stage 0, `incoming` is the last stage's output of item t - (S - 1): file it under its microbatch.
            done = t - (stages - 1)
            slot = done % microbatches
            keep = jnp.where((stage == 0) & (done >= 0), incoming, slots[slot])
            return (jax.lax.dynamic_update_index_in_dim(slots, keep, slot, 0), incoming), None

        with jax.named_scope(TICKS_SCOPE):  # names the loop in the compiled program (aot reads its trip count)
            (slots, _), _ = jax.lax.scan(tick, (inputs, jnp.zeros_like(inputs[0])), jnp.arange(ticks))
        return slots[None]

    per_stage = jax.shard_map(
        stage_loop, mesh=mesh, axis_names={"stage"}, check_vma=False,
        in_specs=(PartitionSpec("stage"), PartitionSpec(), PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec("stage"),
    )
    outputs = _from_microbatches(per_stage(layers, inputs, positions, segment_ids)[0])  # on stage 0's devices
    # Leave split over the stages along the length (when it divides), so that the final norm and the loss run
    # once, on 1 / S of the tokens per device, rather than S times on all of them.
    if outputs.shape[1] % (mesh.shape["sequence"] * stages) == 0:
        spread = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), ("sequence", "stage")))
        outputs = jax.lax.with_sharding_constraint(outputs, spread)
    return outputs
