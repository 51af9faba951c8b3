"""Harvest speed against a plain full forward, and the storage dtype/codec table behind the defaults.

    python -m benchmarks.harvest [--model smollm2-135m] [--layer 6] [--tokens 32768] [--device auto]
    python -m benchmarks.harvest --tiny [--model DIR]   # a tiny GPT-2 (built unless given), layer 1, 2,048 tokens

Both speeds are measured in this run on the same device and contexts: "plain" is the HF model's full
forward (all blocks and the LM head, no hooks, nothing written); "harvest" is `sae harvest` on the same
loaded model (opening the dataset, tokenizing, forward up to the hooked block, conversion, compression,
checksums, commits). MFU counts matmul FLOPs of the blocks each one runs (benchmarks/mfu.py).
"""

import argparse
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr

from benchmarks import parse_with_tiny
from benchmarks.mfu import lm_forward_flops_per_token, peak_flops
from benchmarks.models import model_or_tiny
from sae.cache.codecs import (
    DIM_SCALED,
    STORAGE_DTYPES,
    StoredRows,
    compressors,
    decode_rows,
    dim_scale,
    encode_rows,
    from_numpy,
    is_scaled,
    to_numpy,
    zarr_dtype,
)
from sae.cache.store import open_cache, open_writer
from sae.device import resolve_device
from sae.harvest.config import HarvestConfig
from sae.harvest.harvest import WRITERS, harvest
from sae.harvest.model import LoadedModel, load_model
from tests.synthetic import synthetic_spec

CODECS = [
    "none", "zstd:1", "zstd:3", "zstd:9", "blosc-zstd:1:shuffle", "blosc-zstd:1:bitshuffle",
    "blosc-lz4:5:noshuffle", "blosc-lz4:5:shuffle",
]  # fmt: skip
SCALED_CODECS = ["none", "zstd:1", "blosc-zstd:1:shuffle"]  # 8-bit values: shuffling has nothing to regroup
# --tiny: a tiny GPT-2 (benchmarks.models; built for the run unless --model), 16 contexts of 128 in forwards of 4
TINY = {"layer": 1, "tokens": 2048, "batch_contexts": 4}


def plain_forward_tok_per_s(loaded: LoadedModel, cfg: HarvestConfig, tokens_CT: np.ndarray, device) -> float:
    ids_CT = torch.from_numpy(tokens_CT).long()
    with torch.inference_mode():
        loaded.model(input_ids=ids_CT[: cfg.batch_contexts].to(device), use_cache=False)  # warm-up
        sync(device)
        start = time.perf_counter()
        for b0 in range(0, len(ids_CT), cfg.batch_contexts):
            loaded.model(input_ids=ids_CT[b0 : b0 + cfg.batch_contexts].to(device), use_cache=False)
        sync(device)
    return ids_CT.numel() / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def codec_row(acts_RD: torch.Tensor, storage_dtype: str, codec: str, repeats: int = 3) -> dict:
    """Bytes per token, encode and decode MB/s (the dtype conversion and the codec, through zarr as the
    cache uses it) and the error against float32, of one storage dtype and codec on one chunk."""
    s_dim = dim_scale(acts_RD) if storage_dtype in DIM_SCALED else None
    arrays = {}

    def encode() -> None:
        stored = encode_rows(acts_RD, storage_dtype, s_dim)
        for name, part, dtype, parts_codec in (
            ("values", to_numpy(stored.values_RD, storage_dtype), zarr_dtype(storage_dtype), codec),
            ("scales", None if stored.scale_R is None else stored.scale_R.numpy(), "float32", "none"),
        ):
            if part is not None:
                arrays[name] = zarr.create_array(
                    zarr.storage.MemoryStore(), shape=part.shape, chunks=part.shape, dtype=dtype,
                    compressors=compressors(parts_codec), fill_value=0,
                )  # fmt: skip
                arrays[name][:] = part

    def decode() -> torch.Tensor:
        scales = torch.from_numpy(arrays["scales"][:]) if "scales" in arrays else None
        return decode_rows(StoredRows(from_numpy(arrays["values"][:], storage_dtype), scales), s_dim).float()

    encode_s = min(_timed(encode) for _ in range(repeats))
    decode_s = min(_timed(decode) for _ in range(repeats))
    stored_bytes = sum(len(v) for a in arrays.values() for k, v in a.store._store_dict.items() if k != "zarr.json")
    raw_mb = acts_RD.numel() * 4 / 1e6  # rates in float32-equivalent MB, so dtypes compare fairly
    roundtrip = decode()
    row_error = (roundtrip - acts_RD).norm(dim=1) / acts_RD.norm(dim=1)
    return {
        "dtype": storage_dtype,
        "codec": codec,
        "bytes_per_token": stored_bytes / len(acts_RD),
        "encode_MBps": raw_mb / encode_s,
        "decode_MBps": raw_mb / decode_s,
        "rel_error": float((roundtrip - acts_RD).norm() / acts_RD.norm()),
        "median_row_error": float(row_error.median()),
    }


def write_ceiling_rows_per_s(acts_RD: torch.Tensor, chunk_rows: int, ctx_len: int, writers: int) -> float:
    """Rows/s that `writers` threads write into a float16 zstd:1 cache (chunk files only, as harvest's
    writer threads do): the most a harvest can store, however fast its forward is."""
    n_chunks, n_ctx = 8, min(chunk_rows, len(acts_RD)) // ctx_len
    chunk = StoredRows(acts_RD[: n_ctx * ctx_len].half(), None)
    tokens_CT = np.ones((n_ctx, ctx_len), dtype=np.int32)
    spec = {**synthetic_spec(acts_RD.shape[1], ctx_len, 0), "dtype": "float16"}
    with tempfile.TemporaryDirectory() as tmp:
        writer = open_writer(
            Path(tmp) / "c", spec, {"codec": "zstd:1", "chunk_contexts": len(tokens_CT)}, acts_RD.shape[1], {}
        )
        writer.reserve(n_chunks * len(tokens_CT))
        with ThreadPoolExecutor(writers) as pool:
            start = time.perf_counter()
            list(pool.map(lambda i: writer.write_chunk_data(i, tokens_CT, {0: chunk}), range(n_chunks)))
            return n_chunks * len(chunk.values_RD) / (time.perf_counter() - start)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    model: str,
    layer: int,
    tokens: int,
    device_name: str = "auto",
    model_dtype: str = "float32",
    batch_contexts: int = 32,
) -> dict:
    """Harvest vs plain forward on the same contexts and loaded model, their MFU, and the codec table."""
    device = resolve_device(device_name)
    loaded = load_model(model, model_dtype, str(device))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(
            model=model, layers=(layer,), tokens=tokens, device=device_name, model_dtype=model_dtype,
            batch_contexts=batch_contexts, dtype="float32", codec="none", cache_dir=Path(tmp),
        )  # fmt: skip
        shutil.rmtree(harvest(cfg, loaded))  # warm-up: tokenizer, dataset caches, allocator
        start = time.perf_counter()
        cache = open_cache(harvest(cfg, loaded))
        harvest_s = time.perf_counter() - start
        tokens_CT = np.concatenate([cache.read_tokens(i) for i in range(cache.n_chunks)])
        acts_RD = torch.cat([cache.read_acts(layer, i) for i in range(cache.n_chunks)]).float()
        chunk_rows = cache.chunk_rows
    plain = plain_forward_tok_per_s(loaded, cfg, tokens_CT, device)
    ours = tokens_CT.size / harvest_s  # dataset loading, tokenizing, forward, conversion, writing
    d, T = loaded.d_model, cfg.ctx_len
    head = loaded.model.get_output_embeddings().weight.numel()
    n_params = [sum(p.numel() for p in block.parameters()) for block in loaded.blocks]
    harvest_flops = lm_forward_flops_per_token(sum(n_params[:layer]), 0, layer, d, T)  # resid_pre: blocks < L
    plain_flops = lm_forward_flops_per_token(sum(n_params), head, loaded.n_layers, d, T)
    peak, peak_source = peak_flops(device, "fp32" if model_dtype == "float32" else "bf16")
    codec_rows = [
        codec_row(acts_RD[:chunk_rows], dtype, codec)
        for dtype in STORAGE_DTYPES
        for codec in (SCALED_CODECS if is_scaled(dtype) else CODECS)
    ]
    write_ceiling = {n: write_ceiling_rows_per_s(acts_RD, chunk_rows, cfg.ctx_len, n) for n in (1, WRITERS)}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": model, "layer": layer, "n_layers": loaded.n_layers, "tokens": int(tokens_CT.size),
        "model_dtype": model_dtype, "batch_contexts": batch_contexts,
        "plain_tok_s": plain, "harvest_tok_s": ours, "ratio": ours / plain,
        "plain_mfu": plain * plain_flops / peak, "harvest_mfu": ours * harvest_flops / peak,
        "peak_flops": peak, "peak_source": peak_source, "codecs": codec_rows,
        "write_ceiling_tok_s": write_ceiling, "writers": WRITERS,
    }  # fmt: skip


def report(r: dict) -> None:
    print(
        f"device: {r['device']}; model {r['model']} ({r['model_dtype']}), layer {r['layer']} of {r['n_layers']}, "
        f"{r['tokens']:,} tokens, {r['batch_contexts']} contexts per forward"
    )
    print(f"plain full forward : {r['plain_tok_s']:10,.0f} tok/s   MFU {r['plain_mfu']:6.1%}")
    print(
        f"sae harvest        : {r['harvest_tok_s']:10,.0f} tok/s   MFU {r['harvest_mfu']:6.1%} (all of it, writing included)"
    )
    print(
        f"ratio              : {r['ratio']:10.2f}x          peak: {r['peak_flops'] / 1e12:.2f} TFLOP/s ({r['peak_source']})"
    )
    ceiling = r["write_ceiling_tok_s"]
    print(
        f"host write ceiling : {ceiling[1]:10,.0f} tok/s with 1 writer thread, {ceiling[r['writers']]:,.0f} with "
        f"{r['writers']} (harvest's), float16 zstd:1"
    )
    print("\ncodecs on one chunk of real rows; MB/s in float32-equivalent MB")
    float16 = next(c["bytes_per_token"] for c in r["codecs"] if (c["dtype"], c["codec"]) == ("float16", "none"))
    print(
        f"{'dtype':11} {'codec':24} {'B/token':>8} {'vs fp16':>7} {'enc MB/s':>9} {'dec MB/s':>9} {'rel err':>9} {'row err':>8}"
    )
    for c in r["codecs"]:
        print(
            f"{c['dtype']:11} {c['codec']:24} {c['bytes_per_token']:8.0f} {float16 / c['bytes_per_token']:7.3f} "
            f"{c['encode_MBps']:9.0f} {c['decode_MBps']:9.0f} {c['rel_error']:9.2e} {c['median_row_error']:8.2e}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help=f"the defaults below become {TINY}")
    parser.add_argument("--model", default=None, help="default: smollm2-135m (--tiny: a tiny GPT-2 built for the run)")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-dtype", default="float32")
    parser.add_argument("--batch-contexts", type=int, default=32)
    args = parse_with_tiny(parser, argv, TINY)
    with model_or_tiny(args.model, args.tiny) as model:
        results = measure(model, args.layer, args.tokens, args.device, args.model_dtype, args.batch_contexts)
    report(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
