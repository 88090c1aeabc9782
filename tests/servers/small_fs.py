"""A real small filesystem for full-disk tests: a tmpfs of a given size that the test mounts itself (root only).

`fill()` writes a ballast file until the kernel answers ENOSPC, so "full" means what it means in production; `free()`
deletes the ballast. Skips cleanly, with the reason, where mounting is not permitted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


class SmallFs:
    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.size = size
        self.ballast = root / ".ballast"

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> int:
        """Write ballast until ENOSPC (or until only `leave` bytes are free); returns the ballast's size."""
        chunk = b"\0" * (1 << 16)
        with open(self.ballast, "ab") as fh:
            while True:
                room = self.free_bytes() - leave
                if room <= 0:
                    break
                try:
                    fh.write(chunk[: min(len(chunk), room)])
                    fh.flush()
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        return self.ballast.stat().st_size

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)


@contextlib.contextmanager
def small_fs(where: Path, size: int) -> Iterator[SmallFs]:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a full-disk test mounts a tmpfs of its own: needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (mount said: {proc.stderr.strip() or proc.returncode})")
    try:
        yield SmallFs(where, size)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
