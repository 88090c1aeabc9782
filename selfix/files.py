"""Durable file primitives shared by the spool, the LoRA cache and the local store, and what a process does when
its disk is full (ENOSPC, EDQUOT): it never exits for that, it backs off and logs once per episode."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from loguru import logger

from selfix.backoff import compute_backoff

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_RETRY_BASE_S = 0.25
DISK_RETRY_MAX_S = 2.0  # bounds "space is back -> work resumes": each stage looks again at least this often


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable (the directory entry, not just the file data)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write `path` whole and fsync it; a write that fails (a full disk) removes what it had written."""
    try:
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def disk_full_error(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind `exc` (itself, or a cause wrapped by a client library), if any."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def is_disk_full(exc: BaseException | None) -> bool:
    return disk_full_error(exc) is not None


def free_bytes(path: Path) -> int | None:
    """Free bytes for an unprivileged writer on the filesystem holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


class DiskFull:
    """One disk-full episode of one stage: a log line when it starts (errno, path, free bytes) and one when it
    ends, a bounded exponential backoff between tries, never one line per try."""

    def __init__(self, stage: str, base_s: float = DISK_RETRY_BASE_S, cap_s: float = DISK_RETRY_MAX_S) -> None:
        self.stage = stage
        self.base_s, self.cap_s = base_s, cap_s
        self.since: float | None = None
        self.tries = 0
        self.retry_at = 0.0

    @property
    def active(self) -> bool:
        return self.since is not None

    def hit(self, exc: OSError | None, fallback: Path) -> float:
        """Record one failed try (exc None: a probe found no room); returns the delay before the next one."""
        self.tries += 1
        now = time.monotonic()
        if self.since is None:
            self.since = now
            path, cause = fallback, "no room"
            if exc is not None:
                cause = f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror}"
                if isinstance(exc.filename, str | bytes) and exc.filename:
                    path = Path(os.fsdecode(exc.filename))
            free = free_bytes(path)
            logger.error("{}: disk full ({}) writing {}, {} byte(s) free there; pausing, retrying with backoff "
                         "(up to {:g}s) until space returns; nothing is dropped", self.stage, cause, path,
                         "unknown" if free is None else free, self.cap_s)
        delay = compute_backoff(min(self.tries, 20), self.base_s, self.cap_s)
        self.retry_at = now + delay
        return delay

    def due(self) -> bool:
        """While an episode lasts: whether the backoff has passed and another try may be made."""
        return time.monotonic() >= self.retry_at

    def clear(self) -> None:
        if self.since is None:
            return
        logger.info("{}: disk space is back after {:.1f}s ({} tries); resuming", self.stage,
                    time.monotonic() - self.since, self.tries)
        self.since, self.tries, self.retry_at = None, 0, 0.0
