"""Task control (selfix/control.py): cancel in every state, expiry, per-task deadlines, the control topic.

Whole nodes (real supervisord, the ComfyUI double); the Kafka tests use the real broker. Which prompts ComfyUI
executed comes from the double's execution log, which interrupts reached it from its /fake/stats.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from selfix.comfy import prompt_id_for
from selfix.control import ControlRejected, deadline_label, deadline_s, expiry_error, parse_control
from selfix.job import Job
from selfix.messages import TaskError, job_control_fields, parse_control_fields
from tests.servers.kafka_broker import KafkaBroker
from tests.servers.kafka_tools import committed, end_offsets, produce, read_topic, results_of
from tests.servers.node_plugin import Node, task, wait_until
from tests.test_runner import Bench, until

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- pure parts

@pytest.mark.parametrize(("raw", "why"), [
    (b"{not json", "not JSON"), (b"[1]", "JSON object"), (b'{"action": "cancel", "userId": "u1"}', "taskId"),
    (b'{"action": "pause", "taskId": "t", "userId": "u1"}', "unknown action"),
    (b'{"action": "cancel", "taskId": "t", "userId": "u/1"}', "userId"),
    (b'{"action": "cancel", "taskId": "t"}', "userId"), (b"x" * (1 << 20), "bytes"), (b"\xff\xfe", "not JSON"),
])
def test_bad_control_messages_are_rejected_with_the_reason(raw: bytes, why: str) -> None:
    with pytest.raises(ControlRejected, match=why):
        parse_control(raw)


def test_a_cancel_parses() -> None:
    req = parse_control(b'{"action": "cancel", "taskId": "t-1", "userId": "u1"}')
    assert (req.action, req.task_id, req.user_id) == ("cancel", "t-1", "u1")


def test_timeout_above_the_cap_is_refused_naming_it() -> None:
    with pytest.raises(TaskError, match="JOB_TIMEOUT_S=600") as info:
        parse_control_fields({"timeoutS": 601}, 600)
    assert info.value.code == "invalid_message"
    for bad in ({"timeoutS": 0}, {"timeoutS": "5"}, {"ttlS": True}, {"expiresAt": -1}):
        with pytest.raises(TaskError, match="positive number"):
            parse_control_fields(bad, 600)
    assert parse_control_fields({"timeoutS": 600, "ttlS": 5}, 600) == {"timeoutS": 600.0, "ttlS": 5.0}


def test_expiry_fields_resolve_to_one_moment_and_deadlines_are_capped() -> None:
    assert job_control_fields({"ttlS": 5}, 1000.0) == {"expiresAt": 1005.0}
    assert job_control_fields({"ttlS": 5, "expiresAt": 1001}, 1000.0) == {"expiresAt": 1001.0}
    assert job_control_fields({}, 1000.0) == {}
    assert expiry_error(Job("t", expires_at=10.0), 9.0) is None
    error = expiry_error(Job("t", expires_at=10.0), 12.0)
    assert error is not None and error.code == "expired"
    assert deadline_s(Job("t", timeout_s=3), 600) == 3 and deadline_s(Job("t"), 600) == 600
    assert deadline_label(Job("t", timeout_s=3), 600) == "timeoutS=3s"
    assert deadline_label(Job("t"), 60) == "JOB_TIMEOUT_S=60s"


def test_saved_comfyui_seconds_and_codes_are_counted() -> None:
    from selfix.metrics import NodeView, make_registry, render
    from selfix.stats import JobStats

    jobs = JobStats()
    jobs.count_result({"status": "completed", "metadata": {"generationTime": 10.0}})
    jobs.count_result({"status": "failed", "error": {"code": "cancelled"}, "metadata": {"ranS": 3.0}})
    jobs.count_result({"status": "failed", "error": {"code": "expired"}, "metadata": {"ranS": 0}})
    assert jobs.saved_s == pytest.approx(17.0) and jobs.ran == 2
    assert JobStats.load(jobs.dump()).saved_s == pytest.approx(17.0)
    text = render(make_registry(lambda: NodeView(jobs=jobs))).decode()
    assert 'selfix_jobs_total{code="cancelled",status="failed"} 1.0' in text
    assert "selfix_control_saved_seconds_total 17.0" in text


def test_tombstones_first_request_stands_marked_and_pruned(tmp_path: Path) -> None:
    import os

    from selfix.cli import _cancel_requests
    from selfix.control import refusal, request_cancel
    from selfix.spool import Spool

    spool = Spool(tmp_path / "spool").ensure()
    assert request_cancel(spool, "t-1", "u1", "kafka") and not request_cancel(spool, "t-1", "u2", "cli")
    assert request_cancel(spool, "t-2", "u9", "kafka")
    assert spool.read_cancel("t-1")["userId"] == "u1" and spool.cancel_ids() == ["t-1", "t-2"]
    assert refusal(spool, Job("t-2", "u1", enqueued_at=0)) is None  # another user's cancel: refused, the task runs
    error = refusal(spool, Job("t-1", "u1", enqueued_at=0))
    assert error is not None and error.code == "cancelled"
    assert _cancel_requests(spool) == {"pending": 0, "handled": 2}
    assert refusal(spool, Job("t-1", "u1", enqueued_at=0)) is None  # applied once
    old = time.time() - 7200
    os.utime(spool.cancel_path("t-1"), (old, old))
    assert spool.prune_cancels(3600) == 1 and spool.cancel_ids() == ["t-2"]


# --------------------------------------------------------------------------------------------- helpers

def comfy(node: Node, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.env['COMFY_PORT']}{path}", timeout=5) as resp:
        return json.loads(resp.read())


def processing(node: Node, task_id: str) -> dict[str, Any]:
    path = node.spool.processing_path(task_id)
    try:
        return dict(json.loads(path.read_bytes()))
    except (FileNotFoundError, ValueError):
        return {}


def code(result: dict[str, Any]) -> str:
    return "completed" if result["status"] == "completed" else str(result["error"]["code"])


def cancel_cli(node: Node, *task_ids: str, user: str | None = None) -> str:
    args = [sys.executable, "-m", "selfix", "cancel", *task_ids, *(["--user-id", user] if user else [])]
    out = subprocess.run(args, env=node.env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def png_data_url() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def executed(node: Node, task_id: str) -> bool:
    return prompt_id_for(task_id, 1) in node.executions()


# --------------------------------------------------------------------------------------------- offline (spool)

@pytest.mark.e2e
def test_cancel_in_each_state_offline(make_node: Callable[..., Node]) -> None:
    node = make_node(seconds_per_step=0.1, env={"QUEUE_AHEAD": "1"}).start()
    # Cancelled before it exists: remembered, so the task is cancelled when it arrives.
    assert "remembered" in cancel_cli(node, "early")
    node.drop("early.json", task("early"))
    node.drop("done-1.json", task("done-1"))
    node.wait_results({"early", "done-1"}, 60)
    node.drop("run-1.json", task("run-1", steps=200, images={"pose.png": png_data_url()}))  # 20 s of work
    wait_until(lambda: processing(node, "run-1").get("startedAt"), 30, "run-1 running")
    inputs = Path(node.env["COMFY_INPUT_DIR"]) / "selfix"
    assert list(inputs.glob("run-1*")), "run-1's input image in ComfyUI's input folder"
    node.drop("queued-1.json", task("queued-1", steps=2))  # queued in ComfyUI behind run-1 (QUEUE_AHEAD=1)
    wait_until(lambda: processing(node, "queued-1").get("state") == "submitted", 30, "queued-1 in ComfyUI")
    node.drop("inbox-1.json", task("inbox-1"))
    node.drop("other-user.json", task("other-user"))
    wait_until(lambda: node.spool.state_of("other-user") == "inbox", 30, "other-user in inbox/")
    cancel_cli(node, "other-user", user="u2")  # not u2's task: refused
    cancel_cli(node, "inbox-1", "done-1", user="u1")
    cancel_cli(node, "queued-1")
    results = node.wait_results({"inbox-1", "queued-1"}, 30)
    assert code(results["inbox-1"]) == "cancelled" and code(results["queued-1"]) == "cancelled"
    # other-user is now the job queued in ComfyUI behind run-1: interrupting run-1 must not stop it
    wait_until(lambda: processing(node, "other-user").get("state") == "submitted", 30, "other-user in ComfyUI")
    assert processing(node, "run-1").get("startedAt")
    cancel_cli(node, "run-1", user="u1")
    results = node.wait_results({"early", "done-1", "run-1", "queued-1", "inbox-1", "other-user"}, 60)
    assert {t: code(r) for t, r in results.items()} == {
        "early": "cancelled", "done-1": "completed", "run-1": "cancelled", "queued-1": "cancelled",
        "inbox-1": "cancelled", "other-user": "completed"}
    assert 0 < results["run-1"]["metadata"]["ranS"] < 15
    assert [executed(node, t) for t in ("early", "inbox-1", "queued-1")] == [False, False, False]
    assert executed(node, "run-1") and executed(node, "other-user")
    interrupts = comfy(node, "/fake/stats")["interrupt_log"]
    assert [i[1] for i in interrupts] == [prompt_id_for("run-1", 1)], interrupts  # that prompt only, once
    log = node.log_path.read_text()
    assert "result stands" in log and "cancel refused" in log
    assert not list(inputs.glob("run-1*")), "the cancelled task's input files were left behind"
    assert node.spool.counts()["processing"] == 0


@pytest.mark.e2e
def test_expired_tasks_behind_a_backlog_never_run(make_node: Callable[..., Node]) -> None:
    node = make_node(seconds_per_step=0.1, env={"QUEUE_AHEAD": "1"}).start()
    node.drop("blocker.json", task("blocker", steps=40))  # 4 s ahead of everything
    wait_until(lambda: processing(node, "blocker").get("startedAt"), 30, "blocker running")
    short = [f"ttl-{i:02d}" for i in range(20)]
    for t in short:
        node.drop(f"{t}.json", task(t, ttlS=1))
    node.drop("patient.json", task("patient", ttlS=600))
    node.drop("late.json", task("late", expiresAt=time.time() - 5))  # already expired when it arrives
    results = node.wait_results({*short, "blocker", "patient", "late"}, 90)
    assert {t: code(results[t]) for t in short} == {t: "expired" for t in short}
    assert code(results["patient"]) == "completed" and code(results["blocker"]) == "completed"
    assert code(results["late"]) == "expired"
    assert not [t for t in short if executed(node, t)], "an expired task reached ComfyUI's execution"


@pytest.mark.e2e
def test_task_timeouts_capped_and_enforced(make_node: Callable[..., Node]) -> None:
    node = make_node(seconds_per_step=0.1, env={"JOB_TIMEOUT_S": "30"}).start()
    node.drop("too-long.json", task("too-long", timeoutS=31))
    node.drop("slow.json", task("slow", steps=100, timeoutS=1))  # 10 s of work, 1 s allowed
    node.drop("fine.json", task("fine", steps=2, timeoutS=20))
    results = node.wait_results({"too-long", "slow", "fine"}, 60)
    assert code(results["too-long"]) == "invalid_message"
    assert "JOB_TIMEOUT_S=30" in results["too-long"]["error"]["message"]
    assert code(results["slow"]) == "timeout" and "timeoutS=1s" in results["slow"]["error"]["message"]
    assert code(results["fine"]) == "completed"


# --------------------------------------------------------------------------------------------- Kafka

class Topics:
    def __init__(self, broker: KafkaBroker, partitions: int = 4) -> None:
        tag = uuid.uuid4().hex[:8]
        self.broker, self.partitions = broker, partitions
        self.input, self.output, self.control, self.group = f"in-{tag}", f"out-{tag}", f"ctl-{tag}", f"g-{tag}"
        broker.create_topic(self.input, partitions)
        broker.create_topic(self.output, 2)
        broker.create_topic(self.control, 3, config={"max.message.bytes": str(2 << 20)})

    def env(self, **extra: str) -> dict[str, str]:
        return {**self.broker.settings_env("none"), "KAFKA_TOPIC_INPUT": self.input,
                "KAFKA_TOPIC_OUTPUT": self.output, "KAFKA_TOPIC_CONTROL": self.control,
                "KAFKA_GROUP_ID": self.group, "KAFKA_SESSION_TIMEOUT_MS": "3000", **extra}

    def cancel(self, task_id: str, user: str = "u1") -> float:
        sent = time.time()
        produce(self.broker, self.control, [{"action": "cancel", "taskId": task_id, "userId": user}], key=task_id)
        return sent

    def committed_at_end(self) -> bool:
        return committed(self.broker, self.group, self.input, self.partitions) == end_offsets(
            self.broker, self.input, self.partitions)


def all_results(nodes: list[Node]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for node in nodes:
        out.update(node.results())
    return out


@pytest.mark.kafka
@pytest.mark.e2e
def test_two_nodes_40_tasks_10_cancels_at_random_moments(kafka_broker: KafkaBroker,
                                                         make_node: Callable[..., Node]) -> None:
    rng = random.Random(11)
    topics = Topics(kafka_broker)
    env = topics.env(KAFKA_STATUS_EVENTS="true")
    a = make_node("a", seconds_per_step=0.05, env=env).start()
    b = make_node("b", seconds_per_step=0.05, env=env).start()
    ids = [f"ct-{i:02d}" for i in range(40)]
    doomed = rng.sample(ids, 10)
    early, later = doomed[:3], doomed[3:]
    # Bad control messages first: skipped, logged, and nothing stops.
    bad: list[dict[str, Any] | bytes] = [b"{not json", b'{"action": "cancel", "userId": "u1"}',
                                         b'{"action": "pause", "taskId": "ct-00", "userId": "u1"}',
                                         b"x" * (1 << 20)]
    produce(kafka_broker, topics.control, bad, **{"message.max.bytes": 4 << 20})
    topics.cancel(ids[0] if ids[0] not in doomed else ids[1], user="intruder")  # wrong user: refused
    sent = {t: topics.cancel(t) for t in early}
    produce(kafka_broker, topics.input, [task(t, steps=rng.randint(4, 12)) for t in ids])
    for t in later:
        time.sleep(rng.uniform(0.0, 0.6))  # the workload's randomness, not synchronisation
        sent[t] = topics.cancel(t)
    nodes = [a, b]
    wait_until(lambda: set(ids) <= set(all_results(nodes)), 120,
               lambda: f"all results; missing {sorted(set(ids) - set(all_results(nodes)))[:5]}")
    results = all_results(nodes)
    records = read_topic(kafka_broker, topics.output, min_count=len(ids))
    published = results_of(records)
    lost = set(ids) - {r["taskId"] for r in published}  # a cancelled task's failed result counts: it was answered
    assert lost == set() and {r["taskId"] for r in published} <= set(ids)
    for t in ids:
        if t not in doomed:
            assert code(results[t]) == "completed", (t, results[t])
    for t in early:
        assert code(results[t]) == "cancelled", (t, results[t])
        assert not any(executed(n, t) for n in nodes)
    for t in later:
        meta = results[t]["metadata"]
        # finished before its cancel reached the node: the result stands (within the cancel's travel time)
        assert code(results[t]) == "cancelled" or meta.get("finishedAt", 0) < sent[t] + 1.0, (t, results[t], sent[t])
    wait_until(topics.committed_at_end, 20, "committed offsets at the end of every partition")
    logs = a.log_path.read_text() + b.log_path.read_text()
    assert logs.count("control ") >= 4 and "skipped: not JSON" in logs and "unknown action" in logs
    assert "bytes; a control message is at most" in logs and "cancel refused" in logs
    cancelled = [t for t in doomed if code(results[t]) == "cancelled"]
    events = {r.json()["taskId"] for r in records if r.headers.get("selfix-event") == b"cancelled"}
    assert events == set(cancelled)
    print(f"\ncancel fleet: {len(cancelled)}/10 cancelled, {10 - len(cancelled)} finished first, lost 0")


@pytest.mark.kafka
@pytest.mark.e2e
def test_tasks_redelivered_after_their_ttl_end_expired_on_the_new_owner(kafka_broker: KafkaBroker,
                                                                        make_node: Callable[..., Node]) -> None:
    """Node a holds 10 tasks (ttlS 4) behind a 6 s job and leaves the group; node b gets them again from Kafka after
    their time to live: expired at b's intake (ttlS counts from the message's timestamp), run by neither node."""
    topics = Topics(kafka_broker, partitions=2)
    a = make_node("a", seconds_per_step=0.1, env=topics.env(QUEUE_AHEAD="0", KAFKA_MAX_INFLIGHT="32")).start()
    produce(kafka_broker, topics.input, [task("blocker", steps=60)])
    wait_until(lambda: processing(a, "blocker").get("startedAt"), 30, "blocker running on a")
    short = [f"rd-{i:02d}" for i in range(10)]
    produced = time.time()
    produce(kafka_broker, topics.input, [task(t, ttlS=4) for t in short])
    wait_until(lambda: all(a.spool.state_of(t) == "inbox" for t in short), 30, "the short tasks in a's inbox/")
    wait_until(lambda: time.time() > produced + 4, 10, "their ttl over")
    a.stop()  # leaves the group: not-started jobs withdrawn, their offsets not committed
    b = make_node("b", seconds_per_step=0.1, env=topics.env()).start()
    results = b.wait_results(set(short), 60)
    assert {t: code(r) for t, r in results.items()} == {t: "expired" for t in short}
    assert not [t for t in short if executed(a, t) or executed(b, t)]
    assert "expired at intake" in b.log_path.read_text()


@pytest.mark.kafka
@pytest.mark.e2e
def test_cancel_to_interrupt_latency_on_the_double(kafka_broker: KafkaBroker,
                                                   make_node: Callable[..., Node]) -> None:
    """Control message produced → POST /interrupt at ComfyUI, for running tasks. Prints p50/p95."""
    topics = Topics(kafka_broker, partitions=2)
    node = make_node(seconds_per_step=0.1, env=topics.env(QUEUE_AHEAD="0")).start()
    producer = Producer(kafka_broker.client_config("none", **{"linger.ms": 0}))  # warm: its metadata is fetched
    producer.produce(topics.control, b'{"action": "cancel", "taskId": "warm-up", "userId": "u1"}')
    assert producer.flush(10) == 0
    # ttlS counts from the message's timestamp, not from when the node read it: sent 120 s ago with 60 s to live
    old_ms = int((time.time() - 120) * 1000)
    for t, ttl in (("old-60", 60), ("old-600", 600)):
        producer.produce(topics.input, json.dumps(task(t, ttlS=ttl)).encode(), t, timestamp=old_ms)
    assert producer.flush(10) == 0
    aged = node.wait_results({"old-60", "old-600"}, 30)
    assert code(aged["old-60"]) == "expired" and code(aged["old-600"]) == "completed"
    assert not executed(node, "old-60")
    waits = []
    for i in range(15):
        t = f"lat-{i:02d}"
        produce(kafka_broker, topics.input, [task(t, steps=300)])
        wait_until(lambda t=t: processing(node, t).get("startedAt"), 30, f"{t} running")  # type: ignore[misc]
        sent = time.time()
        producer.produce(topics.control, json.dumps({"action": "cancel", "taskId": t, "userId": "u1"}).encode(), t)
        producer.poll(0)
        pid = prompt_id_for(t, 1)
        hit = wait_until(lambda pid=pid: next((i for i in comfy(node, "/fake/stats")["interrupt_log"]  # type: ignore[misc]
                                               if i[1] == pid), None), 20, f"interrupt of {t}", interval=0.005)
        assert hit[2], "the interrupt named a prompt that was not running"
        waits.append(hit[0] - sent)
        node.wait_results({t}, 30)
    producer.flush(5)
    assert all(code(r) == "cancelled" for t, r in node.results().items() if t.startswith("lat-"))
    ordered = sorted(waits)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    print(f"\ncancel produced -> interrupt at ComfyUI: p50 {statistics.median(waits) * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms, max {max(waits) * 1000:.0f} ms (n={len(waits)})")


# --------------------------------------------------------------------------------------------- in-process runner

@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    from tests.servers.node_plugin import Double

    (tmp_path / "double").mkdir()
    double = Double(tmp_path / "double", seconds_per_step=0.1).start()
    yield Bench(tmp_path, double)
    double.stop()


async def test_a_runner_killed_after_the_cancel_interrupt_does_not_run_the_task_again(bench: Bench) -> None:
    import asyncio

    from selfix.control import request_cancel

    bench.submit("long", steps=100)
    async with bench.runner() as first:
        run = asyncio.create_task(first.run())
        await until(lambda: (bench.processing("long") or {}).get("startedAt"), 10, "the job started")
        request_cancel(bench.spool, "long", "u1", "cli")
        await until(lambda: (bench.spool.read_cancel("long") or {}).get("handled") == "interrupted", 10,
                    "the interrupt sent")
        run.cancel()  # dies before it saw the prompt end: the next runner finds it interrupted in /history
        with pytest.raises(asyncio.CancelledError):
            await run
    await bench.burst()
    assert code(bench.result("long")) == "cancelled"
    assert bench.executions() == [prompt_id_for("long", 1)], "no second attempt ran"
