"""`sae inspect` flags (the stage has no pipeline.toml table: every setting is a flag or a default)."""

from pathlib import Path

import typer

from sae.config import build_config, parse_count
from sae.inspect.config import InspectConfig

Opt = typer.Option


def inspect_command(
    run: Path = typer.Argument(..., help="A run directory."),
    tokens: str = Opt(None, help="Read the cache's first N rows, e.g. 1e6 (default: the run's held-out chunks)."),
    out: Path = Opt(None, help="Folder for latents.json and index.html (default: RUN/inspect)."),
    latent: int = Opt(None, help="Print this latent's card in the terminal (reuses OUT/latents.json if it fits)."),
    top: int = Opt(None, help="Top-activating examples per latent (default 20)."),
    quantile_samples: int = Opt(None, help="Examples per latent across its activation quantiles (default 10)."),
    lm: bool = Opt(None, "--lm/--no-lm", help="Load the LM for token text and token effects (default: yes)."),
    cache: Path = Opt(None, help="The training cache, if it moved since training."),
    device: str = Opt(None, help="auto, cpu, cuda, cuda:1, ..."),
) -> None:
    """What each latent responds to, from one pass over the cache: a browsable page, or one latent's card."""
    from sae.inspect.card import print_card
    from sae.inspect.stage import inspect_run, saved_or_new

    overrides = dict(
        tokens=parse_count(tokens),
        out=out,
        top=top,
        quantile_samples=quantile_samples,
        lm=lm,
        cache=cache,
        device=device,
    )
    cfg = build_config(InspectConfig, {}, overrides, "sae inspect")
    if latent is None:
        print(inspect_run(run, cfg))  # stdout carries only the result, so scripts can capture it
    else:
        print_card(saved_or_new(run, cfg, latent), latent)
