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
import importlib.util
import json
import tempfile
from pathlib import Path

from benchmarks import eval as evaluation
from benchmarks import harvest, latents, models, saelens, select, train
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
            # the inspect pass: SmolLM2's d and the demo's m; GPT-2 small's d and an m of 24k on a GPU
            "latents": latents.measure(768, 24_576, 32, 1 << 18) if args.gpt2_small else latents.measure(),
            "select": select.measure(),
            # an early and a late layer: the shared prefix is short, then long
            "eval": evaluation.measure(model, (2, 8) if args.gpt2_small else (3, 24)),
        }
        if importlib.util.find_spec("sae_lens") is not None:  # the optional extra: pip install -e ".[saelens]"
            results["saelens"] = saelens.measure()
    if args.gpt2_small:
        results["harvest"]["model"] = "gpt2-small-shaped (random weights)"
    harvest.report(results["harvest"])
    print()
    train.report(results["train"])
    print()
    latents.report(results["latents"])
    for name, module in (("select", select), ("eval", evaluation), ("saelens", saelens)):
        if name in results:
            print()
            module.report(results[name])
    h, t, i = results["harvest"], results["train"], results["latents"]
    codec = {c["dtype"]: c for c in h["codecs"] if c["codec"] == "zstd:1"}  # the default codec, every dtype
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
        (
            "cache int8 vs float16 bytes (zstd:1)",
            codec["float16"]["bytes_per_token"] / codec["int8"]["bytes_per_token"],
            f"median row error {codec['int8']['median_row_error']:.1%}, decode {codec['int8']['decode_MBps']:,.0f} MB/s",
        ),
        ("inspect pass vs SAE encode alone", i["pass_vs_encode"], f"{i['pass_rows_s']:,.0f} rows/s, m {i['m']:,}"),
    ]
    for s in results["select"]["shapes"]:
        shape = f"{s['name']}, m {s['m']:,}, B {s['batch']:,}"
        rows.append(
            ("BatchTopK selection vs before", s["select_vs_before"], f"{shape}, {s['select_ms']['now']:.0f} ms")
        )
        rows.append(
            ("train step vs before the selection", s["step_vs_before"], f"{shape}, {s['step_tok_s']['now']:,.0f} tok/s")
        )
    for e in results["eval"]["rows"]:
        rows.append((f"eval from the site vs full passes, {e['saes']} SAEs", e["ratio"], f"resid_pre {e['layer']}"))
    for arch, s in results.get("saelens", {}).get("archs", {}).items():
        fvus = f"FVU {s['ours']['fvu']:.3f} vs {s['sae_lens']['fvu']:.3f}"
        rows.append((f"{arch} train tok/s vs SAELens", s["tok_s_ratio"], f"{s['ours']['tok_s']:,.0f} tok/s, {fvus}"))
    print(f"\nsummary on {h['device']} (harvest) and {t['device']} (train)")
    print(f"{'figure':42} {'ratio':>7}  absolute")
    for name, ratio, absolute in rows:
        print(f"{name:42} {ratio:6.2f}x  {absolute}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
