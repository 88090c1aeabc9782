"""The running task's latest ComfyUI preview, kept in the spool for the console page (CONSOLE_PREVIEWS, off by
default: previews are users' pictures).

The runner hands every preview frame of the prompt it knows is running to `PreviewKeeper.keep`; the keeper writes
at most one every MIN_INTERVAL_S (a sampler may send dozens a second, and the page polls once a second), on the
event loop's thread, so nothing of a task is written after the runner has moved it out of processing/ (the spool
then removes its preview). A failed write (a full disk) costs the preview, never the job.
"""

from __future__ import annotations

from loguru import logger

from selfix.clock import Clock
from selfix.comfy import PreviewFrame
from selfix.spool import Spool

__all__ = ["MIN_INTERVAL_S", "PreviewFrame", "PreviewKeeper"]

MIN_INTERVAL_S = 0.25  # four previews a second at most: ~40 KB each, a few hundred microseconds of writing


class PreviewKeeper:
    def __init__(self, spool: Spool, clock: Clock, min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.spool = spool
        self.clock = clock
        self.min_interval_s = min_interval_s
        self.last: tuple[str, float] | None = None  # (taskId, when) of the last write; one task runs at a time

    def keep(self, task_id: str, frame: PreviewFrame) -> bool:
        """Write `frame` as the task's preview unless one was written less than min_interval_s ago."""
        now = self.clock.monotonic()
        if self.last is not None and self.last[0] == task_id and now - self.last[1] < self.min_interval_s:
            return False
        try:
            written = self.spool.write_preview(task_id, frame.image)
        except OSError as exc:
            logger.bind(task_id=task_id).debug("preview not kept: {}", exc)
            return False
        if written:
            self.last = (task_id, now)
        return written

    def clear(self) -> None:
        """At start-up: a preview a killed runner left belongs to no running task any more."""
        removed = self.spool.clear_previews()
        if removed:
            logger.info("removed {} preview(s) left by an earlier runner", removed)
