"""A stream's bounded window: the chunks a harvest has written into memory and its trainer not yet used.

Training straight from the LM (`sae train --stream`), the harvest writes into a memory:// cache that
the trainer follows (sae.cache.follow) like any cache being written. The window bounds it: before a
chunk's forward passes the harvest waits while the window holds `size` chunks, and the trainer
releases each block of chunks once its rows are in the shuffle buffer, which deletes their data.
The window also remembers where the token stream stood at the start of each chunk, which a checkpoint
records so that a resumed stream starts at the first chunk its trainer still needs.
"""

import threading

from sae.cache.codecs import is_scaled
from sae.cache.store import Cache, acts_name, chunk_key, scales_name
from sae.errors import UserError


class Window:
    def __init__(self, size: int, keep: bool = False):
        """size: chunks held at most (the harvest waits beyond it); keep: release keeps the data (a
        stream written through to its cache on disk, --keep-cache)."""
        if size < 1:
            raise UserError(f"a stream's window must hold at least one chunk, got {size}")
        self.size, self.held, self.peak = size, set(), 0
        self.starts: dict[int, dict] = {}
        """Where the token stream stood at the start of each chunk admitted: a resume point."""
        self.error: BaseException | None = None
        self.ready = threading.Event()
        """Set once the harvest has set the cache's target (or found it reached): a trainer may plan."""
        self.ended = threading.Event()
        """Set when the harvest has returned: a chunk not committed by then never will be."""
        self._cond = threading.Condition()
        self._closed, self.keep = False, keep

    def admit(self, chunk: int, stream_start: dict) -> None:
        """The harvest is about to make `chunk`, its token stream at `stream_start`: wait for room."""
        with self._cond:
            self.starts[chunk] = stream_start
            self._cond.notify_all()
            self._cond.wait_for(lambda: len(self.held) < self.size or self._closed)
            if self._closed:
                raise StreamClosed
            self.held.add(chunk)
            self.peak = max(self.peak, len(self.held))

    def full(self) -> bool:
        with self._cond:
            return len(self.held) >= self.size

    def release(self, cache: Cache, chunks: list[int]) -> None:
        """The trainer has the rows of `chunks`: delete their data and make room."""
        for chunk in [] if self.keep else chunks:
            names = ["tokens", *(acts_name(layer) for layer in cache.layers)]
            names += [scales_name(layer) for layer in cache.layers if is_scaled(cache.storage_dtype)]
            for name in names:
                cache.location.delete(chunk_key(name, chunk))
        with self._cond:
            self.held.difference_update(chunks)
            self._cond.notify_all()

    def stream_start(self, chunk: int) -> dict:
        """Where the token stream stood at the start of `chunk`, waiting until the harvest gets there."""
        with self._cond:
            self._cond.wait_for(lambda: chunk in self.starts or self._closed)
            if chunk not in self.starts:
                raise self.error or StreamClosed
            return self.starts[chunk]

    def fail(self, error: BaseException) -> None:
        """The harvest stopped with `error`: readers waiting for its chunks raise it."""
        self.error = error
        self.close()

    def close(self) -> None:
        """No more chunks: a harvest waiting for room stops (StreamClosed)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class StreamClosed(Exception):
    """Raised in the harvest when its trainer has closed the window."""
