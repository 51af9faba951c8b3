"""Matryoshka BatchTopK, BatchTopK, TopK and JumpReLU at equal L0, with feature absorption (docs/results.md).

    python -m benchmarks.matryoshka_study probes --layers 3,6,9,12,15 --out DIR   # where the LM spells
    python -m benchmarks.matryoshka_study train --cache CACHE --out DIR           # the study's sweep, resumable
    python -m benchmarks.matryoshka_study eval --out DIR                          # sae eval --absorption of it all
    python -m benchmarks.matryoshka_study report --out DIR --docs docs/study/matryoshka
    python -m benchmarks.matryoshka_study {probes,train,eval,report} --tiny --out DIR   # each stage in seconds

The sweep is one `sae train` of every architecture on the same batches (k 32, m 4,608, batch 1,024, three
passes of the embedded cache, the defaults: every row standardised, b_dec at the median, θ calibrated),
JumpReLU at several λ bracketing L0 32, which the report interpolates to L0 32 (the paper did not). The
evaluation is `sae eval --absorption` on held-out text; Matryoshka's prefixes are scored as SAEs too.

--tiny: layer 1 of a tiny GPT-2 (--model, or built under DIR), k 4, m 64, one pass, two λ, 300 absorption words;
the report in DIR/docs.
"""

import argparse
import json
import time
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import sae_cli  # noqa: E402
from benchmarks.models import tiny_gpt2  # noqa: E402

# λ 0.002-0.008 gave JumpReLU L0 28-15 a third of the way through, still falling: these bracket 32
FULL = {"k": 32, "dict_size": 4608, "batch_size": 1024, "epochs": "3", "l0_coeff": "0.0007,0.001,0.0015",
        "words": 4000, "layers": "3,6,9,12,15", "target_l0": 32}  # fmt: skip
TINY = {"k": 4, "dict_size": 64, "batch_size": 256, "epochs": "1", "l0_coeff": "0.002,0.02", "words": 300,
        "layers": "1", "target_l0": 4}  # fmt: skip
ARCHS = "batchtopk,topk,matryoshka_batchtopk,jumprelu"


sae = partial(sae_cli.sae, echo=True)  # one `sae` command (in this process: --tiny), its stdout printed


def tiny_cache(out: Path, model: str | None) -> tuple[str, Path]:
    """(a tiny GPT-2's directory, a cache of its layer 1), made under out (the model too, unless given)."""
    if model is None:
        model = str(out / "tiny-gpt2")
        if not (Path(model) / "config.json").exists():
            tiny_gpt2(Path(model))
    flags = ("--layer", "1", "--tokens", "16384", "--chunk-contexts", "16", "--device", "cpu")
    cache = sae("harvest", "--model", model, *flags, "--cache-dir", str(out / "caches"), in_process=True)
    return model, Path(cache.split()[-1])


def probes(out: Path, layers: str, words: int, model: str) -> None:
    """The first-letter probe's accuracy and F1 at each layer's resid_pre (the LM alone, no SAE)."""
    from sae.evaluate.absorption import probe_data
    from sae.harvest.model import load_model

    loaded = load_model(model, "float32", "cpu")
    rows = []
    for layer in (int(x) for x in layers.split(",")):
        start = time.perf_counter()
        record = probe_data(loaded, "resid_pre", layer, words, seed=0)["record"]
        rows.append(
            {k: v for k, v in record.items() if k != "f1"} | {"layer": layer, "seconds": time.perf_counter() - start}
        )
        print(json.dumps(rows[-1]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "probes.json").write_text(json.dumps(rows, indent=1))


def train(cache: Path, out: Path, p: dict, in_process: bool = False) -> None:
    runs = out / "runs"
    if (runs / f"batchtopk_k{p['k']}_m{p['dict_size']}").exists():
        sae("train", "--resume", str(runs / f"batchtopk_k{p['k']}_m{p['dict_size']}"), in_process=in_process)
        return
    sae(
        "train", "--cache", str(cache), "--arch", ARCHS, "--k", str(p["k"]), "--dict-size", str(p["dict_size"]),
        "--l0-coeff", p["l0_coeff"], "--threshold-lr", "0.01", "--batch-size", str(p["batch_size"]),
        "--epochs", p["epochs"], "--out", str(runs), "--device", "cpu", in_process=in_process,
    )  # fmt: skip


def evaluate(out: Path, p: dict, in_process: bool = False) -> None:
    runs = sorted((out / "runs").iterdir())
    sae("eval", *map(str, runs), "--absorption", "--absorption-words", str(p["words"]), "--device", "cpu",
        in_process=in_process)  # fmt: skip


def rows(out: Path) -> list[dict]:
    """One row per run and Matryoshka prefix: the reconstruction, CE and absorption figures with errors."""
    found = []
    for run in sorted((out / "runs").iterdir()):
        r = json.loads((run / "eval.json").read_text())
        a = r.get("absorption", {})
        row = {"name": run.name, "arch": r["run"]["arch"], "l0_coeff": r["run"].get("l0_coeff")}
        for key in ("l0_mean", "fvu", "nmse_standardized", "ce_degradation", "kl"):
            row[key], row[key + "_se"] = r[key], r.get(key + "_stderr")
        for key in ("absorption_fraction", "full_absorption_rate", "f1", "f1_k1"):
            row[key], row[key + "_se"] = a.get(f"mean_{key}"), a.get(f"mean_{key}_stderr")
        row.update(
            dead=r["dead_latents"], letters=a.get("letters_scored"), probe_accuracy=a.get("probe", {}).get("accuracy")
        )
        found.append(row)
        blocks = [v for k, v in r.items() if k.startswith("prefix_")]
        for block in sorted(blocks, key=lambda block: block["width"]):
            prefix = {"name": f"{run.name}[:{block['width']}]", "arch": "prefix", "l0_coeff": None}
            for k in ("l0_mean", "fvu", "nmse_standardized", "ce_degradation", "kl"):
                prefix[k], prefix[k + "_se"] = block[k], block.get(k + "_stderr")
            found.append(prefix)
    return found


def at_l0(table: list[dict], key: str, target: float) -> tuple[float, float] | None:
    """JumpReLU's key at L0 = target, linearly between the two λ that bracket it (value, its SE by the same
    weights); None where no two runs bracket it."""
    runs = sorted((r for r in table if r["arch"] == "jumprelu"), key=lambda r: r["l0_mean"])
    for lo, hi in zip(runs, runs[1:], strict=False):
        if lo["l0_mean"] <= target <= hi["l0_mean"]:
            w = (target - lo["l0_mean"]) / (hi["l0_mean"] - lo["l0_mean"])
            se = np.hypot((1 - w) * (lo[key + "_se"] or 0), w * (hi[key + "_se"] or 0))
            return (1 - w) * lo[key] + w * hi[key], float(se)
    return None


def report(out: Path, docs: Path, target: float) -> None:
    table = rows(out)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "rows.json").write_text(json.dumps(table, indent=1))
    keys = (
        "l0_mean",
        "fvu",
        "nmse_standardized",
        "ce_degradation",
        "absorption_fraction",
        "full_absorption_rate",
        "f1",
    )

    def cell(row: dict, key: str) -> str:
        value, se = row.get(key), row.get(key + "_se")
        return "–" if value is None else (f"{value:.4g} ± {se:.2g}" if se is not None else f"{value:.4g}")

    lines = ["| run | " + " | ".join(keys) + " | dead |", "|---" * (len(keys) + 2) + "|"]
    lines += [f"| {r['name']} | " + " | ".join(cell(r, k) for k in keys) + f" | {r.get('dead', '–')} |" for r in table]
    interpolated = {k: at_l0(table, k, target) for k in keys[1:]}
    if all(v is not None for v in interpolated.values()):
        cells = " | ".join(f"{v:.4g} ± {se:.2g}" for v, se in interpolated.values())
        lines.append(f"| jumprelu at L0 {target:g} (interpolated) | {target:g} | {cells} | – |")
    (docs / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(table, docs / "metrics_vs_l0.png")
    print(json.dumps({"rows": table, "jumprelu_at_target": interpolated}))


def plot(table: list[dict], path: Path) -> None:
    """FVU, CE degradation and absorption against L0: each architecture, Matryoshka's prefixes dotted."""
    colors = {
        "batchtopk": "tab:blue",
        "topk": "tab:orange",
        "jumprelu": "tab:green",
        "matryoshka_batchtopk": "tab:purple",
        "prefix": "tab:purple",
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, label in zip(axes, ("fvu", "ce_degradation", "absorption_fraction"),
                              ("FVU (raw rows)", "CE degradation (nats/token)", "mean absorption fraction"), strict=True):  # fmt: skip
        for arch in ("batchtopk", "topk", "jumprelu", "matryoshka_batchtopk", "prefix"):
            points = sorted(
                (r for r in table if r["arch"] == arch and r.get(key) is not None), key=lambda r: r["l0_mean"]
            )
            if points:
                ax.errorbar([r["l0_mean"] for r in points], [r[key] for r in points],
                            yerr=[r.get(key + "_se") or 0 for r in points], color=colors[arch], capsize=3,
                            linestyle=":" if arch == "prefix" else "-", marker="o" if arch != "prefix" else ".",
                            label="matryoshka prefixes" if arch == "prefix" else arch)  # fmt: skip
        ax.set_xlabel("L0 (mean active latents per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle("SmolLM2-135M layer 6, m 4,608, 3 passes: each architecture at L0 ≈ 32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["probes", "train", "eval", "report"])
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--docs", type=Path)
    parser.add_argument("--layers")
    parser.add_argument("--model", help="--tiny: a tiny model directory to use (default: one built under OUT)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    p = TINY if args.tiny else FULL
    model = "smollm2-135m"
    if args.tiny and args.stage in ("probes", "train"):
        model, cache = tiny_cache(args.out, args.model)
        args.cache = args.cache or cache
    if args.stage == "probes":
        probes(args.out, args.layers or p["layers"], p["words"], model)
    elif args.stage == "train":
        train(args.cache, args.out, p, in_process=args.tiny)
    elif args.stage == "eval":
        evaluate(args.out, p, in_process=args.tiny)
    else:
        report(args.out, args.docs or args.out / "docs", p["target_l0"])


if __name__ == "__main__":
    main()
