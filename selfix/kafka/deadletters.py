"""Messages without a readable taskId, on their way to KAFKA_TOPIC_DLQ.

Nobody can be answered about such a message, so its offset counts as published once the DLQ has it: the broker
acknowledged the dead letter, or refused it even without its value (then it is only logged), so one record never
holds its partition's commits back. Until then a failed send is tried again after a backoff (DLQ_RETRY_S).
`next_step` is the pure decision; `DeadLetters` applies it with a sender and a clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from loguru import logger

from selfix.backoff import compute_backoff
from selfix.clock import Clock
from selfix.kafka.errors import MessageRejected, PublishError, is_rejection
from selfix.kafka.offsets import TP
from selfix.kafka.producer import Delivery

DLQ_MAX_BYTES = 512 * 1024  # larger values go to the DLQ truncated (a header says from how much)
DLQ_RETRY_S = (1.0, 60.0)  # backoff base and cap between tries of one dead letter

Header = tuple[str, str | bytes | None]
Step = Literal["wait", "send", "delivered", "rejected", "failed"]


class Sender(Protocol):
    """What DeadLetters needs of `KafkaSender`."""

    def send(self, topic: str, key: str | bytes | None, value: bytes,
             headers: list[Header] | None = None) -> Delivery: ...

    def describe(self, err: object) -> str: ...


@dataclass
class DeadLetter:
    tp: TP
    offset: int
    key: bytes | None
    value: bytes
    headers: list[Header] = field(default_factory=list)
    delivery: Delivery | None = None  # the send in flight, or the last one
    tries: int = 0  # failed sends so far
    not_before: float = 0.0  # monotonic: no new send before

    @property
    def where(self) -> str:
        return f"{self.tp[0]}[{self.tp[1]}]@{self.offset}"


def dead_letter(tp: TP, offset: int, key: bytes | None, raw: bytes, reason: str, timestamp_ms: int,
                headers: Iterable[Any] = ()) -> DeadLetter:
    """The DLQ copy of a message: its key and bytes (cut at DLQ_MAX_BYTES); selfix's headers, saying why and where
    from, before the message's own."""
    ours: list[Header] = [
        ("selfix-error", reason.encode()[:1000]), ("selfix-source-topic", tp[0].encode()),
        ("selfix-source-partition", str(tp[1]).encode()), ("selfix-source-offset", str(offset).encode()),
        ("selfix-source-timestamp", str(timestamp_ms).encode())]
    value = raw
    if len(raw) > DLQ_MAX_BYTES:
        value = raw[:DLQ_MAX_BYTES]
        ours.append(("selfix-truncated-from", str(len(raw)).encode()))
    return DeadLetter(tp, offset, key, value, ours + list(headers))


def next_step(item: DeadLetter, now: float) -> Step:
    """What a dead letter needs on this tick: its delivery report decides, else the backoff."""
    d = item.delivery
    if d is not None and d.done:
        if d.error is None:
            return "delivered"
        return "rejected" if is_rejection(d.error) else "failed"
    if d is None and now >= item.not_before:
        return "send"
    return "wait"


class DeadLetters:
    """The dead letters not yet in the DLQ, by (partition, offset). `done(tp, offset)` is called once the DLQ has
    one (or it was given up on): its offset counts as published."""

    def __init__(self, sender: Sender, topic: str, done: Callable[[TP, int], object], clock: Clock) -> None:
        self.sender = sender
        self.topic = topic
        self.done = done
        self.clock = clock
        self.items: dict[tuple[TP, int], DeadLetter] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: DeadLetter) -> None:
        self.items[(item.tp, item.offset)] = item
        self.send(item)

    def poll(self) -> None:
        """Act on delivery reports (served by the sender's poll) and send what is due again."""
        now = self.clock.monotonic()
        for item in list(self.items.values()):
            step = next_step(item, now)
            error = item.delivery.error if item.delivery is not None else None
            if step == "delivered":
                self._settled(item)
            elif step == "rejected":
                self.rejected(item, self.sender.describe(error))
            elif step == "failed":
                self.retry_later(item, "not delivered", self.sender.describe(error))
            elif step == "send":
                self.send(item)

    def drop(self, tp: TP, from_offset: int = 0) -> None:
        """Forget the partition's dead letters from `from_offset` on (revoked, or read again from there)."""
        for key in [key for key in self.items if key[0] == tp and key[1] >= from_offset]:
            del self.items[key]

    def send(self, item: DeadLetter) -> None:
        try:
            item.delivery = self.sender.send(self.topic, item.key, item.value, item.headers)
        except MessageRejected as exc:
            self.rejected(item, str(exc))
        except PublishError as exc:
            self.retry_later(item, "refused", str(exc))

    def retry_later(self, item: DeadLetter, what: str, why: str) -> None:
        item.tries += 1
        item.delivery = None
        item.not_before = self.clock.monotonic() + compute_backoff(min(item.tries, 10), *DLQ_RETRY_S)
        logger.error("DLQ {}: message {} {}: {} (try {})", self.topic, item.where, what, why, item.tries)

    def rejected(self, item: DeadLetter, why: str) -> None:
        """The DLQ refuses this record itself (too large for the topic): send it once more without the value, then
        give up on it."""
        if item.value:
            logger.error("DLQ {}: message {} refused ({}); sending its headers without the value", self.topic,
                         item.where, why)
            item.headers.append(("selfix-truncated-from", str(len(item.value)).encode()))
            item.value, item.delivery = b"", None
            self.send(item)
            return
        logger.error("DLQ {}: message {} refused even without its value ({}); logged here only", self.topic,
                     item.where, why)
        self._settled(item)

    def _settled(self, item: DeadLetter) -> None:
        self.items.pop((item.tp, item.offset), None)
        self.done(item.tp, item.offset)
