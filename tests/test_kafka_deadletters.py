"""DeadLetters: an unaddressable message's offset is done once the DLQ has it or gave up on it (no broker).

A scripted sender stands in for KafkaSender and a ManualClock for time, so backoffs are stepped through."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError

from selfix.clock import ManualClock
from selfix.kafka.deadletters import (
    DLQ_MAX_BYTES,
    DLQ_RETRY_S,
    DeadLetter,
    DeadLetters,
    Header,
    dead_letter,
    next_step,
)
from selfix.kafka.errors import MessageRejected, PublishError
from selfix.kafka.producer import Delivery

TP = ("tasks", 3)
TOO_LARGE = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
DOWN = KafkaError(KafkaError._MSG_TIMED_OUT)


class Sender:
    """Each send takes the next scripted answer: an exception to raise, or a Delivery to return (settled later by
    the test, as librdkafka's delivery report would)."""

    def __init__(self, *answers: Exception | Delivery) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[bytes, list[Header]]] = []

    def send(self, topic: str, key: str | bytes | None, value: bytes,
             headers: list[Header] | None = None) -> Delivery:
        self.sent.append((value, list(headers or [])))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def describe(self, err: object) -> str:
        return str(err)


def settled(error: KafkaError | None = None) -> Delivery:
    return Delivery(done=True, error=error)


def letters(sender: Sender) -> tuple[DeadLetters, list[Any], ManualClock]:
    done: list[Any] = []
    clock = ManualClock()
    return DeadLetters(sender, "dlq", lambda tp, offset: done.append((tp, offset)), clock), done, clock


@pytest.mark.parametrize(("delivery", "not_before", "step"), [
    (None, 0.0, "send"),
    (None, 10.0, "wait"),  # backing off
    (Delivery(), 0.0, "wait"),  # in flight
    (settled(), 0.0, "delivered"),
    (settled(TOO_LARGE), 0.0, "rejected"),
    (settled(DOWN), 0.0, "failed"),
])
def test_next_step(delivery: Delivery | None, not_before: float, step: str) -> None:
    item = DeadLetter(TP, 1, None, b"x", delivery=delivery, not_before=not_before)
    assert next_step(item, now=5.0) == step


def test_the_dead_letter_says_why_and_where_from_and_keeps_the_message_headers() -> None:
    item = dead_letter(TP, 9, b"k", b"{oops", "no taskId", 1234, [("trace", b"t1")])
    assert (item.key, item.value) == (b"k", b"{oops")
    assert item.headers == [("selfix-error", b"no taskId"), ("selfix-source-topic", b"tasks"),
                            ("selfix-source-partition", b"3"), ("selfix-source-offset", b"9"),
                            ("selfix-source-timestamp", b"1234"), ("trace", b"t1")]


def test_a_large_value_is_cut_and_the_header_says_from_how_much() -> None:
    item = dead_letter(TP, 9, None, b"x" * (DLQ_MAX_BYTES + 5), "too big to parse", 0)
    assert len(item.value) == DLQ_MAX_BYTES
    assert ("selfix-truncated-from", str(DLQ_MAX_BYTES + 5).encode()) in item.headers


def test_delivered_marks_the_offset_done() -> None:
    delivery = Delivery()
    dead, done, _ = letters(Sender(delivery))
    dead.add(DeadLetter(TP, 1, None, b"x"))
    dead.poll()
    assert done == [] and len(dead) == 1, "in flight: not done yet"
    delivery.done = True  # librdkafka's delivery report: acknowledged
    dead.poll()
    assert done == [(TP, 1)] and len(dead) == 0


def test_a_failed_send_is_tried_again_only_after_its_backoff() -> None:
    sender = Sender(PublishError("queue full"), settled(DOWN), settled())
    dead, done, clock = letters(sender)
    dead.add(DeadLetter(TP, 1, None, b"x"))
    item = dead.items[(TP, 1)]
    assert item.tries == 1 and item.delivery is None
    dead.poll()
    assert len(sender.sent) == 1, "backing off: not sent again at once"
    clock.advance(DLQ_RETRY_S[0])  # the first backoff is at most the base
    dead.poll()
    assert len(sender.sent) == 2
    dead.poll()  # its report: not delivered, back off again (longer)
    assert item.tries == 2 and item.delivery is None
    clock.advance(DLQ_RETRY_S[0] / 2)
    dead.poll()
    assert len(sender.sent) == 2, "the second backoff is at least the base"
    clock.advance(DLQ_RETRY_S[0] * 1.5)
    dead.poll()
    dead.poll()
    assert done == [(TP, 1)]


@pytest.mark.parametrize("refusal", ["at send", "in the report"])
def test_a_record_the_dlq_refuses_goes_once_more_without_its_value_then_is_given_up(refusal: str) -> None:
    first: Exception | Delivery = MessageRejected("too large") if refusal == "at send" else settled(TOO_LARGE)
    sender = Sender(first, MessageRejected("still too large"))
    dead, done, _ = letters(sender)
    dead.add(DeadLetter(TP, 4, None, b"v" * 10, [("selfix-error", b"no taskId")]))
    dead.poll()
    assert [value for value, _ in sender.sent] == [b"v" * 10, b""]
    assert ("selfix-truncated-from", b"10") in sender.sent[1][1]
    assert done == [(TP, 4)], "given up: one record never holds its partition's commits back"
    assert len(dead) == 0


def test_drop_forgets_a_partition_from_an_offset_on() -> None:
    dead, done, _ = letters(Sender(Delivery(), Delivery(), Delivery()))
    for tp, offset in [(TP, 1), (TP, 5), (("tasks", 4), 2)]:
        dead.add(DeadLetter(tp, offset, None, b"x"))
    dead.drop(TP, 5)
    assert sorted(dead.items) == [(TP, 1), (("tasks", 4), 2)]
    dead.drop(TP)
    assert list(dead.items) == [(("tasks", 4), 2)]
    assert done == []
