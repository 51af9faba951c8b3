"""`sae train --stream`: train straight from the LM. The harvest runs in a thread of the training process
and writes into a bounded window in memory (sae.cache.window), or with --keep-cache into its cache on
disk, and the trainer follows it as it follows any cache being written (sae.cache.follow): one code
path. A resumed stream first makes the held-out chunks again, then starts where its checkpoint says
the trainer's block began; the harvest is deterministic, so the rows are the ones the run had. `sae run`
trains while it harvests the same way, into its cache on disk (a window that keeps its chunks)."""

import contextlib
import dataclasses
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from sae.cache.location import Location, MemoryLocation, as_location
from sae.cache.lock import writer_lock
from sae.cache.spec import cache_dir_name
from sae.cache.store import default_cache_root, open_cache, open_writer
from sae.cache.window import StreamClosed, Window
from sae.config import stage_config
from sae.device import resolve_device
from sae.errors import UserError
from sae.harvest.config import HarvestConfig
from sae.progress import shared_progress
from sae.train.config import TrainConfig
from sae.train.gate import NORM_SAMPLE_CHUNKS

UNBOUNDED = 1 << 62


class Stream(NamedTuple):
    cache: str
    """The cache the harvest writes and the trainer follows (memory://, or a path with --keep-cache)."""
    window: Window
    thread: threading.Thread


def stream_harvest_config(config_path: Path | None, harvest_settings: dict, cfg: TrainConfig) -> HarvestConfig:
    """pipeline.toml's [harvest] with the harvest flags `sae train` was given; its layer, device and
    tokens are the training's: enough whole chunks for cfg.tokens and the held-out chunks."""
    if cfg.tokens is None:
        raise UserError("--stream needs --tokens: the tokens to harvest and train on")
    harvest_cfg = stage_config(HarvestConfig, "harvest", config_path, harvest_settings)
    chunk_tokens = harvest_cfg.chunk_contexts * harvest_cfg.ctx_len
    n_chunks = -(-cfg.tokens // chunk_tokens) + cfg.holdout_chunks
    layers = cfg.layer or harvest_cfg.layers
    return dataclasses.replace(harvest_cfg, layers=layers, tokens=n_chunks * chunk_tokens, device=cfg.device)


def window_chunks(harvest_cfg: HarvestConfig, cfg: TrainConfig) -> int:
    """The window in chunks: --stream-window rows, or two blocks and the held-out chunks; at least one
    block (and the chunks the input set-up samples) and the held-out chunks, or it would fill before the
    trainer could free any of it."""
    chunk_rows = harvest_cfg.chunk_contexts * harvest_cfg.ctx_len
    need = cfg.holdout_chunks + max(cfg.buffer_chunks, NORM_SAMPLE_CHUNKS)
    if cfg.stream_window == 0:
        return need + cfg.buffer_chunks
    if cfg.stream_window // chunk_rows < need:
        raise UserError(
            f"--stream-window {cfg.stream_window:,} rows holds {cfg.stream_window // chunk_rows} chunks of {chunk_rows:,}; "
            f"the trainer needs {need} (holdout_chunks {cfg.holdout_chunks} + buffer_chunks {cfg.buffer_chunks}, "
            f"at least {NORM_SAMPLE_CHUNKS}): "
            f"raise it to {need * chunk_rows:,} or lower --buffer-chunks"
        )
    return cfg.stream_window // chunk_rows


def stream_window(harvest_cfg: HarvestConfig, cfg: TrainConfig) -> Window:
    """The window a stream trains from: bounded in memory, or (--keep-cache) its whole cache on disk."""
    return Window(UNBOUNDED, keep=True) if cfg.keep_cache else Window(window_chunks(harvest_cfg, cfg))


@contextlib.contextmanager
def streaming(harvest_cfg: HarvestConfig, window: Window, precision: str, resume_at: dict | None = None,
              holdout_chunks: int = 0) -> Iterator[Stream]:  # fmt: skip
    """The harvest running in a thread while the body trains from its cache, their progress bars in one
    display. At the end a harvest to disk finishes (so its cache is the one a harvest alone would make),
    one into memory stops; an error of the harvest the body did not meet is raised then. `precision`:
    the training's (sae.train.trainer.configure_backend); `resume_at`: a checkpoint's {"chunk",
    "stream"}, the stream's first `holdout_chunks` made again first."""
    with shared_progress("tok"):
        stream = start_stream(harvest_cfg, window, precision, resume_at, holdout_chunks)
        try:
            yield stream
        except BaseException:
            stop_stream(stream)
            raise
        if window.keep:  # a cache on disk is left whole, whatever part of it the training read
            stream.thread.join()
        stop_stream(stream)
        if window.error is not None:  # one the training did not wait long enough to see
            raise window.error


def start_stream(harvest_cfg: HarvestConfig, window: Window, precision: str, resume_at: dict | None = None,
                 holdout_chunks: int = 0) -> Stream:  # fmt: skip
    """Load the model and start the harvest thread, into memory or (a window that keeps its chunks) into
    harvest_cfg's cache on disk, which it extends or resumes as `sae harvest` would. The device's
    backend is set for the training's `precision` first: it is one setting of the process (CUDA's TF32
    matmuls), so the harvest runs under it from its first chunk, not from when the training starts."""
    from sae.harvest.harvest import build_spec, harvest
    from sae.harvest.model import load_model
    from sae.harvest.text import DatasetSource
    from sae.train.trainer import configure_backend

    device = resolve_device(harvest_cfg.device)
    configure_backend(device, precision)
    loaded = load_model(harvest_cfg.model, harvest_cfg.model_dtype, str(device))
    if window.keep:
        root = default_cache_root(harvest_cfg.cache_dir)
    else:
        root = MemoryLocation(f"memory://stream-{uuid.uuid4().hex[:8]}")
    location = root.child(cache_dir_name(build_spec(harvest_cfg, loaded, DatasetSource.resolve(harvest_cfg.dataset))))
    if resume_at is not None and not window.keep:
        held = dataclasses.replace(
            harvest_cfg, tokens=holdout_chunks * harvest_cfg.chunk_contexts * harvest_cfg.ctx_len
        )
        harvest(held, loaded, root, window)  # the held-out chunks, made first as the stream first made them
        skip_to(location, resume_at, harvest_cfg.tokens // harvest_cfg.ctx_len)

    def run() -> None:
        try:
            harvest(harvest_cfg, loaded, root, window)
        except StreamClosed:  # the trainer is done with the stream
            pass
        except BaseException as e:  # the trainer, waiting for chunks, raises it
            window.fail(e)
        finally:
            window.ended.set()

    thread = threading.Thread(target=run, daemon=True, name="sae-stream")
    thread.start()
    return Stream(location.url, window, thread)


def stop_stream(stream: Stream) -> None:
    """End the harvest (if it still runs) and free what its window held in memory."""
    stream.window.close()
    stream.thread.join()
    location = as_location(stream.cache)
    if isinstance(location, MemoryLocation):
        location.remove_all(keep="")
        location.prune()


def skip_to(location: Location, at: dict, target_contexts: int) -> None:
    """Let the stream's harvest go on at chunk at["chunk"], its token stream at at["stream"], towards
    the whole target (the chunks between are not needed again)."""
    cache = open_cache(location)
    with writer_lock(location):
        writer = open_writer(location, cache.spec, cache.meta["storage"], cache.d_model, {})
        writer.reserve(target_contexts)
        writer.skip_to(at["chunk"], at["stream"])
