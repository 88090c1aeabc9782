"""Benchmark: time from a cancel being produced on KAFKA_TOPIC_CONTROL to the interrupt reaching ComfyUI.

One whole node (supervisord, the five programs, the ComfyUI double at 0.1 s a step) with QUEUE_AHEAD=0. Per
sample: a 30 s task is produced and waited for until it runs, then the cancel is produced by a warm producer;
the double's /fake/stats logs when POST /interrupt for that prompt arrived. Both times are this machine's clock.
Prints p50, p95 and max.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from confluent_kafka import Producer  # noqa: E402

from selfix.comfy import prompt_id_for  # noqa: E402
from tests.servers.kafka_broker import KafkaBroker  # noqa: E402
from tests.servers.node_plugin import Node, task, wait_until  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def interrupts(node: Node) -> list[Any]:
    url = f"http://127.0.0.1:{node.env['COMFY_PORT']}/fake/stats"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return list(json.loads(resp.read())["interrupt_log"])


def started(node: Node, task_id: str) -> bool:
    try:
        return bool(json.loads(node.spool.processing_path(task_id).read_bytes()).get("startedAt"))
    except (FileNotFoundError, ValueError):
        return False


def bench(broker: KafkaBroker, root: Path, n: int) -> None:
    tag = uuid.uuid4().hex[:6]
    topic_in, topic_out, control = f"bc-in-{tag}", f"bc-out-{tag}", f"bc-ctl-{tag}"
    broker.create_topic(topic_in, 2)
    broker.create_topic(topic_out, 1)
    broker.create_topic(control, 3)
    env = {**broker.settings_env(), "KAFKA_TOPIC_INPUT": topic_in, "KAFKA_TOPIC_OUTPUT": topic_out,
           "KAFKA_TOPIC_CONTROL": control, "KAFKA_GROUP_ID": f"g-{tag}", "QUEUE_AHEAD": "0", "LOG_LEVEL": "WARNING"}
    node = Node(root / "node", seconds_per_step=0.1, env=env)
    producer = Producer(broker.client_config(**{"linger.ms": 0}))
    producer.produce(control, b'{"action": "cancel", "taskId": "warm-up", "userId": "u1"}')
    producer.flush(10)
    waits = []
    try:
        node.start()
        for i in range(n):
            t = f"bc-{i:03d}"
            producer.produce(topic_in, json.dumps(task(t, steps=300)).encode(), t.encode())
            producer.flush(10)
            wait_until(lambda t=t: started(node, t), 60, f"{t} running")  # type: ignore[misc]
            sent = time.time()
            producer.produce(control, json.dumps({"action": "cancel", "taskId": t, "userId": "u1"}).encode(),
                             t.encode())
            producer.poll(0)
            pid = prompt_id_for(t, 1)
            hit = wait_until(lambda pid=pid: next((x for x in interrupts(node) if x[1] == pid), None),  # type: ignore[misc]
                             30, f"interrupt of {t}", interval=0.002)
            waits.append(hit[0] - sent)
            node.wait_results({t}, 60)
        producer.flush(5)
    finally:
        node.stop()
    print(f"cancel produced -> interrupt at ComfyUI: n={len(waits)} p50={statistics.median(waits) * 1000:.0f}ms "
          f"p95={pct(waits, 95) * 1000:.0f}ms max={max(waits) * 1000:.0f}ms", flush=True)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    libs = os.environ.get("SELFIX_KAFKA_LIBS") or str(Path.home() / ".cache/selfix/kafka-4.3.1/libs")
    with tempfile.TemporaryDirectory(prefix="selfix-bench-cancel-") as tmp, KafkaBroker(libs, Path(tmp) / "kafka") as b:
        bench(b, Path(tmp), n)


if __name__ == "__main__":
    main()
