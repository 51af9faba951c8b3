"""Every benchmark of the repo in one run: `python -m benchmarks` (from the repo root).

    python -m benchmarks                              # embedded SmolLM2 layer 6; CPU-sized training shapes
    python -m benchmarks --gpt2-small --tokens 1e6 --batch-contexts 256 --model-dtype bfloat16
                                                      # GPT-2 small's shape, random weights, layer 8 (a GPU)
    python -m benchmarks --tiny [--model DIR]         # every script's tiny mode, a tiny GPT-2 (built unless given)

Prints each script's own report, then one summary table of ratios (each measured against its
baseline in the same run, on the same device) and one JSON line with everything.
benchmarks/parity.py needs a real cache and minutes of training; it runs on its own:
`python -m benchmarks.parity --cache PATH`. --tiny: each script at its tiny sizes (its TINY), in seconds:
it checks that every figure is produced (tests/test_benchmarks.py); at those sizes the figures mean little.
"""

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

from benchmarks import eval as evaluation
from benchmarks import harvest, latents, models, saelens, select, train
from sae.config import parse_count


def measure_all(args, model: str) -> dict:
    """Every script's figures on this model; each script at its own tiny sizes (its TINY) with --tiny."""
    sizes = script_sizes(args)
    results = {"harvest": harvest.measure(model, model_dtype=args.model_dtype, **sizes["harvest"])}
    if not args.tiny:
        sizes["eval"]["layers"] = early_and_late(results["harvest"]["n_layers"], args.gpt2_small)
    results.update(
        train=train.measure(tiny=args.tiny),
        latents=latents.measure(**sizes["latents"]),
        select=select.measure(tiny=args.tiny),
        eval=evaluation.measure(model, **sizes["eval"]),
    )
    if importlib.util.find_spec("sae_lens") is not None:  # the optional extra: pip install -e ".[saelens]"
        results["saelens"] = saelens.measure(**sizes["saelens"])
    return results


def script_sizes(args) -> dict[str, dict]:
    """measure()'s sizes for harvest, latents, eval and saelens: their TINY with --tiny; the harvest's flags win."""
    if args.tiny:
        sizes = {"harvest": harvest.TINY, "latents": latents.TINY, "eval": evaluation.TINY, "saelens": saelens.TINY}
    else:
        # the inspect pass: SmolLM2's d and the demo's m; GPT-2 small's d and an m of 24k on a GPU
        inspect_shape = {"d": 768, "m": 24_576, "k": 32, "rows": 1 << 18} if args.gpt2_small else {}
        harvest_sizes = {"layer": 8 if args.gpt2_small else 6, "tokens": 32768, "batch_contexts": 32}
        sizes = {"harvest": harvest_sizes, "latents": inspect_shape, "eval": {}, "saelens": {}}
    given = {
        "layer": args.layer,
        "tokens": args.tokens and parse_count(args.tokens),
        "batch_contexts": args.batch_contexts,
    }
    sizes = {name: dict(script) for name, script in sizes.items()}  # copies: TINY stays as it is
    sizes["harvest"].update((key, value) for key, value in given.items() if value is not None)
    return sizes


def early_and_late(n_layers: int, gpt2_small: bool) -> tuple[int, int]:
    """An early and a late layer, where evaluation's shared prefix is short, then long: 3 and 24 of SmolLM2's
    30 (n/10 and 4n/5 of another model's n), 2 and 8 of GPT-2 small's 12."""
    return (2, 8) if gpt2_small else (n_layers // 10, 4 * n_layers // 5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="every script at its tiny sizes, on a tiny GPT-2")
    parser.add_argument("--model", default=None, help="model id or local directory (default: smollm2-135m)")
    parser.add_argument("--layer", type=int, default=None, help="default: 6; 8 with --gpt2-small; --tiny: 1")
    parser.add_argument(
        "--gpt2-small", action="store_true", help="a random-weight model of GPT-2 small's shape (offline)"
    )
    parser.add_argument("--tokens", default=None, help="harvested tokens, e.g. 1e6 (default: 32768; --tiny: 2048)")
    parser.add_argument("--model-dtype", default="float32")
    parser.add_argument(
        "--batch-contexts", type=int, default=None, help="contexts per forward (default: 32; --tiny: 4)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.gpt2_small:
            results = measure_all(args, str(models.gpt2_small_shaped(Path(tmp))))
        else:
            with models.model_or_tiny(args.model, args.tiny) as model:
                results = measure_all(args, model)
    if args.gpt2_small:
        results["harvest"]["model"] = "gpt2-small-shaped (random weights)"
    report_all(results)
    print(json.dumps(results))


def report_all(results: dict) -> None:
    """Each script's own report, then the summary table of ratios."""
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


if __name__ == "__main__":
    main()
