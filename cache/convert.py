"""`sae cache convert`: the same harvest in another storage dtype or codec, without re-running the LM.

A 1e9-token float16 cache took hours of GPU time to fill; shrinking it to int8 should cost one read
and one write. The converted cache has the source's spec but for `dtype`, so it lives beside the
source under its own key, and training finds it as it finds a harvested one.
"""

from pathlib import Path

from sae.cache.codecs import DIM_SCALED, STORAGE_DTYPES, compressors
from sae.cache.location import as_location
from sae.cache.lock import LOCK_NAME, writer_lock
from sae.cache.spec import cache_dir_name
from sae.cache.store import Cache, CacheWriter, is_cache, open_cache, open_writer
from sae.config import check_choice
from sae.errors import UserError
from sae.progress import make_progress
from sae.versions import library_versions


def converted_stream(source: Cache, chunk_index: int) -> dict | None:
    """The token-stream state after chunk `chunk_index`, where the source records it (the end of its
    last full chunk and of its last chunk); None elsewhere, so a half-converted cache cannot be
    extended or evaluated from a made-up position (require_stream)."""
    if chunk_index == source.n_chunks - 1:
        return source.meta["stream_end"]
    if chunk_index == source.meta["resume"]["chunk_index"] - 1:
        return source.meta["resume"]["stream"]
    return None


def require_stream(stream: dict | None, location: str) -> dict:
    """A cache's recorded stream position; a conversion still under way has none to give."""
    if stream is None:
        raise UserError(
            f"{location} is a conversion still under way: finish it with `sae cache convert` before harvesting "
            "into it or evaluating from it"
        )
    return stream


def convert(
    source_path: "str | Path", dtype: str, codec: str | None = None, cache_root: "str | Path | None" = None
) -> str:
    """Write `source_path`'s committed rows, decoded to float32 and re-encoded as `dtype` with `codec`
    (default: the source's), into a cache under `cache_root` (default: beside the source). Resumable:
    a rerun continues after the chunks already committed. Returns the new cache's path or URL."""
    source = open_cache(source_path)
    check_choice("storage dtype", dtype, STORAGE_DTYPES)
    codec = codec or source.meta["storage"]["codec"]
    compressors(codec)  # raises on an unknown codec
    spec = {**source.spec, "dtype": dtype}
    storage = {"codec": codec, "chunk_contexts": source.chunk_contexts}
    if spec == source.spec and storage == {k: source.meta["storage"][k] for k in storage}:
        raise UserError(f"{source.path} is already {dtype} with codec {codec}: nothing to convert")
    root = as_location(cache_root if cache_root is not None else source.path.rstrip("/").rsplit("/", 1)[0])
    location = root.child(cache_dir_name(spec))
    if location.url == source.location.url:  # same spec, another codec: the name would collide
        raise UserError(f"converting to codec {codec} alone needs another --cache-dir than {root}")
    provenance = {
        "harvest_config": source.meta.get("harvest_config"),
        "converted_from": {"cache": source.path, "key": source.key, "dtype": source.storage_dtype,
                           "codec": source.meta["storage"]["codec"]},
        "versions": library_versions(),
    }  # fmt: skip
    fresh = not is_cache(location)
    try:
        with writer_lock(location):
            writer = open_writer(location, spec, storage, source.d_model, provenance)
            try:
                _copy_chunks(source, writer, dtype)
            finally:  # as a harvest does: a cache this run created and committed nothing to is removed
                if fresh and writer.n_contexts == 0:
                    location.remove_all(keep=LOCK_NAME)
    except BaseException:
        if fresh:
            location.prune()  # the empty directory, unless another writer has taken the lock since
        raise
    return location.url


def _copy_chunks(source: Cache, writer: CacheWriter, dtype: str) -> None:
    first = writer.resume["chunk_index"]
    if writer.n_contexts < source.n_contexts:
        writer.reserve(source.n_contexts)
    if dtype in DIM_SCALED and writer.dim_scales() is None and source.dim_scale(source.layers[0]) is not None:
        writer.set_dim_scales({layer: source.dim_scale(layer) for layer in source.layers})  # no second rounding grid
    with make_progress("rows") as progress:
        task = progress.add_task("convert", total=source.rows, completed=first * source.chunk_rows, status="")
        for chunk_index in range(first, source.n_chunks):
            tokens_CT = source.read_tokens(chunk_index)
            acts = {layer: source.read_acts(layer, chunk_index).float() for layer in source.layers}
            writer.write_chunk(chunk_index, tokens_CT, acts, converted_stream(source, chunk_index))
            progress.advance(task, len(tokens_CT) * source.ctx_len)
