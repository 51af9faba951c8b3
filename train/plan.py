"""What a training will do, settled before it starts: the layers, the chunks it trains on and holds out,
what the SAEs see of the rows (train.inputs), its steps and snapshots, and its run directories.

A sweep over several layers of one cache trains every SAE of the grid at each layer, on the same rows
of each layer (one read of each chunk feeds them all); its run directories end in _L<layer>."""

from pathlib import Path
from typing import NamedTuple

from sae.cache.follow import Follower
from sae.cache.store import Cache
from sae.errors import UserError
from sae.train.archs import ARCHITECTURES
from sae.train.config import SAESpec, TrainConfig
from sae.train.gate import NORM_SAMPLE_CHUNKS
from sae.train.holdout import holdout_chunks
from sae.train.inputs import InputSetup, input_setup


class Plan(NamedTuple):
    cache: Cache
    layers: list[int]
    """The sweep's layers, in order."""
    specs: list[SAESpec]
    sae_layers: list[int]
    """Each SAE's layer."""
    run_dirs: list[Path]
    train_chunks: list[int]
    held_chunks: list[int]
    setups: dict[int, InputSetup]
    """Each layer's input set-up (one gate for all: it names the same rows at every layer)."""
    steps: int
    """Steps of cfg.batch_size rows per rank."""
    pass_rows: int
    """Ungated training rows in one pass (estimated from the gate's sample)."""
    tokens_per_step: int
    """Over all ranks."""
    snapshot_steps: set[int]
    source: dict | None = None
    """What made the cache, when it is a stream's (cfg.json "stream": its harvest config, for --resume)."""


def plan_training(cfg: TrainConfig, cache: Cache, world: int, follower: Follower | None = None,
                  setups: dict[int, InputSetup] | None = None) -> Plan:  # fmt: skip
    """follower: the cache's harvest is still writing it; wait for the chunks the plan reads. setups: the
    input set-ups a resumed run had (a resumed stream does not have the chunks they were sampled from)."""
    layers = pick_layers(cfg, cache)
    specs = sweep_specs(cfg, layers)
    held_chunks = holdout_chunks(cache, cfg.holdout_chunks, first=cfg.harvest_order)
    train_chunks = [c for c in range(cache.target_chunks) if c not in held_chunks]
    if not train_chunks:
        raise UserError(f"cache {cache.path} has {cache.target_chunks} chunk(s), all held out; lower --holdout-chunks")
    if follower is not None:  # what the input set-up samples, and the held-out rows, come first
        follower.wait_for(held_chunks + train_chunks[:NORM_SAMPLE_CHUNKS])
    if cfg.theta == "calibrated" and not held_chunks and any(ARCHITECTURES[s.arch].calibrated_theta for s in specs):
        raise UserError("calibrating BatchTopK's θ needs held-out rows: set --holdout-chunks 1 or more, or --theta eq7")
    setups = setups or {layer: input_setup(cfg, cache, layer, train_chunks) for layer in layers}
    steps, pass_rows = training_steps(cfg, cache, train_chunks, setups[layers[0]].gated_fraction, world)
    tokens_per_step = cfg.batch_size * world
    # Snapshots at or past the end are the run itself.
    snapshot_steps = {t // tokens_per_step for t in cfg.snapshots if 0 < t // tokens_per_step < steps}
    run_dirs = [Path(cfg.out) / s.name for s in specs]
    sae_layers = [s.layer if s.layer is not None else layers[0] for s in specs]
    return Plan(cache, layers, specs, sae_layers, run_dirs, train_chunks, held_chunks, setups, steps, pass_rows,
                tokens_per_step, snapshot_steps)  # fmt: skip


def pick_layers(cfg: TrainConfig, cache: Cache) -> list[int]:
    if not cfg.layer:
        if len(cache.layers) > 1:
            raise UserError(f"cache {cache.path} holds layers {cache.layers}; choose with --layer (e.g. --layer 6,8)")
        return list(cache.layers)
    missing = [layer for layer in cfg.layer if layer not in cache.layers]
    if missing:
        raise UserError(f"layer {missing[0]} is not in cache {cache.path} (it holds {cache.layers})")
    if len(cfg.layer) > 1 and cfg.gate_norm:
        raise UserError(
            "a sweep over several layers gates rows by token or position only: --gate-norm would gate other rows at each layer"
        )
    return list(cfg.layer)


def sweep_specs(cfg: TrainConfig, layers: list[int]) -> list[SAESpec]:
    """cfg's SAEs, each at every layer of a sweep over several (named by it); at one layer, as they are."""
    if len(layers) == 1:
        return cfg.specs()
    return [spec._replace(layer=layer) for layer in layers for spec in cfg.specs()]


def training_steps(
    cfg: TrainConfig, cache: Cache, train_chunks: list[int], gated_fraction: float, world: int
) -> tuple[int, int]:
    """(steps of cfg.batch_size rows per rank, rows in a pass): cfg.tokens, else cfg.epochs passes over
    the ungated training rows (their count estimated from the gate's sample)."""
    train_rows = sum(cache.contexts_in_chunk(c) for c in train_chunks) * cache.ctx_len  # at the harvest's end
    pass_rows = round(train_rows * (1 - gated_fraction))
    available = int(cfg.epochs * pass_rows)
    tokens = cfg.tokens or available
    if tokens > available:
        gated = f", {gated_fraction:.1%} of them gated" if gated_fraction else ""
        raise UserError(
            f"cache {cache.path} has {train_rows:,} training rows ({cache.rows:,} committed, {cfg.holdout_chunks} "
            f"chunk(s) held out{gated}); {cfg.epochs:g} pass(es) over them are {available:,} tokens, fewer than the "
            f"{tokens:,} tokens asked; harvest more (sae harvest --tokens N), lower --tokens or allow more passes "
            f"with --epochs"
        )
    return max(1, tokens // (cfg.batch_size * world)), pass_rows
