"""Kafka errors for operators and callers (pure): one line naming the setting to fix, and which errors a retry can
fix. `retriable` is the one word for "may succeed later", as in `StorageError.retriable` and `TaskError.retriable`:
`is_retriable(err)` is False for what no wait fixes (credentials, TLS, configuration), and `PublishError.retriable`
says the same of a failed publish.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException
from loguru import logger

from selfix.kafka.config import Throttle

_AUTH_CODES = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED,
                         KafkaError.ILLEGAL_SASL_STATE, KafkaError.UNSUPPORTED_SASL_MECHANISM})
_UNREACHABLE_CODES = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._TIMED_OUT,
                                KafkaError._MSG_TIMED_OUT, KafkaError._RESOLVE})
TOPIC_CODES = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC,
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
    elif code in TOPIC_CODES:
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


def is_retriable(err: KafkaError) -> bool:
    """False for errors that retrying with the same settings cannot fix (credentials, TLS, configuration)."""
    return err.code() not in FAIL_FAST_CODES and not any(t in err.str() for t in _FAIL_FAST_TEXT)


class ErrorTriage:
    """A client's error_cb, sorted after each poll. An error that is not retriable, or that librdkafka calls fatal,
    becomes `fatal` (the caller ends the process); it wins over the "all brokers down" that librdkafka reports
    alongside it, which would only mislead the operator. The rest are logged, one line per kind every 30 s."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self.secrets = tuple(secrets)
        self.fatal: KafkaError | None = None
        self._pending: list[KafkaError] = []
        self._throttle = Throttle()

    def __call__(self, err: KafkaError) -> None:
        """librdkafka's error_cb (served inside poll)."""
        self._pending.append(err)

    def sort(self) -> None:
        errors, self._pending = self._pending, []
        fatal = next((e for e in errors if not is_retriable(e) or e.fatal()), None)
        if fatal is not None:
            self.fatal = fatal
        else:
            for err in errors:
                self.report(err, "kafka")

    def report(self, err: object, what: str) -> None:
        inner = err.args[0] if isinstance(err, KafkaException) and err.args else err
        code = inner.code() if isinstance(inner, KafkaError) else type(inner).__name__
        if code == KafkaError._NO_OFFSET:
            return
        hidden = self._throttle(f"{what}:{code}")
        if hidden is not None:
            more = f" (and {hidden} more like it)" if hidden else ""
            logger.warning("{}: {}{}", what, self.describe(err), more)

    def describe(self, err: object) -> str:
        return classify_kafka_error(err, secrets=self.secrets)


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
