"""`sae eval`: every run's SAE spliced into its LM on held-out contexts; eval.json, report.md, PNGs.

Runs are grouped so shared work is done once: the LM is loaded once per (model, dtype), and runs that
share a cache and layer share the evaluation contexts and, per batch, the clean and the zero- and
mean-ablated forward passes; each SAE then adds one spliced pass per batch (two with --batch-mode).
"""

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from sae.cache.store import Cache, open_cache
from sae.config import to_jsonable
from sae.errors import UserError
from sae.evaluate.config import EvalConfig
from sae.evaluate.heldout import eval_plan, heldout_tokens
from sae.evaluate.metrics import (
    RECON_KEYS,
    Tally,
    density,
    l0_distribution,
    lm_metrics,
    log_probs,
    recon_metrics,
    row_stats,
    token_ce,
    token_kl,
)
from sae.evaluate.report import write_outputs
from sae.evaluate.splice import clean_pass, reconstruct, splice_where, spliced_pass
from sae.harvest.harvest import resolve_device
from sae.harvest.model import LoadedModel, check_site, load_model
from sae.progress import make_progress
from sae.train.checkpoint import CFG, WEIGHTS, load_sae
from sae.train.sae import SparseAutoencoder
from sae.versions import library_versions


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


def read_run(run_dir: Path, cfg: EvalConfig) -> Run:
    """The run's cfg.json and training cache, checked before any model is loaded."""
    run_dir = Path(run_dir)
    if not (run_dir / CFG).is_file() or not (run_dir / WEIGHTS).is_file():
        raise UserError(f"no saved SAE in {run_dir} (needs {CFG} and {WEIGHTS}); train one with `sae train`")
    run_cfg = json.loads((run_dir / CFG).read_text())
    if "cache" not in run_cfg:
        raise UserError(f"{run_dir / CFG} names no training cache: evaluate runs written by `sae train`")
    recorded = run_cfg["cache"]
    cache_path = Path(cfg.cache if cfg.cache is not None else recorded["path"])
    if not cache_path.exists():
        raise UserError(f"run {run_dir}: its training cache {cache_path} is not there; give its path with --cache")
    cache = open_cache(cache_path)
    if cache.key != recorded["key"]:
        raise UserError(f"run {run_dir} was trained on cache {recorded['key']}, but {cache_path} is {cache.key}")
    return Run(run_dir, run_cfg, cache, recorded["layer"])


def evaluate_runs(run_dirs: list[Path], cfg: EvalConfig) -> list[Path]:
    """Evaluate every run; returns the paths of the eval.json files written."""
    runs = [read_run(d, cfg) for d in run_dirs]
    device = resolve_device(cfg.device)
    written = []
    for (model_id, dtype), model_runs in _groups(runs, lambda r: r.model_key):
        try:
            loaded = load_model(model_id, dtype, str(device))
        except UserError as e:
            raise UserError(f"run {model_runs[0].path}: {e}") from None
        for _, group in _groups(model_runs, lambda r: (str(r.cache.path), r.layer)):
            written += _evaluate_group(group, loaded, cfg, device)
    return written


def _groups(runs: list[Run], key) -> list[tuple[tuple, list[Run]]]:
    return [(k, list(g)) for k, g in itertools.groupby(sorted(runs, key=key), key)]


def _check_model(run: Run, loaded: LoadedModel) -> None:
    spec = run.cache.spec
    check_site(spec["site"], [run.layer], loaded.n_layers)
    if spec["model_revision"].startswith("sha256:") and loaded.revision != spec["model_revision"]:
        raise UserError(
            f"run {run.path}: model '{spec['model']}' has changed since the harvest (weights {loaded.revision}, "
            f"cache {spec['model_revision']}); evaluate with the model the SAE was trained on"
        )
    if loaded.bos_token_id != spec["bos_token_id"]:
        raise UserError(
            f"run {run.path}: the tokenizer's BOS {loaded.bos_token_id} is not the cache's {spec['bos_token_id']}"
        )
    if run.cfg["d_in"] != loaded.d_model:
        raise UserError(
            f"run {run.path}: the SAE has d_in={run.cfg['d_in']} but {spec['model']} {spec['site']} layer "
            f"{run.layer} has d_model={loaded.d_model}; evaluate it on the model and site it was trained on"
        )


def _evaluate_group(runs: list[Run], loaded: LoadedModel, cfg: EvalConfig, device: torch.device) -> list[Path]:
    cache, layer = runs[0].cache, runs[0].layer
    for run in runs:
        _check_model(run, loaded)
    plan, source = eval_plan(cfg, cache.spec, cache.meta["stream_end"], str(cache.path))
    tokens_CT, plan = heldout_tokens(plan, source, loaded.tokenizer)
    plan["model_revision"] = loaded.revision
    saes = [load_sae(run.path, device) for run in runs]
    results = evaluate_saes(loaded, cache, layer, saes, tokens_CT, cfg, device)
    base = {"config": to_jsonable(cfg), "eval_spec": plan, "versions": library_versions()}
    pairs = zip(runs, results, strict=True)
    return [write_outputs(run.path, {**result, **base, "run": run_record(run)}) for run, result in pairs]


def run_record(run: Run) -> dict:
    spec = run.cache.spec
    return {
        "dir": str(run.path),
        "name": run.path.name,
        "arch": run.cfg["training_architecture"],
        **{k: run.cfg["sae"][k] for k in ("k", "dict_size", "l0_coeff", "l1_coeff")},
        "theta": run.cfg.get("theta"),
        "normalize_activations": run.cfg["normalize_activations"],
        "step": run.cfg.get("step"),
        "train_tokens": run.cfg.get("tokens"),
        "model": spec["model"],
        "site": spec["site"],
        "layer": run.layer,
        "cache_key": run.cache.key,
        "cache_path": str(run.cache.path),
    }


def _variants(sae: SparseAutoencoder, cfg: EvalConfig) -> list[bool]:
    """batch_mode flags to evaluate: θ mode always; batch mode too for BatchTopK on request."""
    return [False, True] if cfg.batch_mode and sae.spec.arch == "batchtopk" else [False]


@torch.inference_mode()
def evaluate_saes(
    loaded: LoadedModel, cache: Cache, layer: int, saes: list[SparseAutoencoder], tokens_CT: np.ndarray,
    cfg: EvalConfig, device: torch.device,
) -> list[dict]:  # fmt: skip
    """One metrics dict per SAE over the contexts tokens_CT, all spliced at the cache's site and layer."""
    site, bos, (C, T) = cache.spec["site"], cache.spec["bos_token_id"], tokens_CT.shape
    mean_D = torch.tensor(cache.stats(layer)["mean_D"], device=device)  # the training data's mean
    shared = Tally()
    tallies = [[Tally() for _ in _variants(sae, cfg)] for sae in saes]
    with make_progress("tok") as progress:
        task = progress.add_task(f"eval {len(saes)} SAE(s) at {site} {layer}", total=C * T, status="")
        for c0 in range(0, C, cfg.batch_size):
            ids_BT = torch.from_numpy(tokens_CT[c0 : c0 + cfg.batch_size]).to(device).long()
            position_BT = torch.arange(T, device=device).expand_as(ids_BT)
            plain_BT = (position_BT > 0) & (ids_BT != bos)  # BOS and first-position rows: the massive norms
            rows_BT = plain_BT if cfg.exclude_bos else torch.ones_like(plain_BT)
            pred_BT = rows_BT & (position_BT < T - 1)  # the last position has no next token
            logits_BTV, x_BTD = clean_pass(loaded, ids_BT, site, layer)
            clean_logp_BTV = log_probs(logits_BTV)
            del logits_BTV
            shared.add("n_pred", torch.ones_like(pred_BT), pred_BT)
            shared.add("ce_clean", token_ce(clean_logp_BTV, ids_BT), pred_BT)
            for name, ablated_BTD in (("zero", torch.zeros_like(x_BTD)), ("mean", mean_D.expand_as(x_BTD))):
                ablated_BTD = splice_where(rows_BT, ablated_BTD, x_BTD)
                logp_BTV = log_probs(spliced_pass(loaded, ids_BT, site, layer, ablated_BTD))
                shared.add(f"ce_{name}", token_ce(logp_BTV, ids_BT), pred_BT)
                del logp_BTV
            batch = Batch(ids_BT, x_BTD, clean_logp_BTV, rows_BT, plain_BT, pred_BT)
            for sae, sae_tallies in zip(saes, tallies, strict=True):
                for batch_mode, tally in zip(_variants(sae, cfg), sae_tallies, strict=True):
                    _tally_sae(tally, sae, batch_mode, batch, loaded, site, layer, cfg.exclude_bos)
            progress.advance(task, ids_BT.numel())
    return [_summarize(shared, sae_tallies, cfg, cfg.batch_size * T) for sae_tallies in tallies]


class Batch(NamedTuple):
    ids_BT: torch.Tensor
    x_BTD: torch.Tensor
    """The site's clean activation."""
    clean_logp_BTV: torch.Tensor
    rows_BT: torch.Tensor
    """Positions spliced and counted in the reconstruction metrics (all, or plain with --exclude-bos)."""
    plain_BT: torch.Tensor
    """Neither BOS nor the first position of a context."""
    pred_BT: torch.Tensor
    """Positions whose next-token prediction counts in CE and KL."""


def _tally_sae(
    tally: Tally, sae: SparseAutoencoder, batch_mode: bool, b: Batch, loaded: LoadedModel, site: str, layer: int,
    exclude_bos: bool,
) -> None:  # fmt: skip
    """One SAE on one batch: its spliced pass (CE, KL) and its reconstruction of the site's activation."""
    x_RD, rows_R, plain_R = b.x_BTD.flatten(0, 1).float(), b.rows_BT.flatten(), b.plain_BT.flatten()
    recon_RD, latents_RM = reconstruct(sae, x_RD, batch_mode, rows_R if exclude_bos else None)
    spliced_BTD = splice_where(b.rows_BT, recon_RD.view(b.x_BTD.shape), b.x_BTD)
    logp_BTV = log_probs(spliced_pass(loaded, b.ids_BT, site, layer, spliced_BTD))
    tally.add("ce_spliced", token_ce(logp_BTV, b.ids_BT), b.pred_BT)
    tally.add("kl", token_kl(b.clean_logp_BTV, logp_BTV), b.pred_BT)
    del logp_BTV
    stats = row_stats(x_RD, recon_RD, latents_RM)
    tally.add_rows("", b.x_BTD, stats, b.rows_BT)
    if not exclude_bos:
        tally.add_rows("plain_", b.x_BTD, stats, b.plain_BT)
    tally.add_latents(latents_RM, stats["l0"], rows_R, plain_R)


def _summarize(shared: Tally, variants: list[Tally], cfg: EvalConfig, rows_per_pass: int) -> dict:
    """eval.json's metrics: headline (θ mode) keys at the top, batch mode nested."""

    def one(tally: Tally) -> dict:
        out = {**lm_metrics(shared, tally), **recon_metrics(tally, "", "")}
        out["n_tokens"] = out["n_rows"]
        out["l0_distribution"] = l0_distribution(tally)
        out.update(density(tally, out["n_rows"], cfg.dense_threshold))
        if not cfg.exclude_bos:  # the same metrics over rows that are neither BOS nor first in their context
            out.update(recon_metrics(tally, "plain_", "_excl_bos"))
        return out

    result = one(variants[0])
    result["mode"] = "theta"
    if len(variants) > 1:
        batch = one(variants[1])
        keep = ("ce_spliced", "ce_degradation", "ce_recovered_zero", "ce_recovered_mean", "kl", *RECON_KEYS)
        result["batch_mode"] = {
            **{k: v for k, v in batch.items() if k.removesuffix("_stderr").removesuffix("_excl_bos") in keep},
            "l0_distribution": batch["l0_distribution"],
            "dead_latents": batch["dead_latents"],
            "dense_latents": batch["dense_latents"],
            "batch_rows": rows_per_pass,
        }
    return result
