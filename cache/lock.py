"""One writer per cache: a lock file holding the writer's pid and host. Readers take no lock."""

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sae.errors import UserError

LOCK_NAME = "writer.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_problem(cache_path: Path) -> str | None:
    """Why the cache cannot be written now, or None if it is free."""
    lock_path = cache_path / LOCK_NAME
    try:
        holder = json.loads(lock_path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError):
        return f"unreadable lock {lock_path}; if no harvest is writing, run `sae cache unlock {cache_path}`"
    pid, host = holder.get("pid"), holder.get("host")
    if host == socket.gethostname() and not _pid_alive(pid):
        return (
            f"stale lock {lock_path}: its writer (pid {pid}) is gone; the cache keeps its committed rows, "
            f"run `sae cache unlock {cache_path}` and harvest again to resume"
        )
    return f"cache {cache_path} is locked by a live writer (pid {pid} on {host}, since {holder.get('since')})"


@contextmanager
def writer_lock(cache_path: Path) -> Iterator[None]:
    lock_path = cache_path / LOCK_NAME
    cache_path.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise UserError(lock_problem(cache_path) or f"lock {lock_path} appeared and vanished; retry") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f)
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)


def unlock(cache_path: Path) -> None:
    """Remove a lock whose writer is gone; refuse while the writer is alive on this host."""
    problem = lock_problem(cache_path)
    if problem is None:
        raise UserError(f"{cache_path} is not locked")
    if "live writer" in problem:
        raise UserError(problem)
    (cache_path / LOCK_NAME).unlink()
