"""Real servers the test suite starts on 127.0.0.1 (no mocks, no look-alikes)."""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self


def free_ports(count: int) -> list[int]:
    """Free loopback ports, all held open together so the kernel cannot hand out the same port twice."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn so a server never outlives a pytest killed with SIGKILL. Linux fires it when the forking
    *thread* exits, so it is armed only from the main thread: a server started from a helper thread would
    otherwise die with that thread."""
    return _die_with_parent if threading.current_thread() is threading.main_thread() else None


class ServerLifecycle:
    """running/pid, restart/close and the context manager for a server class that has start(), stop(), its
    process in _proc, base_dir and _own_dir."""

    base_dir: Path
    _own_dir: bool
    _proc: subprocess.Popen[bytes] | None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    def start(self, *args: Any) -> None:
        raise NotImplementedError

    def stop(self, *args: Any) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """Stop (if running) and start again on the same ports with the same data directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
