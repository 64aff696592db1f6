"""Locks on files that other threads and other processes also change.

``path_lock(path)`` returns the one lock object this process uses for ``path``: exclusive
across processes (an OS file lock via ``filelock``, released by the OS if the holder dies) and
across threads of this process, re-entrant within one thread (so a caller holding an entry's
lock can call code that takes it again).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path

import psutil
from filelock import FileLock, Timeout


class PathLock:
    """A re-entrant lock on ``path`` for threads and processes. Use ``with lock:``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = threading.RLock()
        self._file = FileLock(str(path), thread_local=False)
        self._depth = 0

    def acquire(self, timeout: float = -1) -> bool:
        """Take the lock; ``timeout`` seconds (0: try once, negative: wait). False on timeout."""
        if timeout == 0:
            got = self._thread.acquire(blocking=False)
        else:
            got = self._thread.acquire(timeout=timeout if timeout > 0 else -1)
        if not got:
            return False
        if self._depth == 0:
            try:
                self._file.acquire(timeout=timeout if timeout >= 0 else -1)
            except Timeout:
                self._thread.release()
                return False
            except BaseException:
                self._thread.release()
                raise
        self._depth += 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._file.release()
        self._thread.release()

    def __enter__(self) -> PathLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


_registry: dict[str, PathLock] = {}
_registry_lock = threading.Lock()


def _forget_after_fork() -> None:
    """A forked child holds none of its parent's locks: start with fresh lock objects."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _registry.clear()


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_forget_after_fork)


def path_lock(path: str | Path) -> PathLock:
    """The process-wide lock object for ``path`` (created on first use; the folder must exist)."""
    key = os.path.realpath(path)
    with _registry_lock:
        lock = _registry.get(key)
        if lock is None:
            lock = _registry[key] = PathLock(Path(key))
        return lock


def host_tag() -> str:
    """Six hex digits naming this machine (pids mean nothing on another host or container)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def owner_tag() -> str:
    """``<pid>-<start>-<host>`` for this process (start: creation time in centiseconds).

    A pid alone is not enough: pids are reused, so a leftover's owner is "alive" only when a
    process with that pid exists *and* started at the recorded time, on this host.
    """
    started = psutil.Process(os.getpid()).create_time()
    return f"{os.getpid()}-{round(started * 100)}-{host_tag()}"


def owner_alive(pid: int, started_cs: int) -> bool:
    """True when process ``pid`` runs and started at ``started_cs`` (centiseconds, ±1 s)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() * 100 - started_cs) <= 100
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # AccessDenied and the like: it exists, so assume it is working
        return True
