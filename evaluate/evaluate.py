"""`sae eval`: every run's SAE spliced into its LM on held-out contexts; eval.json, report.md, PNGs.

Runs are grouped so shared work is done once: the LM is loaded once per (model, dtype), and runs that
share a cache and layer share the evaluation contexts and, per batch, the clean and the zero- and
mean-ablated passes; each SAE then adds one spliced pass per batch as deployed (its gated rows passed
through), one more at every position if it has a gate, and one in batch mode on request. Only the
clean pass runs the blocks before the site; the spliced passes start at the site (evaluate.splice).
"""

import functools
import itertools
from pathlib import Path
from typing import NamedTuple

import torch

from sae.config import to_jsonable
from sae.device import keep_freed_memory, resolve_device
from sae.errors import UserError
from sae.evaluate.absorption import probe_data, sae_absorption
from sae.evaluate.config import EvalConfig
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
from sae.evaluate.sources import EvalData, eval_data, group_key
from sae.evaluate.splice import Splicer
from sae.harvest.model import LoadedModel, check_site, load_model
from sae.progress import make_progress
from sae.train.rundir import Run, load_sae, read_run
from sae.train.sae import SparseAutoencoder
from sae.versions import library_versions


def evaluate_runs(run_dirs: list[Path], cfg: EvalConfig) -> list[Path]:
    """Evaluate every run, ours or another library's SAE (train.formats); returns the paths of the
    eval.json files written."""
    runs = [read_run(d, cfg.cache, cfg.model, cfg.site, cfg.layer) for d in run_dirs]
    device = resolve_device(cfg.device)
    keep_freed_memory(device)
    written = []
    for (model_id, dtype), model_runs in _groups(runs, lambda r: r.model_key):
        try:
            loaded = load_model(model_id, dtype, str(device))
        except UserError as e:
            named = " (named by its files: pass --model)" if model_runs[0].imported and not cfg.model else ""
            raise UserError(f"run {model_runs[0].path}: {e}{named}") from None
        for _, group in _groups(model_runs, group_key):
            written += _evaluate_group(group, loaded, cfg, device)
    return written


def _groups(runs: list[Run], key) -> list[tuple[tuple, list[Run]]]:
    return [(k, list(g)) for k, g in itertools.groupby(sorted(runs, key=key), key)]


def _check_model(run: Run, loaded: LoadedModel) -> None:
    spec = run.spec
    try:
        check_site(spec["site"], [run.layer], loaded.n_layers)
    except UserError as e:
        raise UserError(f"run {run.path}: {e}") from None
    if run.cfg["d_in"] != loaded.d_model:
        raise UserError(
            f"run {run.path}: the SAE has d_in={run.cfg['d_in']} but {spec['model']} {spec['site']} layer "
            f"{run.layer} has d_model={loaded.d_model}; evaluate it on the model and site it was trained on"
        )
    if run.imported is not None and run.cache is None:  # evaluated on text: no harvest to agree with
        return
    if spec["model_revision"].startswith("sha256:") and loaded.revision != spec["model_revision"]:
        raise UserError(
            f"run {run.path}: model '{spec['model']}' has changed since the harvest (weights {loaded.revision}, "
            f"cache {spec['model_revision']}); evaluate with the model the SAE was trained on"
        )
    if loaded.bos_token_id != spec["bos_token_id"]:
        raise UserError(
            f"run {run.path}: the tokenizer's BOS {loaded.bos_token_id} is not the cache's {spec['bos_token_id']}"
        )


def _evaluate_group(runs: list[Run], loaded: LoadedModel, cfg: EvalConfig, device: torch.device) -> list[Path]:
    for run in runs:
        _check_model(run, loaded)
    data = eval_data(runs[0], loaded, cfg, device)
    saes = [load_sae(run, device, data.gate) for run in runs]
    variants = [_variants(run, sae, cfg) for run, sae in zip(runs, saes, strict=True)]
    results = evaluate_saes(loaded, data, saes, variants, cfg, device)
    if cfg.absorption:
        probes = probe_data(loaded, data.site, data.layer, cfg.absorption_words, cfg.absorption_seed)
        for sae, result in zip(saes, results, strict=True):
            result["absorption"] = sae_absorption(sae, probes, cfg.absorption_seed)
    for sae, result in zip(saes, results, strict=True):
        result["gate"] = sae.gate.record()
    base = {"config": to_jsonable(cfg), "eval_spec": data.plan, "versions": library_versions()}
    pairs = zip(runs, results, strict=True)
    return [write_outputs(run.path, {**result, **base, "run": run_record(run)}) for run, result in pairs]


def run_record(run: Run) -> dict:
    """eval.json's "run": the SAE, its model and site, its cache; an imported SAE's format and files too."""
    spec = run.spec
    imported = {"format": run.imported.format, "source": run.cfg["source"]} if run.imported else {}
    return {
        "dir": str(run.path),
        "name": run.imported.name if run.imported else run.path.name,
        "arch": run.cfg["training_architecture"],
        **{k: run.cfg["sae"][k] for k in ("k", "dict_size", "l0_coeff", "l1_coeff")},
        "theta": run.cfg.get("theta"),
        "theta_source": run.cfg.get("theta_source"),
        "theta_eq7": run.cfg.get("theta_eq7"),
        "gate": run.cfg["metadata"].get("gate"),
        "normalize": run.cfg.get("input", {}).get("normalize"),
        "normalize_activations": run.cfg["normalize_activations"],
        "step": run.cfg.get("step"),
        "train_tokens": run.cfg.get("tokens"),
        "train_epochs": run.cfg.get("epochs"),
        "model": spec["model"],
        "site": spec["site"],
        "layer": run.layer,
        "cache_key": run.cache.key if run.cache is not None else None,
        "cache_path": str(run.cache.path) if run.cache is not None else None,
        **imported,
    }


class Variant(NamedTuple):
    """One way of splicing an SAE in; the headline is the SAE as deployed (its gate honoured)."""

    name: str
    """Key of its nested block in eval.json ("" for the headline)."""
    batch_mode: bool = False
    gated: bool = True
    """Gated rows pass through unchanged and are left out of the reconstruction metrics."""
    theta: float | None = None
    """BatchTopK θ other than the saved one."""
    width: int | None = None
    """Only the first `width` latents: a Matryoshka prefix, scored as the SAE it is."""
    lm: bool = True
    """Run the spliced LM pass (CE, KL); False: reconstruction metrics only."""


def _variants(run: Run, sae: SparseAutoencoder, cfg: EvalConfig) -> list[Variant]:
    variants = [Variant("")]
    if not sae.gate.empty:  # the paper's way beside it: every row through the SAE
        variants.append(Variant("every_position", gated=False))
    if sae.arch.calibrated_theta:
        eq7 = run.cfg.get("theta_eq7")
        if eq7 is not None and eq7 != run.cfg["theta"]:
            variants.append(Variant("theta_eq7", theta=eq7, lm=False))
        if cfg.batch_mode:
            variants.append(Variant("batch_mode", batch_mode=True))
    for width in sae.arch.widths[:-1]:  # the last prefix is the whole SAE
        variants.append(Variant(f"prefix_{width}", width=width))
    return variants


@torch.inference_mode()
def evaluate_saes(
    loaded: LoadedModel, data: EvalData, saes: list[SparseAutoencoder], variants: list[list[Variant]],
    cfg: EvalConfig, device: torch.device,
) -> list[dict]:  # fmt: skip
    """One metrics dict per SAE over the contexts data.tokens_CT, all spliced at data's site and layer;
    each SAE's gate is its own united with the evaluation's (cfg.gate_*)."""
    site, layer, tokens_CT, mean_D = data.site, data.layer, data.tokens_CT, data.mean_D
    bos, (C, T) = data.plan["bos_token_id"], tokens_CT.shape
    shared = Tally()
    tallies = [[Tally() for _ in sae_variants] for sae_variants in variants]
    splicer = Splicer(loaded, site, layer)
    with make_progress("tok") as progress:
        task = progress.add_task(f"eval {len(saes)} SAE(s) at {site} {layer}", total=C * T, status="")
        for c0 in range(0, C, cfg.batch_size):
            ids_BT = torch.from_numpy(tokens_CT[c0 : c0 + cfg.batch_size]).to(device).long()
            position_BT = torch.arange(T, device=device).expand_as(ids_BT)
            plain_BT = (position_BT > 0) & (ids_BT != bos)  # BOS and first-position rows: the massive norms
            pred_BT = position_BT < T - 1  # the last position has no next token
            logits_BTV, x_BTD = splicer.clean(ids_BT)
            clean_logp_BTV = log_probs(logits_BTV)
            del logits_BTV
            shared.add("n_pred", torch.ones_like(pred_BT), pred_BT)
            shared.add("ce_clean", token_ce(clean_logp_BTV, ids_BT), pred_BT)
            batch = Batch(ids_BT, position_BT, x_BTD, clean_logp_BTV, plain_BT, pred_BT)
            # Every replacement of this batch with what takes its log-probs, then their spliced passes
            # together: the blocks before the site run once per batch, not once per replacement.
            spliced = [
                (torch.zeros_like(x_BTD), functools.partial(_tally_ablation, shared, "ce_zero", batch)),
                (mean_D.expand_as(x_BTD), functools.partial(_tally_ablation, shared, "ce_mean", batch)),
            ]
            for sae, sae_variants, sae_tallies in zip(saes, variants, tallies, strict=True):
                gated_BT = sae.gate.gated(x_BTD.flatten(0, 1), ids_BT.flatten(), position_BT.flatten()).view_as(ids_BT)
                for variant, tally in zip(sae_variants, sae_tallies, strict=True):
                    recon_BTD = _tally_sae(tally, sae, variant, batch, gated_BT)
                    if variant.lm:
                        spliced.append((recon_BTD, functools.partial(_tally_spliced, tally, batch)))
            logits = splicer.spliced(ids_BT, [acts_BTD for acts_BTD, _ in spliced])
            for (_, take), logits_BTV in zip(spliced, logits, strict=True):
                take(log_probs(logits_BTV))
            progress.advance(task, ids_BT.numel())
    return [_summarize(shared, v, t, cfg, cfg.batch_size * T) for v, t in zip(variants, tallies, strict=True)]


class Batch(NamedTuple):
    ids_BT: torch.Tensor
    position_BT: torch.Tensor
    x_BTD: torch.Tensor
    """The site's clean activation."""
    clean_logp_BTV: torch.Tensor
    plain_BT: torch.Tensor
    """Neither BOS nor the first position of a context."""
    pred_BT: torch.Tensor
    """Positions whose next-token prediction counts in CE and KL: all but the last."""


def _tally_sae(
    tally: Tally, sae: SparseAutoencoder, variant: Variant, b: Batch, gated_BT: torch.Tensor
) -> torch.Tensor:
    """One SAE in one variant on one batch: its reconstruction of the site's activation, over the rows
    it encodes (gated rows pass through in gated variants); returns it [B, T, D] for the spliced pass."""
    x_RD = b.x_BTD.flatten(0, 1).float()
    encode_BT = ~gated_BT if variant.gated else torch.ones_like(gated_BT)
    encode_R = encode_BT.flatten() if variant.gated and not sae.gate.empty else None
    recon_RD, latents_RM = sae.reconstruct(x_RD, encode_R, variant.batch_mode, variant.theta, variant.width)
    stats = row_stats(x_RD, recon_RD, latents_RM)
    tally.add_rows("", b.x_BTD, stats, encode_BT)
    tally.add_rows("plain_", b.x_BTD, stats, encode_BT & b.plain_BT)
    tally.add("gated", ~encode_BT, torch.ones_like(encode_BT))
    tally.add("all_rows", torch.ones_like(encode_BT), torch.ones_like(encode_BT))
    tally.add_latents(latents_RM, stats["l0"], encode_BT.flatten(), b.plain_BT.flatten())
    return recon_RD.view(b.x_BTD.shape)


def _tally_spliced(tally: Tally, b: Batch, logp_BTV: torch.Tensor) -> None:
    """An SAE's spliced pass: CE and KL from the clean pass."""
    tally.add("ce_spliced", token_ce(logp_BTV, b.ids_BT), b.pred_BT)
    tally.add("kl", token_kl(b.clean_logp_BTV, logp_BTV), b.pred_BT)


def _tally_ablation(shared: Tally, name: str, b: Batch, logp_BTV: torch.Tensor) -> None:
    shared.add(name, token_ce(logp_BTV, b.ids_BT), b.pred_BT)


NESTED_KEYS = ("ce_spliced", "ce_degradation", "ce_recovered_zero", "ce_recovered_mean", "kl", *RECON_KEYS)


def _summarize(
    shared: Tally, variants: list[Variant], tallies: list[Tally], cfg: EvalConfig, rows_per_pass: int
) -> dict:
    """eval.json's metrics: the headline variant's keys at the top, the others nested under their names."""

    def one(variant: Variant, tally: Tally) -> dict:
        out = lm_metrics(shared, tally) if variant.lm else {}
        out.update(recon_metrics(tally, "", ""))
        out["n_tokens"] = out["n_rows"]
        out["gated_fraction"] = float(tally.cat("gated").sum() / tally.cat("all_rows").sum())
        out["l0_distribution"] = l0_distribution(tally)
        out.update(density(tally, out["n_rows"], cfg.dense_threshold))
        out.update(recon_metrics(tally, "plain_", "_excl_bos"))  # rows that are neither BOS nor first
        return out

    result = one(variants[0], tallies[0])
    for variant, tally in zip(variants[1:], tallies[1:], strict=True):
        full = one(variant, tally)
        result[variant.name] = {
            **{k: v for k, v in full.items() if k.removesuffix("_stderr").removesuffix("_excl_bos") in NESTED_KEYS},
            **{k: full[k] for k in ("n_tokens", "gated_fraction", "l0_distribution", "dead_latents", "dense_latents")},
            **({"theta": variant.theta} if variant.theta is not None else {}),
            **({"batch_rows": rows_per_pass} if variant.batch_mode else {}),
            **({"width": variant.width} if variant.width is not None else {}),
        }
    return result
