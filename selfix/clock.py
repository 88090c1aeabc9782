"""A clock that classes take as an argument, so tests can move time forward instead of sleeping (arroyo style)."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch: timestamps that are stored or compared across processes."""

    def monotonic(self) -> float:
        """Seconds that never go back: durations inside one process."""


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class OffsetClock:
    """Real time plus an offset that `advance` moves forward: waits still pass, but a deadline can be jumped to."""

    def __init__(self) -> None:
        self.offset = 0.0

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


class ManualClock:
    """Time that stands still until `advance` moves it (arroyo's MockedClock): for pure tests of time rules."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now
