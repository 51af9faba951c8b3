"""BatchTopK vs TopK under four treatments of the massive-norm rows (docs/results.md, "BatchTopK vs TopK").

    python -m benchmarks.batchtopk_study train --cache CACHE --out DIR    # every treatment, resumable
    python -m benchmarks.batchtopk_study eval --out DIR                    # sae eval of every run and snapshot
    python -m benchmarks.batchtopk_study report --out DIR --docs docs/study
    python -m benchmarks.batchtopk_study {train,eval,report} --tiny --out DIR   # each stage in seconds

Each treatment is one `sae train` of a BatchTopK and a TopK SAE on the same batches, with snapshots
along the way (learning curves from one run); every run and snapshot is then evaluated with the same
evaluation gate (rows above 4× the median norm pass through and leave the reconstruction metrics), so
all treatments are scored on the same ordinary rows, and also at every position. The commands are the
ones a user would type; this file only runs them and collects their outputs.

--tiny: treatment b only, k 8, m 128, batch 256, two passes with a snapshot after the first, 512 evaluation
tokens, the report in DIR/docs, the commands run in this process (benchmarks/sae_cli.py); without --cache,
the train stage first harvests 8,192 tokens of layer 1 of a tiny GPT-2 (--model, or the tests' shape built
in DIR/tiny-gpt2: evaluation loads it again) in chunks of 1,024.
"""

import argparse
import json
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks import parse_with_tiny, sae_cli  # noqa: E402
from benchmarks.models import tiny_gpt2  # noqa: E402

# (name, what it is, sae train flags)
TREATMENTS = {
    "a": ("every row, dataset-wide scale", ["--normalize", "scale", "--gate-norm", "0"]),
    "b": (
        "every row, per-sample standardisation (the reference code; the default)",
        ["--normalize", "standardize", "--gate-norm", "0"],
    ),
    "c": ("BOS and first position gated", ["--normalize", "scale", "--gate-bos", "--gate-first", "--gate-norm", "0"]),
    "d": ("norm gate 4× the median", ["--normalize", "scale", "--gate-norm", "4"]),
}
EVAL_GATE_NORM = "4"
# --tiny: 7 training chunks of 1,024 rows; two passes of them, the first snapshotted
TINY = {
    "treatments": "b", "k": 8, "dict_size": 128, "batch_size": 256, "tokens": 2 * 7168, "snapshots": "7168",
    "eval_tokens": 512,
}  # fmt: skip
TINY_HARVEST = ("--layer", "1", "--tokens", "8192", "--chunk-contexts", "8")


sae = partial(sae_cli.sae, echo=True)  # one `sae` command (in this process: --tiny), its stdout printed


def tiny_cache(out: Path, model: str | None) -> Path:
    """A cache of a tiny model's activations, harvested under out (the model too, unless given)."""
    if model is None:
        model = str(out / "tiny-gpt2")
        if not (out / "tiny-gpt2" / "config.json").exists():
            tiny_gpt2(out / "tiny-gpt2")
    harvest = sae("harvest", "--model", model, *TINY_HARVEST, "--cache-dir", str(out / "caches"), in_process=True)
    return Path(harvest.split()[-1])


def train(cache: Path, out: Path, treatments: list[str], k: int, dict_size: int, batch_size: int,
          tokens: int, snapshots: str, in_process: bool = False) -> None:  # fmt: skip
    for name in treatments:
        run_parent = out / f"{name}_k{k}_m{dict_size}"
        flags = TREATMENTS[name][1]
        runs = [run_parent / f"{arch}_k{k}_m{dict_size}" for arch in ("batchtopk", "topk")]
        if all((r / "cfg.json").exists() and "heldout" in (r / "cfg.json").read_text() for r in runs):
            continue  # finished
        if any(r.exists() for r in runs):
            sae("train", "--resume", str(runs[0]), in_process=in_process)
            continue
        sae(
            "train", "--cache", str(cache), "--arch", "batchtopk,topk", "--k", str(k), "--dict-size", str(dict_size),
            "--batch-size", str(batch_size), "--tokens", str(tokens), "--epochs", "7", "--snapshots", snapshots,
            "--checkpoint-every", "500", "--out", str(run_parent), *flags, in_process=in_process,
        )  # fmt: skip


def run_dirs(out: Path) -> list[Path]:
    """Every finished run and snapshot under out."""
    finals = [p.parent for p in sorted(out.glob("*/*/cfg.json")) if "heldout" in p.read_text()]
    return finals + [p.parent for p in sorted(out.glob("*/*/snapshots/*/cfg.json"))]


def evaluate(out: Path, tokens: int, in_process: bool = False) -> None:
    """One `sae eval` for all runs: they share a cache, so they share the clean and ablated passes."""
    todo = [d for d in run_dirs(out) if not (d / "eval.json").exists()]
    if todo:
        sae("eval", *map(str, todo), "--gate-norm", EVAL_GATE_NORM, "--tokens", str(tokens), in_process=in_process)


METRICS = (  # eval.json key, where, label
    ("fvu", "", "FVU, ungated rows"),
    ("nmse_standardized", "", "standardised NMSE (paper), ungated rows"),
    ("ce_degradation", "", "CE degradation, gated rows passed through (nats)"),
    ("ce_degradation", "every_position", "CE degradation, every position spliced (nats)"),
)


def collect(out: Path) -> list[dict]:
    """One row per evaluated run: treatment, arch, k, training tokens and the metrics with stderrs."""
    rows = []
    for d in run_dirs(out):
        if not (d / "eval.json").exists():
            continue
        result = json.loads((d / "eval.json").read_text())
        cfg = json.loads((d / "cfg.json").read_text())
        row = {
            "treatment": d.relative_to(out).parts[0].split("_")[0], "arch": cfg["training_architecture"],
            "k": cfg["sae"]["k"], "dict_size": cfg["sae"]["dict_size"], "tokens": cfg["tokens"],
            "epochs": cfg["epochs"], "l0": result["l0_mean"], "l0_stderr": result["l0_mean_stderr"],
            "l0_eq7": result.get("theta_eq7", {}).get("l0_mean"), "gated_fraction": result["gated_fraction"],
            "dead": result["dead_latents"], "dir": str(d.relative_to(out)),
            "model": cfg["cache"]["spec"]["model"], "layer": cfg["cache"]["layer"],
        }  # fmt: skip
        for key, where, _ in METRICS:
            source = result[where] if where else result
            name = f"{key}_{where}" if where else key
            row[name], row[f"{name}_stderr"] = source[key], source[f"{key}_stderr"]
        rows.append(row)
    return sorted(rows, key=lambda r: (r["treatment"], r["k"], r["tokens"], r["arch"]))


def gaps(rows: list[dict]) -> list[dict]:
    """BatchTopK − TopK per (treatment, k, tokens), each metric with the two stderrs combined in
    quadrature (contexts are shared, so the paired error is smaller: this bound is conservative)."""
    out = []
    index = {(r["treatment"], r["k"], r["tokens"], r["arch"]): r for r in rows}
    for (treatment, k, tokens, arch), btk in index.items():
        topk = index.get((treatment, k, tokens, "topk"))
        if arch != "batchtopk" or topk is None:
            continue
        gap = {"treatment": treatment, "k": k, "tokens": tokens, "epochs": btk["epochs"], "l0_batchtopk": btk["l0"]}
        gap.update((key, btk[key]) for key in ("dict_size", "model", "layer"))
        for key, where, _ in METRICS:
            name = f"{key}_{where}" if where else key
            gap[name] = btk[name] - topk[name]
            gap[f"{name}_stderr"] = (btk[f"{name}_stderr"] ** 2 + topk[f"{name}_stderr"] ** 2) ** 0.5
            gap[f"{name}_relative"] = gap[name] / topk[name]
        out.append(gap)
    return out


def report(out: Path, docs: Path) -> None:
    rows = collect(out)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "rows.json").write_text(json.dumps(rows, indent=1))
    gap_rows = gaps(rows)
    (docs / "gaps.json").write_text(json.dumps(gap_rows, indent=1))
    lines = [
        "| treatment | k | tokens | passes | arch | L0 | L0 (eq. 7 θ) | " + " | ".join(m[2] for m in METRICS) + " |"
    ]
    lines.append("|" + "---|" * (6 + len(METRICS)))
    for r in rows:
        cells = [f"{r[n]:.4g} ± {r[n + '_stderr']:.2g}" for n in (f"{k}_{w}" if w else k for k, w, _ in METRICS)]
        eq7 = f"{r['l0_eq7']:.1f}" if r["l0_eq7"] is not None else "–"
        lines.append(
            f"| {r['treatment']} | {r['k']} | {r['tokens']:,} | {r['epochs']:.2f} | {r['arch']} | {r['l0']:.1f} | {eq7} | "
            + " | ".join(cells) + " |"
        )  # fmt: skip
    (docs / "table.md").write_text("\n".join(lines) + "\n")
    plot_gaps(gap_rows, docs / "gap_vs_tokens.png")
    plot_against_l0(rows, docs / "figure1.png")
    print("\n".join(lines))
    print(docs)
    print(json.dumps({"rows": rows, "gaps": gap_rows}))


def setting(rows: list[dict]) -> str:
    """What a study's runs share, for plot titles: 'm = 4,608, smollm2-135m layer 6'."""
    first = rows[0]
    return f"m = {first['dict_size']:,}, {first['model']} layer {first['layer']}"


def plot_against_l0(rows: list[dict], path: Path, treatment: str = "b") -> None:
    """The paper's Figure 1: each metric against L0 for every k, one line per architecture, at the
    training length with the most k trained (every k the same tokens; the longest of equals)."""
    ks_at = {}
    for r in rows:
        if r["treatment"] == treatment:
            ks_at.setdefault(r["tokens"], set()).add(r["k"])
    if max(map(len, ks_at.values()), default=0) < 2:
        return
    tokens = max(ks_at, key=lambda t: (len(ks_at[t]), t))
    lines = {
        arch: sorted((r for r in rows if (r["treatment"], r["tokens"], r["arch"]) == (treatment, tokens, arch)),
                     key=lambda r: r["l0"])
        for arch in ("batchtopk", "topk")
    }  # fmt: skip
    title = f"({treatment}) {TREATMENTS[treatment][0]}, {tokens:,} training tokens, {setting(rows)}"
    plot_metrics(path, lines, lambda r: r["l0"], "L0 (ungated evaluation rows)", title, gaps=False)


def plot_gaps(gap_rows: list[dict], path: Path) -> None:
    """BatchTopK − TopK against training tokens, one line per treatment, one panel per metric."""
    lines = {
        f"({t}) {TREATMENTS[t][0]}": sorted((g for g in gap_rows if g["treatment"] == t and g["k"] == 32),
                                            key=lambda g: g["tokens"])
        for t in sorted({g["treatment"] for g in gap_rows})
    }  # fmt: skip
    title = f"BatchTopK − TopK at equal L0 (k = 32, {setting(gap_rows)}): below 0, BatchTopK is better"
    plot_metrics(path, lines, lambda g: g["tokens"] / 1e6, "training tokens (millions)", title, gaps=True)


def plot_metrics(path: Path, lines: dict[str, list[dict]], x_of, xlabel: str, title: str, gaps: bool) -> None:
    """One panel per metric, one line per label with its standard errors. gaps: the values are
    BatchTopK − TopK (a zero line; the legend below the panels, off the data); else L0 on a log axis."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.8))
    for ax, (key, where, label) in zip(axes, METRICS, strict=True):
        name = f"{key}_{where}" if where else key
        for line, points in lines.items():
            ax.errorbar(
                [x_of(r) for r in points], [r[name] for r in points], yerr=[r[name + "_stderr"] for r in points],
                marker="o", capsize=3, label=line,
            )  # fmt: skip
        if gaps:
            ax.axhline(0, color="k", linewidth=0.8)
            ax.set_ylabel("BatchTopK − TopK")
        else:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(label, fontsize="small")
        ax.grid(alpha=0.3)
    if gaps:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize="small")
    else:
        axes[0].legend(fontsize="x-small")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 if gaps else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["train", "eval", "report"])
    parser.add_argument("--tiny", action="store_true", help=f"the defaults below become {TINY}")
    parser.add_argument("--cache", type=Path, help="required to train, unless --tiny (then: a tiny harvest)")
    parser.add_argument("--model", default=None, help="--tiny without --cache: the model to harvest")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--docs", type=Path, default=None, help="default: docs/study (--tiny: OUT/docs)")
    parser.add_argument("--treatments", default="dabc")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dict-size", type=int, default=4608)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=6 * 983_040)
    parser.add_argument("--snapshots", default="983040,1966080,2949120,3932160")
    parser.add_argument("--eval-tokens", type=int, default=16_384)
    args = parse_with_tiny(parser, argv, TINY)
    if args.stage == "train":
        if args.cache is None and not args.tiny:
            parser.error("train needs --cache (or --tiny, for a tiny harvest)")
        cache = args.cache or tiny_cache(args.out, args.model)
        train(cache, args.out, list(args.treatments), args.k, args.dict_size, args.batch_size, args.tokens,
              args.snapshots, in_process=args.tiny)  # fmt: skip
    elif args.stage == "eval":
        evaluate(args.out, args.eval_tokens, in_process=args.tiny)
    else:
        report(args.out, args.docs or (args.out / "docs" if args.tiny else Path("docs/study")))


if __name__ == "__main__":
    main()
