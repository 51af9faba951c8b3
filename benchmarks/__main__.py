"""Every benchmark of the repo in one run: `python -m benchmarks` (from the repo root).

Prints each script's own report, then one summary table of ratios (each measured against its
baseline in the same run, on the same device) and one JSON line with everything.
benchmarks/parity.py needs a real cache and minutes of training; it runs on its own:
`python -m benchmarks.parity --cache PATH`.
"""

import json

from benchmarks import harvest, train


def main() -> None:
    results = {"harvest": harvest.measure("smollm2-135m", layer=6, tokens=32768), "train": train.measure()}
    harvest.report(results["harvest"])
    print()
    train.report(results["train"])
    h, t = results["harvest"], results["train"]
    codec = next(c for c in h["codecs"] if (c["dtype"], c["codec"]) == ("float16", "zstd:1"))
    rows = [
        ("harvest vs plain full forward", h["ratio"], f"{h['harvest_tok_s']:,.0f} tok/s, MFU {h['harvest_mfu']:.0%}"),
        ("train step vs reference-style step", t["sparse_vs_baseline"], f"MFU {t['train_mfu']:.0%}"),
        ("sparse vs dense decode", t["sparse_vs_baseline"] / t["dense_vs_baseline"], ""),
        ("loader vs trainer demand", t["loader_vs_demand"], f"{t['loader_rows_s']:,.0f} rows/s"),
        ("sweep of 3 vs 3 separate runs", t["sweep_vs_separate"], f"{t['sweep_s']:.1f} s"),
        ("cache codec fp16 zstd:1 size ratio", codec["ratio_vs_dtype"], f"decode {codec['decode_MBps']:,.0f} MB/s"),
    ]
    print(f"\nsummary on {h['device']} (harvest) and {t['device']} (train)")
    print(f"{'figure':38} {'ratio':>7}  absolute")
    for name, ratio, absolute in rows:
        print(f"{name:38} {ratio:6.2f}x  {absolute}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
