"""Where caches live: a local directory, an object-store URL (s3://, gs://, az://), or memory:// (a
stream's bounded window of chunks, held by this process only).

Both sit behind one small interface, so the cache code is the same for either: the zarr store of a
cache's group, and the few whole-object operations the commit protocol and the writer lock need.
Object stores go through obstore (zarr's ObjectStore), an optional dependency (`pip install
'sae[s3]'`): credentials, region and endpoint come from the environment the standard way
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP; the GOOGLE_*
and AZURE_* equivalents), and pipeline.toml's [storage] table adds obstore options on top.

What object stores guarantee here (README, "The cache on object storage"): every object is written
whole (a PUT replaces it atomically, readers never see half of one); creating the writer lock is a
conditional write (If-None-Match: *), so two writers cannot both take it; taking over a stale lock
is a conditional overwrite of the very lock object that was read (If-Match its ETag). There is no
rename, so a chunk is rewritten in place on resume, which is safe because readers trust only the
committed count.
"""

import contextlib
import datetime
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr

from sae.errors import UserError

SCHEMES = ("s3", "gs", "az", "abfs", "azure")
_storage_options: dict[str, Any] = {}


def set_storage_options(options: dict[str, Any]) -> None:
    """obstore options for every object-store location opened from now on (pipeline.toml [storage])."""
    _storage_options.clear()
    _storage_options.update(options)


def as_location(where: "str | Path | Location") -> "Location":
    """A local path or a URL as a location; a location as it is."""
    if isinstance(where, LocalLocation | ObjectLocation | MemoryLocation):
        return where
    text = str(where)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return LocalLocation(Path(text).expanduser().absolute())
    if scheme == "file":
        return LocalLocation(Path(rest).absolute())
    if scheme == "memory":
        return MemoryLocation(text.rstrip("/"))
    if scheme not in SCHEMES:
        raise UserError(f"unknown location scheme '{scheme}://' in {text}; use a local path, s3://, gs:// or az://")
    return ObjectLocation(text.rstrip("/"))


@dataclass(frozen=True)
class LocalLocation:
    path: Path

    @property
    def url(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def __str__(self) -> str:
        return self.url

    def child(self, name: str) -> "LocalLocation":
        return LocalLocation(self.path / name)

    def zarr_store(self, read_only: bool) -> zarr.storage.LocalStore:
        return zarr.storage.LocalStore(self.path, read_only=read_only)

    def read(self, key: str) -> bytes | None:
        try:
            return (self.path / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, key: str) -> bool:
        return (self.path / key).exists()

    def create(self, key: str, data: bytes) -> bool:
        """Write key only if it does not exist (O_EXCL); False if it does."""
        target = self.path / key
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise UserError(f"cannot write {target}: {e.strerror or e}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def replace(self, key: str, data: bytes, expected: bytes) -> bool:
        """Overwrite key with data if it still holds `expected`. A local file system has no
        compare-and-swap: between the check and the rename there is a window of microseconds."""
        target = self.path / key
        if self.read(key) != expected:
            return False
        partial = target.with_name(f".{target.name}.tmp{os.getpid()}")
        partial.write_bytes(data)
        os.replace(partial, target)
        return True

    def delete(self, key: str) -> None:
        (self.path / key).unlink(missing_ok=True)

    def children(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.is_dir()) if self.path.is_dir() else []

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def remove_all(self, keep: str) -> None:
        """Every file of this location but `keep`."""
        if self.path.is_dir():
            for entry in self.path.iterdir():
                if entry.name != keep:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def prune(self) -> None:
        """Remove the directory if it is empty."""
        with contextlib.suppress(OSError):
            self.path.rmdir()

    def check_access(self) -> None:
        """Nothing to check before writing: a local error names its path when it happens."""


class KnownByURL:
    """The name and text of a location that is a URL (an object store's, or memory://)."""

    url: str

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class ObjectLocation(KnownByURL):
    url: str
    store: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.store is None:
            object.__setattr__(self, "store", _object_store(self.url))

    def child(self, name: str) -> "ObjectLocation":
        return ObjectLocation(f"{self.url}/{name}")

    def zarr_store(self, read_only: bool):
        return zarr.storage.ObjectStore(self.store, read_only=read_only)

    def read(self, key: str) -> bytes | None:
        return self._read(key)[0]

    def _read(self, key: str) -> tuple[bytes | None, str | None]:
        """(the object's bytes, its ETag), or (None, None) if there is none."""
        import obstore

        try:
            result = self._call(obstore.get, key)
        except FileNotFoundError:
            return None, None
        return bytes(result.bytes()), result.meta["e_tag"]

    def exists(self, key: str) -> bool:
        import obstore

        try:
            self._call(obstore.head, key)
        except FileNotFoundError:
            return False
        return True

    def create(self, key: str, data: bytes) -> bool:
        """A conditional PUT (If-None-Match: *): False if the object exists."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            self._call(obstore.put, key, data, mode="create")
        except (AlreadyExistsError, PreconditionError):
            return False
        return True

    def replace(self, key: str, data: bytes, expected: bytes) -> bool:
        """A conditional PUT (If-Match the ETag of the `expected` bytes just read): False if the
        object changed in between."""
        import obstore
        from obstore.exceptions import PreconditionError

        current, e_tag = self._read(key)
        if current != expected:
            return False
        try:
            self._call(obstore.put, key, data, mode={"e_tag": e_tag})
        except PreconditionError:
            return False
        return True

    def delete(self, key: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError):
            self._call(obstore.delete, key)

    def children(self) -> list[str]:
        import obstore

        listing = self._call(obstore.list_with_delimiter, None)
        return sorted(prefix.rstrip("/").rsplit("/", 1)[-1] for prefix in listing["common_prefixes"])

    def _objects(self) -> list[dict]:
        import obstore

        return self._call(lambda store: obstore.list(store).collect())

    def size(self) -> int:
        return sum(meta["size"] for meta in self._objects())

    def remove_all(self, keep: str) -> None:
        import obstore

        paths = [meta["path"] for meta in self._objects() if meta["path"] != keep]
        if paths:
            self._call(obstore.delete, paths)

    def prune(self) -> None:
        """Object stores have no directories to remove."""

    def check_access(self) -> None:
        """One listing: a missing bucket, credential or endpoint fails here, before any work."""
        self.children()

    def _call(self, fn, *args, **kwargs):
        """fn(store, *args): a missing object stays FileNotFoundError, a precondition failure stays
        what it is; any other failure (no bucket, no credentials, no network) is one line."""
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            return fn(self.store, *args, **kwargs)
        except (AlreadyExistsError, PreconditionError):
            raise
        except Exception as e:  # obstore's errors carry the server's reply; its first line says why
            if "NoSuchBucket" in str(e):
                raise UserError(f"cannot access {self.url}: its bucket does not exist") from None
            if isinstance(e, FileNotFoundError):
                raise
            reason = str(e).strip().splitlines()[0]
            if "169.254.169.254" in reason or "credential" in reason.lower():  # it fell back to instance metadata
                reason = (
                    f"no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile): {reason}"
                )
            elif _http_endpoint_refused():  # obstore says only "builder error" for it
                reason = f"{reason}; an http:// endpoint needs AWS_ALLOW_HTTP=true"
            raise UserError(f"cannot access {self.url}: {reason}") from None


_MEMORY: dict[str, dict] = {}
"""memory:// locations of this process: url -> the zarr MemoryStore's dict of keys to buffers."""
_MEMORY_LOCK = threading.Lock()


@dataclass(frozen=True)
class MemoryLocation(KnownByURL):
    """A location in this process's memory (a zarr MemoryStore): what a stream's harvest writes and its
    trainer reads, one window of chunks at a time. Gone when the process ends."""

    url: str

    @property
    def _objects(self) -> dict:
        with _MEMORY_LOCK:
            return _MEMORY.setdefault(self.url, {})

    def child(self, name: str) -> "MemoryLocation":
        return MemoryLocation(f"{self.url}/{name}")

    def zarr_store(self, read_only: bool) -> zarr.storage.MemoryStore:
        return zarr.storage.MemoryStore(self._objects, read_only=read_only)

    def read(self, key: str) -> bytes | None:
        buffer = self._objects.get(key)
        return None if buffer is None else buffer.to_bytes()

    def exists(self, key: str) -> bool:
        return key in self._objects

    def create(self, key: str, data: bytes) -> bool:
        with _MEMORY_LOCK:
            objects = _MEMORY.setdefault(self.url, {})
            if key in objects:
                return False
            objects[key] = _buffer(data)
            return True

    def replace(self, key: str, data: bytes, expected: bytes) -> bool:
        with _MEMORY_LOCK:
            objects = _MEMORY.setdefault(self.url, {})
            if key not in objects or objects[key].to_bytes() != expected:
                return False
            objects[key] = _buffer(data)
            return True

    def delete(self, key: str) -> None:
        self._objects.pop(key, None)

    def children(self) -> list[str]:
        with _MEMORY_LOCK:
            names = {url[len(self.url) + 1 :].split("/")[0] for url in _MEMORY if url.startswith(self.url + "/")}
        return sorted(names)

    def size(self) -> int:
        return sum(len(buffer.to_bytes()) for buffer in list(self._objects.values()))

    def remove_all(self, keep: str) -> None:
        for key in [k for k in self._objects if k != keep]:
            self.delete(key)

    def prune(self) -> None:
        with _MEMORY_LOCK:
            if not _MEMORY.get(self.url):
                _MEMORY.pop(self.url, None)

    def check_access(self) -> None:
        """Memory is always there."""


def _buffer(data: bytes):
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype().buffer.from_bytes(data)


Location = LocalLocation | ObjectLocation | MemoryLocation


def _http_endpoint_refused() -> bool:
    """An http:// endpoint configured without allowing plain HTTP, which obstore refuses."""
    endpoint = str(
        _storage_options.get("endpoint")
        or _storage_options.get("aws_endpoint")
        or os.environ.get("AWS_ENDPOINT_URL", "")
    )
    allowed = str(_storage_options.get("allow_http") or os.environ.get("AWS_ALLOW_HTTP", "")).lower() == "true"
    return endpoint.startswith("http://") and not allowed


def _object_store(url: str):
    try:
        from obstore.store import from_url
    except ImportError:
        raise UserError(f"{url.split('://')[0]}:// locations need obstore: pip install 'sae[s3]'") from None
    # obstore's default retries last minutes against an endpoint that is down; fail within seconds
    options = {"retry_config": {"max_retries": 2, "retry_timeout": datetime.timedelta(seconds=10)}, **_storage_options}
    try:
        return from_url(url, **options)
    except Exception as e:  # a malformed URL or an unknown option
        raise UserError(f"cannot open {url}: {str(e).strip().splitlines()[0]}") from None
