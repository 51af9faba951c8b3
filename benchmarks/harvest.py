"""Harvest speed against a plain full forward, and the storage dtype/codec table behind the defaults.

    python benchmarks/harvest.py [--model smollm2-135m] [--layer 6] [--tokens 32768] [--device auto]

Both speeds are measured in this run on the same device and contexts: "plain" is the HF model's full
forward (all blocks and the LM head, no hooks, nothing written); "harvest" is `sae harvest` end to end
(tokenizing, forward up to the hooked block, float16 conversion, compression, checksums, commits).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from sae.cache.codecs import STORAGE_DTYPES, compressors, to_storage, zarr_dtype
from sae.cache.store import open_cache
from sae.harvest.config import HarvestConfig
from sae.harvest.harvest import harvest, resolve_device
from sae.harvest.model import load_model

CODECS = [
    "none", "zstd:1", "zstd:3", "zstd:9", "blosc-zstd:1:shuffle", "blosc-zstd:1:bitshuffle",
    "blosc-lz4:5:noshuffle", "blosc-lz4:5:shuffle",
]  # fmt: skip


def plain_forward_tok_per_s(cfg: HarvestConfig, tokens_NT: np.ndarray) -> float:
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.model, cfg.model_dtype, str(device))
    ids_NT = torch.from_numpy(tokens_NT).long()
    with torch.inference_mode():
        loaded.model(input_ids=ids_NT[: cfg.batch_contexts].to(device), use_cache=False)  # warm-up
        sync(device)
        start = time.perf_counter()
        for b0 in range(0, len(ids_NT), cfg.batch_contexts):
            loaded.model(input_ids=ids_NT[b0 : b0 + cfg.batch_contexts].to(device), use_cache=False)
        sync(device)
    return ids_NT.numel() / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def codec_row(acts_RD: torch.Tensor, storage_dtype: str, codec: str, repeats: int = 3) -> dict:
    """Ratio, encode and decode MB/s of one codec on one chunk, through zarr as the cache uses it."""
    stored = to_storage(acts_RD, storage_dtype)
    array = zarr.create_array(
        zarr.storage.MemoryStore(), shape=stored.shape, chunks=stored.shape, dtype=zarr_dtype(storage_dtype),
        compressors=compressors(codec), fill_value=0,
    )  # fmt: skip
    encode_s = min(_timed(lambda: array.__setitem__(slice(None), stored)) for _ in range(repeats))
    decode_s = min(_timed(lambda: array[:]) for _ in range(repeats))
    stored_bytes = sum(len(v) for v in array.store._store_dict.values()) - len(array.store._store_dict["zarr.json"])
    raw_mb = acts_RD.numel() * 4 / 1e6  # rates in float32-equivalent MB, so dtypes compare fairly
    roundtrip = acts_RD.to(STORAGE_DTYPES[storage_dtype]).float()
    return {
        "dtype": storage_dtype,
        "codec": codec,
        "bytes_per_token": stored_bytes / len(acts_RD),
        "ratio_vs_dtype": stored.nbytes / stored_bytes,
        "encode_MBps": raw_mb / encode_s,
        "decode_MBps": raw_mb / decode_s,
        "rel_error": float((roundtrip - acts_RD).norm() / acts_RD.norm()),
    }


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-dtype", default="float32")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(
            model=args.model, layers=(args.layer,), tokens=args.tokens, device=args.device, model_dtype=args.model_dtype,
            dtype="float32", codec="none", cache_dir=Path(tmp),
        )  # fmt: skip
        harvest(cfg)  # warm-up: first model load, tokenizer and dataset caches
        for path in Path(tmp).iterdir():
            __import__("shutil").rmtree(path)
        start = time.perf_counter()
        cache = open_cache(harvest(cfg))
        harvest_s = time.perf_counter() - start
        tokens_NT = np.concatenate([cache.read_tokens(i) for i in range(cache.n_chunks)])
        acts_RD = torch.cat([cache.read_acts(args.layer, i) for i in range(cache.n_chunks)]).float()
        plain = plain_forward_tok_per_s(cfg, tokens_NT)
    ours = tokens_NT.size / harvest_s  # model load included: the honest end-to-end figure
    device = resolve_device(args.device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"model {args.model}, layer {args.layer} of {cache.spec['n_layers']}, {tokens_NT.size:,} tokens")
    print(f"plain full forward : {plain:10,.0f} tok/s")
    print(f"sae harvest        : {ours:10,.0f} tok/s (incl. model load, tokenizing, writing)")
    print(f"ratio              : {ours / plain:10.2f}x")

    chunk_RD = acts_RD[: cache.chunk_rows]
    rows = [codec_row(chunk_RD, dtype, codec) for dtype in STORAGE_DTYPES for codec in CODECS]
    print(f"\ncodecs on {len(chunk_RD):,} real rows (d={chunk_RD.shape[1]}); MB/s in float32-equivalent MB")
    print(f"{'dtype':9} {'codec':24} {'B/token':>8} {'ratio':>6} {'enc MB/s':>9} {'dec MB/s':>9} {'rel err':>9}")
    for r in rows:
        print(
            f"{r['dtype']:9} {r['codec']:24} {r['bytes_per_token']:8.0f} {r['ratio_vs_dtype']:6.3f} "
            f"{r['encode_MBps']:9.0f} {r['decode_MBps']:9.0f} {r['rel_error']:9.2e}"
        )
    print(json.dumps({"harvest_tok_s": ours, "plain_tok_s": plain, "ratio": ours / plain, "codecs": rows}))


if __name__ == "__main__":
    main()
