"""`sae train` flags; each one overrides its twin in pipeline.toml [train] (and [[sweep]])."""

import json
from pathlib import Path

import typer

from sae.config import (
    apply_storage_options,
    build_config,
    parse_count,
    parse_counts,
    parse_ints,
    read_pipeline_toml,
    stage_config,
)
from sae.errors import UserError
from sae.pipeline import resolve_cache
from sae.train.config import TrainConfig

Opt = typer.Option


def parse_list(text: str | None, kind: type) -> tuple | None:
    """ "batchtopk,topk" -> ("batchtopk", "topk"); "0.004,0.0018" -> (0.004, 0.0018)."""
    if text is None:
        return None
    if kind is int:
        return parse_ints(text)
    try:
        return tuple(kind(part.strip()) for part in text.split(","))
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got '{text}'") from None


def train_command(
    arch: str = Opt(None, help="batchtopk, topk, jumprelu, relu; several (comma-separated) make a sweep."),
    k: str = Opt(None, help="Active latents per token, e.g. 32 or 16,32,64 ((batch)topk)."),
    dict_size: str = Opt(None, help="Dictionary size(s) m, e.g. 12288."),
    l0_coeff: str = Opt(None, help="JumpReLU L0 penalty(s), e.g. 0.0018."),
    l1_coeff: str = Opt(None, help="ReLU L1 penalty(s)."),
    cache: str = Opt(None, help="Cache path or URL (default: the cache of pipeline.toml's [harvest] spec)."),
    layer: int = Opt(None, help="Cache layer to train on (default: the cache's only layer)."),
    tokens: str = Opt(None, help="Training tokens per SAE, e.g. 1e9 (default: one pass over the cache)."),
    batch_size: int = Opt(None, help="Activations per step (paper: 4096)."),
    lr: float = Opt(None, help="Adam learning rate (paper: 3e-4)."),
    threshold_lr: float = Opt(None, help="JumpReLU log-threshold learning rate (default: --lr)."),
    seed: int = Opt(None, help="Seed of the initialisation and data order."),
    normalize: str = Opt(None, help="none, standardize (per sample, reference code) or scale (E‖x‖=√d)."),
    gate_bos: bool = Opt(None, "--gate-bos/--no-gate-bos", help="Gate BOS rows: out of training, passed through."),
    gate_first: bool = Opt(None, "--gate-first/--no-gate-first", help="Gate each context's first position."),
    gate_norm: float = Opt(None, help="Gate rows above this multiple of the median row norm, e.g. 4."),
    b_dec_init: str = Opt(
        None, help="Decoder bias at the start: median (geometric median of the rows; default) or zeros."
    ),
    theta: str = Opt(None, help="BatchTopK's saved θ: calibrated (held-out L0 = k) or eq7 (the paper's)."),
    epochs: float = Opt(None, help="Passes over the cache's training rows (default 1; may be fractional)."),
    snapshots: str = Opt(None, help="Also save each SAE at these training-token counts, e.g. 1e6,3e6."),
    holdout_chunks: int = Opt(None, help="Last full cache chunks (and a partial last one) kept out of training."),
    aux_k: int = Opt(None, help="AuxK dead latents (default 512)."),
    aux_coeff: float = Opt(None, help="AuxK coefficient (default 1/32)."),
    dead_tokens: int = Opt(None, help="Tokens without firing after which a latent counts as dead."),
    device: str = Opt(None, help="auto, cpu, cuda, cuda:1, ..."),
    precision: str = Opt(None, help="fp32, tf32 or bf16 (CUDA matmuls; weights stay fp32)."),
    decode: str = Opt(None, help="(batch)topk decode: auto (sparse on CPU, dense on CUDA), sparse or dense."),
    compile: bool = Opt(None, "--compile/--no-compile", help="torch.compile the SAE forward."),
    log_every: int = Opt(None, help="Steps between metrics lines."),
    checkpoint_every: int = Opt(None, help="Steps between resumable checkpoints."),
    out: Path = Opt(None, help="Parent of the run directories (default ./runs)."),
    wandb: str = Opt(None, help="W&B project to log to (needs wandb installed)."),
    resume: Path = Opt(None, help="A run directory to continue exactly where it stopped (its whole sweep)."),
    config: Path = Opt(None, help="pipeline.toml to read (default: ./pipeline.toml if present)."),
) -> None:
    """Train SAEs on a cached layer: one pass over the data feeds every SAE of the sweep."""
    from sae.train.trainer import run_training

    overrides = dict(
        arch=parse_list(arch, str), k=parse_list(k, int), dict_size=parse_list(dict_size, int),
        l0_coeff=parse_list(l0_coeff, float), l1_coeff=parse_list(l1_coeff, float), layer=layer,
        tokens=parse_count(tokens), batch_size=batch_size, lr=lr, threshold_lr=threshold_lr, seed=seed, normalize=normalize,
        gate_bos=gate_bos, gate_first=gate_first, gate_norm=gate_norm, b_dec_init=b_dec_init, theta=theta, epochs=epochs,
        snapshots=parse_counts(snapshots),
        holdout_chunks=holdout_chunks, aux_k=aux_k, aux_coeff=aux_coeff, dead_tokens=dead_tokens,
        device=device, precision=precision, decode=decode, compile=compile,
        log_every=log_every, checkpoint_every=checkpoint_every, out=out, wandb=wandb,
    )  # fmt: skip
    apply_storage_options(config)
    if resume is not None:
        cfg, cache = resumed_config(resume, overrides, cache)
    else:
        cfg = train_config(config, overrides)
        cache = resolve_cache(cache, config)
    for run_dir in run_training(cfg, cache, resume=resume is not None):
        print(run_dir)  # stdout carries only the result, so scripts can capture it


def calibrate_command(
    run: Path = typer.Argument(..., help="A BatchTopK run directory."),
    l0: float = Opt(None, help="Target mean L0 on the held-out rows (default: the run's k)."),
    cache: str = Opt(None, help="The training cache (path or URL), if it moved since training."),
    device: str = Opt("cpu", help="cpu, cuda, cuda:1, ..."),
    config: Path = Opt(None, help="pipeline.toml whose [storage] table to use (default: ./pipeline.toml)."),
) -> None:
    """Choose BatchTopK's inference θ again so that its mean L0 on the run's held-out rows is --l0."""
    from sae.train.theta import calibrate_run

    apply_storage_options(config)
    result = calibrate_run(run, l0, cache, device)
    print(
        f"θ = {result['theta']:.6g}: mean L0 {result['l0']:.3f} on {result['rows']:,} held-out rows (asked {result['target_l0']:g})"
    )


def train_config(config_path: Path | None, overrides: dict) -> TrainConfig:
    """[train] with its flags; [[sweep]] tables unless a flag sets the grid (arch/k/dict_size/coeffs)."""
    grid_flags = any(overrides.get(key) is not None for key in ("arch", "k", "dict_size", "l0_coeff", "l1_coeff"))
    sweep = read_pipeline_toml(config_path).get("sweep")
    if sweep and not grid_flags:
        overrides = {**overrides, "sweep": tuple(sweep)}
    return stage_config(TrainConfig, "train", config_path, overrides)


def resumed_config(run_dir: Path, overrides: dict, cache: str | None) -> tuple[TrainConfig, str]:
    """The saved config of run_dir's sweep, and its cache (or --cache, e.g. after moving it)."""
    cfg_path = run_dir / "cfg.json"
    if not cfg_path.exists():
        raise UserError(f"{run_dir} is not a run directory (no cfg.json); nothing to resume")
    given = sorted(name for name, value in overrides.items() if value is not None)
    if given:
        raise UserError(f"--resume continues with the run's saved config; drop --{given[0].replace('_', '-')}")
    saved = json.loads(cfg_path.read_text())
    cfg = build_config(TrainConfig, saved["train_config"], {"out": run_dir.parent}, f"{cfg_path} train_config")
    return cfg, cache or saved["cache"]["path"]
