"""Benchmark: Kafka intake throughput and the latency selfix adds per task. Prints one line per measurement.

intake:  N tasks are produced first, then `selfix consumer` starts; a sink takes every job file from inbox/ and
         writes its done/ at once (runner + uploader with zero cost), so the consumer pauses only when the sink
         lags KAFKA_MAX_INFLIGHT behind. rate = N / (last job taken - first job taken). Each job costs
         validation, the de-duplication look-up, an fsync'd file + rename: that is what is measured, not
         librdkafka's fetch rate.
latency: a whole node (supervisord, consumer, runner, uploader, the ComfyUI double with zero generation time).
         Per task: result message timestamp - input message timestamp (both CreateTime on this machine's clock),
         minus the generationTime the result reports (~0). `sequential` = one task in flight at a time;
         `burst` = all produced at once (adds queueing behind the other tasks).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition  # noqa: E402

from tests.servers.kafka_broker import KafkaBroker  # noqa: E402
from tests.servers.kafka_tools import produce  # noqa: E402
from tests.servers.node_plugin import Node, task  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def intake(broker: KafkaBroker, root: Path, n: int, inflight: int) -> None:
    """The consumer process alone; a sink thread plays runner + uploader (takes each job, writes done/ at once),
    so the inbox stays as small as on a working node and offsets get committed as they would there."""
    from selfix.spool import Spool

    topic = f"bench-in-{uuid.uuid4().hex[:6]}"
    broker.create_topic(topic, 4)
    produce(broker, topic, [task(f"i-{i:05d}", steps=1) for i in range(n)])
    spool = Spool(root / f"intake-spool-{inflight}").ensure()
    env = {**os.environ, **broker.settings_env(), "KAFKA_TOPIC_INPUT": topic, "KAFKA_GROUP_ID": topic,
           "SPOOL_DIR": str(spool.root), "KAFKA_MAX_INFLIGHT": str(inflight), "LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "selfix", "consumer"], env=env, cwd=ROOT)
    taken: list[float] = []
    deadline = time.monotonic() + 300
    try:
        while len(taken) < n and time.monotonic() < deadline:
            entries = spool.inbox_entries()
            if not entries:
                time.sleep(0.001)
                continue
            for entry in entries:
                spool.finish({"taskId": entry.task_id, "status": "completed"})
                spool.withdraw(entry)
                taken.append(time.monotonic())
    finally:
        proc.terminate()
        proc.wait(30)
    if len(taken) < n:
        raise SystemExit(f"intake: only {len(taken)} of {n} jobs arrived")
    span = taken[-1] - taken[0]
    print(f"intake      tasks={n} KAFKA_MAX_INFLIGHT={inflight} span={span:.2f}s rate={n / span:.0f} tasks/s "
          f"({span / n * 1000:.2f} ms/task: validate, de-duplicate, fsync'd job file + rename)", flush=True)


class OutputReader:
    def __init__(self, broker: KafkaBroker, topic: str) -> None:
        self.consumer = Consumer(broker.client_config(**{"group.id": f"r-{uuid.uuid4().hex[:6]}",
                                                         "enable.auto.commit": False}))
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in parts])
        self.consumer.poll(0.5)

    def results(self, count: int, timeout: float) -> dict[str, tuple[int, dict]]:
        out: dict[str, tuple[int, dict]] = {}
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            msg = self.consumer.poll(0.05)
            if msg is None or msg.error() is not None:
                continue
            if any(k == "selfix-event" for k, _ in (msg.headers() or [])):
                continue
            body = json.loads(msg.value())
            out[body["taskId"]] = (msg.timestamp()[1], body)
        return out


def latency(broker: KafkaBroker, root: Path, m: int) -> None:
    tag = uuid.uuid4().hex[:6]
    topic_in, topic_out = f"bench-lin-{tag}", f"bench-lout-{tag}"
    broker.create_topic(topic_in, 4)
    broker.create_topic(topic_out, 1)
    env = {**broker.settings_env(), "KAFKA_TOPIC_INPUT": topic_in, "KAFKA_TOPIC_OUTPUT": topic_out,
           "KAFKA_GROUP_ID": f"g-{tag}", "LOG_LEVEL": "WARNING"}
    node = Node(root / "node", seconds_per_step=0.0, env=env)
    producer = Producer(broker.client_config(**{"linger.ms": 0}))
    try:
        node.start()
        reader = OutputReader(broker, topic_out)
        sent: dict[str, int] = {}

        def send(task_id: str) -> None:
            def on_delivery(err: object, msg: object) -> None:
                if err is None:
                    sent[task_id] = msg.timestamp()[1]  # type: ignore[attr-defined]
            producer.produce(topic_in, json.dumps(task(task_id, steps=1)).encode(), task_id.encode(),
                             on_delivery=on_delivery)
            producer.flush(10)

        send("warmup")
        reader.results(1, 60)
        for mode, burst in (("sequential", False), ("burst", True)):
            ids = [f"{mode}-{i:03d}" for i in range(m)]
            got: dict[str, tuple[int, dict]] = {}
            began = time.monotonic()
            if burst:
                for task_id in ids:
                    send(task_id)
                got = reader.results(m, 120)
            else:
                for task_id in ids:
                    send(task_id)
                    got.update(reader.results(1, 60))
            wall = time.monotonic() - began
            added = [(got[t][0] - sent[t]) / 1000 - got[t][1]["metadata"]["generationTime"] for t in ids if t in got]
            gen = statistics.mean(got[t][1]["metadata"]["generationTime"] for t in ids if t in got)
            print(f"latency     mode={mode} tasks={len(added)}/{m} generation={gen * 1000:.1f}ms "
                  f"added p50={pct(added, 50) * 1000:.0f}ms p95={pct(added, 95) * 1000:.0f}ms "
                  f"max={max(added) * 1000:.0f}ms throughput={len(added) / wall:.1f} tasks/s", flush=True)
            parts = {k: [] for k in ("consumer", "to-start", "runner-rest", "uploader")}
            for t in ids:
                if t not in got or "startedAt" not in got[t][1]["metadata"]:
                    continue
                meta, out_ts, in_ts = got[t][1]["metadata"], got[t][0] / 1000, sent[t] / 1000
                enqueued = meta["startedAt"] - meta["queueTime"]
                parts["consumer"].append(enqueued - in_ts)
                parts["to-start"].append(meta["queueTime"])
                parts["runner-rest"].append(meta["totalTime"] - meta["queueTime"] - meta["generationTime"])
                parts["uploader"].append(out_ts - enqueued - meta["totalTime"])
            print("            p50 by stage: " + ", ".join(
                f"{k} {pct(v, 50) * 1000:.0f}ms" for k, v in parts.items() if v), flush=True)
    finally:
        node.stop()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    m = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    libs = os.environ.get("SELFIX_KAFKA_LIBS") or str(Path.home() / ".cache/selfix/kafka-4.3.1/libs")
    with tempfile.TemporaryDirectory(prefix="selfix-bench-kafka-") as tmp, KafkaBroker(libs, Path(tmp) / "kafka") as b:
        intake(b, Path(tmp), n, 8)
        intake(b, Path(tmp), n, 64)
        latency(b, Path(tmp), m)


if __name__ == "__main__":
    main()
