"""The `sae inspect` pass against its limit, the SAE encode alone, on the same rows in the same run.

    python -m benchmarks.latents                   # CPU: SmolLM2-135M's d 576, m 2304, k 32, 1M rows
    python -m benchmarks.latents --rows 16384      # the first batches only: every latent's tables filling
    python -m benchmarks.latents --m 24576 --d 768 --batch-rows 65536   # a GPU: GPT-2 small's d, m 24k
    python -m benchmarks.latents --tiny            # d 64, m 512, k 8, 4,096 rows in batches of 1,024: seconds

Rows are planted sparse features (tests/synthetic.py) in an int8 zstd cache, as harvests write them;
the SAE is a random BatchTopK one with θ calibrated to L0 = k. Three rates, rows/s:
  encode   the SAE's encode (dense latents, as deployed) of batches already in memory: the limit of
           any pass over the rows
  floor    the same encode written into one reused [B, m] buffer, as the pass does (on CPU a fresh
           [B, m] per batch costs its page faults): the stricter bar
  update   the pass's per-batch work on the same in-memory batches (encode, nonzero, the top-k and
           sample merges, the windows): "bound by the encode" is a ratio near 1
  pass     the whole pass from the cache (read, decode, batches, progress bar), as `sae inspect` runs it
Goal: pass ≥ 0.8 × encode; the ratios to the floor are printed too. On a GPU the encode's MFU is printed too.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import parse_with_tiny
from benchmarks.mfu import peak_flops
from sae.cache.store import open_cache
from sae.device import keep_freed_memory
from sae.inspect.config import InspectConfig
from sae.inspect.scan import Scanner, plan_rows, scan
from sae.train.config import SAESpec
from sae.train.sae import SparseAutoencoder
from sae.train.theta import calibrate_theta
from tests.synthetic import planted_acts, write_cache

CTX_LEN, CHUNK_CONTEXTS = 128, 128
TINY = {"d": 64, "m": 512, "k": 8, "rows": 4096, "batch_rows": 1024}


def timed(fn, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


@torch.no_grad()
def measure(d: int = 576, m: int = 2304, k: int = 32, rows: int = 1_048_576, batch_rows: int = 4096) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keep_freed_memory(device)  # as `sae inspect` runs (inspect.stage), for all four figures
    rows = max(CTX_LEN, rows // CTX_LEN * CTX_LEN)
    # in pieces: planted_acts holds [rows, 4d] int64 ranks, 6 GB at 262k rows of d 768
    acts_RD = torch.cat([planted_acts(min(16_384, rows - r), d, 4 * d, k, seed=r) for r in range(0, rows, 16_384)]) * 3
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec("batchtopk", k, m, 0.0, 0.0), d).to(device).eval()
    sae.theta.fill_(calibrate_theta(sae, [acts_RD[:batch_rows].to(device)], k)["theta"])
    cfg = InspectConfig(batch_rows=batch_rows, lm=False)
    batch = cfg.batch_rows // CTX_LEN * CTX_LEN
    batches = [x.to(device) for x in acts_RD.split(batch)]
    tokens = [torch.ones(len(x), dtype=torch.long) for x in batches]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "d": d, "m": m, "k": k}
    result.update(rows=rows, batch_rows=batch, threads=torch.get_num_threads(), load_average=os.getloadavg()[0])

    def encode_all(n_batches: int = len(batches)) -> None:
        for x in batches[:n_batches]:
            sae.encode(x)

    buffer = torch.empty(batch, m, device=device)

    def floor_all(n_batches: int = len(batches)) -> None:
        for x in batches[:n_batches]:
            z_BM, theta_M = sae.scores(x, out=buffer[: len(x)])  # what encode does, into the buffer
            z_BM.masked_fill_(z_BM <= theta_M, 0.0)

    def update_all(n_batches: int = len(batches)) -> None:
        scanner = Scanner(sae, cfg, CTX_LEN, device)
        for i, (x, t) in enumerate(zip(batches[:n_batches], tokens, strict=False)):
            scanner.update(x, t, i * batch)
        scanner.result()

    with tempfile.TemporaryDirectory() as tmp:
        cache = open_cache(write_cache(Path(tmp), acts_RD, CTX_LEN, CHUNK_CONTEXTS, dtype="int8", codec="zstd:1"))
        plan = plan_rows(cache, [], cache.rows)
        encode_all(4), floor_all(4), update_all(4)  # warm-up: first allocations and kernels
        # Best of two rounds of each, interleaved: a shared machine's load drifts during the run.
        times = {"encode": [], "floor": [], "update": [], "pass": []}
        for _ in range(2):
            times["encode"].append(timed(encode_all, device))
            times["floor"].append(timed(floor_all, device))
            times["update"].append(timed(update_all, device))
            times["pass"].append(timed(lambda: scan(sae, cache, 0, plan, cfg, device), device))
    for name, seconds in times.items():
        result[f"{name}_rows_s"] = rows / min(seconds)
    for name in ("update", "pass"):
        for bar in ("encode", "floor"):
            result[f"{name}_vs_{bar}"] = result[f"{name}_rows_s"] / result[f"{bar}_rows_s"]
    peak, source = peak_flops(device, "fp32")
    result["encode_mfu"] = result["encode_rows_s"] * 2 * d * m / peak  # the encoder matmul: 2·d·m FLOPs a row
    result["peak_source"] = source
    return result


def report(r: dict) -> None:
    print(f"device {r['device']}, threads {r['threads']}: d {r['d']}, m {r['m']}, k {r['k']}, {r['rows']:,} rows")
    print(f"load average before the run {r['load_average']:.2f} (other processes skew CPU timings)")
    print(
        f"  encode alone (in memory)      {r['encode_rows_s']:12,.0f} rows/s   MFU {r['encode_mfu']:.1%} ({r['peak_source']})"
    )
    print(f"  encode into a reused buffer   {r['floor_rows_s']:12,.0f} rows/s   (the floor)")
    for name, label in (("update", "inspect update (in memory)   "), ("pass", "inspect pass (from the cache)")):
        print(
            f"  {label} {r[f'{name}_rows_s']:12,.0f} rows/s   {r[f'{name}_vs_encode']:.2f}x encode"
            f" (goal >= 0.8), {r[f'{name}_vs_floor']:.2f}x floor"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help=f"the defaults below become {TINY}")
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--m", type=int, default=2304)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--rows", type=int, default=1_048_576)
    parser.add_argument("--batch-rows", type=int, default=4096)
    args = parse_with_tiny(parser, argv, TINY)
    result = measure(args.d, args.m, args.k, args.rows, args.batch_rows)
    report(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
