"""librdkafka client configuration built from Settings (pure), and the log plumbing every client shares.

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
  (`offsets.OffsetTracker`), which is what makes delivery at-least-once.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Mapping
from typing import Any

from loguru import logger

from selfix.settings import Settings, SettingsError

Config = dict[str, Any]

MAX_POLL_INTERVAL_MS = 300_000

_SECRET_KEY = re.compile(r"password|secret|jaas|private\.key|\.pem$|token", re.IGNORECASE)
_SYSLOG_TO_LOGURU = {50: "CRITICAL", 40: "ERROR", 30: "WARNING", 20: "INFO", 10: "DEBUG"}


def default_client_id() -> str:
    # In a fleet the host name (the container id) tells the operator which node a broker-side client is.
    return f"selfix-{socket.gethostname()}"


def client_config(settings: Settings, client_id: str | None) -> Config:
    """What every client shares (consumer, producer, `selfix doctor`'s admin client): brokers, security, id."""
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
    conf = client_config(settings, client_id)
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
    conf = client_config(settings, client_id)
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
