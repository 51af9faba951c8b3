"""Reading a cache that a harvest is still writing (another process, torchrun ranks, an object store, or
a harvest thread filling an in-memory window): a reader waits until the chunks it needs are committed,
re-reading the committed count, and says so while it waits. Readers see only committed chunks, so what
they read is what stays (the commit protocol, sae.cache.store)."""

import threading
import time
from collections.abc import Iterable

from sae.cache.lock import writer_state
from sae.cache.store import Cache, is_cache, open_cache
from sae.cache.window import Window
from sae.errors import UserError
from sae.progress import console

POLL_S = 1.0
"""Seconds between looks at the committed count while waiting."""
STOPPED_AFTER_S = 30.0
"""Seconds without a writer before a waiting reader says which harvest to resume."""


def wait_for_cache(where: str, timeout_s: float, window: Window | None = None) -> Cache:
    """The cache at `where`, waiting up to timeout_s for a harvest to create it and set its target;
    `window`: a stream's, whose harvest runs in this process, shows its own progress and reports its
    errors there (one before it made the cache, e.g. a store it cannot reach, is raised at once); the
    cache is then ready once the harvest has set its target, which may extend a cache already there."""
    deadline, said = time.monotonic() + timeout_s, window is not None
    while not ((window is None or window.ready.is_set()) and is_cache(where) and started(open_cache(where))):
        if window is not None and window.error is not None:
            raise window.error
        if time.monotonic() > deadline:
            raise UserError(
                f"{where} did not become an activation cache within {timeout_s:g} s; start its `sae harvest` "
                "(or check the path), or raise --follow-timeout"
            )
        if not said:
            console.print(f"waiting for a harvest to create the cache {where}")
            said = True
        time.sleep(POLL_S)
    return open_cache(where)


def started(cache: Cache) -> bool:
    """A cache its harvest has set a target for, or one no harvest writes (made before targets were kept)."""
    return "target_contexts" in cache.meta or writer_state(cache.location) != "live"


class Follower:
    """Waits, on behalf of every reader thread of one cache, until chunks are committed."""

    def __init__(self, cache: Cache, stop: threading.Event | None = None, window: Window | None = None):
        """window: the cache is a stream's (its harvest runs in this process, shows its own progress, so
        waits go unsaid, and reports its errors there)."""
        self.cache, self.stop, self.window = cache, stop or threading.Event(), window
        self._lock = threading.Lock()
        self._waiting_since: float | None = None
        self._said_stopped = False

    def wait_for(self, chunks: Iterable[int]) -> bool:
        """Block until every chunk is committed; False if stopped first."""
        last = max(chunks)
        while not self.cache.is_committed(last):
            if self.stop.is_set():
                return False
            if self.window is not None and self.window.error is not None:
                raise self.window.error
            if self.cache.complete:
                raise UserError(
                    f"the harvest of {self.cache.path} ended with {self.cache.n_contexts:,} contexts, before chunk "
                    f"{last} that this training planned for: its dataset ran out; train with fewer --tokens"
                )
            ended = self.window is not None and self.window.ended.is_set()  # before the look that sees its last commit
            with self._lock:  # one reader refreshes and speaks for all
                self._look(last)
            if ended and not self.cache.is_committed(last):
                raise UserError(
                    f"the harvest of {self.cache.path} ended with {self.cache.n_contexts:,} of its target "
                    f"{self.cache.target_contexts:,} contexts committed, before chunk {last} that this training "
                    "planned for: finish the cache with `sae harvest --tokens` of its target, or train on fewer tokens"
                )
            time.sleep(POLL_S)
        return True

    def _look(self, chunk: int) -> None:
        cache = self.cache
        cache.refresh()
        if cache.is_committed(chunk):
            self._waiting_since, self._said_stopped = None, False
            return
        if self.window is not None:  # its progress bar says it
            return
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
            console.print(
                f"waiting for the harvest: {cache.n_contexts:,} of {cache.target_contexts:,} contexts of "
                f"{cache.path} committed, chunk {chunk} needed"
            )
        elif (
            not self._said_stopped
            and now - self._waiting_since > STOPPED_AFTER_S
            and writer_state(cache.location) == "gone"
        ):
            self._said_stopped = True
            console.print(
                f"the harvest writing {cache.path} has stopped at {cache.n_contexts:,} of {cache.target_contexts:,} "
                "contexts: run the same `sae harvest` command again to resume it; training goes on when it does"
            )
