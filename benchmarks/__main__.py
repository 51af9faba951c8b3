"""Every benchmark of the repo in one run: `python -m benchmarks` (from the repo root).

    python -m benchmarks                              # embedded SmolLM2 layer 6; CPU-sized training shapes
    python -m benchmarks --gpt2-small --tokens 1e6 --batch-contexts 256 --model-dtype bfloat16
                                                      # GPT-2 small's shape, random weights, layer 8 (a GPU)

Prints each script's own report, then one summary table of ratios (each measured against its
baseline in the same run, on the same device) and one JSON line with everything.
benchmarks/parity.py needs a real cache and minutes of training; it runs on its own:
`python -m benchmarks.parity --cache PATH`.
"""

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks import harvest, models, train
from sae.config import parse_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model id or local directory")
    parser.add_argument("--layer", type=int, default=None, help="default: 6, or 8 with --gpt2-small")
    parser.add_argument(
        "--gpt2-small", action="store_true", help="a random-weight model of GPT-2 small's shape (offline)"
    )
    parser.add_argument("--tokens", default="32768", help="harvested tokens, e.g. 1e6")
    parser.add_argument("--model-dtype", default="float32")
    parser.add_argument("--batch-contexts", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(models.gpt2_small_shaped(Path(tmp))) if args.gpt2_small else args.model
        layer = args.layer if args.layer is not None else (8 if args.gpt2_small else 6)
        results = {
            "harvest": harvest.measure(
                model, layer, parse_count(args.tokens), "auto", args.model_dtype, args.batch_contexts
            ),
            "train": train.measure(),
        }
    if args.gpt2_small:
        results["harvest"]["model"] = "gpt2-small-shaped (random weights)"
    harvest.report(results["harvest"])
    print()
    train.report(results["train"])
    h, t = results["harvest"], results["train"]
    codec = next(c for c in h["codecs"] if (c["dtype"], c["codec"]) == ("float16", "zstd:1"))
    best, default = t["best"], t["steps"][t["default"]]
    rows = [
        ("harvest vs plain full forward", h["ratio"], f"{h['harvest_tok_s']:,.0f} tok/s, MFU {h['harvest_mfu']:.0%}"),
        (
            "train step (defaults) vs reference-style",
            default["vs_baseline"],
            f"{t['default']}, MFU {default['mfu']:.0%}",
        ),
        ("fastest train step vs reference-style", best["vs_baseline"], best["name"]),
        ("sparse vs dense decode", t["sparse_vs_baseline"] / t["dense_vs_baseline"], ""),
        ("loader vs fastest step's demand", t["loader_vs_demand"], f"{t['loader_rows_s']:,.0f} rows/s"),
        ("sweep of 3 vs 3 separate runs", t["sweep_vs_separate"], f"{t['sweep_s']:.1f} s"),
        ("cache codec fp16 zstd:1 size ratio", codec["ratio_vs_dtype"], f"decode {codec['decode_MBps']:,.0f} MB/s"),
    ]
    print(f"\nsummary on {h['device']} (harvest) and {t['device']} (train)")
    print(f"{'figure':42} {'ratio':>7}  absolute")
    for name, ratio, absolute in rows:
        print(f"{name:42} {ratio:6.2f}x  {absolute}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
