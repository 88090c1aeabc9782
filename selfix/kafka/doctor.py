"""`selfix doctor`'s Kafka checks: one metadata round trip (broker reachable with these credentials), then
each topic."""

from __future__ import annotations

import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._metadata import ClusterMetadata

from selfix.kafka.config import client_config, default_client_id
from selfix.kafka.errors import TOPIC_CODES, classify_kafka_error, is_retriable
from selfix.settings import Settings

Check = tuple[str, bool, str]


def _identity(settings: Settings) -> str:
    proto = settings.kafka_security_protocol
    if proto.startswith("SASL_"):
        return f"{proto}, {settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username}"
    return proto


def _most_telling(errors: list[KafkaError], fallback: object) -> object:
    # "1/1 brokers are down" says less than the connection error that preceded it.
    telling = [e for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN] or errors
    return telling[-1] if telling else fallback


def _metadata(admin: AdminClient, errors: list[KafkaError], timeout: float) -> ClusterMetadata | object:
    """Cluster metadata, or the error that stopped us (an error no retry fixes ends the wait at once)."""
    deadline = time.monotonic() + timeout
    last: object = KafkaError(KafkaError._TIMED_OUT, "no answer before the deadline")
    while True:
        remaining = deadline - time.monotonic()
        try:
            return admin.list_topics(timeout=max(0.1, min(0.5, remaining)))
        except KafkaException as exc:
            last = exc
        admin.poll(0)  # serves error_cb: librdkafka says why brokers are down only there
        fatal = next((e for e in errors if not is_retriable(e)), None)
        if fatal is not None:
            return fatal
        if remaining <= 0:
            return _most_telling(errors, last)


def _topic_check(admin: AdminClient, env: str, topic: str, timeout: float, secrets: tuple[str | None]) -> Check:
    name = _topic_name(env)
    try:
        meta = admin.list_topics(topic, timeout=timeout).topics.get(topic)
    except KafkaException as exc:
        return name, False, f"{env}={topic}: " + classify_kafka_error(exc, secrets=secrets)
    if meta is None or meta.error is not None and meta.error.code() in TOPIC_CODES:
        return name, False, f"topic {topic!r} does not exist: create it or fix {env}"
    if meta.error is not None:
        return name, False, f"{env}={topic}: " + classify_kafka_error(meta.error, secrets=secrets)
    return name, True, f"topic {topic!r}: {len(meta.partitions)} partition(s)"


def _topic_name(env: str) -> str:
    return f"kafka.topic.{env.removeprefix('KAFKA_TOPIC_').lower()}"


def check_kafka(settings: Settings, timeout: float = 5.0) -> list[Check]:
    """`selfix doctor`'s Kafka checks: broker reachable with these credentials, then each topic exists."""
    if not settings.kafka_enabled:
        return [("kafka", True, "KAFKA_BOOTSTRAP_SERVER is empty: Kafka off, jobs come from inbox/")]
    secrets = (settings.kafka_sasl_password,)
    topics = [("KAFKA_TOPIC_INPUT", settings.kafka_topic_input), ("KAFKA_TOPIC_OUTPUT", settings.kafka_topic_output)]
    if settings.kafka_topic_dlq:
        topics.append(("KAFKA_TOPIC_DLQ", settings.kafka_topic_dlq))
    errors: list[KafkaError] = []
    conf = client_config(settings, default_client_id() + "-doctor")
    # error_cb carries every failure the check reports; librdkafka's own log would repeat each reconnect.
    conf.update({"error_cb": errors.append, "log_level": 0,
                 "socket.connection.setup.timeout.ms": max(1000, int(timeout * 1000)),
                 "allow.auto.create.topics": False})  # a check must not create what it checks
    where = f"{settings.kafka_bootstrap} ({_identity(settings)})"
    try:
        admin = AdminClient(conf)
        meta = _metadata(admin, errors, timeout)
    except KafkaException as exc:  # a property librdkafka refuses
        meta = exc
    if not isinstance(meta, ClusterMetadata):
        line = classify_kafka_error(meta, secrets=secrets)
        return [("kafka.connect", False, f"{where}: {line}")] + [
            (_topic_name(env), False, f"{topic!r} not checked: no connection") for env, topic in topics]
    checks: list[Check] = [("kafka.connect", True, f"{where}: {len(meta.brokers)} broker(s)")]
    checks.extend(_topic_check(admin, env, topic, timeout, secrets) for env, topic in topics)
    return checks
