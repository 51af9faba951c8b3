"""BatchTopK vs TopK under four treatments of the massive-norm rows (docs/results.md, "BatchTopK vs TopK").

    python -m benchmarks.batchtopk_study train --cache CACHE --out DIR    # every treatment, resumable
    python -m benchmarks.batchtopk_study eval --out DIR                    # sae eval of every run and snapshot
    python -m benchmarks.batchtopk_study report --out DIR --docs docs/study

Each treatment is one `sae train` of a BatchTopK and a TopK SAE on the same batches, with snapshots
along the way (learning curves from one run); every run and snapshot is then evaluated with the same
evaluation gate (rows above 4× the median norm pass through and leave the reconstruction metrics), so
all treatments are scored on the same ordinary rows, and also at every position. The commands are the
ones a user would type; this file only runs them and collects their outputs.
"""

import argparse
import subprocess
import sys
from pathlib import Path

# (name, what it is, sae train flags)
TREATMENTS = {
    "a": ("every row, dataset-wide scale (the default)", []),
    "b": ("every row, per-sample standardisation (the reference code)", ["--normalize", "standardize"]),
    "c": ("BOS and first position gated", ["--gate-bos", "--gate-first"]),
    "d": ("norm gate 4× the median", ["--gate-norm", "4"]),
}
EVAL_GATE_NORM = "4"


def sae(*args: str) -> None:
    print("+ sae", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "sae", *args], check=True)


def train(cache: Path, out: Path, treatments: list[str], k: int, dict_size: int, batch_size: int,
          tokens: int, snapshots: str) -> None:  # fmt: skip
    for name in treatments:
        run_parent = out / f"{name}_k{k}_m{dict_size}"
        flags = TREATMENTS[name][1]
        runs = [run_parent / f"{arch}_k{k}_m{dict_size}" for arch in ("batchtopk", "topk")]
        if all((r / "cfg.json").exists() and "heldout" in (r / "cfg.json").read_text() for r in runs):
            continue  # finished
        if any(r.exists() for r in runs):
            sae("train", "--resume", str(runs[0]))
            continue
        sae(
            "train", "--cache", str(cache), "--arch", "batchtopk,topk", "--k", str(k), "--dict-size", str(dict_size),
            "--batch-size", str(batch_size), "--tokens", str(tokens), "--epochs", "7", "--snapshots", snapshots,
            "--checkpoint-every", "500", "--out", str(run_parent), *flags,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["train"])
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--treatments", default="dabc")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dict-size", type=int, default=4608)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=6 * 983_040)
    parser.add_argument("--snapshots", default="983040,1966080,2949120,3932160")
    args = parser.parse_args()
    if args.stage == "train":
        train(args.cache, args.out, list(args.treatments), args.k, args.dict_size, args.batch_size, args.tokens,
              args.snapshots)  # fmt: skip


if __name__ == "__main__":
    main()
