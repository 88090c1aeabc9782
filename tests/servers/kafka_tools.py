"""Helpers for tests that drive selfix against the real broker: produce, read a topic whole, committed offsets,
the consumer loop in a thread, and simulated publication (what the runner + uploader would do)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from selfix.clock import Clock
from selfix.process import StopFlags
from selfix.settings import Settings, load
from selfix.spool import Spool
from selfix.templates import Catalog
from tests.servers.kafka_broker import Auth, KafkaBroker
from tests.servers.node_plugin import wait_until


def produce(broker: KafkaBroker, topic: str, messages: Iterable[dict[str, Any] | bytes], *,
            partition: int | None = None, key: str | None = None, auth: Auth = "none",
            **conf: Any) -> list[tuple[int, int]]:
    """Produce and wait for every acknowledgement; (partition, offset) of each message in order. The key is the
    message's taskId when it has one (so a task goes to one partition), unless `key` or `partition` says else."""
    out: list[tuple[int, int] | None] = []
    errors: list[KafkaError] = []
    producer = Producer(broker.client_config(auth, **{"linger.ms": 2, "enable.idempotence": True, **conf}))

    def settle(index: int) -> Any:
        def cb(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                errors.append(err)
            else:
                out[index] = (msg.partition(), msg.offset())
        return cb

    for i, msg in enumerate(messages):
        value = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
        k = key if key is not None else (msg.get("taskId") if isinstance(msg, dict) else None)
        out.append(None)
        kwargs: dict[str, Any] = {"on_delivery": settle(i)}
        if partition is not None:
            kwargs["partition"] = partition
        producer.produce(topic, value, str(k).encode() if k is not None else None, **kwargs)
        producer.poll(0)
    left = producer.flush(30)
    assert left == 0 and not errors, f"produce: {left} undelivered, errors {errors}"
    return [o for o in out if o is not None]


@dataclass
class Record:
    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: dict[str, bytes]
    timestamp: int

    def json(self) -> Any:
        return json.loads(self.value)


def read_topic(broker: KafkaBroker, topic: str, *, min_count: int = 0, timeout: float = 30.0,
               idle: float = 1.0) -> list[Record]:
    """Everything on the topic: waits until at least `min_count` records arrived, then until `idle` s pass
    without a new one (so a duplicate that would follow is seen too)."""
    consumer = Consumer(broker.client_config(**{"group.id": f"reader-{uuid.uuid4().hex[:8]}",
                                                "auto.offset.reset": "earliest", "enable.auto.commit": False}))
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    # assign(), not subscribe(): no group join, so reading starts at once.
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    got: list[Record] = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            now = time.monotonic()
            if msg is None:
                if len(got) >= min_count and now - last_new >= idle:
                    break
                continue
            if msg.error() is not None:
                continue
            last_new = now
            key = msg.key()
            got.append(Record(msg.partition() or 0, msg.offset() or 0, key.decode() if key else None,
                              msg.value() or b"", {k: v for k, v in (msg.headers() or [])},
                              msg.timestamp()[1]))
    finally:
        consumer.close()
    assert len(got) >= min_count, f"{topic}: {len(got)} record(s) within {timeout}s, expected >= {min_count}"
    return got


def results_of(records: list[Record]) -> list[dict[str, Any]]:
    """Result messages only (status events carry the selfix-event header)."""
    return [r.json() for r in records if "selfix-event" not in r.headers]


def committed(broker: KafkaBroker, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer(broker.client_config(**{"group.id": group, "enable.auto.commit": False}))
    try:
        parts = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {p.partition: p.offset for p in parts}
    finally:
        consumer.close()


def end_offsets(broker: KafkaBroker, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer(broker.client_config(**{"group.id": f"probe-{uuid.uuid4().hex[:8]}"}))
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(partitions)}
    finally:
        consumer.close()


wait_for = wait_until  # one polling helper for every server test


def finish(spool: Spool, task_id: str) -> None:
    """What runner + uploader do for a job, minus ComfyUI: the result is 'published' (done/ written)."""
    for entry in spool.inbox_entries():
        if entry.task_id == task_id:
            job = json.loads(spool.read_inbox(entry) or b"{}")
            spool.finish({"taskId": task_id, "userId": job.get("userId"), "status": "completed", "imagePaths": []})
            spool.withdraw(entry)
            return
    if spool.outbox_dir(task_id).exists():
        spool.finish(spool.read_result(task_id))
        return
    raise AssertionError(f"{task_id} neither in inbox/ nor in outbox/")


def inbox_ids(spool: Spool) -> list[str]:
    return [e.task_id for e in spool.inbox_entries()]


def sources(spool: Spool) -> dict[str, dict[str, Any]]:
    out = {}
    for entry in spool.inbox_entries():
        raw = spool.read_inbox(entry)
        if raw:
            out[entry.task_id] = json.loads(raw)["source"]
    return out


class IntakeThread:
    """selfix.kafka.intake.KafkaIntake in a thread of the test process (no signal handlers), on its own spool."""

    def __init__(self, root: Path, env: dict[str, str], overrides: dict[str, Any] | None = None,
                 clock: Clock | None = None) -> None:
        self.root = root
        self.env = {"SPOOL_DIR": str(root / "spool"), "KAFKA_SESSION_TIMEOUT_MS": "3000", **env}
        self.settings: Settings = load(self.env)
        self.spool = Spool(self.settings.spool_dir).ensure()
        self.flags = StopFlags()
        self.overrides = overrides
        self.clock = clock
        self.code: int | None = None
        self.error: BaseException | None = None
        self.intake: Any = None
        self.thread: threading.Thread | None = None

    def start(self) -> IntakeThread:
        from selfix.kafka.intake import KafkaIntake

        self.intake = KafkaIntake(self.settings, self.spool, Catalog.load(None), self.flags, self.overrides,
                                  self.clock)

        def run() -> None:
            try:
                self.code = self.intake.run()
            except BaseException as exc:  # noqa: BLE001 - surfaced by stop()/alive()
                self.error = exc

        self.thread = threading.Thread(target=run, name="intake", daemon=True)
        self.thread.start()
        return self

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def assigned(self) -> set[int]:
        return {p.partition for p in self.intake.consumer.assignment()} if self.intake else set()

    def stop(self, timeout: float = 30.0) -> int | None:
        self.flags.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout)
            assert not self.thread.is_alive(), "consumer loop did not stop"
        if self.error is not None:
            raise self.error
        return self.code


def total_queue(enqueued: Iterable[str], records: list[Record]) -> dict[str, Any]:
    """Jepsen's total-queue checker over the output topic: every enqueued taskId must come out with a completed
    result (lost = those that did not), nothing may come out that was not put in (unexpected), and re-deliveries
    are counted (duplicated: taskIds with more than one result message; at-least-once allows them)."""
    wanted = set(enqueued)
    results = results_of(records)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["taskId"]] = counts.get(r["taskId"], 0) + 1
    completed = {r["taskId"] for r in results if r.get("status") == "completed"}
    return {
        "enqueued": len(wanted), "result_messages": len(results), "ok": len(wanted & completed),
        "lost": sorted(wanted - completed), "unexpected": sorted(set(counts) - wanted),
        "duplicated": {t: n for t, n in sorted(counts.items()) if n > 1},
        "failed": sorted({r["taskId"] for r in results if r.get("status") != "completed"}),
        "events": len(records) - len(results),
    }
