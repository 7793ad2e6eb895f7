"""Advisory locks on Share files, so that concurrent writers (training runs, the web UI) serialise.

A writer holds ``fcntl.flock`` on the sidecar ``<file>.lock`` (left in place: deleting it would
break the lock for whoever holds it). `hold` is re-entrant within a thread, waits at most
``timeout`` seconds, then raises `ShareFileLockedError`. Without fcntl (Windows), or on a file
system without flock, writes go unlocked with a warning; ``save_share(expected=...)`` still
catches a concurrent change.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, see _flock
    fcntl = None

LOCK_TIMEOUT = 120.0  # seconds a writer waits for another one to finish


class ShareFileLockedError(TimeoutError):
    """Another writer held the Share file's lock for longer than the timeout."""


_held = threading.local()  # this thread's locks: path → depth (flock would block on a second fd of ours)


def lock_path(path: str | os.PathLike) -> Path:
    """The sidecar lock file of a Share file: ``<file>.lock`` (kept; deleting it would break the lock)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def hold(path: Path, timeout: float = LOCK_TIMEOUT):
    """Hold the advisory lock of ``path`` (re-entrant within a thread)."""
    key = str(lock_path(os.path.realpath(path)))  # one lock however the path is spelled (symlinks, "..")
    held = getattr(_held, "depth", None)
    if held is None:
        held = _held.depth = {}
    if held.get(key):
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _flock(fd, key, path, timeout)
        held[key] = 1
        try:
            yield
        finally:
            held.pop(key, None)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _flock(fd: int, key: str, path: Path, timeout: float) -> None:
    if fcntl is None:
        warnings.warn(f"No fcntl on this platform: {path} is written without a lock (concurrent writers are caught "
                      "only by save_share(expected=...)).", RuntimeWarning, stacklevel=4)
        return
    deadline, pause = time.monotonic() + timeout, 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ShareFileLockedError(
                    f"{path} is being written by another process (it has held {key} for more than {timeout:g} s); "
                    "try again when it has finished. Nothing was written."
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.25)
        except OSError as e:  # a file system without flock (some network mounts)
            warnings.warn(f"Cannot lock {key} ({e}); writing {path} without a lock.", RuntimeWarning, stacklevel=4)
            return
