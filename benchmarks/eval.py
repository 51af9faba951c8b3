"""Evaluation wall time: spliced passes that start at the site against full passes, in the same run.

    python -m benchmarks.eval                                   # SmolLM2-135M, layers 3 and 24 of 30
    python -m benchmarks.eval --tokens 8192 --batch-size 16     # more text
    python -m benchmarks.eval --tiny [--model DIR]              # a tiny GPT-2 (built unless given): seconds

"full" is the evaluation as it was before the passes shared their prefix: every spliced pass (zero and
mean ablation, each SAE variant) runs the whole model; "prefix" is `sae eval` now (evaluate.splice).
Both evaluate the same random SAEs (BatchTopK and TopK, m 2304) on the same held-out contexts with
the same loaded model, writing eval.json, report.md and the plots; the model load is left out. The
largest relative difference between the two eval.json's numbers is printed beside each ratio.
"""

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

import sae.evaluate.evaluate as evaluate_module
import sae.evaluate.splice as splice
from benchmarks import parse_with_tiny
from benchmarks.models import model_or_tiny
from sae.cache.store import open_cache
from sae.device import resolve_device
from sae.evaluate.config import EvalConfig
from sae.harvest.config import HarvestConfig
from sae.harvest.harvest import harvest
from sae.harvest.model import load_model
from sae.train.config import SAESpec
from sae.train.rundir import cache_record, run_cfg, save_run
from sae.train.sae import SparseAutoencoder

# --tiny: a tiny GPT-2 (benchmarks.models; built for the run unless --model), its blocks 1 and 2 of 3, one SAE of
# m 128 (at these sizes the plots of eval.json's report are most of an evaluation's time)
TINY = {"layers": (1, 2), "counts": (1,), "tokens": 512, "m": 128}


@contextlib.contextmanager
def preloaded(loaded):
    """evaluate_runs with this model instead of loading it again."""
    saved = evaluate_module.load_model
    evaluate_module.load_model = lambda *args, **kwargs: loaded
    try:
        yield
    finally:
        evaluate_module.load_model = saved


def save_saes(out: Path, cache: Path, layer: int, n: int, d: int, m: int, k: int = 32) -> list[Path]:
    runs = []
    for i in range(n):
        arch = ("batchtopk", "topk")[i % 2]
        torch.manual_seed(i)
        sae = SparseAutoencoder(SAESpec(arch, k, m, 0.0, 0.0), d)
        if arch == "batchtopk":
            sae.theta.fill_(0.5)
        run_dir = out / f"L{layer}_{i}_{arch}"
        run_dir.mkdir(parents=True)
        save_run(run_dir, sae, run_cfg(sae, cache_record(open_cache(cache), layer), {}))
        runs.append(run_dir)
    return runs


def max_relative_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for key, value in a.items():
        if key in ("config", "versions"):
            continue
        if isinstance(value, dict):
            worst = max(worst, max_relative_difference(value, b[key]))
        elif isinstance(value, float) and math.isfinite(value):
            worst = max(worst, abs(value - b[key]) / max(abs(value), 1e-12))
    return worst


def measure(model: str = "smollm2-135m", layers: tuple[int, ...] = (3, 24), counts: tuple[int, ...] = (2, 6),
            tokens: int = 1024, batch_size: int = 4, m: int = 2304, device: str = "auto") -> dict:  # fmt: skip
    dev = resolve_device(device)
    loaded = load_model(model, "float32", str(dev))
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "model": model}
    result.update(n_layers=loaded.n_layers, tokens=tokens, batch_size=batch_size, m=m)
    result.update(threads=torch.get_num_threads(), load_average=os.getloadavg()[0], rows=[])
    cfg = EvalConfig(tokens=tokens, batch_size=batch_size, device=str(dev))
    with tempfile.TemporaryDirectory() as tmp, preloaded(loaded):
        harvest_cfg = HarvestConfig(
            model=model, layers=layers, tokens=128 * 16, chunk_contexts=16, cache_dir=Path(tmp), device=str(dev)
        )
        cache = harvest(harvest_cfg, loaded)
        for layer in layers:
            runs = save_saes(Path(tmp) / "runs", cache, layer, max(counts), loaded.d_model, m)
            for n in counts:
                seconds, results = {}, {}
                for mode in ("full", "prefix"):
                    splice.SPLICE = mode
                    start = time.perf_counter()
                    evaluate_module.evaluate_runs(runs[:n], cfg)
                    seconds[mode] = time.perf_counter() - start
                    results[mode] = [json.loads((r / "eval.json").read_text()) for r in runs[:n]]
                splice.SPLICE = "prefix"
                worst = max(max_relative_difference(a, b) for a, b in zip(*results.values(), strict=True))
                result["rows"].append(
                    {
                        "layer": layer,
                        "saes": n,
                        "seconds": seconds,
                        "ratio": seconds["full"] / seconds["prefix"],
                        "max_rel_diff": worst,
                    }  # fmt: skip
                )
    return result


def report(r: dict) -> None:
    print(f"evaluation, {r['model']} ({r['n_layers']} blocks) on {r['device']}, threads {r['threads']}:")
    print(f"  {r['tokens']:,} tokens in batches of {r['batch_size']} contexts, random SAEs of m {r['m']}")
    print(f"  load average before the run {r['load_average']:.2f} (other processes skew CPU timings)")
    for row in r["rows"]:
        s = row["seconds"]
        print(
            f"  resid_pre {row['layer']:2d}, {row['saes']} SAEs: full passes {s['full']:6.1f} s, from the site "
            f"{s['prefix']:6.1f} s: {row['ratio']:5.2f}x   eval.json max rel. diff {row['max_rel_diff']:.1e}"
        )


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help=f"the defaults below become {TINY}")
    parser.add_argument("--model", default=None, help="default: smollm2-135m (--tiny: a tiny GPT-2 built for the run)")
    parser.add_argument("--layers", type=ints, default=(3, 24), help="comma-separated: an early and a late layer")
    parser.add_argument("--saes", type=ints, default=(2, 6), dest="counts", help="comma-separated SAE counts")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--m", type=int, default=2304, help="latents of each random SAE")
    parser.add_argument("--device", default="auto")
    args = parse_with_tiny(parser, argv, TINY)
    with model_or_tiny(args.model, args.tiny) as model:
        result = measure(model, args.layers, args.counts, args.tokens, args.batch_size, args.m, args.device)
    report(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
