"""Run directories: the SAELens-6 layout, plus what --resume needs.

    <run>/sae_weights.safetensors   W_enc [d, m], b_enc [m], W_dec [m, d], b_dec [d], threshold [m]
                                    (thresholded SAEs only); acting on raw activations
    <run>/cfg.json                  SAELens fields + ours (training_architecture, config, cache, versions)
    <run>/metrics.jsonl             one line per logging step; a last line with the held-out figures
    <run>/checkpoint-<step>.pt      training-space weights, optimizer, θ statistics, loader position

Every file is written atomically (temp file, fsync, rename), so a kill at any instant leaves either
the old file or the new one. The last two checkpoints are kept: a sweep killed between writing its
runs' checkpoints resumes from the newest step that every run has.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from sae.cache.location import as_location
from sae.cache.store import Cache, open_cache
from sae.errors import UserError
from sae.progress import console
from sae.train.config import SAESpec
from sae.train.gate import Gate
from sae.train.sae import SparseAutoencoder, normalize_input

WEIGHTS, CFG, METRICS = "sae_weights.safetensors", "cfg.json", "metrics.jsonl"
SAELENS_ARCH = {"batchtopk": "jumprelu", "jumprelu": "jumprelu", "topk": "topk", "relu": "standard"}


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}; choose a writable --out") from None
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def prepare_run_dir(run_dir: Path, overwrite: bool = False) -> None:
    """Create a run dir for a training that starts at step 0, clearing what a run killed before its
    first complete checkpoint left (metrics lines, checkpoints). A run that has saved its config is
    refused unless `overwrite` (a --resume that found no checkpoint common to its sweep starts over)."""
    if not overwrite and (run_dir / CFG).exists():
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write run directory {run_dir}: {e.strerror or e}; choose another --out") from None
    (run_dir / METRICS).unlink(missing_ok=True)
    for step in checkpoint_steps(run_dir):
        (run_dir / f"checkpoint-{step:09d}.pt").unlink()


def export_weights(sae: SparseAutoencoder, scale: float) -> dict[str, torch.Tensor]:
    """SAELens tensors acting on raw activations: the SAE saw x·scale, so fold the scale in.

    pre = (s·x − b_dec) W_enc + b_enc = (x − b_dec/s)(s·W_enc) + b_enc;  x̂ = (f W_dec + b_dec)/s.
    """
    with torch.no_grad():
        tensors = {
            "W_enc": sae.W_enc * scale,
            "b_enc": sae.b_enc.clone(),
            "W_dec": sae.W_dec / scale,
            "b_dec": sae.b_dec / scale,
        }
        if sae.spec.arch in ("batchtopk", "jumprelu"):
            tensors["threshold"] = sae.threshold_M().clone()
    return {name: t.float().cpu().contiguous() for name, t in tensors.items()}


def saelens_cfg(sae: SparseAutoencoder, standardized: bool, cache_spec: dict, layer: int) -> dict[str, Any]:
    """The fields SAELens 6's SAE.load_from_disk reads."""
    cfg = {
        "architecture": SAELENS_ARCH[sae.spec.arch],
        "d_in": sae.d_in,
        "d_sae": sae.m,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if standardized else "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": cache_spec.get("model"),
            "hook_name": f"blocks.{layer}.hook_{cache_spec.get('site', 'resid_pre')}",
            "hook_head_index": None,
            "context_size": cache_spec.get("ctx_len"),
            "prepend_bos": True,
            "dataset_path": cache_spec.get("dataset"),
            # SAELens cannot express the gate: it encodes every row (README, "Run directory").
            "gate": sae.gate.record(),
        },
    }
    if sae.spec.arch == "topk":
        cfg["k"] = sae.spec.k
    return cfg


def run_cfg(sae: SparseAutoencoder, standardized: bool, cache: Cache, layer: int) -> dict[str, Any]:
    """cfg.json's description of an SAE and its data: SAELens's fields plus ours (the trainer adds
    the training state; evaluation reads these)."""
    return {
        **saelens_cfg(sae, standardized, cache.spec, layer),
        "training_architecture": sae.spec.arch,
        "sae": sae.spec._asdict(),
        "theta": float(sae.threshold_M()[0]) if sae.spec.arch == "batchtopk" else None,
        "cache": {"path": cache.path, "key": cache.key, "layer": layer, "spec": cache.spec},
    }


def save_run(run_dir: Path, sae: SparseAutoencoder, scale: float, cfg_json: dict[str, Any]) -> None:
    """The SAELens weights and cfg.json (weights first: cfg.json marks a complete run dir)."""
    tensors = export_weights(sae, scale)
    atomic_write(run_dir / WEIGHTS, lambda f: f.write(safetensors_bytes(tensors)))
    write_json(run_dir / CFG, cfg_json)


@dataclass
class Run:
    path: Path
    cfg: dict
    """The run's cfg.json."""
    cache: Cache
    layer: int

    @property
    def model_key(self) -> tuple[str, str]:
        return self.cache.spec["model"], self.cache.spec["model_dtype"]


def read_run(run_dir: Path, cache: str | Path | None = None) -> Run:
    """The run's cfg.json and its training cache (`cache`: where it is now, if it moved), checked
    before any model is loaded."""
    run_dir = Path(run_dir)
    if not (run_dir / CFG).is_file() or not (run_dir / WEIGHTS).is_file():
        raise UserError(f"no saved SAE in {run_dir} (needs {CFG} and {WEIGHTS}); train one with `sae train`")
    run_cfg = json.loads((run_dir / CFG).read_text())
    if "cache" not in run_cfg:
        raise UserError(f"{run_dir / CFG} names no training cache: use runs written by `sae train`")
    recorded = run_cfg["cache"]
    location = as_location(cache if cache is not None else recorded["path"])
    if not location.exists("zarr.json"):
        raise UserError(f"run {run_dir}: its training cache {location} is not there; give its path with --cache")
    cache = open_cache(location)
    if cache.key != recorded["key"]:
        raise UserError(f"run {run_dir} was trained on cache {recorded['key']}, but {location} is {cache.key}")
    return Run(run_dir, run_cfg, cache, recorded["layer"])


def load_sae(run_dir: Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """A saved SAE (raw-activation weights, its gate and input_mode set)."""
    run_dir = Path(run_dir)
    if not (run_dir / CFG).exists() or not (run_dir / WEIGHTS).exists():
        raise UserError(f"{run_dir} is not a run directory (no {CFG} and {WEIGHTS})")
    cfg = json.loads((run_dir / CFG).read_text())
    tensors = load_file(run_dir / WEIGHTS, device=str(device))
    sae = SparseAutoencoder(SAESpec(**cfg["sae"]), cfg["d_in"]).to(device)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(tensors[name])
        if sae.spec.arch == "jumprelu":
            sae.log_threshold.copy_(tensors["threshold"].log())
        elif sae.spec.arch == "batchtopk":
            sae.theta.fill_(float(tensors["threshold"][0]))
    sae.gate = Gate.from_record(cfg["metadata"].get("gate"))
    sae.input_mode = "standardize" if cfg["normalize_activations"] == "layer_norm" else "none"
    return sae.eval()


def reconstruct(
    sae: SparseAutoencoder, x_BD: torch.Tensor, tokens_B: torch.Tensor | None = None,
    positions_B: torch.Tensor | None = None, gate: bool = True, batch_mode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(reconstruction [B, d] float32, latents [B, m]) of a loaded SAE on raw activations, as deployed:
    rows its gate names pass through unchanged with no active latent (token ids and positions in
    their contexts are needed only by a BOS or first-position gate); gate=False encodes every row,
    as SAELens does."""
    encode_B = ~sae.gate.gated(x_BD, tokens_B, positions_B) if gate and not sae.gate.empty else None
    return reconstruct_rows(sae, x_BD, encode_B, batch_mode)


def reconstruct_rows(
    sae: SparseAutoencoder, x_BD: torch.Tensor, encode_B: torch.Tensor | None = None, batch_mode: bool = False,
    theta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """reconstruct() of the rows in encode_B (None: all); the others keep x and no latents, and batch
    mode selects among the encoded rows only; `theta` replaces BatchTopK's saved θ. A standardising
    SAE ("layer_norm") sees each row standardised and its output mapped back, as in SAELens."""
    if encode_B is not None:
        recon_BD, latents_BM = x_BD.float().clone(), x_BD.new_zeros(len(x_BD), sae.m, dtype=torch.float32)
        if encode_B.any():
            recon_ND, latents_NM = reconstruct_rows(sae, x_BD[encode_B], None, batch_mode, theta)
            recon_BD[encode_B], latents_BM[encode_B] = recon_ND, latents_NM.float()
        return recon_BD, latents_BM
    x_n, mult, shift = normalize_input(x_BD, sae.input_mode)
    latents_BM = sae.encode(x_n, batch_mode, theta)
    return (sae.decode(latents_BM) * mult + shift).float(), latents_BM


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in run_dir.glob("checkpoint-*.pt"))


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any]) -> None:
    atomic_write(run_dir / f"checkpoint-{step:09d}.pt", lambda f: torch.save(state, f))


def prune_checkpoints(run_dir: Path, keep: int = 2) -> None:
    for step in checkpoint_steps(run_dir)[:-keep]:
        (run_dir / f"checkpoint-{step:09d}.pt").unlink(missing_ok=True)


def load_checkpoint(run_dir: Path, step: int, device: torch.device) -> dict[str, Any]:
    return torch.load(run_dir / f"checkpoint-{step:09d}.pt", map_location=device, weights_only=True)


def resume_point(run_dirs: list[Path], device: torch.device) -> tuple[int, list[dict[str, Any]] | None]:
    """(step, each run's checkpoint state) of the newest checkpoint every run of the sweep has and can
    read; an unreadable one (a damaged file) is skipped with a warning. (0, None) where there is none:
    the sweep was killed before its first complete checkpoint and starts over."""
    common = set.intersection(*[set(checkpoint_steps(d)) for d in run_dirs])
    for step in sorted(common, reverse=True):
        try:
            return step, [load_checkpoint(d, step, device) for d in run_dirs]
        except Exception as e:  # a truncated or corrupt file: torch.load's error says which
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            console.print(f"warning: a checkpoint of step {step} in {run_dirs[0].parent} is unreadable ({reason}); "
                          "resuming from an earlier one")  # fmt: skip
    return 0, None


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics lines logged after `step` (they will be logged again by the resumed run)."""
    path = run_dir / METRICS
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if json.loads(ln).get("step", 0) <= step]
        atomic_write(path, lambda f: f.write("".join(ln + "\n" for ln in lines).encode()))
