"""One writer per cache: a lock object holding the writer's pid and host. Readers take no lock.

Taking the lock is a create-if-absent write (O_EXCL locally, If-None-Match on object stores), so
two writers can never both hold it. A lock whose writer is gone is stale. On the writer's own host
that is certain (its pid is not running) and the next harvest takes the lock over by itself, with a
conditional overwrite of the stale lock it read. From another host (a shared file system, an object
store) liveness cannot be checked: `sae cache unlock` removes such a lock once you know its writer is
gone.
"""

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sae.cache.location import Location, as_location
from sae.errors import UserError
from sae.progress import console

LOCK_NAME = "writer.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder() -> bytes:
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode()


def _state(location: Location) -> tuple[str, bytes | None, dict]:
    """("free" | "stale here" | "elsewhere" | "live" | "unreadable", the lock's bytes, its holder)."""
    raw = location.read(LOCK_NAME)
    if raw is None:
        return "free", None, {}
    try:
        holder = json.loads(raw)
        pid, host = int(holder["pid"]), holder["host"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return "unreadable", raw, {}
    if host != socket.gethostname():
        return "elsewhere", raw, holder
    return ("live" if _pid_alive(pid) else "stale here"), raw, holder


def _problem(location: Location, state: str, holder: dict) -> str:
    if state == "unreadable":
        return f"unreadable lock {location}/{LOCK_NAME}; if no harvest is writing, run `sae cache unlock {location}`"
    where = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
    if state == "elsewhere":
        return (
            f"cache {location} is locked by a writer on another host ({where}); if it is gone, run "
            f"`sae cache unlock {location}` and harvest again to resume"
        )
    return f"cache {location} is locked by a live writer ({where})"


@contextmanager
def writer_lock(where: "str | Path | Location") -> Iterator[None]:
    """Hold the cache's writer lock; a stale lock of this host is taken over, with one line saying so."""
    location = as_location(where)
    mine = _holder()
    if not location.create(LOCK_NAME, mine):
        state, raw, holder = _state(location)
        if state == "stale here" and location.replace(LOCK_NAME, mine, expected=raw):
            console.print(
                f"took over the stale lock of {location}: its writer (pid {holder['pid']}, this host) is gone; "
                "resuming from the committed rows"
            )
        elif not (state == "free" and location.create(LOCK_NAME, mine)):
            state, _, holder = _state(location)  # as it is now: another writer may have won the race
            if state in ("free", "stale here"):
                raise UserError(f"the lock of {location} changed while this harvest took it; run it again")
            raise UserError(_problem(location, state, holder))
    try:
        yield
    finally:
        if location.read(LOCK_NAME) == mine:  # never remove a lock that is not ours
            location.delete(LOCK_NAME)


def unlock(where: "str | Path | Location") -> None:
    """Remove a lock whose writer is gone; refuse while the writer is alive on this host."""
    location = as_location(where)
    state, _, holder = _state(location)
    if state == "free":
        raise UserError(f"{location} is not locked")
    if state == "live":
        raise UserError(_problem(location, state, holder))
    location.delete(LOCK_NAME)


def writer_state(where: "str | Path | Location") -> str:
    """Whether a harvest is writing the cache: "live" (its writer holds the lock), "gone" (no lock, or
    a stale one of this host) or "unknown" (another host's lock, whose writer cannot be checked)."""
    state = _state(as_location(where))[0]
    return {"live": "live", "free": "gone", "stale here": "gone"}.get(state, "unknown")
