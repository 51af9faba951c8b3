"""The run directory: what one SAE's folder holds, and the one module that reads and writes it.

    <run>/sae_weights.safetensors   W_enc [d, m], b_enc [m], W_dec [m, d], b_dec [d], threshold [m]
                                    (thresholded SAEs only); acting on raw activations (SAELens 6 layout)
    <run>/cfg.json                  SAELens fields + ours (the SAE, its cache, how it was trained): run_cfg
    <run>/metrics.jsonl             one line per logging step; a last line with the held-out figures
    <run>/checkpoint-<step>.pt      the training state (train.state.TrainState) for --resume
    <run>/snapshots/<tokens>/       the run as a shorter training would have left it
    <run>/eval.json, report.md, *.png    `sae eval`          <run>/inspect/    `sae inspect`

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
from sae.train.sae import SparseAutoencoder

WEIGHTS, CFG, METRICS, EVAL = "sae_weights.safetensors", "cfg.json", "metrics.jsonl", "eval.json"
SNAPSHOTS, INSPECT = "snapshots", "inspect"
PARTIAL = ".tmp"  # .<name>.tmp<pid>: a file being written; one a killed writer left is removed on resume
SAELENS_FORMAT = "6.0.0"
"""metadata.sae_lens_version: the SAELens cfg.json layout we write. SAELens reads a config without one as
pre-6.0 and drops its nested metadata (hook_name, model_name, context_size)."""
TRAINING_KEYS = (
    "step", "tokens", "epochs", "input", "train_config", "versions",
    "theta_eq7", "theta_source", "theta_calibration", "heldout",
)  # fmt: skip
"""cfg.json's record of how the SAE was trained, after the fields run_cfg derives from the SAE and cache."""


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    tmp = path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")
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


# -- what a run is: the SAE and cfg.json ---------------------------------------------------------
def cache_record(cache: Cache, layer: int) -> dict[str, Any]:
    """cfg.json's "cache": where the training rows are, which layer, and the spec that made them."""
    return {"path": cache.path, "key": cache.key, "layer": layer, "spec": cache.spec}


def run_cfg(sae: SparseAutoencoder, cache: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """cfg.json, the one place it is assembled: the fields SAELens 6's SAE.load_from_disk reads, then
    ours (the SAE's spec and θ, its cache as cache_record gives it) and `training`: how it was trained
    (TRAINING_KEYS, in that order, those that are set)."""
    assert set(training) <= set(TRAINING_KEYS), f"not a training key: {set(training) - set(TRAINING_KEYS)}"
    spec = cache["spec"]
    return {
        "architecture": sae.arch.saelens_architecture,
        "d_in": sae.d_in,
        "d_sae": sae.m,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if sae.input_norm == "standardize" else "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT,
            "model_name": spec.get("model"),
            "hook_name": f"blocks.{cache['layer']}.hook_{spec.get('site', 'resid_pre')}",
            "hook_head_index": None,
            "context_size": spec.get("ctx_len"),
            "prepend_bos": True,
            "dataset_path": spec.get("dataset"),
            # SAELens cannot express the gate: it encodes every row (README, "Run directory").
            "gate": sae.gate.record(),
            **sae.arch.saelens_metadata(),
        },
        **sae.arch.saelens_fields(),
        "training_architecture": sae.spec.arch,
        "sae": sae.spec._asdict(),
        "theta": float(sae.theta) if sae.arch.calibrated_theta else None,
        "cache": cache,
        **{key: training[key] for key in TRAINING_KEYS if key in training},
    }


def save_run(run_dir: Path, sae: SparseAutoencoder, cfg: dict[str, Any]) -> None:
    """The SAELens weights and cfg.json (weights first: cfg.json marks a complete run dir)."""
    tensors = sae.export()
    atomic_write(run_dir / WEIGHTS, lambda f: f.write(safetensors_bytes(tensors)))
    write_json(run_dir / CFG, cfg)


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
    cfg = json.loads((run_dir / CFG).read_text())
    if "cache" not in cfg:
        raise UserError(f"{run_dir / CFG} names no training cache: use runs written by `sae train`")
    recorded = cfg["cache"]
    location = as_location(cache if cache is not None else recorded["path"])
    if not location.exists("zarr.json"):
        raise UserError(f"run {run_dir}: its training cache {location} is not there; give its path with --cache")
    opened = open_cache(location)
    if opened.key != recorded["key"]:
        raise UserError(f"run {run_dir} was trained on cache {recorded['key']}, but {location} is {opened.key}")
    return Run(run_dir, cfg, opened, recorded["layer"])


def load_sae(run_dir: Path, device: str | torch.device = "cpu", gate: Gate = Gate()) -> SparseAutoencoder:
    """A saved SAE on raw activations: its scale in the weights, its standardisation and gate as saved;
    `gate`: more rows to pass through (an evaluation's own gate, united with the SAE's)."""
    run_dir = Path(run_dir)
    if not (run_dir / CFG).exists() or not (run_dir / WEIGHTS).exists():
        raise UserError(f"{run_dir} is not a run directory (no {CFG} and {WEIGHTS})")
    cfg = json.loads((run_dir / CFG).read_text())
    tensors = load_file(run_dir / WEIGHTS, device=str(device))
    normalize = "standardize" if cfg["normalize_activations"] == "layer_norm" else "none"
    gate = Gate.from_record(cfg["metadata"].get("gate")).union(gate)
    sae = SparseAutoencoder(SAESpec(**cfg["sae"]), cfg["d_in"], normalize=normalize, gate=gate).to(device)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(tensors[name])
        if "threshold" in tensors:
            sae.arch.load_threshold(sae, tensors["threshold"])
    return sae.eval()


# -- training: a fresh directory, metrics, checkpoints ------------------------------------------
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
        checkpoint_path(run_dir, step).unlink()
    remove_partial_writes(run_dir)


def remove_partial_writes(run_dir: Path) -> None:
    """Drop the temporary files of writes a killed training never finished (their targets are intact)."""
    for path in run_dir.rglob(f".*{PARTIAL}*"):
        path.unlink(missing_ok=True)


def snapshot_dir(run_dir: Path, tokens: int) -> Path:
    path = run_dir / SNAPSHOTS / str(tokens)
    path.mkdir(parents=True, exist_ok=True)
    return path


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def metrics_lines(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a last line a kill cut short (appends are not atomic) is dropped."""
    path = run_dir / METRICS
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines[:-1]]
    try:
        return records + [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        return records


def is_finished(run_dir: Path, steps: int) -> bool:
    """The run's training ended after `steps` steps: its last metrics line is the final record (the
    held-out figures; written after the final weights and cfg.json), not a logging line."""
    lines = metrics_lines(run_dir)
    return bool(lines) and lines[-1].get("step") == steps and "loss" not in lines[-1]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep the logging lines up to `step`: a resumed run logs the later ones and the final record again."""
    if (run_dir / METRICS).exists():
        lines = [json.dumps(r) for r in metrics_lines(run_dir) if "loss" in r and r["step"] <= step]
        atomic_write(run_dir / METRICS, lambda f: f.write("".join(ln + "\n" for ln in lines).encode()))


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"checkpoint-{step:09d}.pt"


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in run_dir.glob("checkpoint-*.pt"))


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> None:
    """Write the state of `step`, then drop all but the newest `keep` checkpoints."""
    atomic_write(checkpoint_path(run_dir, step), lambda f: torch.save(state, f))
    for old in checkpoint_steps(run_dir)[:-keep]:
        checkpoint_path(run_dir, old).unlink(missing_ok=True)


def load_checkpoint(run_dir: Path, step: int, device: torch.device) -> dict[str, Any]:
    return torch.load(checkpoint_path(run_dir, step), map_location=device, weights_only=True)


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
