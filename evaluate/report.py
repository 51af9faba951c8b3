"""A run's evaluation outputs: eval.json (everything), report.md (a readable summary), two PNGs."""

from pathlib import Path

from sae.evaluate.plots import density_histogram, l0_histogram
from sae.train.archs import sparsity_knob
from sae.train.rundir import EVAL, write_json

REPORT_MD = "report.md"
L0_PNG, DENSITY_PNG = "l0_histogram.png", "feature_density.png"

LM_ROWS = (
    ("ce_clean", "CE clean"),
    ("ce_spliced", "CE spliced"),
    ("ce_degradation", "CE degradation (spliced − clean)"),
    ("ce_zero_ablation", "CE zero-ablation"),
    ("ce_mean_ablation", "CE mean-ablation (training-cache mean)"),
    ("ce_recovered_zero", "CE recovered vs zero-ablation (fraction)"),
    ("ce_recovered_mean", "CE recovered vs mean-ablation (fraction)"),
    ("kl", "KL(clean ‖ spliced) per token"),
)
RECON_ROWS = (
    ("nmse", "NMSE  Σ‖x−x̂‖² / Σ‖x‖²  (raw)"),
    ("fvu", "FVU  Σ‖x−x̂‖² / Σ‖x−x̄‖²  (raw)"),
    ("explained_variance", "explained variance  1 − FVU"),
    ("nmse_standardized", "normalized MSE on standardised inputs (paper)"),
    ("mse", "MSE per element (raw)"),
    ("cos_sim", "cosine similarity x, x̂ (mean over tokens)"),
    ("l0_mean", "L0 mean (active latents per token)"),
)


VARIANTS = {
    "every_position": "every position spliced (gate ignored)",
    "theta_eq7": "θ of eq. 7 (no LM pass)",
    "batch_mode": "batch mode (top k·rows of each pass)",
}


def describe_gate(gate: dict, gated_fraction: float) -> str:
    """One line: which rows pass through unspliced, and what share of the evaluation rows they are."""
    parts = []
    if gate["bos_token_id"] is not None:
        parts.append(f"BOS (token {gate['bos_token_id']})")
    if gate["first"]:
        parts.append("each context's first position")
    if gate["norm_ratio"] is not None:
        parts.append(f"‖x‖ > {gate['norm_ratio']:g} × median ({gate['max_norm']:.4g} raw)")
    if not parts:
        return (
            "no gate: every position spliced (the paper's way); reconstruction metrics also without BOS/first position"
        )
    return (
        f"gate: {', '.join(parts)}; {gated_fraction:.2%} of the evaluation rows pass through unspliced and are "
        "left out of the reconstruction metrics (CE counts every position)"
    )


def fmt(result: dict, key: str) -> str:
    value, se = result.get(key), result.get(f"{key}_stderr")
    if value is None:
        return "–"
    value += 0.0  # prints −0.0 as 0
    return f"{value:.4g} ± {se:.2g}" if se is not None else f"{value:.4g}"


def write_outputs(run_dir: Path, result: dict) -> Path:
    """eval.json, report.md and the PNGs in run_dir; returns the eval.json path."""
    write_json(run_dir / EVAL, result)
    title = result["run"]["name"]
    l0_histogram(result, title, run_dir / L0_PNG)
    density_histogram(result, title, run_dir / DENSITY_PNG)
    (run_dir / REPORT_MD).write_text(report_markdown(result))
    return run_dir / EVAL


def report_markdown(result: dict) -> str:
    run, spec = result["run"], result["eval_spec"]
    held = f"first unread: {spec['first_unread_doc']}" if spec["same_data_as_cache"] else "another dataset/split"
    held = held if run["cache_key"] else "no training cache to hold documents out from"
    bos = describe_gate(result["gate"], result["gated_fraction"])
    source = f" (a {run['format']} SAE, from {run['dir']})" if "format" in run else ""
    cache = (
        f"cache {run['cache_key']}"
        if run["cache_key"]
        else "no cache of it: the mean ablation's mean is the site's over these contexts"
    )
    lines = [
        f"# Evaluation of {run['name']}",
        "",
        f"- SAE: {run['arch']}, dict size {run['dict_size']:,}"
        + (f", k {run['k']}" if sparsity_knob(run["arch"]) == "k" else "")
        + source,
        f"- Model: {run['model']}, {run['site']} of layer {run['layer']} ({cache})",
        f"- Evaluation text: '{spec['dataset']}' split {spec['dataset_split']}, seed {spec['seed']}, from document "
        f"{spec['start_doc']} ({held}); {spec['n_contexts']:,} contexts × {spec['ctx_len']} = {spec['n_tokens']:,} tokens "
        f"(sha256 {spec['tokens_sha256']})",
        f"- {bos}",
        "- ± is one standard error, with contexts as independent clusters",
        "",
        "## Language model (nats per predicted token)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {_lm_label(key, label, spec)} | {fmt(result, key)} |" for key, label in LM_ROWS],
        "",
        "## Reconstruction",
        "",
        "| metric | all evaluated tokens | without BOS / first position |",
        "|---|---|---|",
        *[f"| {label} | {fmt(result, key)} | {fmt(result, key + '_excl_bos')} |" for key, label in RECON_ROWS],
        "",
        "## Sparsity",
        "",
        _sparsity(result),
        "",
    ]
    variants = [name for name in VARIANTS if name in result]
    if variants:
        lines += [
            "## The same SAE spliced in other ways",
            "",
            "| metric | as deployed (headline) | " + " | ".join(VARIANTS[v] for v in variants) + " |",
            "|---|---|" + "---|" * len(variants),
            *[
                f"| {label} | {fmt(result, key)} | " + " | ".join(fmt(result[v], key) for v in variants) + " |"
                for key, label in LM_ROWS[1:3] + RECON_ROWS
            ],
            "",
        ]
    lines += [f"![L0 per token]({L0_PNG})", "", f"![feature density]({DENSITY_PNG})", ""]
    return "\n".join(lines)


def _lm_label(key: str, label: str, spec: dict) -> str:
    if key == "ce_mean_ablation" and spec.get("mean_ablation") == "evaluation_contexts":
        return "CE mean-ablation (mean over these contexts)"
    return label


def _sparsity(result: dict) -> str:
    dist = result["l0_distribution"]
    quantiles = ", ".join(f"{q} {dist[q]}" for q in ("p1", "p10", "p50", "p90", "p99"))
    return (
        f"L0 per token: mean {fmt(result, 'l0_mean')}, min {dist['min']}, {quantiles}, max {dist['max']}.  \n"
        f"Dead latents (never active on these tokens): {result['dead_latents']:,} ({result['dead_fraction']:.1%}); "
        f"dense (active on > {result['dense_threshold']:.0%} of tokens): {result['dense_latents']:,} "
        f"({result['dense_fraction']:.1%})."
    )
