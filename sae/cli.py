"""The `sae` command: one thin function per stage that builds its config and calls it.

Each stage's options are its config dataclass's fields (sae.flags); pipeline.toml glue (which cache a
`sae train` means, [[sweep]], resuming) is in sae.pipeline, so the stages never import one another's
configs.
"""

import os
import sys
from pathlib import Path

import click
import typer

from sae.cache.cli import cache_app
from sae.config import apply_storage_options, parse_sets, stage_config, to_jsonable
from sae.errors import UserError
from sae.evaluate.config import EvalConfig
from sae.flags import CONFIG, settings_command
from sae.harvest.config import HarvestConfig
from sae.inspect.config import InspectConfig
from sae.train.config import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(cache_app, name="cache")
STAGES = {"harvest": HarvestConfig, "train": TrainConfig, "eval": EvalConfig, "inspect": InspectConfig}


@app.command("harvest")
@settings_command(HarvestConfig)
def harvest_command(settings: dict, config: Path = CONFIG) -> None:
    """Run the LM over text and write residual-stream activations to a zarr cache (resumable)."""
    from sae.harvest.harvest import harvest

    cfg = stage_config(HarvestConfig, "harvest", config, settings)
    apply_storage_options(config)
    print(harvest(cfg))  # stdout carries only results, so scripts can capture them


# What of [harvest] `sae train --stream` takes from its own flags (its layer, tokens and device are the training's)
STREAM_HARVEST_FIELDS = (
    "model", "site", "dataset", "dataset_config", "dataset_split", "text_column", "ctx_len", "packing",
    "batch_contexts", "model_dtype", "dtype", "codec", "chunk_contexts", "cache_dir",
)  # fmt: skip


@app.command("train")
@settings_command(TrainConfig)
@settings_command(HarvestConfig, fields=STREAM_HARVEST_FIELDS, into="harvest")
def train_command(
    settings: dict,
    harvest: dict,
    resume: Path = typer.Option(None, help="A run directory to continue exactly where it stopped (its whole sweep)."),
    config: Path = CONFIG,
) -> None:
    """Train SAEs on a cached layer, or (--stream) straight from the LM: one pass over the data feeds
    every SAE of the sweep. The harvest options apply to --stream."""
    from sae.pipeline import resolve_cache, resumed_config, train_config
    from sae.train.trainer import run_training

    apply_storage_options(config)
    if resume is not None:
        cfg = resumed_config(resume, settings)
    else:
        cfg = train_config(config, settings)
        cfg.cache = cfg.cache if cfg.stream else resolve_cache(cfg.cache, config)
    if cfg.stream:
        run_dirs = train_from_stream(cfg, config, harvest, resume)
    else:
        given = sorted(name for name, value in harvest.items() if value is not None)
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} is a harvest setting: it applies to --stream only")
        run_dirs = run_training(cfg, cfg.cache, resume=resume is not None)
    for run_dir in run_dirs:
        print(run_dir)


def train_from_stream(cfg: TrainConfig, config: Path | None, harvest: dict, resume: Path | None) -> list[Path]:
    """Start the stream's harvest (where a resumed run's checkpoint says), train from it, stop it."""
    from sae.pipeline import stream_resume
    from sae.stream import stream_harvest_config, stream_window, streaming
    from sae.train.trainer import run_training

    if resume is not None:
        harvest_cfg, resume_at = stream_resume(cfg)
    else:
        harvest_cfg, resume_at = stream_harvest_config(config, harvest, cfg), None
    window = stream_window(harvest_cfg, cfg)
    with streaming(harvest_cfg, window, cfg.precision, resume_at, cfg.holdout_chunks) as stream:
        return run_training(cfg, stream.cache, resume=resume is not None, window=stream.window,
                            source={"harvest_config": to_jsonable(harvest_cfg)})  # fmt: skip


@app.command("calibrate")
@settings_command(TrainConfig, fields=("cache", "device"))
def calibrate_command(
    settings: dict,
    run: Path = typer.Argument(..., help="A BatchTopK run directory."),
    l0: float = typer.Option(None, help="Target mean L0 on the held-out rows (default: the run's k)."),
    config: Path = CONFIG,
) -> None:
    """Choose BatchTopK's inference θ again so that its mean L0 on the run's held-out rows is --l0."""
    from sae.train.theta import calibrate_run

    apply_storage_options(config)
    result = calibrate_run(run, l0, settings["cache"], settings["device"] or TrainConfig.device)
    print(
        f"θ = {result['theta']:.6g}: mean L0 {result['l0']:.3f} on {result['rows']:,} held-out rows (asked {result['target_l0']:g})"
    )


@app.command("eval")
@settings_command(EvalConfig)
def eval_command(
    settings: dict,
    runs: list[Path] = typer.Argument(..., help="Run directories, e.g. runs/* (the LM is loaded once per model)."),
    config: Path = CONFIG,
) -> None:
    """Splice each run's SAE into its LM on held-out text: eval.json, report.md and PNGs in the run dir."""
    from sae.evaluate.evaluate import evaluate_runs

    cfg = stage_config(EvalConfig, "eval", config, settings)
    apply_storage_options(config)
    for path in evaluate_runs(runs, cfg):
        print(path)


@app.command("compare")
def compare_command(
    runs: list[Path] = typer.Argument(..., help="Evaluated run directories, e.g. runs/*."),
    out: Path = typer.Option(Path("comparison"), help="Folder for table.md, table.csv and the plots."),
) -> None:
    """Compare evaluated runs: a table and NMSE-vs-L0 and CE-degradation-vs-L0 plots (paper Figure 1)."""
    from sae.evaluate.compare import compare_runs

    print(compare_runs(runs, out))


@app.command("inspect")
@settings_command(InspectConfig)
def inspect_command(
    settings: dict,
    run: Path = typer.Argument(..., help="A run directory."),
    latent: int = typer.Option(
        None, help="Print this latent's card in the terminal (reuses OUT/latents.json if it fits)."
    ),
    config: Path = CONFIG,
) -> None:
    """What each latent responds to, from one pass over the cache: a browsable page, or one latent's card."""
    from sae.inspect.card import print_card
    from sae.inspect.stage import inspect_run, saved_or_new

    cfg = stage_config(InspectConfig, "inspect", config, settings)
    apply_storage_options(config)
    if latent is None:
        print(inspect_run(run, cfg))
    else:
        print_card(saved_or_new(run, cfg, latent), latent)


@app.command("run")
def run_command(
    config: Path = CONFIG,
    out: Path = typer.Option(None, help=r"Parent of the run directories (default: \[train] out, ./runs)."),
    set_: list[str] = typer.Option(
        None, "--set", help="STAGE.KEY=VALUE over the file's value, e.g. train.gate_bos=true; repeatable."
    ),
    overlap: bool = typer.Option(
        True, help="Train while the harvest writes the cache (the same SAEs, sooner); --no-overlap: harvest first."
    ),
) -> None:
    """The whole pipeline as pipeline.toml describes it: harvest, train, eval, inspect, compare; ends with
    the comparison table."""
    from sae.evaluate.compare import summary
    from sae.pipeline import run_pipeline

    comparison, page = run_pipeline(config, out, parse_sets(set_ or [], STAGES), overlap)
    print(summary(comparison))
    if page is not None:
        print(f"latents: {page}")
    print(comparison)  # last, alone on its line: what a script captures


def main() -> None:
    """Entry point: a UserError becomes one line on stderr and exit code 1 (SAE_DEBUG=1 shows the traceback)."""
    try:
        code = app(standalone_mode=False)  # typer returns an Exit's code here, Ctrl-C's 130 among them
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        if os.environ.get("SAE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if code == 130:
        print("aborted", file=sys.stderr)
    if isinstance(code, int) and code != 0:
        sys.exit(code)
