"""The test broker itself: plain round trip, PLAIN and SCRAM authentication, data surviving a restart."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer

from tests.servers.kafka_broker import KafkaBroker

pytestmark = pytest.mark.kafka


def _produce(conf: dict[str, Any], topic: str, values: list[bytes]) -> None:
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer({**conf, "enable.idempotence": True, "acks": "all"})
    for i, value in enumerate(values):
        producer.produce(topic, value, key=str(i).encode(), on_delivery=on_delivery)
    assert producer.flush(15) == 0, "messages left undelivered"
    assert errors == []


def _consume(conf: dict[str, Any], topic: str, count: int, timeout: float = 20.0) -> list[bytes]:
    consumer = Consumer({**conf, "group.id": f"g-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "session.timeout.ms": 6000})
    consumer.subscribe([topic])
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append(msg.value())
    finally:
        consumer.close()
    return got


def _first_error(conf: dict[str, Any], timeout: float) -> tuple[KafkaError | None, float]:
    """Drive a producer until librdkafka reports an error through error_cb; (error, seconds it took)."""
    errors: list[KafkaError] = []
    producer = Producer({**conf, "error_cb": errors.append, "log_level": 0})
    began = time.monotonic()
    producer.produce("never-created", b"x")
    while not errors and time.monotonic() - began < timeout:
        producer.poll(0.1)
    return (errors[0] if errors else None), time.monotonic() - began


def test_plaintext_round_trip(kafka_broker: KafkaBroker, kafka_topic: str) -> None:
    values = [f"m{i}".encode() for i in range(20)]
    _produce(kafka_broker.client_config(), kafka_topic, values)
    assert _consume(kafka_broker.client_config(), kafka_topic, len(values)) == values


@pytest.mark.parametrize("auth", ["plain", "scram"])
def test_sasl_right_credentials(kafka_broker: KafkaBroker, kafka_topic_factory: Callable[..., str],
                                auth: str) -> None:
    topic = kafka_topic_factory(partitions=2)
    conf = kafka_broker.client_config(auth)  # type: ignore[arg-type]
    _produce(conf, topic, [b"a", b"b", b"c"])
    assert sorted(_consume(conf, topic, 3)) == [b"a", b"b", b"c"]


@pytest.mark.parametrize(("auth", "mechanism", "broker_says"), [
    ("plain", None, "Invalid username or password"),
    ("scram", None, "invalid credentials with SASL mechanism SCRAM-SHA-256"),
    # The SCRAM user does not exist for PLAIN: proves the mechanisms are really distinct on the broker.
    ("scram", "PLAIN", "Invalid username or password"),
])
def test_sasl_wrong_credentials_fail_fast(kafka_broker: KafkaBroker, auth: str, mechanism: str | None,
                                          broker_says: str) -> None:
    conf = kafka_broker.client_config(auth)  # type: ignore[arg-type]
    if mechanism:
        conf["sasl.mechanism"] = mechanism
    else:
        conf["sasl.password"] = "wrong-password"
    err, took = _first_error(conf, timeout=10)
    assert err is not None, "no error reported within 10 s"
    assert err.code() == KafkaError._AUTHENTICATION, (err.name(), err.str())
    assert "SASL authentication error" in err.str() and broker_says in err.str()
    assert took < 5, f"authentication failure took {took:.1f}s to surface"


def test_sasl_listener_refuses_unauthenticated_client(kafka_broker: KafkaBroker) -> None:
    # A client speaking PLAINTEXT to the SASL port: the broker drops the connection at the first non-handshake
    # request, which librdkafka reports as a transport failure (it cannot tell this from a dead broker).
    err, took = _first_error({"bootstrap.servers": kafka_broker.sasl_bootstrap, "log_level": 0}, timeout=10)
    assert err is not None
    assert err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT), (err.name(), err.str())
    assert took < 5


def test_restart_keeps_topic_data(private_kafka_broker: KafkaBroker) -> None:
    broker = private_kafka_broker
    broker.create_topic("durable", 2)
    _produce(broker.client_config(), "durable", [b"before-stop-1", b"before-stop-2"])

    port, sasl_port = broker.port, broker.sasl_port
    broker.restart()
    assert (broker.port, broker.sasl_port) == (port, sasl_port)
    _produce(broker.client_config(), "durable", [b"after-restart"])

    broker.kill()  # acks=all was answered, so the log is on disk (page cache survives the process)
    assert not broker.running
    broker.start()
    got = _consume(broker.client_config(), "durable", 3)
    assert sorted(got) == [b"after-restart", b"before-stop-1", b"before-stop-2"]
    topic = broker.admin().list_topics("durable", timeout=10).topics["durable"]
    assert len(topic.partitions) == 2
