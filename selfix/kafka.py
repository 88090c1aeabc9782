"""Kafka helpers shared by the consumer and uploader processes and by `selfix doctor`.

Pure parts (no I/O): the librdkafka configuration built from Settings, `redact`, `OffsetTracker`,
`classify_kafka_error`. I/O parts: `KafkaSender` (one idempotent producer per process), `ResultPublisher` (the
uploader's results and status events), `ProgressWatcher` (started/progress events from processing/), and
`check_kafka`, one metadata round trip for `selfix doctor`. The consumer loop itself lives in selfix/consumer.py.

Consumer choices (see `consumer_config`):
- The consumer process never runs a job: it only turns messages into spool files, and it keeps polling while its
  partitions are paused. So `max.poll.interval.ms` bounds the consumer's own stalls (a slow fsync, a full disk),
  not the length of a generation, and stays at 5 minutes whatever JOB_TIMEOUT_S is.
- `session.timeout.ms` = KAFKA_SESSION_TIMEOUT_MS (30 s): a dead node's partitions move to the rest of the fleet
  within half a minute, while a node whose CPUs are saturated by ComfyUI (librdkafka heartbeats from its own
  thread) is not thrown out. Heartbeats every tenth of it.
- `cooperative-sticky` assignment: when a node joins or leaves the fleet, the other nodes keep their partitions and
  the jobs already in their spool. With an eager strategy every rebalance revokes everything from everyone, and
  since revocation withdraws the not-yet-started jobs, scaling the fleet would reshuffle the whole backlog.
  The classic group protocol is kept (not KIP-848 `group.protocol=consumer`) so brokers older than 4.0 work.
- Offsets are stored and committed by hand, only up to the contiguous low-watermark of published results
  (`OffsetTracker`), which is what makes delivery at-least-once.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._metadata import ClusterMetadata
from loguru import logger

from selfix.settings import Settings, SettingsError

if TYPE_CHECKING:
    from selfix.spool import Spool

Config = dict[str, Any]
TP = tuple[str, int]
Check = tuple[str, bool, str]

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
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": max(100, settings.kafka_session_timeout_ms // 10),
        "max.poll.interval.ms": MAX_POLL_INTERVAL_MS,
        # The consumer pauses its partitions at KAFKA_MAX_INFLIGHT, which drops what was prefetched: cap the
        # prefetch at 16 MB instead of 64 MB. (Not queued.min.messages: lowered, it delays every fetch after a
        # resume by ~0.4 s.)
        "queued.max.messages.kbytes": 16384,
        # A resumed partition cannot fetch before the fetch request in flight returns, which the broker holds up to
        # this long when there is nothing new: 100 ms (librdkafka: 500) keeps the refill after a pause quick, for
        # ten small requests a second from an idle node.
        "fetch.wait.max.ms": 100,
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


class Throttle:
    """Log a recurring condition once per `every` seconds per key, saying how often it happened meanwhile."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, key: str) -> int | None:
        """None to stay quiet; else how many times it was suppressed since the last line."""
        now = time.monotonic()
        last, hidden = self._last.get(key, (-1e9, 0))
        if now - last >= self.every:
            self._last[key] = (now, 0)
            return hidden
        self._last[key] = (last, hidden + 1)
        return None


class LibrdkafkaLog:
    """`logger` for librdkafka clients: its log lines go through loguru, never above `ceiling`.

    Lines at INFO and above are throttled per facility (FAIL, ...) to one per `every` seconds: with a broker
    down librdkafka logs every reconnect attempt, 20 a second, and error_cb already says why."""

    def __init__(self, ceiling: str = "WARNING", every: float = 30.0) -> None:
        self.ceiling = ceiling
        self.throttle = Throttle(every)

    def log(self, level: int, fmt: str, *args: Any) -> None:
        name = _SYSLOG_TO_LOGURU.get(level, "DEBUG")
        if logger.level(name).no > logger.level(self.ceiling).no:
            name = self.ceiling
        line = "librdkafka: " + (fmt % args if args else fmt)
        if logger.level(name).no >= logger.level("INFO").no:
            hidden = self.throttle(f"{name}:{args[0] if args else fmt}")
            if hidden is None:
                return
            if hidden:
                line += f" (and {hidden} more like it)"
        logger.opt(depth=1).log(name, line)


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

    def rewind(self, tp: TP, offset: int) -> None:
        """The consumer seeks back to `offset`: what was received from there on will be delivered again."""
        part = self._parts.get(tp)
        if part is None:
            return
        part.pending = {o for o in part.pending if o < offset}
        part.high = min(part.high, offset - 1)
        if not part.pending and part.high < 0:
            self._parts.pop(tp, None)

    def next_offsets(self) -> dict[TP, int]:
        """Per partition, the offset after the highest one received: where consuming stands."""
        return {tp: part.high + 1 for tp, part in self._parts.items() if part.high >= 0}

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


# --------------------------------------------------------------------------- producing

EVENT_HEADER = "selfix-event"  # status events carry it (and an "event" field); results carry neither
PUBLISH_WAIT_S = 10.0  # how long publish() waits for the broker's acknowledgement before the uploader retries
SHORT_WAIT_S = 0.2  # ... when an earlier delivery is already overdue (Kafka down): don't stall on every result


class PublishError(RuntimeError):
    """A message was not (or not yet) acknowledged by the broker; the caller keeps it and retries later."""

    retriable = True


class PublishRefused(PublishError):
    """The broker refuses this producer for good (credentials, TLS, authorization): retrying cannot help."""

    retriable = False


class MessageRejected(PublishError):
    """This one message can never be produced as it is (too large, refused as invalid); others still can."""

    rejected = True


# Errors about the message itself, not the connection: producing the same bytes again gets the same answer.
REJECTED_CODES = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG, KafkaError.INVALID_MSG_SIZE,
                            KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD})


def is_rejection(err: object) -> bool:
    inner = err.args[0] if isinstance(err, KafkaException) and err.args else err
    return isinstance(inner, KafkaError) and inner.code() in REJECTED_CODES


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
        self.permanent: KafkaError | None = None
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
        if is_permanent(err):
            self.permanent = err
        hidden = self.throttle(f"error:{err.code()}")
        if hidden is not None:
            more = f" (and {hidden} more like it)" if hidden else ""
            (logger.error if is_permanent(err) else logger.warning)("Kafka producer: {}{}", line, more)

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
            if self.sender.permanent is not None:
                raise PublishRefused(self.sender.describe(self.sender.permanent))
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

