"""zarr v3 sharding (many chunks per file) against the cache's one file per chunk (docs/cache.md).

    python -m benchmarks.sharding [--chunks 16] [--rows 16384] [--d 576] [--shards 1,4,16]
    python -m benchmarks.sharding --tiny      # 16 chunks of 1,024 x 64 rows: a second

The cache writes and commits one chunk at a time. With shards of S chunks, zarr rewrites a shard's
whole file for each chunk written into it (read, add the chunk, write), so writing the S chunks of a
shard one after another moves about S/2 times the bytes; reading a chunk back needs the shard's
index first. Measured here on real-shaped float16 rows with the cache's codec (zstd:1 + crc32c): the
write rate of chunk-by-chunk appends, the read rate of chunk reads, and files per 1e9 GPT-2 tokens.
What a crash can lose is the same either way: a shard is written whole (temp file + rename), so a kill
leaves the old shard and at most the uncommitted chunks are redone.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from benchmarks import parse_with_tiny
from sae.cache.codecs import compressors

GPT2_TOKENS, GPT2_CHUNK_ROWS = 10**9, 128 * 128
TINY = {"chunks": 16, "rows": 1024, "d": 64}


def measure(n_chunks: int = 16, chunk_rows: int = 16384, d: int = 576, shards: tuple[int, ...] = (1, 4, 16)) -> dict:
    rng = np.random.default_rng(0)
    # real residual rows compress ~7%; random float16 with a narrow exponent range does about the same
    chunk = (rng.standard_normal((chunk_rows, d)) * 3).astype(np.float16)
    mb = chunk.nbytes / 1e6
    rows = []
    for s in shards:
        with tempfile.TemporaryDirectory() as tmp:
            group = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w")
            array = group.create_array(
                "acts", shape=(n_chunks * chunk_rows, d), chunks=(chunk_rows, d), dtype="float16",
                shards=(s * chunk_rows, d) if s > 1 else None, compressors=compressors("zstd:1"), fill_value=0,
            )  # fmt: skip
            start = time.perf_counter()
            for i in range(n_chunks):  # as a harvest writes: one chunk, then its commit, then the next
                array[i * chunk_rows : (i + 1) * chunk_rows] = chunk
            write_s = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(n_chunks):  # as the loader reads: one chunk at a time
                array[i * chunk_rows : (i + 1) * chunk_rows]
            read_s = time.perf_counter() - start
            files = sum(1 for p in Path(tmp, "acts").rglob("*") if p.is_file() and p.name != "zarr.json")
        rows.append({
            "chunks_per_file": s,
            "write_MBps": n_chunks * mb / write_s,
            "read_MBps": n_chunks * mb / read_s,
            "files": files,
            "files_per_1e9_gpt2_tokens_per_array": -(-GPT2_TOKENS // (GPT2_CHUNK_ROWS * s)),
        })  # fmt: skip
    base = rows[0]
    for r in rows:
        r["write_vs_unsharded"] = r["write_MBps"] / base["write_MBps"]
        r["read_vs_unsharded"] = r["read_MBps"] / base["read_MBps"]
    return {"n_chunks": n_chunks, "chunk_rows": chunk_rows, "d": d, "rows": rows}


def report(r: dict) -> None:
    print(f"{r['n_chunks']} chunks of {r['chunk_rows']:,} x {r['d']} float16 rows, zstd:1, written one by one")
    print(
        f"{'chunks/file':>11} {'write MB/s':>10} {'vs 1':>6} {'read MB/s':>10} {'vs 1':>6} {'files/1e9 GPT-2 tok':>20}"
    )
    for row in r["rows"]:
        print(
            f"{row['chunks_per_file']:>11} {row['write_MBps']:10.0f} {row['write_vs_unsharded']:6.2f} "
            f"{row['read_MBps']:10.0f} {row['read_vs_unsharded']:6.2f} {row['files_per_1e9_gpt2_tokens_per_array']:>20,}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help=f"the defaults below become {TINY}")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--shards", default="1,4,16")
    args = parse_with_tiny(parser, argv, TINY)
    result = measure(args.chunks, args.rows, args.d, tuple(int(s) for s in args.shards.split(",")))
    report(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
