"""Kafka helpers shared by the consumer and uploader processes and by `selfix doctor`.

Pure parts (no I/O): the librdkafka configuration built from Settings, `redact`, `OffsetTracker`,
`classify_kafka_error`. Thin I/O part: `check_kafka`, one metadata round trip.

Consumer choices (see `consumer_config`):
- The consumer process never runs a job: it only turns messages into spool files, and it keeps polling while its
  partitions are paused. So `max.poll.interval.ms` bounds the consumer's own stalls (a slow fsync, a full disk),
  not the length of a generation, and stays at 5 minutes whatever JOB_TIMEOUT_S is.
- `session.timeout.ms` = 30 s: a dead node's partitions move to the rest of the fleet within half a minute, while
  a node whose CPUs are saturated by ComfyUI (librdkafka heartbeats from its own thread) is not thrown out.
- `cooperative-sticky` assignment: when a node joins or leaves the fleet, the other nodes keep their partitions and
  the jobs already in their spool. With an eager strategy every rebalance revokes everything from everyone, and
  since revocation withdraws the not-yet-started jobs, scaling the fleet would reshuffle the whole backlog.
  The classic group protocol is kept (not KIP-848 `group.protocol=consumer`) so brokers older than 4.0 work.
- Offsets are stored and committed by hand, only up to the contiguous low-watermark of published results
  (`OffsetTracker`), which is what makes delivery at-least-once.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._metadata import ClusterMetadata
from loguru import logger

from selfix.settings import Settings, SettingsError

Config = dict[str, Any]
TP = tuple[str, int]
Check = tuple[str, bool, str]

SESSION_TIMEOUT_MS = 30_000
HEARTBEAT_INTERVAL_MS = 3_000
MAX_POLL_INTERVAL_MS = 300_000

_SECRET_KEY = re.compile(r"password|secret|jaas|private\.key|\.pem$|token", re.IGNORECASE)
_SYSLOG_TO_LOGURU = {50: "CRITICAL", 40: "ERROR", 30: "WARNING", 20: "INFO", 10: "DEBUG"}


# --------------------------------------------------------------------------- configuration

def default_client_id() -> str:
    # In a fleet the host name (the container id) tells the operator which node a broker-side client is.
    return f"selfix-{socket.gethostname()}"


def _common(settings: Settings, client_id: str | None) -> Config:
    if not settings.kafka_bootstrap:
        raise SettingsError("KAFKA_BOOTSTRAP_SERVER is empty: Kafka is off")
    protocol = settings.kafka_security_protocol
    conf: Config = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": protocol,
        "client.id": client_id or default_client_id(),
    }
    if protocol.startswith("SASL_"):
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
        conf["sasl.username"] = settings.kafka_sasl_username or ""
        conf["sasl.password"] = settings.kafka_sasl_password or ""
    if protocol in ("SSL", "SASL_SSL") and settings.kafka_ssl_ca_location:
        conf["ssl.ca.location"] = settings.kafka_ssl_ca_location
    return conf


def consumer_config(settings: Settings, *, client_id: str | None = None,
                    overrides: Mapping[str, Any] | None = None) -> Config:
    """librdkafka consumer properties; `overrides` (tests: a shorter session timeout) win."""
    conf = _common(settings, client_id)
    conf.update({
        "group.id": settings.kafka_group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": SESSION_TIMEOUT_MS,
        "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
        "max.poll.interval.ms": MAX_POLL_INTERVAL_MS,
    })
    conf.update(overrides or {})
    return conf


def producer_config(settings: Settings, *, client_id: str | None = None,
                    overrides: Mapping[str, Any] | None = None) -> Config:
    """librdkafka producer properties: idempotent, acknowledged by every in-sync replica."""
    conf = _common(settings, client_id)
    conf.update({
        "enable.idempotence": True,
        "acks": "all",
        # Results are small and a user waits for each one: batch only what arrives within 5 ms.
        "linger.ms": 5,
    })
    conf.update(overrides or {})
    return conf


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy safe to log: every secret-looking value becomes '***'."""
    return {k: ("***" if _SECRET_KEY.search(k) and v not in (None, "") else v) for k, v in config.items()}


class LibrdkafkaLog:
    """`logger` for librdkafka clients: its log lines go through loguru, never above `ceiling`."""

    def __init__(self, ceiling: str = "WARNING") -> None:
        self.ceiling = ceiling

    def log(self, level: int, fmt: str, *args: Any) -> None:
        name = _SYSLOG_TO_LOGURU.get(level, "DEBUG")
        if logger.level(name).no > logger.level(self.ceiling).no:
            name = self.ceiling
        logger.opt(depth=1).log(name, "librdkafka: " + (fmt % args if args else fmt))


# --------------------------------------------------------------------------- offsets

@dataclass
class _Partition:
    pending: set[int] = field(default_factory=set)  # received, result not yet published
    high: int = -1  # highest offset received
    committed: int | None = None  # last offset handed to mark_committed

    def watermark(self) -> int | None:
        if self.high < 0:
            return None
        return min(self.pending) if self.pending else self.high + 1


class OffsetTracker:
    """Per partition: which received offsets still wait for their result, and what may be committed.

    The committed offset is the next one to read: every received offset below it has its result published.
    Kafka delivers a partition in offset order, possibly with gaps (compaction, transaction markers), so the
    watermark is "lowest offset still pending", or "highest received + 1" when nothing is pending. An offset at or
    below the highest one received that is not pending was already handled: receiving it again is a duplicate.
    """

    def __init__(self) -> None:
        self._parts: dict[TP, _Partition] = {}

    def received(self, tp: TP, offset: int) -> bool:
        """Track a delivered message; False for a re-delivery of an offset already tracked or handled."""
        part = self._parts.setdefault(tp, _Partition())
        if offset <= part.high:
            return False
        part.high = offset
        part.pending.add(offset)
        return True

    def done(self, tp: TP, offset: int) -> bool:
        """The result of this offset is published; False if it was not pending (revoked partition, repeat)."""
        part = self._parts.get(tp)
        if part is None or offset not in part.pending:
            return False
        part.pending.discard(offset)
        return True

    def committable(self) -> dict[TP, int]:
        """Offsets to commit: partitions whose watermark moved past the last `mark_committed`."""
        out: dict[TP, int] = {}
        for tp, part in self._parts.items():
            mark = part.watermark()
            if mark is not None and (part.committed is None or mark > part.committed):
                out[tp] = mark
        return out

    def mark_committed(self, offsets: Mapping[TP, int]) -> None:
        for tp, offset in offsets.items():
            part = self._parts.get(tp)
            if part is not None and (part.committed is None or offset > part.committed):
                part.committed = offset

    def forget(self, tp: TP) -> None:
        """On revocation: the partition's next owner re-reads from the last commit."""
        self._parts.pop(tp, None)

    def pending(self, tp: TP) -> frozenset[int]:
        part = self._parts.get(tp)
        return frozenset(part.pending) if part else frozenset()

    def partitions(self) -> list[TP]:
        return list(self._parts)

    def inflight(self) -> int:
        return sum(len(p.pending) for p in self._parts.values())


# --------------------------------------------------------------------------- errors

_AUTH_CODES = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED,
                         KafkaError.ILLEGAL_SASL_STATE, KafkaError.UNSUPPORTED_SASL_MECHANISM})
_UNREACHABLE_CODES = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._TIMED_OUT,
                                KafkaError._MSG_TIMED_OUT, KafkaError._RESOLVE})
_TOPIC_CODES = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC,
                          KafkaError._UNKNOWN_PARTITION})
# Errors that no amount of waiting fixes: check_kafka reports them at once instead of running out its timeout.
FAIL_FAST_CODES = _AUTH_CODES | {KafkaError._SSL, KafkaError._INVALID_ARG}
_FAIL_FAST_TEXT = ("SASL authentication error", "mechanism handshake failed", "SSL handshake failed")

_SASL = "KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD / KAFKA_SASL_MECHANISM"
_TOPICS = "KAFKA_TOPIC_INPUT / KAFKA_TOPIC_OUTPUT / KAFKA_TOPIC_DLQ"
_AUTHZ = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "not authorized for the topic: grant ACLs to KAFKA_SASL_USERNAME "
                                           f"or fix {_TOPICS}",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "not authorized for the consumer group: grant ACLs to KAFKA_SASL_USERNAME "
                                           "or fix KAFKA_GROUP_ID",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "not authorized on the cluster (idempotent producer needs IdempotentWrite "
                                             "on brokers < 2.8): grant ACLs to KAFKA_SASL_USERNAME",
}


def _unwrap(err: object) -> tuple[int | None, str, str]:
    """(code, name, text) of a KafkaError, a KafkaException wrapping one, or anything else."""
    if isinstance(err, KafkaException) and err.args and isinstance(err.args[0], KafkaError):
        err = err.args[0]
    if isinstance(err, KafkaError):
        return err.code(), err.name(), err.str()
    return None, type(err).__name__, str(err)


def _detail(text: str) -> str:
    # "sasl_plaintext://h:p/bootstrap: SASL authentication error: X (after 301ms in state AUTH_REQ)" -> "X"
    text = re.sub(r"^(\S+://)?\S+/(bootstrap|\d+): ", "", text)
    text = re.sub(r"^SASL authentication error: ", "", text)
    return re.sub(r" \(after \d+ms in state \w+\)$", "", text)


def _scrub(text: str, secrets: Iterable[str | None]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return " ".join(text.split())[:400]


def classify_kafka_error(err: object, *, secrets: Iterable[str | None] = ()) -> str:
    """One line for an operator: what failed and which setting to look at. `secrets` are masked if echoed."""
    code, name, text = _unwrap(err)
    detail = _detail(text)
    if "mechanism handshake failed" in text:
        line = (f"SASL handshake failed ({detail}): check KAFKA_SASL_MECHANISM, and that KAFKA_SECURITY_PROTOCOL "
                "matches the broker's listener")
    elif code in _AUTH_CODES or "SASL authentication error" in text:
        line = f"SASL authentication failed ({detail}): check {_SASL}"
    elif code == KafkaError._SSL or "SSL handshake failed" in text:
        line = f"TLS handshake failed ({detail}): check KAFKA_SECURITY_PROTOCOL / KAFKA_SSL_CA_LOCATION"
    elif code == KafkaError._RESOLVE:
        line = f"cannot resolve a broker host ({detail}): check KAFKA_BOOTSTRAP_SERVER"
    elif code in _UNREACHABLE_CODES:
        # librdkafka's "0/2 brokers are down" counts connections, not brokers, and confuses more than it says.
        detail = "no broker answered" if code == KafkaError._ALL_BROKERS_DOWN else detail
        line = (f"Kafka unreachable ({detail}): check KAFKA_BOOTSTRAP_SERVER, and that KAFKA_SECURITY_PROTOCOL "
                "matches the broker's listener")
    elif code in _TOPIC_CODES:
        line = f"topic does not exist ({detail}): create it or fix {_TOPICS}"
    elif code in _AUTHZ:
        line = f"{_AUTHZ[code]} ({detail})"
    elif code == KafkaError.MSG_SIZE_TOO_LARGE:
        line = f"message larger than the broker or topic accepts ({detail}): raise the topic's max.message.bytes"
    elif code == KafkaError._INVALID_ARG:
        line = f"invalid Kafka client configuration ({detail}): check the KAFKA_* settings"
    else:
        line = f"Kafka error {name}: {detail}"
    return _scrub(line, secrets)


# --------------------------------------------------------------------------- doctor

def _identity(settings: Settings) -> str:
    proto = settings.kafka_security_protocol
    if proto.startswith("SASL_"):
        return f"{proto}, {settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username}"
    return proto


def is_permanent(err: KafkaError) -> bool:
    """True for errors that retrying with the same settings cannot fix (credentials, TLS, configuration)."""
    return err.code() in FAIL_FAST_CODES or any(t in err.str() for t in _FAIL_FAST_TEXT)


def _most_telling(errors: list[KafkaError], fallback: object) -> object:
    # "1/1 brokers are down" says less than the connection error that preceded it.
    telling = [e for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN] or errors
    return telling[-1] if telling else fallback


def _metadata(admin: AdminClient, errors: list[KafkaError], timeout: float) -> ClusterMetadata | object:
    """Cluster metadata, or the error that stopped us (permanent errors end the wait at once)."""
    deadline = time.monotonic() + timeout
    last: object = KafkaError(KafkaError._TIMED_OUT, "no answer before the deadline")
    while True:
        remaining = deadline - time.monotonic()
        try:
            return admin.list_topics(timeout=max(0.1, min(0.5, remaining)))
        except KafkaException as exc:
            last = exc
        admin.poll(0)  # serves error_cb: librdkafka says why brokers are down only there
        fatal = next((e for e in errors if is_permanent(e)), None)
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
    if meta is None or meta.error is not None and meta.error.code() in _TOPIC_CODES:
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
    conf = _common(settings, default_client_id() + "-doctor")
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
