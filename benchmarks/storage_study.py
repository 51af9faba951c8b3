"""What a lossy storage dtype costs the SAEs trained from it (docs/cache.md, "Storage dtypes").

    python -m benchmarks.storage_study --out DIR [--dtypes float16,bfloat16,int8,float8_e4m3]

One float16 harvest (the embedded default: SmolLM2 layer 6, 1M tokens of the bundled sample), copied
into every other storage dtype with `sae cache convert` (the same harvest: float16's own rounding,
0.02% of a row, is far below the others'); from each, the same BatchTopK and TopK SAEs (k 32, m 2,304,
one pass at batch 4,096, seed 49: identical tokens, order and settings); then one `sae eval` of them
all, which re-runs the LM on held-out text, so the evaluation never sees the storage rounding. Prints held-out NMSE and CE degradation with standard
errors per dtype, and each one's difference from float16 in units of their standard errors. The
commands are the ones a user would type; this file only runs them and collects their outputs.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path


def sae(*args: str) -> str:
    print("+ sae", " ".join(args), flush=True)
    return subprocess.run([sys.executable, "-m", "sae", *args], check=True, stdout=subprocess.PIPE, text=True).stdout


def run(out: Path, dtypes: list[str], tokens: str, eval_tokens: str) -> list[dict]:
    float16 = sae("harvest", "--dtype", "float16", "--tokens", tokens, "--cache-dir", str(out / "caches")).split()[-1]
    trained = {}
    for dtype in dtypes:
        cache = float16 if dtype == "float16" else sae("cache", "convert", float16, "--dtype", dtype).split()[-1]
        runs = out / f"runs-{dtype}"
        names = [runs / f"{arch}_k32_m2304" for arch in ("batchtopk", "topk")]
        if not all((r / "cfg.json").exists() and "heldout" in (r / "cfg.json").read_text() for r in names):
            sae("train", "--cache", cache, "--arch", "batchtopk,topk", "--k", "32", "--dict-size", "2304",
                "--batch-size", "4096", "--out", str(runs))  # fmt: skip
        trained[dtype] = (cache, names)
    todo = [r for _, names in trained.values() for r in names if not (r / "eval.json").exists()]
    if todo:  # one evaluation: every SAE on the same held-out tokens, sharing the clean passes
        sae("eval", *map(str, todo), "--tokens", eval_tokens)
    rows = []
    for dtype, (cache, names) in trained.items():
        info = json.loads(sae("cache", "info", "--json", cache))
        for r in names:
            result = json.loads((r / "eval.json").read_text())
            rows.append({
                "dtype": dtype, "arch": result["run"]["arch"], "bytes_per_token": info["size_bytes"] / info["rows"],
                **{k: result[k] for k in ("l0_mean", "nmse", "nmse_stderr", "fvu", "fvu_stderr", "ce_degradation",
                                          "ce_degradation_stderr")},
            })  # fmt: skip
    return rows


def report(rows: list[dict]) -> None:
    base = {r["arch"]: r for r in rows if r["dtype"] == "float16"}
    print("| dtype | arch | cache B/token | L0 | NMSE | Δ vs float16 (SE) | CE degradation | Δ vs float16 (SE) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        deltas = []
        for key in ("nmse", "ce_degradation"):
            b = base.get(r["arch"])
            deltas.append(f"{(r[key] - b[key]) / r[f'{key}_stderr']:+.2f}" if b else "–")
        print(
            f"| {r['dtype']} | {r['arch']} | {r['bytes_per_token']:,.0f} | {r['l0_mean']:.1f} | "
            f"{r['nmse']:.4f} ± {r['nmse_stderr']:.4f} | {deltas[0]} | "
            f"{r['ce_degradation']:.3f} ± {r['ce_degradation_stderr']:.3f} | {deltas[1]} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtypes", default="float16,bfloat16,int8,float8_e4m3")
    parser.add_argument("--tokens", default="1e6")
    parser.add_argument("--eval-tokens", default="16384")
    args = parser.parse_args()
    rows = run(args.out, args.dtypes.split(","), args.tokens, args.eval_tokens)
    (args.out / "storage_study.json").write_text(json.dumps(rows, indent=1))
    report(rows)


if __name__ == "__main__":
    main()
