"""One preparation per cache entry, however many processes ask for it: the first takes a lock file beside the
entry and prepares; the others wait on the lock, then read what it cached. The lock is a POSIX record lock
(fcntl.lockf), which the kernel drops when its process ends, crash included, and which NFS (lockd) carries across
nodes: with a node-local cache each node prepares once; with a cache on a shared file system, one process prepares
for all. Waiting on a file lock has no time limit, unlike a barrier between processes (accelerate's, or torch's,
which time out after 30 minutes by default while a large dataset may take longer to prepare)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("sftune")

STAGING_PREFIX = ".staging-"  # an entry being written: <prefix><entry name>-<random>


@contextlib.contextmanager
def preparing(folder: Path) -> Iterator[bool]:
    """Hold the lock of cache entry `folder` (waiting for another process that holds it). Yields False where no
    lock could be taken (a read-only or lock-less file system): the caller then prepares without one."""
    import fcntl

    lock_path = lock_file(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("data: another process is preparing this data (%s): waiting for it", folder)
            started = time.monotonic()
            fcntl.lockf(handle, fcntl.LOCK_EX)
            log.info("data: waited %.0f s for the other process's preparation", time.monotonic() - started)
        except OSError:  # no locks on this file system
            yield False
            return
        remove_stale_staging(folder)
        yield True
    finally:
        os.close(handle)  # releases the lock


def lock_file(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def release_lock_file(folder: Path) -> None:
    """Remove the lock file once the entry is complete: a process that arrives later reads the entry without
    locking, and one still waiting on the removed file finds the entry when it gets the lock. (Not after a failed
    preparation: two processes could then lock two different files and prepare at once.)"""
    lock_file(folder).unlink(missing_ok=True)


def remove_stale_staging(folder: Path) -> None:
    """Half-written entries of `folder` left by a preparation that was killed (holding the lock, we know its
    writer is gone)."""
    for stage in folder.parent.glob(f"{STAGING_PREFIX}{folder.name}-*"):
        shutil.rmtree(stage, ignore_errors=True)
