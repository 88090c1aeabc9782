"""librdkafka configuration from Settings, operator messages for Kafka errors, and `check_kafka` for real.

The pure tests run everywhere; the ones marked `kafka` run against the real broker of tests/servers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from loguru import logger

from selfix.kafka import (
    ErrorTriage,
    LibrdkafkaLog,
    check_kafka,
    classify_kafka_error,
    consumer_config,
    is_retriable,
    producer_config,
    redact,
)
from selfix.settings import SettingsError, load
from tests.servers.kafka_broker import KafkaBroker

SECRET = "s3cr3t-Pa55"
SASL_ENV = {"KAFKA_BOOTSTRAP_SERVER": "k1:9092,k2:9092", "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256", "KAFKA_SASL_USERNAME": "node", "KAFKA_SASL_PASSWORD": SECRET,
            "KAFKA_SSL_CA_LOCATION": "/etc/ssl/ca.pem", "KAFKA_GROUP_ID": "fleet"}


# --------------------------------------------------------------------------- pure

def test_consumer_config_commits_by_hand() -> None:
    conf = consumer_config(load(SASL_ENV), client_id="n1")
    assert conf["bootstrap.servers"] == "k1:9092,k2:9092"
    assert conf["group.id"] == "fleet"
    assert conf["enable.auto.commit"] is False
    assert conf["enable.auto.offset.store"] is False
    assert conf["auto.offset.reset"] == "earliest"
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert conf["session.timeout.ms"] < conf["max.poll.interval.ms"]
    assert (conf["security.protocol"], conf["sasl.mechanism"]) == ("SASL_SSL", "SCRAM-SHA-256")
    assert (conf["sasl.username"], conf["sasl.password"]) == ("node", SECRET)
    assert conf["ssl.ca.location"] == "/etc/ssl/ca.pem"
    assert conf["client.id"] == "n1"


def test_producer_config_is_idempotent() -> None:
    conf = producer_config(load(SASL_ENV))
    assert conf["enable.idempotence"] is True
    assert conf["acks"] == "all"
    assert conf["client.id"].startswith("selfix-")
    assert "group.id" not in conf


def test_plaintext_sends_no_credentials() -> None:
    env = {**SASL_ENV, "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}
    for conf in (consumer_config(load(env)), producer_config(load(env))):
        assert conf["security.protocol"] == "PLAINTEXT"
        assert not any(k.startswith(("sasl.", "ssl.")) for k in conf)


def test_overrides_win() -> None:
    conf = consumer_config(load(SASL_ENV), overrides={"session.timeout.ms": 6000})
    assert conf["session.timeout.ms"] == 6000


def test_configs_are_accepted_by_librdkafka() -> None:
    # Constructing the clients validates every property name and value (no connection is needed for that).
    env = {**SASL_ENV, "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}
    Consumer(consumer_config(load(env))).close()
    Producer(producer_config(load(env))).flush(0)


def test_kafka_off_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="KAFKA_BOOTSTRAP_SERVER"):
        consumer_config(load({}))


def test_redact_masks_secrets_only() -> None:
    shown = redact(consumer_config(load(SASL_ENV)))
    assert shown["sasl.password"] == "***"
    assert shown["sasl.username"] == "node"
    assert SECRET not in repr(shown)
    assert redact({"sasl.oauthbearer.client.secret": "x", "ssl.key.password": "y", "sasl.password": ""}) == {
        "sasl.oauthbearer.client.secret": "***", "ssl.key.password": "***", "sasl.password": ""}


@pytest.mark.parametrize(("err", "names"), [
    (KafkaError(KafkaError._AUTHENTICATION, "sasl_ssl://k1:9092/bootstrap: SASL authentication error: "
                "Authentication failed: Invalid username or password (after 301ms in state AUTH_REQ)"),
     ["KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "KAFKA_SASL_MECHANISM"]),
    (KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"), ["KAFKA_BOOTSTRAP_SERVER"]),
    (KafkaError(KafkaError._TRANSPORT, "k1:9092/bootstrap: Connect failed: Connection refused"),
     ["KAFKA_BOOTSTRAP_SERVER", "KAFKA_SECURITY_PROTOCOL"]),
    (KafkaError(KafkaError._RESOLVE, "Failed to resolve 'k1:9092'"), ["KAFKA_BOOTSTRAP_SERVER"]),
    (KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "Broker: Unknown topic or partition"), ["KAFKA_TOPIC_INPUT"]),
    (KafkaError(KafkaError._UNKNOWN_TOPIC, "Local: Unknown topic"), ["KAFKA_TOPIC_OUTPUT"]),
    (KafkaError(KafkaError._SSL, "SSL handshake failed: certificate verify failed"), ["KAFKA_SSL_CA_LOCATION"]),
    (KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED, "Broker: Group authorization failed"), ["KAFKA_GROUP_ID"]),
    (KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "denied")), ["KAFKA_SASL_USERNAME"]),
])
def test_classify_names_the_setting(err: object, names: list[str]) -> None:
    line = classify_kafka_error(err)
    assert "\n" not in line
    for name in names:
        assert name in line, line


def test_classify_masks_secrets_and_strips_noise() -> None:
    err = KafkaError(KafkaError._INVALID_ARG, f'Invalid value "{SECRET}"\nfor property')
    line = classify_kafka_error(err, secrets=[SECRET, None])
    assert SECRET not in line and "\n" not in line
    auth = classify_kafka_error(KafkaError(KafkaError._AUTHENTICATION, "sasl_ssl://k:1/bootstrap: SASL "
                                           "authentication error: Authentication failed (after 300ms in state X)"))
    assert auth.startswith("SASL authentication failed (Authentication failed):")


DOWN = KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")
REFUSED = KafkaError(KafkaError.SASL_AUTHENTICATION_FAILED, "Authentication failed")
FATAL = KafkaError(KafkaError._FENCED, "fenced", fatal=True)


@pytest.mark.parametrize(("errors", "fatal", "logged"), [
    ([], None, 0),
    ([DOWN], None, 1),
    ([DOWN, DOWN, DOWN], None, 1),  # one line per kind every 30 s
    ([DOWN, REFUSED], REFUSED, 0),  # not retriable: ends the process, and the noise beside it is not logged
    ([FATAL, DOWN], FATAL, 0),
])
def test_error_triage_picks_what_ends_the_process_and_throttles_the_rest(
        errors: list[KafkaError], fatal: KafkaError | None, logged: int) -> None:
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    try:
        triage = ErrorTriage(secrets=[SECRET])
        for err in errors:
            triage(err)
        triage.sort()
    finally:
        logger.remove(sink)
    assert triage.fatal is fatal
    assert len(seen) == logged, seen
    assert is_retriable(DOWN) and not is_retriable(REFUSED)


def test_librdkafka_log_goes_through_loguru_capped() -> None:
    seen: list[tuple[str, str]] = []
    sink = logger.add(lambda m: seen.append((m.record["level"].name, m.record["message"])), level="DEBUG")
    try:
        # confluent-kafka calls logger.log(python_level, "%s [%s] %s", facility, client, text)
        LibrdkafkaLog("WARNING").log(50, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "broker down")
        LibrdkafkaLog("WARNING").log(10, "%s [%s] %s", "FETCH", "rdkafka#consumer-1", "fetch")
    finally:
        logger.remove(sink)
    assert seen == [("WARNING", "librdkafka: FAIL [rdkafka#consumer-1] broker down"),
                    ("DEBUG", "librdkafka: FETCH [rdkafka#consumer-1] fetch")]


def test_check_kafka_when_kafka_is_off() -> None:
    [(name, ok, msg)] = check_kafka(load({}))
    assert ok and "KAFKA_BOOTSTRAP_SERVER" in msg


# --------------------------------------------------------------------------- against the real broker

@pytest.fixture
def topics_env(kafka_topic_factory: Callable[..., str]) -> dict[str, str]:
    return {"KAFKA_TOPIC_INPUT": kafka_topic_factory(partitions=2, prefix="in"),
            "KAFKA_TOPIC_OUTPUT": kafka_topic_factory(prefix="out")}


@pytest.mark.kafka
@pytest.mark.parametrize("auth", ["none", "plain", "scram"])
def test_check_kafka_ok(kafka_broker: KafkaBroker, topics_env: dict[str, str], auth: str) -> None:
    checks = check_kafka(load({**topics_env, **kafka_broker.settings_env(auth)}))  # type: ignore[arg-type]
    assert [name for name, _, _ in checks] == ["kafka.connect", "kafka.topic.input", "kafka.topic.output"]
    assert all(ok for _, ok, _ in checks), checks
    assert "2 partition(s)" in checks[1][2]


@pytest.mark.kafka
@pytest.mark.parametrize("auth", ["plain", "scram"])
def test_check_kafka_wrong_password_fails_fast(kafka_broker: KafkaBroker, topics_env: dict[str, str],
                                               auth: str) -> None:
    wrong = f"wrong-{SECRET}"
    env = {**topics_env, **kafka_broker.settings_env(auth), "KAFKA_SASL_PASSWORD": wrong}  # type: ignore[arg-type]
    began = time.monotonic()
    checks = check_kafka(load(env), timeout=10)
    took = time.monotonic() - began
    name, ok, msg = checks[0]
    assert (name, ok) == ("kafka.connect", False)
    assert "SASL authentication failed" in msg and "KAFKA_SASL_PASSWORD" in msg and "KAFKA_SASL_USERNAME" in msg
    assert took < 3, f"took {took:.1f}s: an authentication failure must not wait out the timeout"
    assert all(not ok for _, ok, _ in checks)
    assert not any(wrong in m or SECRET in m for _, _, m in checks)


@pytest.mark.kafka
def test_check_kafka_wrong_mechanism(kafka_broker: KafkaBroker, topics_env: dict[str, str]) -> None:
    env = {**topics_env, **kafka_broker.settings_env("scram"), "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"}
    _, ok, msg = check_kafka(load(env), timeout=10)[0]
    assert not ok and "KAFKA_SASL_MECHANISM" in msg and "SCRAM-SHA-256" in msg  # the broker lists what it offers


@pytest.mark.kafka
def test_check_kafka_missing_topics(kafka_broker: KafkaBroker, topics_env: dict[str, str]) -> None:
    env = {**topics_env, **kafka_broker.settings_env("plain"), "KAFKA_TOPIC_OUTPUT": "no-such-results",
           "KAFKA_TOPIC_DLQ": "no-such-dlq"}
    checks = {name: (ok, msg) for name, ok, msg in check_kafka(load(env))}
    assert checks["kafka.connect"][0] and checks["kafka.topic.input"][0]
    assert checks["kafka.topic.output"] == (
        False, "topic 'no-such-results' does not exist: create it or fix KAFKA_TOPIC_OUTPUT")
    assert not checks["kafka.topic.dlq"][0] and "KAFKA_TOPIC_DLQ" in checks["kafka.topic.dlq"][1]
    # The check looked, it did not create (a broker with auto-creation on would otherwise make them).
    assert "no-such-results" not in kafka_broker.admin().list_topics(timeout=5).topics


@pytest.mark.kafka
def test_check_kafka_broker_down(kafka_broker: KafkaBroker, topics_env: dict[str, str]) -> None:
    env = {**topics_env, "KAFKA_BOOTSTRAP_SERVER": "127.0.0.1:1"}
    began = time.monotonic()
    _, ok, msg = check_kafka(load(env), timeout=1.5)[0]
    assert time.monotonic() - began < 5
    assert not ok and "KAFKA_BOOTSTRAP_SERVER" in msg


@pytest.mark.kafka
def test_check_kafka_sasl_client_on_plaintext_listener(kafka_broker: KafkaBroker, topics_env: dict[str, str]) -> None:
    env = {**topics_env, **kafka_broker.settings_env("plain"), "KAFKA_BOOTSTRAP_SERVER": kafka_broker.bootstrap}
    _, ok, msg = check_kafka(load(env), timeout=10)[0]
    assert not ok and "KAFKA_SECURITY_PROTOCOL" in msg
