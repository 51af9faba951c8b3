"""The training loader reading a cache from S3 against the same cache on local disk (docs/cache.md).

    python -m benchmarks.loader_s3 [--chunks 16] [--rows 16384] [--d 576] [--batch 4096]
    python -m benchmarks.loader_s3 --tiny       # 16 chunks of 1,024 x 64 rows, batches of 512: seconds

One cache (float16, zstd:1, real-shaped rows) is written twice, to a local directory and to a real S3
API: moto's server on 127.0.0.1 (the tests' object store; an S3 bucket in a region near the GPUs has
more bandwidth and more latency). The loader's rows/s from each, in the same run, and against what
a training step consumes (benchmarks.train measures it; pass it with --demand to print the ratio,
which must stay ≥ 2×). Needs the s3 extra and moto: pip install -e ".[dev,s3]".
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from benchmarks import parse_with_tiny
from sae.cache.store import open_cache
from sae.train.loader import Loader
from tests.synthetic import write_cache

# --tiny: as many chunks as the default (two blocks of the loader's 8), each of 1,024 rows of 64
TINY = {"chunks": 16, "rows": 1024, "d": 64, "batch": 512}


def moto_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, endpoint
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def loader_rows_per_s(cache_path: str, batch: int, batches: int) -> float:
    cache = open_cache(cache_path)
    loader = Loader(cache, [0], list(range(cache.n_chunks)), batch, seed=0, buffer_chunks=8)
    try:
        next(loader)  # the first block's reads: start-up, not steady state
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        return batches * batch / (time.perf_counter() - start)
    finally:
        loader.close()


def measure(n_chunks: int = 16, chunk_rows: int = 16384, d: int = 576, batch: int = 4096) -> dict:
    acts_RD = torch.randn(n_chunks * chunk_rows, d) * 3
    process, endpoint = moto_server()
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}  # fmt: skip
    # For this run only: a caller's own AWS settings come back afterwards (the tests call this in-process).
    with mock.patch.dict(os.environ, env):
        try:
            rates = rates_local_and_s3(acts_RD, endpoint, chunk_rows, batch)
        finally:
            process.terminate()
            process.wait()
    return {"chunks": n_chunks, "chunk_rows": chunk_rows, "d": d, "batch": batch, "rows_s": rates,
            "s3_vs_local": rates["s3"] / rates["local"]}  # fmt: skip


def rates_local_and_s3(acts_RD: torch.Tensor, endpoint: str, chunk_rows: int, batch: int) -> dict[str, float]:
    """The loader's rows/s from one cache written to a local directory and to a bucket at endpoint."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                 region_name="us-east-1").create_bucket(Bucket="bench")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        caches = {
            where: write_cache(root, acts_RD, 128, chunk_rows // 128, dtype="float16", codec="zstd:1")
            for where, root in (("local", tmp), ("s3", "s3://bench/caches"))
        }
        batches = len(acts_RD) // batch - 2  # about one epoch, past the first block
        return {where: loader_rows_per_s(path, batch, batches) for where, path in caches.items()}


def report(r: dict, demand: float | None = None) -> None:
    print(f"loader over {r['chunks']} chunks of {r['chunk_rows']:,} x {r['d']} float16 rows, batch {r['batch']:,}")
    for where, rate in r["rows_s"].items():
        vs = f"  {rate / demand:5.2f}x the demand of {demand:,.0f} rows/s" if demand else ""
        print(f"  from {where:5}: {rate:12,.0f} rows/s{vs}")
    print(f"  s3 / local: {r['s3_vs_local']:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help=f"the defaults below become {TINY}")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--rows", type=int, default=16384, help="rows per chunk (a multiple of 128)")
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--batch", type=int, default=4096, help="rows per loader batch")
    parser.add_argument("--demand", type=float, default=None, help="a training step's rows/s (benchmarks.train)")
    args = parse_with_tiny(parser, argv, TINY)
    result = measure(args.chunks, args.rows, args.d, args.batch)
    report(result, args.demand)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
