"""One idempotent librdkafka producer per process (`KafkaSender`) and the `Delivery` each send returns."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from loguru import logger

from selfix.kafka.config import LibrdkafkaLog, Throttle, default_client_id, producer_config
from selfix.kafka.errors import MessageRejected, PublishError, classify_kafka_error, is_rejection, is_retriable
from selfix.settings import Settings


@dataclass
class Delivery:
    """One produced message: settled by librdkafka's delivery report (served by poll/flush)."""

    since: float = field(default_factory=time.monotonic)
    done: bool = False
    error: KafkaError | None = None
    offset: int | None = None

    def settle(self, err: KafkaError | None, msg: Message) -> None:
        self.done, self.error = True, err
        if err is None:
            self.offset = msg.offset()


class KafkaSender:
    """One idempotent producer for a process: confirmed sends (results, DLQ) and fire-and-forget status events.

    librdkafka retries by itself until `message.timeout.ms`; idempotence keeps those retries from duplicating or
    reordering messages. A fatal producer error (possible with idempotence) replaces the producer instance.
    """

    def __init__(self, settings: Settings, role: str, overrides: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.role = role
        self.secrets = (settings.kafka_sasl_password,)
        self.overrides = dict(overrides or {})
        self.throttle = Throttle()
        self.last_error: KafkaError | None = None
        self.refusal: KafkaError | None = None  # the last error that is not retriable: publishing is refused
        self._fatal = False
        self.producer = self._make()

    def _make(self) -> Producer:
        conf = producer_config(self.settings, client_id=f"{default_client_id()}-{self.role}", overrides={
            "error_cb": self._on_error, "logger": LibrdkafkaLog(), **self.overrides})
        return Producer(conf)

    def _on_error(self, err: KafkaError) -> None:
        self.last_error = err
        line = classify_kafka_error(err, secrets=self.secrets)
        if err.fatal():
            self._fatal = True
            logger.error("Kafka producer: fatal error, starting a new producer: {}", line)
            return
        retriable = is_retriable(err)
        if not retriable:
            self.refusal = err
        hidden = self.throttle(f"error:{err.code()}")
        if hidden is not None:
            more = f" (and {hidden} more like it)" if hidden else ""
            (logger.warning if retriable else logger.error)("Kafka producer: {}{}", line, more)

    def describe(self, err: object) -> str:
        return classify_kafka_error(err, secrets=self.secrets)

    def problem(self) -> str:
        """The latest thing librdkafka complained about, for an operator (or a plain 'no answer')."""
        if self.last_error is not None:
            return self.describe(self.last_error)
        return "no acknowledgement from the broker yet"

    def _renew_if_fatal(self) -> None:
        if self._fatal:
            self._fatal = False
            old, self.producer = self.producer, self._make()
            old.flush(0)

    def send(self, topic: str, key: str | bytes | None, value: bytes,
             headers: list[tuple[str, str | bytes | None]] | None = None) -> Delivery:
        """Queue one message; the returned Delivery settles when the broker acknowledges or refuses it.

        Raises PublishError when librdkafka refuses it at once (local queue full, message too large)."""
        self._renew_if_fatal()
        delivery = Delivery()
        try:
            self.producer.produce(topic, value, key, headers=headers or [], on_delivery=delivery.settle)
        except BufferError as exc:
            self.producer.poll(0.1)
            raise PublishError(f"producer queue full: {exc}") from None
        except KafkaException as exc:
            raise (MessageRejected if is_rejection(exc) else PublishError)(self.describe(exc)) from None
        self.producer.poll(0)
        return delivery

    def wait(self, delivery: Delivery, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not delivery.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.producer.poll(min(0.05, remaining))
        return True

    def poll(self, timeout: float = 0.0) -> None:
        self.producer.poll(timeout)

    def close(self, timeout: float = 5.0) -> int:
        """Flush what is queued (up to `timeout`); returns how many messages were left undelivered."""
        return self.producer.flush(timeout)
