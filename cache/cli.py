"""`sae cache ls | info | verify | unlock`."""

import json
from pathlib import Path

import typer
from rich.table import Table

from sae.cache.lock import unlock
from sae.cache.store import default_cache_root, list_caches, open_cache
from sae.cache.verify import cache_size_bytes, describe, verify
from sae.errors import UserError
from sae.progress import console, make_progress

cache_app = typer.Typer(no_args_is_help=True, help="List, describe, verify and unlock activation caches.")


@cache_app.command("ls")
def ls_command(
    cache_dir: Path = typer.Option(None, help="Root of the caches (default: $SAE_CACHE_DIR, else ./caches)."),
):
    """What caches exist: spec, committed tokens, size."""
    root = default_cache_root(cache_dir)
    caches = list_caches(root)
    if not caches:
        console.print(f"no caches under {root}")
        return
    table = Table(title=f"caches under {root}")
    for column in ("directory", "model", "site", "layers", "tokens", "dtype", "size"):
        table.add_column(column, overflow="fold")
    for cache in caches:
        table.add_row(
            cache.path.name, cache.spec["model"], cache.spec["site"], ",".join(map(str, cache.layers)),
            f"{cache.rows:,}", f"{cache.storage_dtype} {cache.meta['storage']['codec']}",
            f"{cache_size_bytes(cache.path) / 2**20:,.1f} MiB",
        )  # fmt: skip
    console.print(table)


@cache_app.command("info")
def info_command(path: Path, as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout.")):
    """Describe one cache (its spec, rows, arrays, statistics, versions)."""
    description = describe(open_cache(path))
    if as_json:
        print(json.dumps(description))
        return
    for key, value in description.items():
        console.print(f"[bold]{key}[/bold]: {value}")


@cache_app.command("verify")
def verify_command(path: Path):
    """Re-read every committed chunk, check its checksum and values, and name the bad ones."""
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
def unlock_command(path: Path):
    """Remove the lock a killed harvest left behind (refused while its writer is alive)."""
    unlock(path)
    console.print(f"unlocked {path}")
