"""Whole nodes (real supervisord, all five programs, the ComfyUI double) against the real broker.

Tasks go in on the input topic and results are read back from the output topic, as a client would. The chaos test
is Jepsen's total-queue check: every task produced comes out with a completed result (lost = 0), nothing comes out
that was not put in (unexpected = 0), and re-deliveries are counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.servers.kafka_broker import Auth, KafkaBroker
from tests.servers.kafka_tools import (
    committed,
    end_offsets,
    produce,
    read_topic,
    results_of,
    total_queue,
)
from tests.servers.node_plugin import PROGRAMS, Node, task, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Topics:
    def __init__(self, broker: KafkaBroker, partitions: int, dlq: bool = False, **config: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.broker = broker
        self.partitions = partitions
        self.input, self.output, self.group = f"in-{tag}", f"out-{tag}", f"g-{tag}"
        self.dlq = f"dlq-{tag}" if dlq else None
        broker.create_topic(self.input, partitions, config=config or None)
        broker.create_topic(self.output, 2)
        if self.dlq:
            broker.create_topic(self.dlq)

    def env(self, auth: Auth = "none", **extra: str) -> dict[str, str]:
        env = {**self.broker.settings_env(auth), "KAFKA_TOPIC_INPUT": self.input, "KAFKA_TOPIC_OUTPUT": self.output,
               "KAFKA_GROUP_ID": self.group, "KAFKA_SESSION_TIMEOUT_MS": "3000", **extra}
        if self.dlq:
            env["KAFKA_TOPIC_DLQ"] = self.dlq
        return env

    def committed_at_end(self) -> bool:
        return committed(self.broker, self.group, self.input, self.partitions) == end_offsets(
            self.broker, self.input, self.partitions)


def assert_images(node_store: Path, result: dict[str, Any]) -> None:
    assert result["status"] == "completed", result
    assert result["imagePaths"] and result["imagePath"] == result["imagePaths"][0]
    for key in result["imagePaths"]:
        assert (node_store / key).read_bytes()[:8] == PNG_MAGIC, key


def unfinished(node: Node) -> int:
    counts = node.spool.counts()
    return int(counts["inbox"] + counts["processing"] + counts["outbox"])


def node_logs(node: Node) -> str:
    parts = [node.log_path.read_text(errors="replace")]
    for path in [*Path(node.env["COMFY_LOG_DIR"]).glob("*"), *(node.spool.run.glob("*.log*"))]:
        if path.is_file():
            parts.append(path.read_text(errors="replace"))
    return "\n".join(parts)


def kill_node_hard(node: Node) -> None:
    """Power cut: SIGKILL supervisord and every program (each is its own process group) at once."""
    assert node.proc is not None
    pids = [int(p["pid"]) for p in node.info().values() if p.get("pid")]
    os.kill(node.proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    node.proc.wait(10)


# --------------------------------------------------------------------------------------------- bad messages

def _bad_messages() -> tuple[list[bytes], dict[str, str], list[dict[str, Any]]]:
    """(unaddressable values, {taskId: expected error code}, the addressable messages): 35 malformed in all."""
    good = task("x")
    unaddressable = [
        bytes(range(256)) * 4, b"[1, 2, 3]", b"", b"null", b'"a string"', b"{not json", b"\xff\xfe\xfa",
        b"[" * 100_000, os.urandom(5 << 20),
        json.dumps({"userId": "u1", "workflow": good["workflow"]}).encode(),
        json.dumps({**good, "taskId": 42}).encode(), json.dumps({**good, "taskId": "a/b"}).encode(),
        json.dumps({**good, "taskId": ".."}).encode(), json.dumps({**good, "taskId": "x" * 200}).encode(),
        json.dumps({**good, "taskId": None}).encode(),
    ]
    addressable: dict[str, tuple[dict[str, Any], str]] = {
        "b-no-user": ({"taskId": "b-no-user", "workflow": good["workflow"]}, "invalid_message"),
        "b-bad-user": ({**task("b-bad-user"), "userId": "u/1"}, "invalid_message"),
        "b-no-workflow": ({"taskId": "b-no-workflow", "userId": "u1"}, "invalid_message"),
        "b-both": ({**task("b-both"), "template": "demo"}, "invalid_message"),
        "b-wf-list": ({"taskId": "b-wf-list", "userId": "u1", "workflow": [1]}, "invalid_workflow"),
        "b-no-class": ({"taskId": "b-no-class", "userId": "u1", "workflow": {"1": {"inputs": {}}}},
                       "invalid_workflow"),
        "b-prio-str": ({**task("b-prio-str"), "priority": "high"}, "invalid_message"),
        "b-prio-bool": ({**task("b-prio-bool"), "priority": True}, "invalid_message"),
        "b-prio-float": ({**task("b-prio-float"), "priority": 1.5}, "invalid_message"),
        "b-template": ({"taskId": "b-template", "userId": "u1", "template": "no-such-template"},
                       "unknown_template"),
        "b-template-type": ({"taskId": "b-template-type", "userId": "u1", "template": 5}, "invalid_message"),
        "b-params": ({"taskId": "b-params", "userId": "u1", "template": "demo", "params": [1]}, "invalid_message"),
        "b-lora-type": ({**task("b-lora-type"), "loraModel": 42}, "invalid_message"),
        "b-lora-outside": (task("b-lora-outside", lora="users/u2/models/x.safetensors"), "lora_forbidden"),
        "b-lora-ckpt": (task("b-lora-ckpt", lora="users/u1/models/x.ckpt"), "lora_forbidden"),
        "b-lora-unused": ({**task("b-lora-unused"), "loraModel": "users/u1/models/a.safetensors"}, "lora_not_used"),
        "b-images-type": ({**task("b-images-type"), "images": ["a.png"]}, "invalid_message"),
        "b-image-url": ({**task("b-image-url"), "images": {"a.png": "data:text/html;base64,AAAA"}},
                        "input_forbidden"),
        "b-huge": ({**task("b-huge"), "pad": "x" * (5 << 20)}, "message_too_large"),
        "b-unknown-node": ({"taskId": "b-unknown-node", "userId": "u1",
                            "workflow": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}, "invalid_workflow"),
    }
    return unaddressable, {t: code for t, (_, code) in addressable.items()}, [m for m, _ in addressable.values()]


def test_100_tasks_exactly_once_and_35_bad_messages(kafka_broker: KafkaBroker, make_node: Callable[..., Node]) -> None:
    topics = Topics(kafka_broker, 4, dlq=True, **{"max.message.bytes": str(8 << 20)})
    node = make_node("n1", seconds_per_step=0.005, env=topics.env()).start()
    consumer_pid = node.pid("consumer")
    good = [task(f"ok-{i:03d}", steps=1, priority=i % 3) for i in range(100)]
    unaddressable, codes, addressable = _bad_messages()
    twice = task("twice", steps=1)
    big = {"message.max.bytes": 8 << 20}
    produce(kafka_broker, topics.input, good[:50] + [twice], **big)
    produce(kafka_broker, topics.input, unaddressable, **big)
    produce(kafka_broker, topics.input, [*addressable, twice, *good[50:]], **big)
    expected = {m["taskId"] for m in good} | set(codes) | {"twice"}

    node.wait_results(expected, timeout=120)
    records = read_topic(kafka_broker, topics.output, min_count=len(expected))
    results = results_of(records)
    ids = [r["taskId"] for r in results]
    assert sorted(ids) == sorted(expected), "each taskId exactly once on a clean run"
    by_id = {r["taskId"]: r for r in results}
    for msg in [*good, twice]:
        assert_images(node.store, by_id[msg["taskId"]])
    for task_id, code in codes.items():
        assert by_id[task_id]["status"] == "failed" and by_id[task_id]["error"]["code"] == code, by_id[task_id]
    assert len(node.executions()) == len(set(node.executions())), "a prompt ran twice"

    dead = read_topic(kafka_broker, topics.dlq, min_count=len(unaddressable), idle=0.5)
    assert len(dead) == len(unaddressable)
    assert all(r.headers.get("selfix-error") and r.headers["selfix-source-topic"] == topics.input.encode()
               for r in dead)
    assert sum(1 for r in dead if "selfix-truncated-from" in r.headers) == 1  # the 5 MB garbage
    wait_until(topics.committed_at_end, 15, "committed offsets at the end of every partition")
    assert node.pid("consumer") == consumer_pid, "the consumer stopped or restarted"
    assert unfinished(node) == 0


# --------------------------------------------------------------------------------------------- chaos

@pytest.mark.chaos
def test_kill_minus_9_loop_and_broker_restart_lose_nothing(private_kafka_broker: KafkaBroker,
                                                          make_node: Callable[..., Node]) -> None:
    broker = private_kafka_broker
    topics = Topics(broker, 4)
    node = make_node("chaos", seconds_per_step=0.06, env=topics.env(
        MAX_ATTEMPTS="20", KAFKA_MAX_INFLIGHT="16", LOG_LEVEL="INFO",
        # Once, the uploader dies between Kafka's acknowledgement and done/: a known duplicate the checker must see.
        CRASHPOINTS="uploader.before_done")).start()
    ids = [f"c-{i:03d}" for i in range(200)]
    rng = random.Random(int(os.environ.get("SELFIX_CHAOS_SEED", "0")) or None)
    began = time.monotonic()
    produce(broker, topics.input, [task(t, steps=3) for t in ids[:100]])
    kills: dict[str, int] = {}
    broker_restarted = False
    while time.monotonic() - began < 75 and len(node.results()) < len(ids):
        time.sleep(rng.uniform(1.0, 3.0))
        if not broker_restarted and time.monotonic() - began > 12:
            broker.restart()  # controlled stop + start on the same ports and data
            broker_restarted = True
            produce(broker, topics.input, [task(t, steps=3) for t in ids[100:]])
            continue
        running = [p for p, i in node.info().items() if i.get("statename") == "RUNNING" and p != "watchdog"]
        if running:
            victim = rng.choice(running)
            node.kill(victim)
            kills[victim] = kills.get(victim, 0) + 1
    chaos_s = time.monotonic() - began
    assert broker_restarted
    node.wait_results(set(ids), timeout=90)
    wait_until(topics.committed_at_end, 30, "committed offsets at the end of every partition")
    report = total_queue(ids, read_topic(broker, topics.output, min_count=len(ids), idle=2.0))
    executions = node.executions()
    print(f"\nchaos: {chaos_s:.0f}s of kills {kills}, broker restarted once; total-queue: enqueued "
          f"{report['enqueued']}, ok {report['ok']}, lost {len(report['lost'])}, unexpected "
          f"{len(report['unexpected'])}, duplicated {len(report['duplicated'])} taskIds "
          f"({report['result_messages'] - report['ok']} extra result messages), prompts run "
          f"{len(executions)} for {len(set(executions))} distinct")
    assert sum(kills.values()) >= 10, kills
    assert report["lost"] == [] and report["unexpected"] == [] and report["failed"] == [], report
    assert report["duplicated"], "the crash point's re-publication should show as a duplicate"
    assert unfinished(node) == 0


# --------------------------------------------------------------------------------------------- fleet

def test_node_loss_with_its_spool_another_node_delivers_everything(kafka_broker: KafkaBroker,
                                                                  make_node: Callable[..., Node]) -> None:
    topics = Topics(kafka_broker, 2)
    env = topics.env("plain")
    n1 = make_node("n1", seconds_per_step=0.1, env=env).start()
    ids = [f"loss-{i:02d}" for i in range(14)]
    produce(kafka_broker, topics.input, [task(t, steps=3) for t in ids])
    wait_until(lambda: len(n1.results()) >= 2 and unfinished(n1) >= 4, 60,
               lambda: f"node 1 busy with accepted tasks: {n1.spool.counts()}")
    kill_node_hard(n1)
    held, published = unfinished(n1), set(n1.results())
    shutil.rmtree(n1.env["SPOOL_DIR"])
    n2 = make_node("n2", seconds_per_step=0.01, env=env).start()
    n2.wait_results(set(ids) - published, timeout=60)
    report = total_queue(ids, read_topic(kafka_broker, topics.output, min_count=len(ids)))
    assert report["lost"] == [] and report["unexpected"] == [], report
    wait_until(topics.committed_at_end, 15, "committed offsets at the end of every partition")
    assert held >= 4
    assert n2.env["KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT" and n2.env["KAFKA_SASL_MECHANISM"] == "PLAIN"
    for node in (n1, n2):
        assert KafkaBroker.PLAIN_PASSWORD not in node_logs(node)


def test_rebalance_between_two_nodes_mid_run_loses_nothing(kafka_broker: KafkaBroker,
                                                          make_node: Callable[..., Node]) -> None:
    topics = Topics(kafka_broker, 4)
    env = topics.env("scram")
    # Jobs slow enough (3 x 0.15 s) that node a cannot finish all 60 before node b has started and joined.
    a = make_node("a", seconds_per_step=0.15, env=env).start()
    ids = [f"rb-{i:02d}" for i in range(60)]
    produce(kafka_broker, topics.input, [task(t, steps=3) for t in ids])
    wait_until(lambda: len(a.results()) >= 8, 60, "node a under way")
    b = make_node("b", seconds_per_step=0.15, env=env).start()  # joins: a hands over half the partitions
    wait_until(lambda: len(b.results()) >= 5, 60, lambda: f"node b working; a {a.spool.counts()}")
    b.stop()  # leaves: its partitions and not-started jobs go back to a
    wait_until(lambda: set(ids) <= set(a.results()) | set(b.results()), 90,
               lambda: f"all results; missing {sorted(set(ids) - set(a.results()) - set(b.results()))[:5]}")
    report = total_queue(ids, read_topic(kafka_broker, topics.output, min_count=len(ids)))
    assert report["lost"] == [] and report["unexpected"] == [], report
    wait_until(topics.committed_at_end, 15, "committed offsets at the end of every partition")
    assert unfinished(a) == 0
    for node in (a, b):
        logs = node_logs(node)
        assert KafkaBroker.SCRAM_PASSWORD not in logs
    assert "withdrawn" in a.log_path.read_text() + b.log_path.read_text()


def test_wrong_sasl_password_stops_the_consumer_visibly(kafka_broker: KafkaBroker,
                                                         make_node: Callable[..., Node]) -> None:
    topics = Topics(kafka_broker, 1)
    wrong = f"not-the-password-{uuid.uuid4().hex[:6]}"
    node = make_node("wrong", env=topics.env("scram", KAFKA_SASL_PASSWORD=wrong))
    node.start(wait_programs=tuple(p for p in PROGRAMS if p != "consumer"))

    # The consumer gives up within a second, before supervisord's startsecs: after startretries it is FATAL.
    wait_until(lambda: "exited: consumer (exit status 69" in node.log_path.read_text(), 30,
               lambda: f"consumer exit 69 in supervisord's log: {node.info().get('consumer')}")
    assert node.info()["consumer"]["statename"] in ("BACKOFF", "STARTING", "FATAL")
    logs = node_logs(node)
    assert "SASL authentication failed" in logs and "KAFKA_SASL_PASSWORD" in logs
    assert "consumer kafka: Kafka unreachable" not in logs  # the real cause is not drowned by a wrong one
    assert wrong not in logs

    # A result that cannot be published stops the uploader just as visibly; the result waits in outbox/.
    job = node.root / "direct.json"
    job.write_text(json.dumps(task("direct-1")))
    subprocess.run([sys.executable, "-m", "selfix", "submit", str(job)], env=node.env, check=True, timeout=60)
    wait_until(lambda: "exited: uploader (exit status 69" in node.log_path.read_text(), 60,
               lambda: f"uploader exit 69 in supervisord's log: {node.info().get('uploader')}")
    assert node.spool.outbox_tasks() == ["direct-1"] and node.results() == {}
    assert wrong not in node_logs(node)
