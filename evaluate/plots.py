"""Figures, drawn from eval.json contents only (so they can be redrawn without rerunning eval).

Per run: the per-token L0 histogram with BOS/first-position tokens marked (paper Figure 3) and the
feature-density histogram. Across runs: NMSE and CE degradation against L0, one line per
(architecture, dictionary size) (paper Figure 1), and every run's L0 distribution on one axis.
"""

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sae.train.archs import sparsity_knob  # noqa: E402

ARCH_COLORS = {
    "batchtopk": "tab:blue", "topk": "tab:orange", "jumprelu": "tab:green", "relu": "tab:red",
    "matryoshka_batchtopk": "tab:purple",
}  # fmt: skip
MARKERS = "osD^v<>p*"
MAX_L0_BINS = 120


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def l0_histogram(result: dict, title: str, path: Path) -> Path:
    """Stacked histogram of active latents per token; BOS and first-position tokens in their own colour."""
    dist = result["l0_distribution"]
    values = np.array(dist["l0"], dtype=float)
    top = max(dist["max"], 1)
    bins = np.arange(top + 2) - 0.5 if top < MAX_L0_BINS else np.linspace(0, top + 1, MAX_L0_BINS + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    n_bos = sum(dist["bos_or_first"])
    ax.hist(
        [values, values], bins=bins, weights=[dist["plain"], dist["bos_or_first"]], stacked=True,
        color=["tab:blue", "tab:red"],
        label=[f"other tokens (n={sum(dist['plain']):,})", f"BOS / first position (n={n_bos:,})"],
    )  # fmt: skip
    ax.axvline(result["l0_mean"], color="k", linestyle="--", label=f"mean L0 = {result['l0_mean']:.1f}")
    k = result["run"].get("k")
    if sparsity_knob(result["run"]["arch"]) == "k" and k:
        ax.axvline(k, color="tab:gray", linestyle=":", label=f"k = {k}")
    ax.set_yscale("log")  # the few BOS/first-position tokens must stay visible beside thousands of others
    ax.set_xlabel("L0: active latents per token (count)")
    ax.set_ylabel("tokens (count, log scale)")
    ax.set_title(f"Active latents per token: {title}")
    ax.legend()
    return _save(fig, path)


def density_histogram(result: dict, title: str, path: Path) -> Path:
    """How many latents fire at each log10 frequency; dead latents, which have none, are counted in the legend."""
    edges, counts = np.array(result["density_log10_edges"]), np.array(result["density_log10_counts"])
    fig, ax = plt.subplots(figsize=(7, 4))
    live = int(counts.sum())
    ax.stairs(counts, edges, fill=True, color="tab:blue", label=f"live latents ({live:,})")
    dense = f"dense: active on > {result['dense_threshold']:g} of tokens ({result['dense_latents']:,})"
    ax.axvline(np.log10(result["dense_threshold"]), color="tab:red", linestyle="--", label=dense)
    ax.plot([], [], " ", label=f"dead: never active ({result['dead_latents']:,}, not shown)")
    ax.set_xlabel("log10(firing frequency)  (fraction of evaluation tokens a latent is active on)")
    ax.set_ylabel("latents (count)")
    ax.set_title(f"Feature density: {title}")
    ax.legend()
    return _save(fig, path)


def metric_vs_l0(results: list[dict], key: str, ylabel: str, title: str, path: Path,
                 prefixes: dict[str, list[dict]] | None = None) -> Path:  # fmt: skip
    """key against mean L0 with standard-error bars; colour = architecture, marker = dictionary size;
    prefixes: a Matryoshka run's prefixes by run name, drawn as a dotted curve ending at the run."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted({r["run"]["dict_size"] for r in results})
    group = lambda r: (r["run"]["arch"], r["run"]["dict_size"])  # noqa: E731
    for (arch, size), members in itertools.groupby(sorted(results, key=group), group):
        members = sorted(members, key=lambda r: r["l0_mean"])
        ax.errorbar(
            [r["l0_mean"] for r in members], [r[key] for r in members],
            xerr=[r["l0_mean_stderr"] for r in members], yerr=[r[f"{key}_stderr"] for r in members],
            color=ARCH_COLORS.get(arch, "tab:gray"), marker=MARKERS[sizes.index(size) % len(MARKERS)],
            capsize=3, label=f"{arch}, m={size:,}",
        )  # fmt: skip
    for r in results:
        curve = [*(prefixes or {}).get(r["run"]["name"], []), r]
        if len(curve) > 1:
            ax.plot(
                [p["l0_mean"] for p in curve], [p[key] for p in curve], linestyle=":", marker=".",
                color=ARCH_COLORS.get(r["run"]["arch"], "tab:gray"), label=f"{r['run']['name']}: its prefixes",
            )  # fmt: skip
    ax.set_xlabel("L0: mean active latents per token")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def l0_distributions(results: list[dict], path: Path) -> Path:
    """Each run's per-token L0 histogram on shared log-spaced bins, as a density (fraction of tokens per
    unit of L0), to compare how runs spend their latents (TopK: a spike at k; BatchTopK: a spread)."""
    top = max(max(r["l0_distribution"]["max"], 1) for r in results)
    edges = np.unique(np.round(np.geomspace(1, top + 1, 60))) - 0.5  # each bin holds whole L0 values
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = itertools.cycle(["-", "--", ":", "-."])
    for r in sorted(results, key=lambda r: (r["run"]["arch"], r["l0_mean"])):
        dist = r["l0_distribution"]
        counts = np.array(dist["plain"]) + np.array(dist["bos_or_first"])
        hist, _ = np.histogram(dist["l0"], bins=edges, weights=counts / counts.sum())
        ax.stairs(
            hist / np.diff(edges), edges, linestyle=next(styles), color=ARCH_COLORS.get(r["run"]["arch"], "tab:gray"),
            label=f"{r['run']['name']} (mean {r['l0_mean']:.1f})",
        )  # fmt: skip
    ax.set_xscale("log")  # BatchTopK's massive-norm rows reach hundreds of latents
    ax.set_yscale("log")
    ax.set_xlabel("L0: active latents per token (count)")
    ax.set_ylabel("fraction of tokens per unit of L0 (log scale)")
    ax.set_title("Active latents per token, all runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    return _save(fig, path)
