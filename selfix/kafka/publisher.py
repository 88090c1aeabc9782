"""The uploader's side of Kafka: results (`ResultPublisher`) and status events (`event_message`,
`ProgressWatcher`, which reads started/progress from the runner's processing/ files)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from loguru import logger

from selfix.kafka.errors import MessageRejected, PublishError, PublishRefused, is_rejection
from selfix.kafka.producer import Delivery, KafkaSender
from selfix.settings import Settings

if TYPE_CHECKING:
    from selfix.spool import Spool

EVENT_HEADER = "selfix-event"  # status events carry it (and an "event" field); results carry neither
PUBLISH_WAIT_S = 10.0  # how long publish() waits for the broker's acknowledgement before the uploader retries
SHORT_WAIT_S = 0.2  # ... when an earlier delivery is already overdue (Kafka down): don't stall on every result


def event_message(kind: str, task_id: str, user_id: str | None, **fields: Any) -> tuple[bytes, list[Any]]:
    """A status event's value and headers: `{"event": kind, "taskId", "userId", "at", ...}` + selfix-event."""
    value = {"event": kind, "taskId": task_id, "userId": user_id, "at": round(time.time(), 3), **fields}
    return json.dumps(value, separators=(",", ":")).encode(), [(EVENT_HEADER, kind.encode())]


class ResultPublisher:
    """The uploader's Publisher: results to KAFKA_TOPIC_OUTPUT with key = taskId.

    publish() returns only once the broker acknowledged the result (acks=all) and raises otherwise, so the uploader
    writes done/ (the ledger the consumer commits offsets by) only for a delivered result. A result whose delivery
    is still pending when publish() gives up is not produced a second time on the next try: the next call waits
    for the same delivery. With KAFKA_STATUS_EVENTS, idle() also publishes started/progress events read from
    processing/.
    """

    def __init__(self, settings: Settings, spool: Spool | None = None, *, wait_s: float = PUBLISH_WAIT_S,
                 overrides: Mapping[str, Any] | None = None) -> None:
        self.topic = settings.kafka_topic_output
        self.dlq = settings.kafka_topic_dlq
        self.wait_s = wait_s
        self.sender = KafkaSender(settings, "uploader", overrides)
        self.pending: dict[str, Delivery] = {}
        self.rejected: set[str] = set()  # results refused once: the broker judges whole batches, so try alone again
        self.watcher = ProgressWatcher(spool, self.emit) if settings.kafka_status_events and spool else None

    def publish(self, result: dict[str, Any]) -> None:
        task_id = str(result["taskId"])
        delivery = self.pending.get(task_id)
        if delivery is None or (delivery.done and delivery.error is not None):
            value = json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode()
            delivery = self.sender.send(self.topic, task_id, value)
            self.pending[task_id] = delivery
        overdue = any(d is not delivery and not d.done and time.monotonic() - d.since > self.wait_s
                      for d in self.pending.values())
        if not self.sender.wait(delivery, SHORT_WAIT_S if overdue else self.wait_s):
            if self.sender.refusal is not None:
                raise PublishRefused(self.sender.describe(self.sender.refusal))
            raise PublishError(f"result not acknowledged by Kafka yet ({self.sender.problem()}); it stays in outbox/")
        del self.pending[task_id]
        if delivery.error is not None:
            again = task_id not in self.rejected
            if is_rejection(delivery.error) and again:
                self.rejected.add(task_id)  # maybe refused for a batch it shared with a larger message
            error = MessageRejected if is_rejection(delivery.error) and not again else PublishError
            raise error(self.sender.describe(delivery.error))
        self.rejected.discard(task_id)
        code = (result.get("error") or {}).get("code")
        if self.watcher is not None and code in ("cancelled", "expired"):  # status events on: say it as an event too
            self.emit(str(code), task_id, result.get("userId"), message=result["error"].get("message"))

    def dead_letter(self, result: dict[str, Any], reason: str) -> None:
        """The failed result of a task whose result the output topic refuses, to KAFKA_TOPIC_DLQ (if set)."""
        if not self.dlq:
            return
        value = json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode()
        headers: list[tuple[str, str | bytes | None]] = [
            ("selfix-error", reason.encode("utf-8", "backslashreplace")[:1000]),
            ("selfix-result-topic", self.topic.encode())]
        delivery = self.sender.send(self.dlq, str(result["taskId"]), value, headers)
        if not self.sender.wait(delivery, self.wait_s) or delivery.error is not None:
            problem = self.sender.describe(delivery.error) if delivery.error else "not acknowledged"
            raise PublishError(f"DLQ {self.dlq}: {problem}")

    def emit(self, kind: str, task_id: str, user_id: str | None, **fields: Any) -> None:
        """A status event, fire-and-forget: losing one is harmless, waiting for one would slow results."""
        value, headers = event_message(kind, task_id, user_id, **fields)
        try:
            self.sender.send(self.topic, task_id, value, headers)
        except PublishError as exc:
            logger.bind(task_id=task_id).debug("status event {} dropped: {}", kind, exc)

    def idle(self) -> None:
        """Called on every turn of the uploader's loop: serve delivery reports, publish status events."""
        self.sender.poll(0)
        if self.watcher is not None:
            self.watcher.tick()
        cutoff = time.monotonic() - 3600
        for task_id in [t for t, d in self.pending.items() if d.done and d.since < cutoff]:
            del self.pending[task_id]  # delivered, but the uploader never asked again (outbox entry gone)

    def close(self) -> None:
        left = self.sender.close()
        if left:
            logger.warning("{} Kafka message(s) not acknowledged at exit; their results stay in outbox/", left)


class ProgressWatcher:
    """`started` and `progress` status events from the runner's processing/ files (at most one progress a second
    per task). In memory only: after a restart a `started` may be sent again; events are informational."""

    def __init__(self, spool: Spool, emit: Callable[..., None], every: float = 0.25,
                 progress_every: float = 1.0) -> None:
        self.spool = spool
        self.emit = emit
        self.every = every
        self.progress_every = progress_every
        self.last_tick = 0.0
        self.started: set[tuple[str, int]] = set()
        self.progress: dict[str, tuple[float, Any]] = {}

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_tick < self.every:
            return
        self.last_tick = now
        seen: set[str] = set()
        for job in self.spool.processing_jobs():
            task_id, attempt = job.task_id, job.attempt
            seen.add(task_id)
            if job.started_at and (task_id, attempt) not in self.started:
                self.started.add((task_id, attempt))
                self.emit("started", task_id, job.user_id, attempt=attempt, startedAt=job.started_at)
            progress = job.progress.to_dict() if job.progress else None
            last = self.progress.get(task_id)
            if progress and (last is None or (last[1] != progress and now - last[0] >= self.progress_every)):
                self.progress[task_id] = (now, progress)
                self.emit("progress", task_id, job.user_id, attempt=attempt, progress=progress)
        self.started = {k for k in self.started if k[0] in seen}
        self.progress = {k: v for k, v in self.progress.items() if k in seen}
