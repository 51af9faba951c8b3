"""The run directory: what one SAE's folder holds, and the one module that reads and writes it.

    <run>/sae_weights.safetensors   W_enc [d, m], b_enc [m], W_dec [m, d], b_dec [d], threshold [m]
                                    (thresholded SAEs only); acting on raw activations (SAELens 6 layout)
    <run>/cfg.json                  SAELens fields + ours (the SAE, its cache, how it was trained): run_cfg
    <run>/metrics.jsonl             one line per logging step; a last line with the held-out figures
    <run>/checkpoint-<step>.pt      the training state (train.state.TrainState) for --resume
    <run>/snapshots/<tokens>/       the run as a shorter training would have left it
    <run>/eval.json, report.md, *.png    `sae eval`          <run>/inspect/    `sae inspect`

`sae eval`, `sae compare` and `sae inspect` also read the SAEs of other libraries (SAELens, sparsify,
dictionary_learning): read_run and load_sae tell the formats apart by their files (run_format) and
read them with train.formats, onto the same SparseAutoencoder.

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
from sae.cache.spec import file_sha256
from sae.cache.store import Cache, default_cache_root, is_cache, list_caches, open_cache
from sae.config import StageConfig, setting
from sae.errors import UserError
from sae.harvest.model import SITES
from sae.progress import console
from sae.train.config import SAESpec
from sae.train.formats import Imported, dictionary_learning, read_json, saelens, sparsify
from sae.train.gate import Gate
from sae.train.sae import SparseAutoencoder

WEIGHTS, CFG, METRICS, EVAL = "sae_weights.safetensors", "cfg.json", "metrics.jsonl", "eval.json"
SNAPSHOTS, INSPECT = "snapshots", "inspect"
DEFAULT_CONTEXT = 128  # the context length an imported SAE is evaluated at where its files name none
PARTIAL = ".tmp"  # .<name>.tmp<pid>: a file being written; one a killed writer left is removed on resume
SAELENS_FORMAT = "6.0.0"
"""metadata.sae_lens_version: the SAELens cfg.json layout we write. SAELens reads a config without one as
pre-6.0 and drops its nested metadata (hook_name, model_name, context_size)."""
TRAINING_KEYS = (
    "step", "tokens", "epochs", "input", "train_config", "versions",
    "theta_eq7", "theta_source", "theta_calibration", "heldout", "stream",
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
        "normalize_activations": {"standardize": "layer_norm", "constant_norm_rescale": "constant_norm_rescale"}.get(
            sae.input_norm, "none"
        ),
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
    """The run's cfg.json; for an imported SAE, the cfg.json ours would have (run_cfg) and its "source"."""
    cache: Cache | None
    """The training cache; for an imported SAE a cache of its model and site, or None (none found); None
    for a run trained from a stream in memory (--stream without --keep-cache)."""
    layer: int
    imported: Imported | None = None
    """An SAE another library trained (train.formats), as read; None: one of ours."""

    @property
    def spec(self) -> dict[str, Any]:
        """The cache's spec; for an imported SAE without one, what its files (or flags) name."""
        return self.cache.spec if self.cache is not None else self.cfg["cache"]["spec"]

    @property
    def model_key(self) -> tuple[str, str]:
        return self.spec["model"], self.spec.get("model_dtype", "float32")

    def weights_sha256(self) -> str:
        files = self.imported.files if self.imported is not None else [self.path / WEIGHTS]
        return file_sha256(files)


FORMATS = {"saelens": saelens, "sparsify": sparsify, "dictionary_learning": dictionary_learning}
LABELS = {
    "ours": "`sae train` run",
    "saelens": "SAELens",
    "sparsify": "sparsify",
    "dictionary_learning": "dictionary_learning",
}


def resolve(run_dir: str | Path) -> Path:
    """The directory a run argument names: itself, or for `saelens:RELEASE/SAE_ID` SAELens's download of it."""
    text = str(run_dir)
    return saelens.fetch(text) if text.startswith(saelens.PREFIX) else Path(run_dir)


def run_format(run_dir: Path) -> str:
    """The format of run_dir from its files: "ours", "saelens", "sparsify" or "dictionary_learning"; else one line
    naming what is there and what is missing."""
    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if {CFG, WEIGHTS} <= names:
        return "ours" if "cache" in read_json(run_dir / CFG) else "saelens"
    for name, module in FORMATS.items():
        if set(module.FILES) <= names:
            return name
    inside = [str(run_dir / p) for p in sorted(names) if _holds_sae(run_dir / p)][:4]
    partial = [(name, module.FILES) for name, module in FORMATS.items() if names & set(module.FILES)]
    if CFG in names and WEIGHTS not in names and _sparsify_cfg(run_dir / CFG):
        partial = [("sparsify", sparsify.FILES)]
    if partial and not inside:  # (a sparsify run's folder has a config.json beside its hookpoints)
        name, files = partial[0]
        missing = [f for f in files if f not in names]
        raise UserError(f"{run_dir} holds {', '.join(f for f in files if f in names)} of a {LABELS[name]} SAE but "
                        f"not {', '.join(missing)}")  # fmt: skip
    held = ", ".join(sorted(names)[:8]) + (", …" if len(names) > 8 else "") if names else "nothing"
    hint = f"; pass one of the SAEs inside it: {', '.join(inside)}" if inside else ""
    raise UserError(
        f"no saved SAE in {run_dir} (it holds {held}): a run has {CFG} and {WEIGHTS} (ours, SAELens), {CFG} and "
        f"{sparsify.WEIGHTS} (sparsify) or {dictionary_learning.WEIGHTS} and {dictionary_learning.CONFIG} "
        f"(dictionary_learning){hint}"
    )


def _sparsify_cfg(path: Path) -> bool:
    try:
        return "expansion_factor" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _holds_sae(path: Path) -> bool:
    """The folder has the files of one of the formats (not looking further down)."""
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    return {CFG, WEIGHTS} <= names or any(set(module.FILES) <= names for module in FORMATS.values())


@dataclass
class RunSource(StageConfig):
    """Where an SAE's data is, when its run directory does not say (or says wrong): the settings of
    `sae eval` and `sae inspect` that read_run takes."""

    cache: str | None = None
    """The training cache (a path or URL), or a folder of caches holding it; None: the one recorded in
    the run's cfg.json. Give it if the cache moved. For another library's SAE: a cache of its model's
    residual stream at its site, or a folder to look in; None: the cache root ($SAE_CACHE_DIR, else
    ./caches)."""
    model: str | None = None
    """The model of another library's SAE (HF hub id, local model directory or `smollm2-135m`, as its
    caches name it); None: the one its files name. Our runs always take their cache's."""
    site: str | None = setting(None, choices=SITES)
    """The site of another library's SAE (resid_pre or resid_post); None: the one its files name."""
    layer: int | None = setting(None, at_least=0)
    """The layer of another library's SAE; None: the one its files name."""


def read_run(run_dir: str | Path, cache: str | Path | None = None, model: str | None = None,
             site: str | None = None, layer: int | None = None) -> Run:  # fmt: skip
    """The run's cfg.json and its cache, checked before any model is loaded. Ours: its training cache
    (`cache`: where it is now, or a folder of caches holding it). Another library's SAE (train.formats):
    where its files say it belongs, `model`, `site` and `layer` overriding them, and a cache of that
    model's residual stream there under `cache` (a cache or a folder of caches; default: the cache root)."""
    run_dir = resolve(run_dir)
    found = run_format(run_dir)
    if found != "ours":
        return imported_run(run_dir, FORMATS[found].read(run_dir), cache, model, site, layer)
    cfg = json.loads((run_dir / CFG).read_text())
    recorded = cfg["cache"]
    if cache is None and recorded["path"].startswith("memory://") and "stream_end" in cfg.get("stream", {}):
        return Run(run_dir, cfg, None, recorded["layer"])  # trained from a stream whose rows were not kept
    location = as_location(cache if cache is not None else recorded["path"])
    if cache is not None and not is_cache(location):  # a folder of caches: the run's is among them
        location = next((c.location for c in list_caches(location) if c.key == recorded["key"]), location)
    if not location.exists("zarr.json"):
        raise UserError(f"run {run_dir}: its training cache {location} is not there; give its path with --cache")
    opened = open_cache(location)
    if opened.key != recorded["key"]:
        raise UserError(f"run {run_dir} was trained on cache {recorded['key']}, but {location} is {opened.key}")
    return Run(run_dir, cfg, opened, recorded["layer"])


def imported_run(run_dir: Path, imported: Imported, cache: str | Path | None, model: str | None,
                 site: str | None, layer: int | None) -> Run:  # fmt: skip
    """An imported SAE as a Run: at the model, site and layer its files name (or the flags), with a
    matching cache where one exists; cfg as run_cfg would write it for the SAE, plus its "source"."""
    model, site = model or imported.model, site or imported.site
    layer = layer if layer is not None else imported.layer
    missing = [flag for flag, value in (("--model", model), ("--site", site), ("--layer", layer)) if value is None]
    if missing:
        reasons = [f"its hook {imported.hook!r} is no residual-stream site" if imported.hook else "no site named"]
        reasons = (reasons if site is None or layer is None else []) + (["no model named"] if model is None else [])
        raise UserError(
            f"{run_dir}: where this {LABELS[imported.format]} SAE belongs is not in its files ({', '.join(reasons)}); "
            f"pass {' and '.join(missing)}"
        )
    match = matching_cache(cache, model, site, layer, imported.sae.d_in)
    if match is not None:
        opened, layer = match
        record = cache_record(opened, layer)
    else:
        opened = None
        spec = {"model": model, "model_dtype": "float32", "site": site, "dataset": imported.dataset,
                "ctx_len": imported.context_size or DEFAULT_CONTEXT}  # fmt: skip
        record = {"path": None, "key": None, "layer": layer, "spec": spec}
    source = {"format": imported.format, "name": imported.name, "hook": imported.hook, "model": imported.model,
              "site": imported.site, "layer": imported.layer, "files_sha256": imported.files_sha256(),
              **imported.details}  # fmt: skip
    return Run(run_dir, {**run_cfg(imported.sae, record, {}), "source": source}, opened, layer, imported)


def matching_cache(where: str | Path | None, model: str, site: str, layer: int, d_in: int) -> tuple[Cache, int] | None:
    """(the largest cache of model's residual stream at site and layer, its layer) under `where` (a cache or
    a folder of caches; None: the default cache root). resid_post L is resid_pre L+1: a cache of either
    serves (its site is where evaluation splices); d_model must be d_in. A `where` that is a cache and
    does not match is an error; None where nothing matches."""
    root = as_location(where) if where is not None else default_cache_root(None)
    caches = [open_cache(root)] if is_cache(root) else list_caches(root)
    found = []
    for opened in caches:
        if opened.spec.get("model") != model or opened.d_model != d_in:
            continue
        same = [(site, layer), ("resid_pre", layer + 1) if site == "resid_post" else ("resid_post", layer - 1)]
        found += [(opened, at) for name, at in same if opened.spec["site"] == name and at in opened.layers]
    if not found and where is not None and is_cache(root):
        raise UserError(
            f"cache {root} is not of {model} {site} layer {layer} (d_model {d_in}); give one that is, or none"
        )
    return max(found, key=lambda pair: pair[0].n_contexts) if found else None


def load_sae(run: "Run | str | Path", device: str | torch.device = "cpu", gate: Gate = Gate()) -> SparseAutoencoder:
    """A saved SAE on raw activations, ours or another library's (train.formats): its scale in the weights,
    its normalisation and gate as saved; `gate`: more rows to pass through (an evaluation's own gate,
    united with the SAE's). A Run read before gives its imported SAE without reading it again."""
    if isinstance(run, Run) and run.imported is not None:
        imported = run.imported
    else:
        run_dir = resolve(run.path if isinstance(run, Run) else run)
        found = run_format(run_dir)
        imported = FORMATS[found].read(run_dir) if found != "ours" else None
    if imported is not None:
        sae = imported.sae
        sae.gate = sae.gate.union(gate)
        return sae.to(device)
    cfg = json.loads((run_dir / CFG).read_text())
    tensors = load_file(run_dir / WEIGHTS, device=str(device))
    normalize = saelens.NORMALIZATIONS[cfg["normalize_activations"]]
    gate = Gate.from_record(cfg["metadata"].get("gate")).union(gate)
    return SparseAutoencoder.from_tensors(SAESpec(**cfg["sae"]), tensors, normalize=normalize, gate=gate, device=device)


# -- training: a fresh directory, metrics, checkpoints ------------------------------------------
def stream_point(run_dirs: list[Path]) -> dict | None:
    """Where a streamed sweep's stream stood at the newest checkpoint all its runs have (None: none)."""
    _, states = resume_point(run_dirs, torch.device("cpu"))
    return None if states is None else states[0]["loader"][0].get("stream")


def saved_input(run_dir: Path) -> dict[str, Any] | None:
    """The input set-up a run recorded at its last save ({"input": ..., "gate": ...}); None before any."""
    if not (run_dir / CFG).is_file():
        return None
    cfg = json.loads((run_dir / CFG).read_text())
    return (
        {"input": cfg["input"], "gate": cfg["metadata"]["gate"], "layer": cfg["cache"]["layer"]}
        if "input" in cfg
        else None
    )


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
