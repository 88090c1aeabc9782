"""What every selfix process does at start: settings, logging, signal flags, exit codes (one per failure class)."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from loguru import logger

from selfix import log
from selfix.settings import EXIT_CONFIG, Settings, SettingsError, load

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_ABORTED = 130  # second SIGTERM/SIGINT: leave now, recovery at next start picks up the pieces
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: a dependency (Kafka credentials, ...) refused us; retrying won't help


def boot(process: str) -> Settings:
    """Load settings or exit with EXIT_CONFIG and a message naming the variable; then set up logging."""
    try:
        settings = load()
    except SettingsError as exc:
        print(f"selfix {process}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG) from None
    log.setup(process, settings)
    return settings


class StopFlags:
    """Signal handlers only set flags: the first SIGTERM/SIGINT asks to drain, the second to leave at once."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.abort = threading.Event()

    def install(self) -> StopFlags:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping.is_set():
            self.abort.set()
        else:
            self.stopping.set()
        logger.info("signal {}: {}", signal.Signals(signum).name, "abort" if self.abort.is_set() else "draining")

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early on a stop request; True when stopping."""
        return self.stopping.wait(seconds)
