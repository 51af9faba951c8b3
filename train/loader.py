"""Shuffled training batches from the activation cache.

An epoch visits the training chunks in a seeded random order (rank r of a world of W takes every
W-th), `buffer_chunks` at a time: a block. Following a harvest (--follow), the first pass takes them in
harvest order instead, so that a block can start as soon as its chunks are committed; reads of chunks
not committed yet wait for them (sae.cache.follow). Background threads read the next block's chunks while
the current one is served; a block's kept rows are drawn in a seeded random permutation, batch by
batch. Several layers are read together: each batch holds the same rows at every layer. A position (epoch, block, batch) fixes everything that follows, so it is the whole resume
state. A block's last rows that do not fill a batch are skipped (< 1 batch per block).

A block holds its rows as stored (int8 and its scales: a quarter of float32's bytes), and each batch
is decoded on its own: on a GPU after the copy, on the CPU in the producer thread. The background
threads run torch on one thread each (torch's thread count is per thread: the step's own are
untouched), so that their ops do not start thread teams of their own beside the step's. Decoding whole
chunks to float32 in the readers made a 1.2 GB block at the demo shape (32 chunks of 16,384 rows of
576), faulted in afresh each block: `sae train` at B 4,096, m 2,304 ran 35.0k / 37.7k tokens/s with
21-26 s of system time, 67.7k / 60.8k with 1.5 s this way (alternating runs, 1M tokens, 2 CPU cores).
"""

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from sae.cache.codecs import StoredRows, decode_rows
from sae.cache.follow import Follower
from sae.cache.store import Cache
from sae.cache.window import Window
from sae.errors import UserError
from sae.train.gate import Gate, kept_rows


class Loader:
    """Iterate to get batches {layer: [batch_size, d] float32 on `device`}; `position` is the resume state."""

    def __init__(self, cache: Cache, layers: list[int], chunks: list[int], batch_size: int, seed: int,
                 gate: Gate = Gate(), buffer_chunks: int = 32, threads: int = 4,
                 device: torch.device = torch.device("cpu"), rank: int = 0, world: int = 1,
                 position: dict | None = None, harvest_order: bool = False,
                 follower: Follower | None = None, window: Window | None = None):  # fmt: skip
        per_rank = len(chunks) // world  # equal shares keep ranks in step
        if per_rank == 0:
            raise UserError(f"{len(chunks)} training chunks cannot be shared by {world} ranks; harvest more")
        self.cache, self.layers, self.chunks, self.batch_size = cache, layers, sorted(chunks), batch_size
        self.seed, self.gate, self.buffer_chunks = seed, gate, buffer_chunks
        self.rank, self.world, self.per_rank, self.device = rank, world, per_rank, device
        self.harvest_order, self.follower, self.window = harvest_order, follower, window
        self.position = dict(position or {"epoch": 0, "block": 0, "batch": 0})
        self.reads = 0  # chunks read, for the one-read-per-batch test and the benchmark
        self._pool = ThreadPoolExecutor(
            threads, thread_name_prefix="sae-chunk", initializer=torch.set_num_threads, initargs=(1,)
        )
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # where batches decode: a GPU after the copy, else the producer thread; the dimension scales are there
        self._on_gpu = device.type == "cuda"
        self._dim_scales = {layer: cache.dim_scale(layer, device if self._on_gpu else "cpu") for layer in layers}

    def block_chunks(self, epoch: int, block: int) -> list[int]:
        if self.harvest_order and epoch == 0:
            order = np.asarray(self.chunks)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.chunks)
        share = order[self.rank : self.per_rank * self.world : self.world]
        return share[block * self.buffer_chunks : (block + 1) * self.buffer_chunks].tolist()

    def stream_point(self) -> dict:
        """Where a stream must start again to go on from `position`: its block's first chunk and the
        token stream there (the first pass only: a stream is read once)."""
        chunk = self.block_chunks(self.position["epoch"], self.position["block"])[0]
        return {"chunk": chunk, "stream": self.window.stream_start(chunk)}

    def n_blocks(self) -> int:
        return -(-self.per_rank // self.buffer_chunks)

    def _blocks(self) -> Iterator[tuple[int, int, list]]:
        """(epoch, block, futures of its chunks' rows), the next block's reads already submitted."""
        epoch, block = self.position["epoch"], self.position["block"]
        futures = self._submit(epoch, block)
        while not self._stop.is_set():
            nxt_epoch, nxt_block, _ = self._after(epoch, block)
            nxt_futures = self._submit(nxt_epoch, nxt_block)
            self.reads += len(futures)
            yield epoch, block, futures
            epoch, block, futures = nxt_epoch, nxt_block, nxt_futures

    def _submit(self, epoch: int, block: int) -> list:
        return [self._pool.submit(self._read, c) for c in self.block_chunks(epoch, block)]

    def _read(self, chunk: int) -> dict[int, StoredRows] | None:
        if self.follower is not None and not self.follower.wait_for([chunk]):
            return None  # closed while waiting: nothing will use it
        return {layer: kept_rows(self.cache, layer, chunk, self.gate, decode=False) for layer in self.layers}

    def _produce(self) -> None:
        """Producer thread: gathers batches (as stored into pinned memory on CUDA, decoded on the CPU)
        and queues them in order."""
        torch.set_num_threads(1)
        first_batch, empty_blocks = self.position["batch"], 0
        try:
            for epoch, block, futures in self._blocks():
                parts = [f.result() for f in futures]
                if self.window is not None:  # a stream's rows are in the buffer now: free the window
                    self.window.release(self.cache, self.block_chunks(epoch, block))
                rows = {layer: _concat([part[layer] for part in parts]) for layer in self.layers}
                n_batches = len(rows[self.layers[0]].values_RD) // self.batch_size
                empty_blocks = 0 if n_batches else empty_blocks + 1
                if empty_blocks > self.n_blocks():
                    raise UserError(
                        f"no training batch of {self.batch_size} rows fits the kept rows; lower --batch-size"
                    )
                n_rows = len(rows[self.layers[0]].values_RD)
                perm_R = torch.from_numpy(np.random.default_rng([self.seed, epoch, block, 1]).permutation(n_rows))
                for batch in range(first_batch, n_batches):
                    idx = perm_R[batch * self.batch_size : (batch + 1) * self.batch_size]
                    x = {layer: self._batch(layer, layer_rows, idx) for layer, layer_rows in rows.items()}
                    nxt = (epoch, block, batch + 1) if batch + 1 < n_batches else self._after(epoch, block)
                    self._put((x, nxt))
                    if self._stop.is_set():
                        return
                first_batch = 0
        except BaseException as e:  # surfaced in the consumer, which re-raises it
            self._put((e, None))

    def _batch(self, layer: int, rows: StoredRows, idx: torch.Tensor) -> StoredRows:
        """rows[idx]: as stored into pinned memory for a GPU (its copy then overlaps compute), else
        decoded to float32 here."""
        if self._on_gpu:
            return StoredRows(*(_pinned_gather(part, idx) if part is not None else None for part in rows))
        return StoredRows(decode_rows(rows.take(idx), self._dim_scales[layer]).float(), None)

    def _after(self, epoch: int, block: int) -> tuple[int, int, int]:
        return (epoch, block + 1, 0) if block + 1 < self.n_blocks() else (epoch + 1, 0, 0)

    def _put(self, item: tuple) -> None:
        while not self._stop.is_set():
            try:
                return self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[int, torch.Tensor]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, daemon=True, name="sae-loader")
            self._thread.start()
        x, nxt = self._queue.get()
        if isinstance(x, BaseException):
            raise x
        self.position = dict(zip(("epoch", "block", "batch"), nxt, strict=True))
        # A pinned host tensor lets the copy overlap compute; each batch has its own pinned buffer
        # (recycled by torch's caching host allocator only once the copy is done). A CPU batch comes decoded.
        return {layer: decode_rows(rows.to(self.device), self._dim_scales[layer]).float() for layer, rows in x.items()}

    def close(self) -> None:
        self._stop.set()
        if self.follower is not None:
            self.follower.stop.set()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _concat(parts: list[StoredRows]) -> StoredRows:
    """A block's chunks' rows as one (values, and scales where stored)."""
    return StoredRows(*(torch.cat(p) if p[0] is not None else None for p in zip(*parts, strict=True)))


def _pinned_gather(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """rows[idx] into a new pinned tensor."""
    out = torch.empty((len(idx), *rows.shape[1:]), dtype=rows.dtype, pin_memory=True)
    return torch.index_select(rows, 0, idx, out=out)
