"""Real servers the test suite starts on 127.0.0.1 (no mocks, no look-alikes)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Self


class ServerLifecycle:
    """restart/close/context manager for a server class that has start(), stop(), base_dir and _own_dir."""

    base_dir: Path
    _own_dir: bool

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
