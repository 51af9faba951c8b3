"""Glue between stages that the CLI needs: which cache a `sae train` without --cache means, the
[train] config with its [[sweep]], a resumed run's saved config, and `sae run` itself."""

import dataclasses
import json
import os
from pathlib import Path

from sae.cache.store import default_cache_root, find_caches
from sae.cache.window import Window
from sae.commands import harvest_command_line
from sae.config import apply_storage_options, build_config, read_pipeline_toml, stage_config, to_jsonable
from sae.device import resolve_device
from sae.errors import UserError
from sae.harvest.config import HarvestConfig
from sae.train.config import SWEEP_KEYS, TrainConfig


def resolve_cache(cache: str | None, config_path: Path | None) -> str:
    """The given cache, else the largest cache matching pipeline.toml's [harvest] spec.

    Only the CLI calls this: the train stage itself never imports harvest.
    """
    if cache is not None:
        return cache
    harvest_cfg = stage_config(HarvestConfig, "harvest", config_path, {})
    root = default_cache_root(harvest_cfg.cache_dir)
    matches = find_caches(root, harvest_cfg.declared_spec())
    if not matches:
        raise UserError(
            f"no cache in {root} matches the [harvest] spec (model {harvest_cfg.model}, layers "
            f"{list(harvest_cfg.layers)}, {harvest_cfg.dataset}); make it with `{harvest_command_line(harvest_cfg)}`"
            " or pass --cache PATH"
        )
    return max(matches, key=lambda c: c.n_contexts).path


def train_config(config_path: Path | None, settings: dict) -> TrainConfig:
    """[train] with its settings; [[sweep]] tables unless a setting gives the grid or the sweep itself."""
    grid = any(settings.get(key) is not None for key in (*SWEEP_KEYS, "sweep"))
    sweep = read_pipeline_toml(config_path).get("sweep")
    if sweep and not grid:
        settings = {**settings, "sweep": tuple(sweep)}
    return stage_config(TrainConfig, "train", config_path, settings)


def resumed_config(run_dir: Path, settings: dict) -> TrainConfig:
    """The saved config of run_dir's sweep, reading its cache there or at --cache (e.g. after moving it)."""
    cfg_path = run_dir / "cfg.json"
    if not cfg_path.exists():
        raise UserError(f"{run_dir} is not a run directory (no cfg.json); nothing to resume")
    given = sorted(name for name, value in settings.items() if value is not None and name != "cache")
    if given:
        raise UserError(f"--resume continues with the run's saved config; drop --{given[0].replace('_', '-')}")
    saved = json.loads(cfg_path.read_text())
    cache = settings["cache"] or saved["cache"]["path"]
    where = f"{cfg_path} train_config"
    return build_config(TrainConfig, saved["train_config"], {"out": run_dir.parent, "cache": cache}, where)


def stream_resume(cfg: TrainConfig) -> tuple[HarvestConfig, dict | None]:
    """A streamed sweep's harvest config and where its stream stood at its newest checkpoint."""
    from sae.train.rundir import stream_point

    run_dirs = [Path(cfg.out) / spec.name for spec in cfg.specs()]
    saved = json.loads((run_dirs[0] / "cfg.json").read_text())
    if "stream" not in saved:
        raise UserError(f"{run_dirs[0]} was not trained from a stream; resume it without --stream")
    where = f"{run_dirs[0] / 'cfg.json'} stream"
    return build_config(HarvestConfig, saved["stream"]["harvest_config"], {}, where), stream_point(run_dirs)


def run_pipeline(
    config_path: Path | None, out: Path | None, sets: dict[str, dict] | None = None, overlap: bool = True
) -> tuple[Path, Path | None]:
    """harvest → train (the [train]/[[sweep]] SAEs) → eval each run → inspect the BatchTopK run →
    compare; returns (the comparison folder, the inspect page). Each stage reads its table of
    pipeline.toml, exactly as its own command does, then the overrides in sets[stage]
    ({"train": {"gate_bos": True}}, from `--set`). `overlap`: train while the harvest writes (one
    process; not under torchrun, whose ranks' collectives must not interleave), else harvest first. Run
    again after a kill, it resumes the harvest and the training where they stopped (continues_runs)."""
    from sae.evaluate.compare import compare_runs
    from sae.evaluate.config import EvalConfig
    from sae.evaluate.evaluate import evaluate_runs
    from sae.harvest.harvest import harvest
    from sae.inspect.config import InspectConfig
    from sae.inspect.stage import inspect_pipeline_runs
    from sae.stream import UNBOUNDED, streaming
    from sae.train.trainer import configure_backend, run_training

    sets = sets or {}
    apply_storage_options(config_path)
    harvest_cfg = stage_config(HarvestConfig, "harvest", config_path, sets.get("harvest", {}))
    # The first pass in harvest order either way: the same SAEs overlapped or not, cache reused or not.
    train_cfg = train_config(config_path, {**sets.get("train", {}), "out": out, "follow": True})
    resume = continues_runs(train_cfg, list(train_cfg.layer or harvest_cfg.layers))
    if overlap and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        with streaming(harvest_cfg, Window(UNBOUNDED, keep=True), train_cfg.precision) as stream:
            train_cfg = dataclasses.replace(train_cfg, cache=stream.cache)
            run_dirs = run_training(train_cfg, stream.cache, resume, window=stream.window)
    else:
        # under the training's backend setting (CUDA's TF32), as streaming harvests: the same cache either way
        configure_backend(resolve_device(harvest_cfg.device), train_cfg.precision)
        train_cfg = dataclasses.replace(train_cfg, cache=harvest(harvest_cfg))
        run_dirs = run_training(train_cfg, train_cfg.cache, resume)
    evaluate_runs(run_dirs, stage_config(EvalConfig, "eval", config_path, sets.get("eval", {})))
    page = inspect_pipeline_runs(run_dirs, stage_config(InspectConfig, "inspect", config_path, sets.get("inspect", {})))
    out_dir = Path(train_cfg.out)
    # beside the runs, not among them: `sae eval runs/*` and `sae compare runs/*` must see only runs
    return compare_runs(run_dirs, out_dir.with_name(f"{out_dir.name}-comparison")), page


def continues_runs(cfg: TrainConfig, layers: list[int]) -> bool:
    """Whether `sae run` continues the runs of an earlier `sae run` into the same folder (killed: from
    their newest checkpoint; finished: they are evaluated again): every run of the sweep is there, made
    by this very [train] config. None there: False. Any other run in the way is an error now, not after
    the harvest."""
    from sae.train.plan import sweep_specs
    from sae.train.rundir import CFG

    run_dirs = [Path(cfg.out) / spec.name for spec in sweep_specs(cfg, layers)]
    held = [run_dir for run_dir in run_dirs if (run_dir / CFG).exists()]
    if not held:
        return False
    wanted = {**to_jsonable(cfg), "cache": None}  # the cache: the same spec's, wherever it was
    other = [d for d in held if {**json.loads((d / CFG).read_text())["train_config"], "cache": None} != wanted]
    if other or len(held) < len(run_dirs):
        raise UserError(
            f"{(other or held)[0]} already holds a run of another [train] config or sweep than this sae run's: "
            "choose another --out"
        )
    return True
