"""The `sae` command: thin wrappers that build each stage's config and call it."""

import os
import sys
from pathlib import Path

import click
import typer

from sae.cache.cli import cache_app
from sae.config import parse_sets
from sae.errors import UserError
from sae.evaluate.cli import compare_command, eval_command
from sae.harvest.cli import harvest_command
from sae.inspect.cli import inspect_command
from sae.pipeline import run_pipeline
from sae.train.cli import calibrate_command, train_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
app.command("harvest")(harvest_command)
app.command("train")(train_command)
app.command("calibrate")(calibrate_command)
app.command("eval")(eval_command)
app.command("compare")(compare_command)
app.command("inspect")(inspect_command)
app.add_typer(cache_app, name="cache")


@app.command("run")
def run_command(
    config: Path = typer.Option(None, help="pipeline.toml to read (default: ./pipeline.toml if present)."),
    out: Path = typer.Option(None, help="Parent of the run directories (default: [train] out, ./runs)."),
    set_: list[str] = typer.Option(
        None, "--set", help="STAGE.KEY=VALUE over the file's value, e.g. train.gate_bos=true; repeatable."
    ),
) -> None:
    """The whole pipeline as pipeline.toml describes it: harvest, train, eval, inspect, compare; ends with
    the comparison table."""
    from sae.evaluate.compare import summary
    from sae.evaluate.config import EvalConfig
    from sae.harvest.config import HarvestConfig
    from sae.train.config import TrainConfig

    stages = {"harvest": HarvestConfig, "train": TrainConfig, "eval": EvalConfig}
    comparison, page = run_pipeline(config, out, parse_sets(set_ or [], stages))
    print(summary(comparison))
    if page is not None:
        print(f"latents: {page}")
    print(comparison)  # last, alone on its line: what a script captures


def main() -> None:
    """Entry point: a UserError becomes one line on stderr and exit code 1 (SAE_DEBUG=1 shows the traceback)."""
    try:
        app(standalone_mode=False)
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
