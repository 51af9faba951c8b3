"""`sae harvest`: run the LM over text and append residual-stream activations to the cache.

Per chunk: contexts from the token stream -> forward passes that stop after the last hooked block ->
activations converted to the storage dtype and summed into the chunk's statistics on the model's
device, then copied (pinned, non-blocking on CUDA) into a host buffer -> writer threads compress and
write up to WRITERS chunks while the next chunk's forward passes run -> commits in chunk order.
"""

import collections
import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from sae.cache.codecs import STORAGE_DTYPES
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
from sae.config import to_jsonable
from sae.errors import UserError
from sae.harvest.config import HarvestConfig
from sae.harvest.hooks import capture
from sae.harvest.model import LoadedModel, check_site, load_model
from sae.harvest.text import DatasetSource, iter_contexts, iter_documents, iter_token_docs, open_dataset
from sae.progress import console, make_progress
from sae.versions import library_versions

WRITERS = 3  # chunks compressed and written at once (zstd releases the GIL)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


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


def harvest(cfg: HarvestConfig, loaded: LoadedModel | None = None) -> str:
    """Create or extend the cache for cfg; returns its path or URL. `loaded`: cfg's model, already
    loaded on cfg's device (a caller harvesting several times saves the load)."""
    device = resolve_device(cfg.device)
    source = DatasetSource.resolve(cfg.dataset)
    dataset = open_dataset(source, cfg.dataset_config, cfg.dataset_split, cfg.text_column)
    root = default_cache_root(cfg.cache_dir)
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
    fresh = not is_cache(location)
    try:
        with writer_lock(location):
            writer = open_writer(location, spec, storage, loaded.d_model, provenance)
            have = writer.n_contexts
            if have >= target_contexts:
                console.print(
                    f"{location} already holds {have * cfg.ctx_len:,} tokens (asked {cfg.tokens:,}): nothing to do"
                )
                return location.url
            writer.reserve(target_contexts)
            try:
                _harvest_chunks(writer, loaded, cfg, dataset, target_contexts, device)
            finally:
                if fresh and writer.n_contexts == 0:  # a cache with nothing committed holds nothing to keep
                    location.remove_all(keep=LOCK_NAME)
            if writer.n_contexts == 0:
                raise UserError(
                    f"dataset '{cfg.dataset}' yielded no complete context of {cfg.ctx_len} tokens: its documents "
                    "are empty or together shorter than one context"
                )
            if writer.n_contexts < target_contexts:
                writer.reserve(writer.n_contexts)
                console.print(f"dataset exhausted: the cache holds {writer.n_contexts * cfg.ctx_len:,} tokens")
    except BaseException:
        if fresh:
            location.prune()  # the empty directory, unless another writer has taken the lock since
        raise
    return location.url


def _harvest_chunks(writer: CacheWriter, loaded: LoadedModel, cfg: HarvestConfig, dataset, target: int, device) -> None:
    ctx_len, chunk_contexts = cfg.ctx_len, cfg.chunk_contexts
    first_chunk, position = writer.resume["chunk_index"], writer.resume["stream"]
    documents = iter_documents(dataset, cfg.text_column, cfg.seed, start_doc=position["doc"])
    token_docs = iter_token_docs(documents, loaded.tokenizer, loaded.bos_token_id, first_doc=position["doc"])
    contexts = iter_contexts(token_docs, ctx_len, cfg.packing, loaded.bos_token_id, position)
    pin = device.type == "cuda"
    storage_dtype = STORAGE_DTYPES[cfg.dtype]
    # One host buffer per chunk in flight: the forward passes fill one while up to WRITERS threads
    # compress and write the ones before it. Commits stay in chunk order, in this thread.
    buffers = [
        {
            layer: torch.empty(chunk_contexts * ctx_len, loaded.d_model, dtype=storage_dtype, pin_memory=pin)
            for layer in cfg.layers
        }
        for _ in range(WRITERS + 1)
    ]
    in_flight: collections.deque = collections.deque()  # (future of the data write, commit arguments)

    def commit_oldest() -> None:
        future, commit_args = in_flight.popleft()
        future.result()  # surfaces the write's errors
        writer.commit_chunk(*commit_args)

    n_chunks = -(-target // chunk_contexts)
    with ThreadPoolExecutor(max_workers=WRITERS) as pool, make_progress("tok") as progress:
        done = first_chunk * chunk_contexts * ctx_len
        task = progress.add_task("harvest", total=target * ctx_len, completed=done, status="")
        for chunk_index in range(first_chunk, n_chunks):
            wanted = min(chunk_contexts, target - chunk_index * chunk_contexts)
            batch = list(itertools.islice(contexts, wanted))
            if not batch:
                break
            tokens_CT = np.stack([context for context, _ in batch])
            buffer = buffers[chunk_index % len(buffers)]  # its last chunk is committed: see the end of the loop
            batch_stats = {layer: [] for layer in cfg.layers}
            for b0 in range(0, len(batch), cfg.batch_contexts):
                ids_BT = torch.from_numpy(tokens_CT[b0 : b0 + cfg.batch_contexts]).to(device, non_blocking=pin).long()
                plain_R = plain_rows(ids_BT, loaded.bos_token_id)
                acts = capture(loaded.model, loaded.blocks, cfg.site, list(cfg.layers), ids_BT)
                rows = slice(b0 * ctx_len, (b0 + len(ids_BT)) * ctx_len)
                for layer, acts_BTD in acts.items():
                    # Conversion and statistics on the model's device: the host only compresses.
                    stored_RD = acts_BTD.reshape(-1, loaded.d_model).to(storage_dtype)
                    batch_stats[layer].append(chunk_stats(stored_RD, plain_R))
                    buffer[layer][rows].copy_(stored_RD, non_blocking=pin)
                progress.advance(task, ids_BT.numel())
            stats = {
                layer: merge_chunk_stats(torch.stack(per_batch)).cpu().numpy()
                for layer, per_batch in batch_stats.items()
            }
            if pin:
                torch.cuda.current_stream(device).synchronize()  # the copies must land before a writer reads
            n_rows = len(batch) * ctx_len
            chunk = {layer: buffer[layer][:n_rows] for layer in cfg.layers}
            future = pool.submit(writer.write_chunk_data, chunk_index, tokens_CT, chunk)
            in_flight.append((future, (chunk_index, len(batch), stats, batch[-1][1])))
            while len(in_flight) > WRITERS or (in_flight and in_flight[0][0].done()):
                commit_oldest()
            if len(batch) < wanted:
                break
        while in_flight:
            commit_oldest()
