"""SIGTERM of `selfix up` (what `docker stop` sends): the drain order, under real supervisord with the double.

At the SIGTERM a job runs in ComfyUI, another waits in ComfyUI's queue, and a result waits in outbox/ (the
uploader is held with SIGSTOP to keep it there). supervisord stops consumer, runner, uploader, watchdog, ComfyUI,
one after another; when `selfix up` has exited, outbox/ is empty, and with Kafka the committed offset covers every
published result.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable
from typing import Any

import pytest

from tests.servers.kafka_broker import KafkaBroker
from tests.servers.kafka_tools import committed, end_offsets, produce, read_topic, total_queue
from tests.servers.node_plugin import Node, task, wait_until
from tests.test_kafka_node import Topics

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

STOP_ORDER = ["consumer", "runner", "uploader", "watchdog", "comfyui"]


def running_and_queued(node: Node) -> bool:
    jobs = [json.loads(p.read_bytes()) for p in node.spool.processing_files()]
    started = [j for j in jobs if j.get("startedAt")]
    queued = [j for j in jobs if j.get("state") == "submitted" and not j.get("startedAt")]
    return len(started) == 1 and len(queued) == 1


def hold_a_result_in_outbox(node: Node, first: str) -> int:
    """SIGSTOP the uploader, then wait for `first`'s result in outbox/ and for one job running plus one queued."""
    uploader = node.pid("uploader")
    os.kill(uploader, signal.SIGSTOP)
    wait_until(lambda: first in node.spool.outbox_tasks(), 30, f"{first}'s result in outbox/")
    wait_until(lambda: running_and_queued(node), 30, "one job running and one queued in ComfyUI")
    return uploader


def sigterm_pending(pid: int) -> bool:
    """supervisord sent SIGTERM to the stopped process (it waits in the pending set until SIGCONT)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return bool(pending & (1 << (signal.SIGTERM - 1)))


def stop_order(node: Node) -> list[str]:
    return re.findall(r"INFO stopped: (\w+) ", node.log_path.read_text(errors="replace"))


def sigterm_and_wait(node: Node, uploader: int, release: Callable[[], bool]) -> None:
    """SIGTERM `selfix up`; SIGCONT the held uploader once `release()` says so; wait for the exit."""
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGTERM)
    try:
        wait_until(release, 60, lambda: f"the moment to let the uploader go\n{node.log_tail()}")
    finally:
        os.kill(uploader, signal.SIGCONT)
    assert node.proc.wait(120) == 0, node.log_tail()
    assert stop_order(node) == STOP_ORDER, node.log_tail()


def test_offline_drain_hands_back_finishes_and_publishes_outbox(make_node: Callable[..., Node]) -> None:
    node: Node = make_node(seconds_per_step=0.1, env={"LOG_LEVEL": "INFO"}).start()
    node.drop("d-0.json", task("d-0", steps=1))
    for name in ("d-1", "d-2", "d-3"):
        node.drop(f"{name}.json", task(name, steps=30))
    uploader = hold_a_result_in_outbox(node, "d-0")

    sigterm_and_wait(node, uploader, lambda: sigterm_pending(uploader))
    # The uploader may publish in the loop turn during which the stop is noticed, so how many results its drain line
    # counts (0-2) is a race; what must hold is that both were published before it exited.
    log = node.log_path.read_text(errors="replace")
    assert re.search(r"uploader draining: [0-2] result\(s\) in outbox/", log), log
    exit_at = log.index("uploader uploader exits with 0")
    assert all(-1 < log.find(f"uploader [{t}] published") < exit_at for t in ("d-0", "d-1")), log
    spool = node.spool
    assert spool.outbox_tasks() == [] and spool.processing_files() == [], "outbox/ drained, nothing claimed"
    assert sorted(node.results()) == ["d-0", "d-1"], "the result held in outbox/ and the running job"
    assert sorted(e.task_id for e in spool.inbox_entries()) == ["d-2", "d-3"], "queued one handed back"
    assert all(e.attempt == 1 for e in spool.inbox_entries())
    assert spool.corrupt_entries() == [] and spool.counts()["tmp"] == 0
    executions = node.executions()
    assert len(executions) == len(set(executions)) == 2, executions

    node.start()  # the next start finishes what was handed back
    results = node.wait_results({f"d-{i}" for i in range(4)}, timeout=60)
    assert all(r["status"] == "completed" and r["metadata"]["attempts"] == 1 for r in results.values())
    assert len(node.executions()) == len(set(node.executions())) == 4


@pytest.mark.kafka
def test_kafka_drain_commits_every_published_result_before_leaving(kafka_broker: KafkaBroker,
                                                                    make_node: Callable[..., Node]) -> None:
    topics = Topics(kafka_broker, 1)
    node: Node = make_node(seconds_per_step=0.1, env=topics.env(LOG_LEVEL="INFO")).start()
    ids = [f"k-{i}" for i in range(5)]
    produce(kafka_broker, topics.input, [task(ids[0], steps=1), *(task(t, steps=30) for t in ids[1:])])
    uploader = hold_a_result_in_outbox(node, ids[0])

    def consumer_draining() -> bool:
        return "draining:" in node.log_path.read_text(errors="replace")

    sigterm_and_wait(node, uploader, consumer_draining)
    assert "uploader draining: 0 result(s)" in node.log_path.read_text(errors="replace")
    spool = node.spool
    assert spool.outbox_tasks() == [] and spool.processing_files() == []
    published = sorted(node.results())
    assert published == ids[:3], "the held result, the running job and the one queued in ComfyUI"
    assert spool.inbox_entries() == [], "not-started jobs were withdrawn for re-delivery"
    assert committed(kafka_broker, topics.group, topics.input, 1) == {0: 3}, "the commit covers every result"

    node.start()  # their offsets were not committed: delivered again, and run
    node.wait_results(set(ids), timeout=60)
    wait_until(topics.committed_at_end, 30, "committed offsets at the end of the partition")
    assert committed(kafka_broker, topics.group, topics.input, 1) == end_offsets(kafka_broker, topics.input, 1)
    report: dict[str, Any] = total_queue(ids, read_topic(kafka_broker, topics.output, min_count=len(ids), idle=1.0))
    assert report["lost"] == [] and report["duplicated"] == {} and report["unexpected"] == [], report
    executions = node.executions()
    assert len(executions) == len(set(executions)) == 5, executions
