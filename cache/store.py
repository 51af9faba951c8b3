"""The on-disk activation cache: one zarr v3 group per harvest spec.

    <cache>/zarr.json             group; attrs["sae_cache"] holds the metadata (format in README.md)
    <cache>/tokens                int32 [n_contexts, ctx_len]        chunks of `chunk_contexts` contexts
    <cache>/acts/<layer>          storage dtype [rows, d_model]      chunks of chunk_contexts * ctx_len rows
    <cache>/chunk_stats/<layer>   float64 [n_chunks, 7 + d_model]    one row of sums per chunk
    <cache>/writer.lock           present while a harvest writes

Commit protocol: a chunk's arrays are written first (each chunk file atomically), then the metadata's
`n_contexts` is advanced. Readers trust only `n_contexts`, so a writer killed at any instant leaves a
valid cache whose uncommitted chunk files are simply rewritten on resume.
"""

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from sae.cache.codecs import (
    DIM_SCALED,
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
from sae.cache.location import Location, as_location
from sae.cache.spec import cache_key
from sae.errors import UserError

FORMAT = "sae-activation-cache"
FORMAT_VERSION = 1
META_KEY = "sae_cache"
# Per-chunk sums kept in chunk_stats; "plain" rows exclude BOS tokens and the first position of each
# context, whose norms are several times the rest in Llama-family models.
STAT_COLUMNS = (
    "rows",
    "norm_sum",
    "norm_sq_sum",
    "norm_max",
    "plain_rows",
    "plain_norm_sum",
    "plain_norm_sq_sum",
)
NORM_MAX = STAT_COLUMNS.index("norm_max")


def acts_name(layer: int) -> str:
    return f"acts/{layer}"


def scales_name(layer: int) -> str:
    """The per-row scales of a scaled storage dtype (int8, float8_e4m3): float32 [rows]."""
    return f"scales/{layer}"


def chunk_key(array_name: str, chunk_index: int) -> str:
    """Where zarr's default v3 chunk key encoding puts chunk (chunk_index, 0) of a 2-d array, or
    chunk chunk_index of the 1-d scales arrays."""
    return f"{array_name}/c/{chunk_index}" + ("" if array_name.startswith("scales/") else "/0")


def chunk_file(cache_path: Path, array_name: str, chunk_index: int) -> Path:
    """chunk_key's file in a local cache."""
    return Path(cache_path) / chunk_key(array_name, chunk_index)


def is_cache(where: "str | Path | Location") -> bool:
    raw = as_location(where).read("zarr.json")
    try:
        attrs = json.loads(raw).get("attributes", {}) if raw is not None else {}
    except json.JSONDecodeError:
        return False
    return attrs.get(META_KEY, {}).get("format") == FORMAT


@dataclass
class Cache:
    """A read-only view of the rows committed when it was opened (or last refreshed)."""

    location: Location
    meta: dict[str, Any]
    group: zarr.Group

    @property
    def path(self) -> str:
        """The cache's local path or URL, as it is shown and recorded."""
        return self.location.url

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def spec(self) -> dict[str, Any]:
        return self.meta["spec"]

    @property
    def layers(self) -> list[int]:
        return self.spec["layers"]

    @property
    def d_model(self) -> int:
        return self.meta["d_model"]

    @property
    def ctx_len(self) -> int:
        return self.spec["ctx_len"]

    @property
    def storage_dtype(self) -> str:
        return self.spec["dtype"]

    @property
    def n_contexts(self) -> int:
        """Contexts committed."""
        return self.meta["n_contexts"]

    @property
    def target_contexts(self) -> int:
        """Contexts the cache will hold once its harvest ends (what the harvest reserved)."""
        return self.meta.get("target_contexts", self.n_contexts)

    @property
    def complete(self) -> bool:
        """Every context its harvest set out to write is committed."""
        return self.n_contexts >= self.target_contexts

    def refresh(self) -> None:
        """See what a harvest still writing the cache has committed since it was opened."""
        group = zarr.open_group(self.location.zarr_store(read_only=True), mode="r")
        self.group, self.meta = group, group.attrs[META_KEY]

    @property
    def rows(self) -> int:
        return self.n_contexts * self.ctx_len

    @property
    def chunk_contexts(self) -> int:
        return self.meta["storage"]["chunk_contexts"]

    @property
    def chunk_rows(self) -> int:
        return self.chunk_contexts * self.ctx_len

    @property
    def n_chunks(self) -> int:
        """Chunks committed (the last may be partial)."""
        return -(-self.n_contexts // self.chunk_contexts)

    @property
    def target_chunks(self) -> int:
        """Chunks the cache will hold once its harvest ends."""
        return -(-self.target_contexts // self.chunk_contexts)

    def contexts_in_chunk(self, chunk_index: int) -> int:
        """Contexts the chunk holds, or will once committed (a harvest commits whole chunks, and a
        partial one only as its last)."""
        assert 0 <= chunk_index < self.target_chunks, f"chunk {chunk_index} not in [0, {self.target_chunks})"
        return min(self.chunk_contexts, self.target_contexts - chunk_index * self.chunk_contexts)

    def is_committed(self, chunk_index: int) -> bool:
        if chunk_index >= self.target_chunks:  # the harvest ended short of it (its dataset ran out)
            return False
        return self.n_contexts >= (chunk_index * self.chunk_contexts + self.contexts_in_chunk(chunk_index))

    def _read(self, array_name: str, chunk_index: int, start: int, stop: int) -> np.ndarray:
        key = chunk_key(array_name, chunk_index)
        if not self.location.exists(key):
            raise UserError(
                f"missing chunk {self.path}/{key}: the cache is damaged; run `sae cache verify {self.path}`"
            )
        try:
            return self.group[array_name][start:stop]
        except ValueError as e:  # zarr reports a checksum or decode failure as ValueError
            raise UserError(f"corrupt chunk {self.path}/{key}: {e}") from None

    def read_tokens(self, chunk_index: int) -> np.ndarray:
        """int32 [contexts_in_chunk, ctx_len]."""
        start = chunk_index * self.chunk_contexts
        return self._read("tokens", chunk_index, start, start + self.contexts_in_chunk(chunk_index))

    def read_stored(self, layer: int, chunk_index: int) -> StoredRows:
        """A chunk's rows as stored (CPU): decode_rows(..., self.dim_scale(layer)) makes them floats."""
        start = chunk_index * self.chunk_rows
        stop = start + self.contexts_in_chunk(chunk_index) * self.ctx_len
        values = from_numpy(self._read(acts_name(layer), chunk_index, start, stop), self.storage_dtype)
        scales = None
        if is_scaled(self.storage_dtype):
            scales = torch.from_numpy(self._read(scales_name(layer), chunk_index, start, stop))
        return StoredRows(values, scales)

    def read_acts(self, layer: int, chunk_index: int) -> torch.Tensor:
        """[rows_in_chunk, d_model] CPU float tensor (float16/bfloat16/float32 as stored; float32 for
        the scaled dtypes); row r is context r // ctx_len."""
        return decode_rows(self.read_stored(layer, chunk_index), self.dim_scale(layer))

    def dim_scale(self, layer: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """int8's per-dimension scale s_dim [d] (cache.codecs) on `device`, where rows decode; None for
        the other dtypes."""
        scale = self.meta["storage"].get("dim_scale", {}).get(str(layer))
        return None if scale is None else torch.tensor(scale, dtype=torch.float32, device=device)

    def stats(self, layer: int) -> dict[str, Any]:
        """mean_D, mean_norm, mean_sq_norm, max_norm, count, and the same over plain rows (no BOS/first)."""
        return self.meta["stats"][str(layer)]


def open_cache(where: "str | Path | Location") -> Cache:
    location = as_location(where)
    if not is_cache(location):
        raise UserError(f"{location} is not an activation cache (no {FORMAT} metadata in {location}/zarr.json)")
    group = zarr.open_group(location.zarr_store(read_only=True), mode="r")
    return Cache(location=location, meta=group.attrs[META_KEY], group=group)


def list_caches(cache_root: "str | Path | Location") -> list[Cache]:
    root = as_location(cache_root)
    return [open_cache(root.child(name)) for name in root.children() if is_cache(root.child(name))]


def find_caches(cache_root: "str | Path | Location", declared: dict[str, Any]) -> list[Cache]:
    """Caches whose spec agrees with every declared field (a spec without the resolved model revision)."""
    return [c for c in list_caches(cache_root) if all(c.spec.get(k) == v for k, v in declared.items())]


def summarize_chunk_stats(stats_per_chunk: np.ndarray) -> dict[str, Any]:
    """Totals over committed chunks: [n_chunks, len(STAT_COLUMNS) + d_model] float64 sums."""
    totals = dict(zip(STAT_COLUMNS, stats_per_chunk[:, : len(STAT_COLUMNS)].sum(0).tolist(), strict=True))
    rows, plain_rows = max(totals["rows"], 1), max(totals["plain_rows"], 1)
    return {
        "count": int(totals["rows"]),
        "mean_D": (stats_per_chunk[:, len(STAT_COLUMNS) :].sum(0) / rows).tolist(),
        "mean_norm": totals["norm_sum"] / rows,
        "mean_sq_norm": totals["norm_sq_sum"] / rows,
        "max_norm": float(stats_per_chunk[:, STAT_COLUMNS.index("norm_max")].max(initial=0.0)),
        "plain_count": int(totals["plain_rows"]),
        "plain_mean_norm": totals["plain_norm_sum"] / plain_rows,
        "plain_mean_sq_norm": totals["plain_norm_sq_sum"] / plain_rows,
    }


def plain_rows(tokens_CT: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """[C*T] bool: rows that are neither a BOS token nor a context's first position."""
    plain_CT = tokens_CT != bos_token_id
    plain_CT[:, 0] = False
    return plain_CT.reshape(-1)


def chunk_stats(acts_RD: torch.Tensor, plain_R: torch.Tensor) -> torch.Tensor:
    """One row of STAT_COLUMNS followed by the per-dimension sum: float64, on acts' device, no sync.
    A NaN or inf anywhere in acts makes norm_sum non-finite, which is how writers detect them."""
    acts_RD = acts_RD.double()
    norms_R = acts_RD.norm(dim=1)
    plain_norms_R = torch.where(plain_R, norms_R, 0.0)
    # new_full is a fill on the device; new_tensor would copy from the host and wait for the queue
    head = [norms_R.new_full((), float(len(norms_R))), norms_R.sum(), norms_R.square().sum(), norms_R.max()]
    head += [plain_R.sum().double(), plain_norms_R.sum(), plain_norms_R.square().sum()]
    return torch.cat([torch.stack(head), acts_RD.sum(0)])


def merge_chunk_stats(stats_per_batch):
    """Rows of chunk_stats (torch or numpy) of disjoint row sets as one row of their union."""
    merged_F = stats_per_batch.sum(0)
    merged_F[NORM_MAX] = stats_per_batch[:, NORM_MAX].max()
    return merged_F


class CacheWriter:
    """Writes chunks under the writer lock. Chunk data may be written concurrently (each chunk's files
    are its own); commits go in chunk order. `write_chunk` does both for one chunk."""

    def __init__(self, location: Location, group: zarr.Group):
        self.location = location
        self.group = group
        self.meta = group.attrs[META_KEY]
        # Stats of the full chunks before resume["chunk_index"], kept so a commit costs O(1), not a
        # re-read of every chunk's row (61k of them for 1e9 GPT-2 tokens).
        n_full = self.resume["chunk_index"]
        self._full_stats = {
            layer: merge_chunk_stats(self.group[f"chunk_stats/{layer}"][:n_full])
            if n_full
            else np.zeros(self.group[f"chunk_stats/{layer}"].shape[1])
            for layer in self.meta["spec"]["layers"]
        }

    @property
    def n_contexts(self) -> int:
        return self.meta["n_contexts"]

    @property
    def resume(self) -> dict[str, Any]:
        """{"chunk_index": first chunk not yet full, "stream": token-stream state at its start}."""
        return self.meta["resume"]

    def reserve(self, n_contexts: int) -> None:
        """Grow the arrays to hold n_contexts, the harvest's target that followers plan by (metadata
        only: no chunk is written)."""
        chunk_contexts, ctx_len = self.meta["storage"]["chunk_contexts"], self.meta["spec"]["ctx_len"]
        n_chunks = -(-n_contexts // chunk_contexts)
        self.group["tokens"].resize((n_contexts, ctx_len))
        for layer in self.meta["spec"]["layers"]:
            self.group[acts_name(layer)].resize((n_contexts * ctx_len, self.meta["d_model"]))
            if is_scaled(self.meta["spec"]["dtype"]):
                self.group[scales_name(layer)].resize((n_contexts * ctx_len,))
            stats = self.group[f"chunk_stats/{layer}"]
            stats.resize((n_chunks, stats.shape[1]))
        with self._storage_errors("the target"):
            self.meta = {**self.meta, "target_contexts": n_contexts}
            self.group.attrs[META_KEY] = self.meta

    def skip_to(self, chunk_index: int, stream: dict) -> None:
        """Go on writing at chunk_index, the token stream at `stream`, as if the chunks before it were
        committed (a stream resumed by its trainer, which needs none of them). Never on a stored cache."""
        assert self.location.url.startswith("memory://"), "only a stream's memory cache skips chunks"
        meta = {**self.meta, "n_contexts": chunk_index * self.meta["storage"]["chunk_contexts"]}
        meta["resume"] = {"chunk_index": chunk_index, "stream": stream}
        self.group.attrs[META_KEY] = self.meta = meta

    def dim_scales(self) -> dict[int, torch.Tensor] | None:
        """s_dim per layer where the storage dtype needs one (int8), once set; else None."""
        if self.meta["spec"]["dtype"] not in DIM_SCALED:
            return None
        scales = self.meta["storage"].get("dim_scale")
        return None if scales is None else {int(k): torch.tensor(v, dtype=torch.float32) for k, v in scales.items()}

    def set_dim_scales(self, scales: dict[int, torch.Tensor]) -> None:
        """Fix s_dim before the first chunk is written; every later chunk and resume uses it."""
        meta = dict(self.meta)
        meta["storage"] = {**meta["storage"], "dim_scale": {str(k): v.tolist() for k, v in scales.items()}}
        self.group.attrs[META_KEY] = meta
        self.meta = meta

    def write_chunk(
        self, chunk_index: int, tokens_CT: np.ndarray, acts: dict[int, torch.Tensor], stream_after: dict
    ) -> None:
        """Write chunk `chunk_index` (tokens and every layer's [C*T, D] CPU float acts), then commit it."""
        storage_dtype = self.meta["spec"]["dtype"]
        if storage_dtype in DIM_SCALED and self.dim_scales() is None:
            self.set_dim_scales({layer: dim_scale(acts_RD) for layer, acts_RD in acts.items()})
        scales = self.dim_scales() or {}
        stored = {layer: encode_rows(acts_RD, storage_dtype, scales.get(layer)) for layer, acts_RD in acts.items()}
        plain_R = plain_rows(torch.from_numpy(tokens_CT), self.meta["spec"]["bos_token_id"])
        stats = {
            layer: chunk_stats(decode_rows(rows, scales.get(layer)), plain_R).numpy() for layer, rows in stored.items()
        }
        self.write_chunk_data(chunk_index, tokens_CT, stored)
        self.commit_chunk(chunk_index, len(tokens_CT), stats, stream_after)

    def write_chunk_data(self, chunk_index: int, tokens_CT: np.ndarray, stored: dict[int, StoredRows]) -> None:
        """Write chunk `chunk_index`'s files (tokens; every layer's [C*T, D] CPU rows as stored) without
        committing them. Safe to run for different chunks at once."""
        chunk_contexts, ctx_len = self.meta["storage"]["chunk_contexts"], self.meta["spec"]["ctx_len"]
        n_ctx = len(tokens_CT)
        assert 0 < n_ctx <= chunk_contexts, f"{n_ctx} contexts do not fit a chunk of {chunk_contexts}"
        ctx0, row0 = chunk_index * chunk_contexts, chunk_index * chunk_contexts * ctx_len
        rows = slice(row0, row0 + n_ctx * ctx_len)
        with self._storage_errors(f"chunk {chunk_index}"):
            self.group["tokens"][ctx0 : ctx0 + n_ctx] = tokens_CT
            for layer, (values_RD, scale_R) in stored.items():
                self.group[acts_name(layer)][rows] = to_numpy(values_RD, self.meta["spec"]["dtype"])
                if scale_R is not None:
                    self.group[scales_name(layer)][rows] = scale_R.numpy()

    @contextlib.contextmanager
    def _storage_errors(self, what: str) -> Iterator[None]:
        """A write the storage refuses (a full disk, a file-size limit, an object store's error) as one
        line naming the cache: the committed rows stay, and a rerun resumes after them."""
        try:
            yield
        except Exception as e:
            reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0] or type(e).__name__
            raise UserError(
                f"cannot write {what} of {self.location}: {reason}; the cache keeps its "
                f"{self.n_contexts * self.meta['spec']['ctx_len']:,} committed rows: free space and run the "
                "harvest again to resume"
            ) from None

    def commit_chunk(self, chunk_index: int, n_ctx: int, stats: dict[int, np.ndarray], stream_after: dict) -> None:
        """Commit chunk `chunk_index` (its files written, `stats` its chunk_stats row per layer): the
        next chunk to commit, unless its activations hold a NaN or inf, which commits nothing."""
        chunk_contexts = self.meta["storage"]["chunk_contexts"]
        assert chunk_index == self.resume["chunk_index"], f"chunk {chunk_index} != {self.resume['chunk_index']}"
        ctx0 = chunk_index * chunk_contexts
        for layer, stats_F in stats.items():
            if not np.isfinite(stats_F[STAT_COLUMNS.index("norm_sum")]):  # float16 overflows above 65504
                raise UserError(
                    f"non-finite activations (NaN/inf) at layer {layer} in contexts {ctx0}..{ctx0 + n_ctx - 1}"
                    f" (in {self.meta['spec']['dtype']}); nothing from this chunk was committed; try"
                    f" --model-dtype float32 or --dtype float32"
                )
        full = n_ctx == chunk_contexts  # a partial last chunk is rewritten whole by the next extension
        meta = dict(self.meta)
        meta["n_contexts"] = ctx0 + n_ctx
        meta["stream_end"] = stream_after  # evaluation holds out the documents after this point
        if full:
            meta["resume"] = {"chunk_index": chunk_index + 1, "stream": stream_after}
        meta["stats"], full_stats = {}, {}
        for layer, stats_F in stats.items():
            full_stats[layer] = merge_chunk_stats(np.stack([self._full_stats[layer], stats_F]))
            meta["stats"][str(layer)] = summarize_chunk_stats(full_stats[layer][None])
        meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with self._storage_errors(f"the commit of chunk {chunk_index}"):
            for layer, stats_F in stats.items():
                self.group[f"chunk_stats/{layer}"][chunk_index] = stats_F
            self.group.attrs[META_KEY] = meta  # the commit: one whole-object write
        if full:
            self._full_stats.update(full_stats)
        self.meta = meta


def _spec_differences(stored: dict, wanted: dict) -> list[str]:
    return [f"{k}: cache has {stored.get(k)!r}, asked {wanted.get(k)!r}" for k in wanted if stored.get(k) != wanted[k]]


def open_writer(
    where: "str | Path | Location", spec: dict, storage: dict, d_model: int, provenance: dict
) -> CacheWriter:
    """Create the cache at `where` (cache_root / cache_dir_name(spec)), or reopen it to extend.

    storage: {"codec": str, "chunk_contexts": int}; provenance: the harvest config and versions.
    Call it holding writer_lock(where).
    """
    location = as_location(where)
    if is_cache(location):
        group = zarr.open_group(location.zarr_store(read_only=False), mode="r+")
        meta = group.attrs[META_KEY]
        diffs = _spec_differences(meta["spec"], spec) + _spec_differences(meta["storage"], storage)
        if meta["d_model"] != d_model:
            diffs.append(f"d_model: cache has {meta['d_model']}, model has {d_model}")
        if diffs:
            raise UserError(f"spec mismatch extending {location}: {'; '.join(diffs)}")
        return CacheWriter(location, group)
    # Mode "w" would delete the lock file; arrays left by a creation that died before the metadata was
    # written (the metadata goes last) are overwritten.
    group = zarr.open_group(location.zarr_store(read_only=False), mode="a")
    chunk_contexts, ctx_len = storage["chunk_contexts"], spec["ctx_len"]
    array_config = {"write_empty_chunks": True}  # a missing chunk must mean damage, never "all zeros"
    group.create_array(
        "tokens", shape=(0, ctx_len), chunks=(chunk_contexts, ctx_len), dtype="int32",
        compressors=compressors("zstd:3"), fill_value=-1, config=array_config, overwrite=True,
    )  # fmt: skip
    for layer in spec["layers"]:
        group.create_array(
            acts_name(layer), shape=(0, d_model), chunks=(chunk_contexts * ctx_len, d_model),
            dtype=zarr_dtype(spec["dtype"]), compressors=compressors(storage["codec"]), fill_value=0,
            config=array_config, overwrite=True,
        )  # fmt: skip
        if is_scaled(spec["dtype"]):
            group.create_array(
                scales_name(layer), shape=(0,), chunks=(chunk_contexts * ctx_len,), dtype="float32",
                compressors=compressors("none"), fill_value=0, config=array_config, overwrite=True,
            )  # fmt: skip
        group.create_array(
            f"chunk_stats/{layer}", shape=(0, len(STAT_COLUMNS) + d_model), chunks=(1, len(STAT_COLUMNS) + d_model),
            dtype="float64", compressors=compressors("none"), fill_value=0, config=array_config, overwrite=True,
        )  # fmt: skip
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    group.attrs[META_KEY] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": cache_key(spec),
        "spec": spec,
        "storage": storage,
        "d_model": d_model,
        "n_contexts": 0,
        "resume": {"chunk_index": 0, "stream": {"doc": 0, "offset": 0}},
        "stream_end": {"doc": 0, "offset": 0},
        "stats": {},
        "created": now,
        "updated": now,
        **provenance,
    }
    return CacheWriter(location, group)


def default_cache_root(configured: str | Path | None) -> Location:
    """The configured root (pipeline.toml or --cache-dir), else $SAE_CACHE_DIR, else ./caches; a
    local directory or an object-store URL."""
    return as_location(configured if configured is not None else os.environ.get("SAE_CACHE_DIR", "caches"))
