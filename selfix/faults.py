"""Crash points: a test names a point in CRASHPOINTS and the process SIGKILLs itself there, once.

This is how the crash tests hit the narrow windows (between the outbox rename and the processing cleanup, in the
middle of an upload) deterministically with a real kill -9. Each point fires once per spool (a marker file in
run/), so the restarted process gets past it. With CRASHPOINTS empty (production) this is one set lookup.
"""

from __future__ import annotations

import os
import signal

from loguru import logger

from selfix.settings import Settings
from selfix.spool import Spool


def crashpoint(settings: Settings, spool: Spool, name: str) -> None:
    if name not in settings.crashpoints:
        return
    marker = spool.run / f"crashpoint.{name}.fired"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    logger.warning("crash point {}: SIGKILL now", name)
    os.kill(os.getpid(), signal.SIGKILL)
