"""One writer at a time per survey store, across threads, processes and machines.

A store's lock lives *beside* the store (``survey.zarr`` -> ``survey.zarr.lock``), so it exists
before the store does (two ingests racing to create one), is never listed as a Zarr node, and a
copied or moved store does not carry a stale lock along.

Three backends, chosen from the URL:

- local paths and ``file://`` URLs: an OS file lock (`filelock`, ``flock``): the kernel frees it
  when its process dies, so a crashed writer never blocks the next one;
- object stores (``s3://`` and other fsspec URLs): a *lease* object written with a conditional
  create (``PUT`` with ``If-None-Match: *``: exactly one writer's create succeeds). The holder
  renews the lease every ``ttl/3`` by a conditional overwrite (``If-Match: <its ETag>``), and a
  waiter takes over a lease whose expiry has passed by the same compare-and-swap, so a crashed
  holder blocks others for at most ``ttl``. Release is a conditional delete. S3 has had these
  preconditions since 2024 (and MinIO, moto, R2 follow it); backends without ``If-Match`` never
  break an expired lease: the error names the lease object to remove by hand;
- ``memory://`` (one process by nature): a process-local lock.

Every backend is wrapped in one re-entrant, thread-aware guard per lock URL, so ``append`` inside
``with store.lock():`` does not deadlock, and threads of one process queue up like processes.

Why a lock rather than Icechunk (transactional Zarr: atomic commits, conflict detection): gsafe's appends
are short (one store chunk) and rare next to reads, a lock keeps the store a plain Zarr v3 group
that every tool and every reader opens without a session, and Icechunk's own local-filesystem
storage is *not* safe for concurrent commits, so local stores would need a file lock anyway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from infra.errors import EXIT_RUNTIME, StoreError

__all__ = ["lock_url_for", "store_lock", "LockTimeout", "LeaseLost"]

log = logging.getLogger("gsafe.locks")

#: Seconds a writer waits for another writer's lock before giving up with a clear error.
DEFAULT_TIMEOUT = 600.0
#: Seconds an object-store lease lives without renewal (the holder renews it every ttl/3).
DEFAULT_TTL = 60.0


class LockTimeout(StoreError):
    """Another writer held the store's lock for longer than we were willing to wait."""

    exit_code = EXIT_RUNTIME


class LeaseLost(StoreError):
    """An object-store lease expired or was taken over while we held it: our write is abandoned."""

    exit_code = EXIT_RUNTIME


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def lock_url_for(store_url: str) -> str:
    """Where the lock of the store at `store_url` lives: ``<store>.lock`` beside it."""
    url = str(store_url).rstrip("/")
    scheme = _scheme(url)
    if scheme in ("", "file"):
        path = Path(url[len("file://"):] if scheme == "file" else url).resolve()
        return str(path.parent / f"{path.name}.lock")
    rest = url.split("://", 1)[1]
    if "/" not in rest:  # a store at a bucket's root: the lease goes inside it
        return f"{url}/.gsafe.lock"
    return f"{url}.lock"


class _FileBackend:
    """An OS file lock (flock); freed by the kernel if the process dies."""

    def __init__(self, path: str):
        from filelock import FileLock

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # thread_local=False: the guard above serialises threads; this lock is the process's
        self._lock = FileLock(path, thread_local=False)
        self.where = path

    def acquire(self, timeout: float) -> None:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=timeout)
        except Timeout as e:
            raise LockTimeout(f"store lock {self.where}: another writer held it for more than {timeout:.0f} s; "
                              f"wait for it to finish (a dead process frees it by itself)") from e

    def check(self) -> None:
        pass

    def release(self) -> None:
        self._lock.release()


class _MemoryBackend:
    """``memory://`` stores live in one process: the guard's thread lock is all there is to it."""

    where = "memory"

    def acquire(self, timeout: float) -> None:
        pass

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


class _LeaseBackend:
    """A lease object on an object store, created, renewed, taken over and deleted conditionally.

    Arguments:
        url: the lease object's fsspec URL.
        ttl: seconds the lease lives without renewal.
        poll: seconds between attempts while another writer holds it.
        storage_options: passed to fsspec (endpoint, credentials...).
    """

    def __init__(self, url: str, ttl: float = DEFAULT_TTL, poll: float = 0.2, storage_options: dict | None = None):
        import fsspec

        self.url, self.ttl, self.poll = url, float(ttl), poll
        self.fs, self.path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.where = url
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._lost: str | None = None
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    # -- conditional operations (S3's preconditions; other backends get what fsspec offers) --
    def _is_s3(self) -> bool:
        return hasattr(self.fs, "call_s3")

    def _split(self) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(self.path)
        return bucket, key

    def _body(self) -> bytes:
        return json.dumps({"owner": self._owner, "expires": time.time() + self.ttl}).encode()

    def _create(self) -> str | None:
        """Create the lease if absent; its ETag, or None if another writer holds one."""
        try:
            out = self.fs.pipe_file(self.path, self._body(), mode="create")
        except FileExistsError:
            return None
        etag = (out or {}).get("ETag") if isinstance(out, dict) else None
        return etag or self.fs.info(self.path).get("ETag") or "created"

    def _replace_if(self, etag: str) -> str | None:
        """Overwrite the lease only if it is still the object with `etag`; the new ETag, or None."""
        if not self._is_s3():
            return None
        bucket, key = self._split()
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), IfMatch=etag)
        except (OSError, FileExistsError, FileNotFoundError):
            return None
        except Exception as e:  # noqa: BLE001 - botocore's ClientError (412/409) means "not ours any more"
            if "PreconditionFailed" in str(e) or "ConditionalRequestConflict" in str(e) or "NoSuchKey" in str(e):
                return None
            raise
        self.fs.invalidate_cache(self.path)
        return out.get("ETag")

    def _read(self) -> tuple[dict, str | None] | None:
        """The lease's content and its ETag, read together (the read is pinned to that ETag)."""
        try:
            with self.fs.open(self.path, "rb") as f:
                data = f.read()
                etag = getattr(f, "details", {}).get("ETag")
        except FileNotFoundError:
            return None
        except OSError:   # replaced between the HEAD and the GET: read again next round
            return {}, None
        try:
            return json.loads(data or b"{}"), etag
        except ValueError:
            return {}, etag

    def _delete_if(self, etag: str | None) -> None:
        if self._is_s3() and etag:
            bucket, key = self._split()
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
            except Exception as e:  # noqa: BLE001
                log.warning("store lock %s: not released (%s); it expires by itself in %.0f s", self.url, e, self.ttl)
            self.fs.invalidate_cache(self.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path)

    # -- the lock -----------------------------------------------------------------------------
    def acquire(self, timeout: float) -> None:
        t0 = time.monotonic()
        holder = None
        while True:
            etag = self._create()
            if etag is None:
                current = self._read()
                if current is None:      # released meanwhile: try again at once
                    continue
                body, cur_etag = current
                holder = body.get("owner", "?")
                if cur_etag and body.get("expires", float("inf")) < time.time():
                    etag = self._replace_if(cur_etag)
                    if etag:
                        log.warning("store lock %s: took over the lease of %s, expired %.0f s ago",
                                    self.url, holder, time.time() - body["expires"])
            if etag:
                self._etag, self._lost = etag, None
                self._stop.clear()
                self._renewer = threading.Thread(target=self._renew, name="gsafe-lease", daemon=True)
                self._renewer.start()
                return
            if time.monotonic() - t0 > timeout:
                raise LockTimeout(
                    f"store lock {self.url}: held by {holder} for more than {timeout:.0f} s; wait for that writer, "
                    f"or if it is gone remove {self.url} (leases expire by themselves after {self.ttl:.0f} s "
                    f"where the store supports conditional writes)")
            time.sleep(self.poll)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            etag = self._replace_if(self._etag) if self._is_s3() else self._etag
            if not etag:
                self._lost = f"lease {self.url} was taken over or removed while held"
                log.error("store lock: %s", self._lost)
                return
            self._etag = etag

    def check(self) -> None:
        """Raise `LeaseLost` if the lease is no longer ours: called right before a commit."""
        if self._lost:
            raise LeaseLost(f"store lock: {self._lost}; nothing was committed, run the command again")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if not self._lost:
            self._delete_if(self._etag)
        self._etag = None


class _Guard:
    """Re-entrant per thread, exclusive across threads (an RLock) and across processes (the backend)."""

    def __init__(self, backend):
        self.backend = backend
        self._rlock = threading.RLock()
        self._depth = 0

    @contextlib.contextmanager
    def hold(self, timeout: float) -> Iterator["_Guard"]:
        if not self._rlock.acquire(timeout=timeout):
            raise LockTimeout(f"store lock {self.backend.where}: another thread held it for more than {timeout:.0f} s")
        try:
            if self._depth == 0:
                self.backend.acquire(timeout)
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.backend.release()
        finally:
            self._rlock.release()

    def check(self) -> None:
        self.backend.check()


_GUARDS: dict[str, _Guard] = {}
_GUARDS_LOCK = threading.Lock()


def _guard(store_url: str, storage_options: dict | None) -> _Guard:
    lock_url = lock_url_for(store_url)
    with _GUARDS_LOCK:
        g = _GUARDS.get(lock_url)
        if g is None:
            scheme = _scheme(str(store_url))
            if scheme in ("", "file"):
                backend = _FileBackend(lock_url)
            elif scheme == "memory":
                backend = _MemoryBackend()
            else:
                backend = _LeaseBackend(lock_url, storage_options=storage_options)
            g = _GUARDS[lock_url] = _Guard(backend)
        return g


@contextlib.contextmanager
def store_lock(store_url: str, timeout: float = DEFAULT_TIMEOUT, storage_options: dict | None = None) -> Iterator[_Guard]:
    """Hold the lock of the store at `store_url`: one writer at a time, re-entrant in one thread.

    Yields the guard; call its ``check()`` right before a commit (an object-store lease may have
    been lost meanwhile).

    Raises:
        LockTimeout: another writer held the lock for more than `timeout` seconds.

    Example:
        >>> with store_lock("memory://doc-lock") as g:
        ...     with store_lock("memory://doc-lock"):   # re-entrant
        ...         g.check()
    """
    with _guard(str(store_url), storage_options).hold(timeout) as g:
        yield g
