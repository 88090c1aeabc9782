"""Results out: ResultPublisher confirms delivery before returning, the uploader keeps results in outbox/ while Kafka
is unreachable and sends each exactly once when it is back; status events are told apart from results."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from selfix.job import Job, Progress
from selfix.kafka import EVENT_HEADER, PublishError, ResultPublisher
from selfix.process import StopFlags
from selfix.settings import load
from selfix.spool import Spool
from selfix.storage import open_store
from selfix.uploader import Uploader
from tests.servers.kafka_broker import KafkaBroker
from tests.servers.kafka_tools import read_topic, results_of, wait_for

pytestmark = pytest.mark.kafka


def settings_for(broker: KafkaBroker, root: Path, topic: str, **extra: str) -> Any:
    return load({**broker.settings_env(), "KAFKA_TOPIC_OUTPUT": topic, "SPOOL_DIR": str(root / "spool"),
                 "STORE_DIR": str(root / "store"), "COMFY_OUTPUT_DIR": str(root / "out"),
                 "COMFY_INPUT_DIR": str(root / "in"), **extra})


def failed(task_id: str) -> dict[str, Any]:
    return {"taskId": task_id, "userId": "u1", "status": "failed",
            "error": {"code": "invalid_workflow", "message": "x", "retriable": False}, "metadata": {"attempts": 1}}


def test_publish_returns_once_acknowledged(kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path) -> None:
    publisher = ResultPublisher(settings_for(kafka_broker, tmp_path, kafka_topic))
    try:
        publisher.publish(failed("pub-1"))
        publisher.publish(failed("pub-2"))
    finally:
        publisher.close()
    records = read_topic(kafka_broker, kafka_topic, min_count=2, idle=0.3)
    assert [(r.key, r.json()["taskId"]) for r in records] == [("pub-1", "pub-1"), ("pub-2", "pub-2")]
    assert all(EVENT_HEADER not in r.headers for r in records)


def test_missing_topic_is_an_error_naming_the_setting(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    # librdkafka waits topic.metadata.propagation.max.ms (30 s) for a topic to appear before it gives up.
    publisher = ResultPublisher(settings_for(kafka_broker, tmp_path, f"nope-{uuid.uuid4().hex[:6]}"),
                                wait_s=5.0, overrides={"topic.metadata.propagation.max.ms": 500})
    try:
        with pytest.raises(PublishError, match="topic does not exist.*KAFKA_TOPIC_OUTPUT"):
            publisher.publish(failed("x"))
    finally:
        publisher.close()


def test_results_wait_in_outbox_while_kafka_is_down(private_kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    broker = private_kafka_broker
    topic = f"res-{uuid.uuid4().hex[:6]}"
    broker.create_topic(topic)
    settings = settings_for(broker, tmp_path, topic)
    spool = Spool(settings.spool_dir).ensure()
    flags = StopFlags()
    publisher = ResultPublisher(settings, spool, wait_s=1.0)
    uploader = Uploader(settings, spool, open_store(settings), publisher, flags)
    thread = threading.Thread(target=uploader.run, daemon=True)
    thread.start()
    try:
        spool.write_result(failed("before"))
        wait_for(lambda: spool.read_done("before"), 20, "the first result published")
        broker.stop()
        for i in range(3):
            spool.write_result(failed(f"down-{i}"))
        time.sleep(4.0)  # several publish attempts meet a dead broker
        assert sorted(spool.outbox_tasks()) == ["down-0", "down-1", "down-2"]
        assert not any(spool.read_done(f"down-{i}") for i in range(3))
        broker.start()
        wait_for(lambda: all(spool.read_done(f"down-{i}") for i in range(3)), 60,
                 lambda: f"results after Kafka came back; outbox {spool.outbox_tasks()}")
    finally:
        flags.stopping.set()
        flags.abort.set()
        thread.join(30)
    ids = [r["taskId"] for r in results_of(read_topic(broker, topic, min_count=4))]
    assert sorted(ids) == ["before", "down-0", "down-1", "down-2"], ids  # each exactly once


def test_started_and_progress_events_from_processing(kafka_broker: KafkaBroker, kafka_topic: str,
                                                     tmp_path: Path) -> None:
    settings = settings_for(kafka_broker, tmp_path, kafka_topic, KAFKA_STATUS_EVENTS="true")
    spool = Spool(settings.spool_dir).ensure()
    publisher = ResultPublisher(settings, spool)
    job = Job("ev", "u1", attempt=1, workflow={}, enqueued_at=time.time())
    try:
        spool.write_processing(job)
        publisher.idle()
        job = job.started(time.time())
        began = time.monotonic()
        for step in range(1, 11):  # 10 progress updates within ~1.3 s
            job = job.with_progress(Progress(step, 10, "3"))
            spool.write_processing(job)
            for _ in range(3):
                publisher.idle()
                time.sleep(0.045)
        while time.monotonic() - began < 1.6:
            publisher.idle()
            time.sleep(0.05)
        spool.drop_processing("ev")
        publisher.publish({**failed("ev"), "status": "completed"})
    finally:
        publisher.close()
    records = read_topic(kafka_broker, kafka_topic, min_count=3, idle=0.3)
    kinds = [r.headers.get(EVENT_HEADER, b"result").decode() for r in records]
    assert kinds[0] == "started" and kinds[-1] == "result", kinds
    progress = [r.json() for r in records if r.headers.get(EVENT_HEADER) == b"progress"]
    assert 1 <= len(progress) <= 3, kinds  # at most one a second
    assert all(p["event"] == "progress" and p["progress"]["max"] == 10 for p in progress)
    assert all(r.key == "ev" for r in records)
    assert "event" not in records[-1].json()
