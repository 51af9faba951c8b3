"""`sae cache ls | info | verify | unlock | convert`."""

import json
from pathlib import Path

import typer
from rich.table import Table

from sae.cache.convert import convert
from sae.cache.lock import unlock
from sae.cache.store import default_cache_root, list_caches, open_cache
from sae.cache.verify import describe, verify
from sae.config import apply_storage_options, stage_config
from sae.errors import UserError
from sae.flags import CONFIG, settings_command
from sae.harvest.config import HarvestConfig
from sae.progress import console, make_progress

cache_app = typer.Typer(no_args_is_help=True, help="List, describe, verify, unlock and convert activation caches.")


@cache_app.command("ls")
@settings_command(HarvestConfig, fields=("cache_dir",))
def ls_command(settings: dict, config: Path = CONFIG):
    """What caches exist: spec, committed tokens, size."""
    apply_storage_options(config)
    root = default_cache_root(stage_config(HarvestConfig, "harvest", config, settings).cache_dir)
    caches = list_caches(root)
    if not caches:
        console.print(f"no caches under {root}")
        return
    table = Table(title=f"caches under {root}")
    for column in ("directory", "model", "site", "layers", "tokens", "dtype", "size"):
        table.add_column(column, overflow="fold")
    for cache in caches:
        table.add_row(
            cache.location.name, cache.spec["model"], cache.spec["site"], ",".join(map(str, cache.layers)),
            f"{cache.rows:,}", f"{cache.storage_dtype} {cache.meta['storage']['codec']}",
            f"{cache.location.size() / 2**20:,.1f} MiB",
        )  # fmt: skip
    console.print(table)


@cache_app.command("info")
def info_command(
    path: str, as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."), config: Path = CONFIG
):
    """Describe one cache (its spec, rows, arrays, statistics, versions)."""
    apply_storage_options(config)
    description = describe(open_cache(path))
    if as_json:
        print(json.dumps(description))
        return
    for key, value in description.items():
        console.print(f"[bold]{key}[/bold]: {value}")


@cache_app.command("verify")
def verify_command(path: str, config: Path = CONFIG):
    """Re-read every committed chunk, check its checksum and values, and name the bad ones."""
    apply_storage_options(config)
    cache = open_cache(path)
    bad = []
    with make_progress("chunks") as progress:
        task = progress.add_task("verify", total=cache.n_chunks, status="")
        for _, problem in verify(cache):
            if problem:
                bad.append(problem)
            progress.advance(task)
    for problem in bad:
        console.print(problem)
    if bad:
        raise UserError(f"{len(bad)} of {cache.n_chunks} chunks are bad in {path}")
    console.print(f"{path}: {cache.n_chunks} chunks, {cache.rows:,} rows per layer, all good")


@cache_app.command("unlock")
def unlock_command(path: str, config: Path = CONFIG):
    """Remove the lock a killed harvest left behind (refused while its writer is alive)."""
    apply_storage_options(config)
    unlock(path)
    console.print(f"unlocked {path}")


@cache_app.command("convert")
@settings_command(HarvestConfig, fields=("dtype", "codec", "cache_dir"), show_defaults=False)
def convert_command(settings: dict, path: str, config: Path = CONFIG):
    """Copy a cache into another storage dtype (--dtype, e.g. float16 to int8; required) without
    re-running the model, with the source's codec beside the source unless --codec or --cache-dir say
    otherwise. Resumable; prints the new cache's path."""
    if settings["dtype"] is None:
        raise UserError("sae cache convert needs the dtype of the copy, e.g. --dtype int8")
    apply_storage_options(config)
    print(convert(path, settings["dtype"], settings["codec"], settings["cache_dir"]))
