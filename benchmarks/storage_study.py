"""What a lossy storage dtype costs the SAEs trained from it (docs/cache.md, "Storage dtypes").

    python -m benchmarks.storage_study --out DIR [--dtypes float16,bfloat16,int8,float8_e4m3]
    python -m benchmarks.storage_study --out DIR --tiny [--model DIR]   # a tiny GPT-2: float16 vs int8 in seconds

One float16 harvest (the embedded default: SmolLM2 layer 6, 1M tokens of the bundled sample), copied
into every other storage dtype with `sae cache convert` (the same harvest: float16's own rounding,
0.02% of a row, is far below the others'); from each, the same BatchTopK and TopK SAEs (k 32, m 2,304,
one pass at batch 4,096, seed 49: identical tokens, order and settings); then one `sae eval` of them
all, which re-runs the LM on held-out text, so the evaluation never sees the storage rounding. Prints held-out NMSE and CE degradation with standard
errors per dtype, and each one's difference from float16 in units of their standard errors. The
commands are the ones a user would type; this file only runs them and collects their outputs.

--tiny: the tests' tiny GPT-2 (built for the run unless --model is given), layer 1, 8,192 tokens in
chunks of 1,024, SAEs of k 8 and m 128 at batch 256, 512 evaluation tokens, float16 and int8, the
commands run in this process (benchmarks/sae_cli.py).
"""

import argparse
import json
from functools import partial
from pathlib import Path

from benchmarks import parse_with_tiny, sae_cli
from benchmarks.models import model_or_tiny

# --tiny: a tiny GPT-2 (benchmarks.models; built for the run unless --model); 8 chunks, so one is held out
TINY = {
    "layer": 1, "dtypes": "float16,int8", "tokens": "8192", "chunk_contexts": 8, "k": 8,
    "dict_size": 128, "batch_size": 256, "eval_tokens": "512",
}  # fmt: skip


def run(args, model: str) -> list[dict]:
    """Harvest, convert, train, evaluate with the `sae` commands; one row per dtype and architecture."""
    sae = partial(sae_cli.sae, in_process=args.tiny)
    out, sizes = args.out, ("--k", str(args.k), "--dict-size", str(args.dict_size))
    harvest_flags = ("--model", model, "--layer", str(args.layer), "--chunk-contexts", str(args.chunk_contexts))
    float16 = sae(
        "harvest", *harvest_flags, "--dtype", "float16", "--tokens", args.tokens, "--cache-dir", str(out / "caches")
    ).split()[-1]
    trained = {}
    for dtype in args.dtypes.split(","):
        cache = float16 if dtype == "float16" else sae("cache", "convert", float16, "--dtype", dtype).split()[-1]
        runs = out / f"runs-{dtype}"
        names = [runs / f"{arch}_k{args.k}_m{args.dict_size}" for arch in ("batchtopk", "topk")]
        if not all((r / "cfg.json").exists() and "heldout" in (r / "cfg.json").read_text() for r in names):
            sae("train", "--cache", cache, "--arch", "batchtopk,topk", *sizes, "--batch-size", str(args.batch_size),
                "--out", str(runs))  # fmt: skip
        trained[dtype] = (cache, names)
    todo = [r for _, names in trained.values() for r in names if not (r / "eval.json").exists()]
    if todo:  # one evaluation: every SAE on the same held-out tokens, sharing the clean passes
        sae("eval", *map(str, todo), "--tokens", args.eval_tokens)
    return collect(trained, sae)


def collect(trained: dict[str, tuple[str, list[Path]]], sae) -> list[dict]:
    """One row per dtype and run: the cache's bytes per token and the run's eval.json figures."""
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help=f"the defaults below become {TINY}")
    parser.add_argument("--model", default=None, help="default: smollm2-135m (--tiny: a tiny GPT-2 built for the run)")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--dtypes", default="float16,bfloat16,int8,float8_e4m3")
    parser.add_argument("--tokens", default="1e6")
    parser.add_argument("--chunk-contexts", type=int, default=128)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dict-size", type=int, default=2304)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--eval-tokens", default="16384")
    args = parse_with_tiny(parser, argv, TINY)
    with model_or_tiny(args.model, args.tiny) as model:
        rows = run(args, model)
    (args.out / "storage_study.json").write_text(json.dumps(rows, indent=1))
    report(rows)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
