"""`sae harvest`: run the LM over text and append residual-stream activations to the cache.

Per chunk: contexts from the token stream -> forward passes that stop after the last hooked block ->
activations converted to the storage dtype and summed into the chunk's statistics on the model's
device, then copied (pinned, non-blocking on CUDA) into a host buffer -> writer threads compress and
write up to WRITERS chunks while the next chunk's forward passes run -> commits in chunk order.
Under torchrun, the ranks take turns over the chunks (harvest.ranks).
"""

import collections
import contextlib
import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from sae.cache.codecs import DIM_SCALED, DTYPES, StoredRows, decode_rows, dim_scale, encode_rows, is_scaled
from sae.cache.convert import require_stream
from sae.cache.location import Location
from sae.cache.lock import LOCK_NAME, writer_lock
from sae.cache.spec import cache_dir_name
from sae.cache.store import (
    CacheWriter,
    chunk_stats,
    default_cache_root,
    is_cache,
    merge_chunk_stats,
    open_writer,
    plain_rows,
)
from sae.cache.window import Window
from sae.config import to_jsonable
from sae.device import keep_freed_memory, resolve_device
from sae.errors import UserError
from sae.harvest.config import HarvestConfig
from sae.harvest.hooks import capture
from sae.harvest.model import LoadedModel, check_site, load_model
from sae.harvest.ranks import Ranks
from sae.harvest.text import DatasetSource, iter_contexts, iter_documents, iter_token_docs, open_dataset
from sae.progress import console, make_progress
from sae.versions import library_versions

WRITERS = 3  # chunks compressed and written at once (zstd releases the GIL)


def build_spec(cfg: HarvestConfig, loaded: LoadedModel, source: DatasetSource) -> dict:
    """The full cache spec: the declared fields plus what loading the model and data resolved."""
    return {
        **cfg.declared_spec(),
        "model_revision": loaded.revision,
        "dataset_revision": source.revision,
        "bos_token_id": loaded.bos_token_id,
        "vocab_size": len(loaded.tokenizer),
        "n_layers": loaded.n_layers,
    }


def harvest(cfg: HarvestConfig, loaded: LoadedModel | None = None, root: Location | None = None,
            window: Window | None = None) -> str:  # fmt: skip
    """Create or extend the cache for cfg; returns its path or URL. `loaded`: cfg's model, already
    loaded on cfg's device (a caller harvesting several times saves the load); `root`: where the cache
    goes instead of cfg.cache_dir; `window`: a stream's (the harvest says when the target is set, waits
    for room before each chunk, and shares one progress display with its trainer: sae.stream.streaming).
    Under torchrun every rank runs this, and together they write what one process would (harvest.ranks)."""
    ranks = Ranks()
    device = resolve_device(cfg.device)
    keep_freed_memory(device)
    source = DatasetSource.resolve(cfg.dataset)
    dataset = open_dataset(source, cfg.dataset_config, cfg.dataset_split, cfg.text_column)
    root = root or default_cache_root(cfg.cache_dir)
    root.check_access()  # a missing bucket or credential fails now, not after the model has loaded
    loaded = loaded or load_model(cfg.model, cfg.model_dtype, str(device))
    check_site(cfg.site, list(cfg.layers), loaded.n_layers)
    spec = build_spec(cfg, loaded, source)
    target_contexts = cfg.tokens // cfg.ctx_len
    if target_contexts == 0:
        raise UserError(f"tokens={cfg.tokens} is less than one context of {cfg.ctx_len} tokens")
    location = root.child(cache_dir_name(spec))
    provenance = {"harvest_config": to_jsonable(cfg), "versions": library_versions()}
    storage = {"codec": cfg.codec, "chunk_contexts": cfg.chunk_contexts}
    leader = ranks.rank == 0
    fresh = leader and not is_cache(location)
    try:
        with writer_lock(location) if leader else contextlib.nullcontext():
            if leader:
                writer = open_writer(location, spec, storage, loaded.d_model, provenance)
                if writer.n_contexts < target_contexts:
                    writer.reserve(target_contexts)
            ranks.barrier()  # the arrays exist at their size: the other ranks may open them
            if not leader:
                writer = open_writer(location, spec, storage, loaded.d_model, provenance)
            if window is not None:
                window.ready.set()  # the target is set: the stream's trainer may plan from it
            if writer.n_contexts >= target_contexts:
                if leader:
                    console.print(
                        f"{location} already holds {writer.n_contexts * cfg.ctx_len:,} tokens (asked "
                        f"{cfg.tokens:,}): nothing to do"
                    )
                return location.url
            try:
                _harvest_chunks(writer, loaded, cfg, dataset, target_contexts, device, ranks, window)
            finally:
                if fresh and writer.n_contexts == 0:  # a cache with nothing committed holds nothing to keep
                    location.remove_all(keep=LOCK_NAME)
            if leader and writer.n_contexts == 0:
                raise UserError(
                    f"dataset '{cfg.dataset}' yielded no complete context of {cfg.ctx_len} tokens: its documents "
                    "are empty or together shorter than one context"
                )
            if leader and writer.n_contexts < target_contexts:
                writer.reserve(writer.n_contexts)
                console.print(f"dataset exhausted: the cache holds {writer.n_contexts * cfg.ctx_len:,} tokens")
    except BaseException:
        if fresh:
            location.prune()  # the empty directory, unless another writer has taken the lock since
        raise
    return location.url


def _harvest_chunks(
    writer: CacheWriter, loaded: LoadedModel, cfg: HarvestConfig, dataset, target: int, device, ranks: Ranks,
    window: Window | None,
) -> None:  # fmt: skip
    """Rounds of ranks.world chunks, each rank forwarding and writing one chunk of every round; rank 0
    commits the written chunks in order after each round. A stream's window admits each chunk first."""
    ctx_len, chunk_contexts, rank = cfg.ctx_len, cfg.chunk_contexts, ranks.rank
    first_chunk, position = writer.resume["chunk_index"], require_stream(writer.resume["stream"], writer.location.url)
    documents = iter_documents(dataset, cfg.text_column, cfg.seed, start_doc=position["doc"])
    token_docs = iter_token_docs(documents, loaded.tokenizer, loaded.bos_token_id, first_doc=position["doc"])
    contexts = iter_contexts(token_docs, ctx_len, cfg.packing, loaded.bos_token_id, position)
    buffers = _chunk_buffers(cfg, loaded.d_model, pin=device.type == "cuda")
    dim_scales, contexts = _dim_scales(writer, loaded, cfg, contexts, device, ranks)
    in_flight: collections.deque = collections.deque()  # this rank's (future of a chunk write, its report)
    written: dict[int, tuple] = {}  # rank 0: commit arguments of chunks written but not yet committed

    def exchange(wait_all: bool) -> None:
        """Every rank reports the chunks it has finished writing; rank 0 commits the ready prefix."""
        done = []
        while in_flight and (wait_all or len(in_flight) > WRITERS or in_flight[0][0].done()):
            future, report = in_flight.popleft()
            future.result()  # surfaces the write's errors
            done.append(report)
        everyone = ranks.gather(done)
        if rank != 0:
            return
        for reports in everyone:
            written.update((report[0], report) for report in reports)
        while writer.resume["chunk_index"] in written:
            writer.commit_chunk(*written.pop(writer.resume["chunk_index"]))
            progress.update(task, completed=writer.n_contexts * ctx_len)
        assert not (wait_all and written), f"chunks {sorted(written)} written but not next to commit"

    n_chunks, n_mine = -(-target // chunk_contexts), 0
    with ThreadPoolExecutor(max_workers=WRITERS) as pool, make_progress("tok", quiet=rank != 0) as progress:
        task = progress.add_task(
            "harvest", total=target * ctx_len, completed=first_chunk * chunk_contexts * ctx_len, status=""
        )
        for round_start in range(first_chunk, n_chunks, ranks.world):
            mine, exhausted = None, False
            for chunk_index in range(round_start, min(round_start + ranks.world, n_chunks)):
                wanted = min(chunk_contexts, target - chunk_index * chunk_contexts)
                batch = list(itertools.islice(contexts, wanted))  # every rank reads the whole stream
                if window is not None and batch:
                    if window.full():  # commit what is written first: the trainer waits for it to make room
                        exchange(wait_all=True)
                    window.admit(chunk_index, position)
                position = batch[-1][1] if batch else position
                if chunk_index - round_start == rank and batch:
                    mine = (chunk_index, batch)
                if len(batch) < wanted:
                    exhausted = True
                    break
            if mine is not None:
                future, report = _write_chunk(
                    writer, loaded, cfg, *mine, buffers[n_mine % len(buffers)], dim_scales, device, pool
                )
                in_flight.append((future, report))
                n_mine += 1
            exchange(wait_all=False)
            if exhausted:
                break
        exchange(wait_all=True)


def _chunk_buffers(cfg: HarvestConfig, d_model: int, pin: bool) -> list[dict[int, StoredRows]]:
    """One host buffer per chunk in flight: the forward passes fill one while up to WRITERS threads
    compress and write the ones before it."""
    values_dtype, scaled, rows = DTYPES[cfg.dtype][0], is_scaled(cfg.dtype), cfg.chunk_contexts * cfg.ctx_len
    return [
        {
            layer: StoredRows(
                torch.empty(rows, d_model, dtype=values_dtype, pin_memory=pin),
                torch.empty(rows, pin_memory=pin) if scaled else None,
            )
            for layer in cfg.layers
        }
        for _ in range(WRITERS + 1)
    ]


def _dim_scales(writer: CacheWriter, loaded: LoadedModel, cfg: HarvestConfig, contexts, device,
                ranks: Ranks) -> tuple[dict, Iterator]:  # fmt: skip
    """({layer: s_dim} on the device, or {} for a dtype without them; the contexts, none consumed): the
    cache's own, or fixed by rank 0 from the first batch of a new cache and shared with every rank."""
    dim_scales = writer.dim_scales()
    if cfg.dtype in DIM_SCALED and dim_scales is None:
        first = list(itertools.islice(contexts, cfg.batch_contexts))
        contexts = itertools.chain(first, contexts)
        if ranks.rank == 0 and first:  # no context at all: nothing will be written, and the harvest says so
            ids_BT = torch.from_numpy(np.stack([context for context, _ in first])).to(device).long()
            acts = capture(loaded.model, loaded.blocks, cfg.site, list(cfg.layers), ids_BT)
            dim_scales = {layer: dim_scale(acts_BTD.flatten(0, 1)).cpu() for layer, acts_BTD in acts.items()}
            writer.set_dim_scales(dim_scales)
        dim_scales = ranks.from_rank0(dim_scales)
    return {layer: scale.to(device) for layer, scale in (dim_scales or {}).items()}, contexts


def _write_chunk(
    writer: CacheWriter, loaded: LoadedModel, cfg: HarvestConfig, chunk_index: int, batch: list, buffer: dict,
    dim_scales: dict, device, pool: ThreadPoolExecutor,
) -> tuple:  # fmt: skip
    """Forward passes over one chunk's contexts, conversion to the storage dtype and the chunk's
    statistics on the model's device, a copy into `buffer`; then its write is submitted to `pool`.
    Returns (the write's future, the chunk's commit arguments)."""
    ctx_len, pin = cfg.ctx_len, device.type == "cuda"
    tokens_CT = np.stack([context for context, _ in batch])
    batch_stats = {layer: [] for layer in cfg.layers}
    for b0 in range(0, len(batch), cfg.batch_contexts):
        ids_BT = torch.from_numpy(tokens_CT[b0 : b0 + cfg.batch_contexts]).to(device, non_blocking=pin).long()
        plain_R = plain_rows(ids_BT, loaded.bos_token_id)
        acts = capture(loaded.model, loaded.blocks, cfg.site, list(cfg.layers), ids_BT)
        rows = slice(b0 * ctx_len, (b0 + len(ids_BT)) * ctx_len)
        for layer, acts_BTD in acts.items():
            # Conversion and statistics on the model's device: the host only compresses.
            stored = encode_rows(acts_BTD.flatten(0, 1), cfg.dtype, dim_scales.get(layer))
            batch_stats[layer].append(chunk_stats(decode_rows(stored, dim_scales.get(layer)), plain_R))
            for host, part in zip(buffer[layer], stored, strict=True):
                if part is not None:
                    host[rows].copy_(part, non_blocking=pin)
    stats = {layer: merge_chunk_stats(torch.stack(per_batch)).cpu().numpy() for layer, per_batch in batch_stats.items()}
    if pin:
        torch.cuda.current_stream(device).synchronize()  # the copies must land before a writer reads
    n_rows = len(batch) * ctx_len
    chunk = {layer: StoredRows(*(p[:n_rows] if p is not None else None for p in buffer[layer])) for layer in cfg.layers}
    future = pool.submit(writer.write_chunk_data, chunk_index, tokens_CT, chunk)
    return future, (chunk_index, len(batch), stats, batch[-1][1])
