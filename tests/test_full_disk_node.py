"""A whole node (real supervisord, all five programs, the ComfyUI double) whose spool and ComfyUI folders live on a
small real filesystem that fills up while tasks keep arriving through the real Kafka broker, then frees up.

Jepsen's total-queue check at the end: every taskId gets exactly one completed result (lost 0, duplicates 0),
corrupt/ empty, tmp/ clean, offsets committed at the end of every partition, no program FATAL and none restarted,
all with no person acting. Prints "disk freed -> first new result" and each program's restart count.

Also: a program that supervisord gave up on (FATAL) is started again by the watchdog, and the probes say so.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.servers.kafka_broker import KafkaBroker
from tests.servers.kafka_tools import produce, read_topic, total_queue
from tests.servers.node_plugin import PROGRAMS, Node, task, wait_until
from tests.servers.small_fs import small_fs
from tests.test_kafka_node import Topics, unfinished

pytestmark = [pytest.mark.kafka, pytest.mark.e2e, pytest.mark.chaos]

DISK = 16 << 20
FULL_FOR_S = 15.0


def http(node: Node, path: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{node.env['METRICS_PORT']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return 0, {}


def exits(node: Node) -> dict[str, int]:
    """supervisord's own count of program exits (its log goes to the node's stdout)."""
    text = node.log_path.read_text(errors="replace")
    return {p: len(re.findall(rf"exited: {p} \(", text)) for p in PROGRAMS}


def test_a_full_disk_pauses_the_node_and_it_resumes_alone_with_nothing_lost(
        kafka_broker: KafkaBroker, make_node: Callable[..., Node], tmp_path: Path) -> None:
    with small_fs(tmp_path / "disk", DISK) as disk:
        root = disk.root
        topics = Topics(kafka_broker, 4)
        node = make_node("full", seconds_per_step=0.02, env=topics.env(
            SPOOL_DIR=str(root / "spool"), COMFY_OUTPUT_DIR=str(root / "comfy" / "output"),
            COMFY_INPUT_DIR=str(root / "comfy" / "input"), DISK_FREE_FLOOR_GB="0.002", KAFKA_MAX_INFLIGHT="8",
            LOG_LEVEL="INFO", FATAL_RESTART_S="2"))
        try:
            _run(node, disk, topics, kafka_broker)
        finally:
            node.stop()  # before the filesystem goes away under it


def _run(node: Node, disk: Any, topics: Topics, broker: KafkaBroker) -> None:
    node.start()
    pids = {p: node.pid(p) for p in PROGRAMS}
    before = [f"df-{i:03d}" for i in range(24)]
    during = [f"dd-{i:03d}" for i in range(24)]
    after = [f"da-{i:03d}" for i in range(12)]
    hand = "hand-1"
    # A file a person drops into inbox/ while the disk is full: written beforehand on the same filesystem, moved
    # in by rename (which needs no space) once it is full.
    staged_drop = disk.root / "staged-drop.json"
    staged_drop.write_text(json.dumps(task(hand, steps=3)))

    produce(broker, topics.input, [task(t, steps=3) for t in before])
    wait_until(lambda: len(node.results()) >= 6, 60, "the node under way")

    # Fill the disk and keep it full (another writer takes whatever the node frees) while tasks keep arriving.
    full_since = time.monotonic()
    disk.fill()
    produce(broker, topics.input, [task(t, steps=3) for t in during])
    os.rename(staged_drop, node.spool.inbox / "by-hand.json")
    readyz_failed: dict[str, Any] = {}
    while time.monotonic() - full_since < FULL_FOR_S:
        disk.fill()
        status, body = http(node, "/readyz")
        if status == 503 and not readyz_failed:
            readyz_failed = body
        time.sleep(0.2)
    held = {state: n for state, n in node.spool.counts().items() if n}
    done_while_full = set(node.results())
    assert (node.spool.inbox / "by-hand.json").exists(), "a hand-dropped file stays in place while the disk is full"
    assert readyz_failed and {"spool", "disk:spool"} & set(readyz_failed["failing"]), readyz_failed
    assert not set(during) <= done_while_full, "the disk was not really full"

    # Free it: the node must resume on its own.
    disk.free()
    freed = time.monotonic()
    first_new = wait_until(lambda: set(node.results()) - done_while_full, 60, "a new result after the disk was freed")
    first_s = time.monotonic() - freed
    produce(broker, topics.input, [task(t, steps=3) for t in after])
    every = set(before) | set(during) | set(after) | {hand}
    node.wait_results(every, timeout=120)
    all_s = time.monotonic() - freed
    wait_until(topics.committed_at_end, 30, "committed offsets at the end of every partition")
    wait_until(lambda: http(node, "/readyz")[0] == 200, 30, lambda: f"/readyz back to 200: {http(node, '/readyz')}")

    report = total_queue(every, read_topic(broker, topics.output, min_count=len(every), idle=2.0))
    info = node.info()
    restarts = {p: int(info[p]["pid"] != pids[p]) for p in PROGRAMS}
    logs = node.log_path.read_text(errors="replace")
    episodes = {p: len(re.findall(rf"{p}: disk full \(", logs)) for p in ("consumer", "runner", "uploader")}
    print(f"\nfull disk: {DISK >> 20} MiB tmpfs full for {FULL_FOR_S:g}s, held {held}; disk freed -> first new "
          f"result {first_s:.2f}s ({sorted(first_new)[0]}), -> all {len(every)} results {all_s:.1f}s; "
          f"total-queue: ok {report['ok']}, lost {len(report['lost'])}, duplicated {len(report['duplicated'])}, "
          f"unexpected {len(report['unexpected'])}, failed {len(report['failed'])}; program exits {exits(node)}, "
          f"pid changes {restarts}; disk-full log lines {episodes}; /readyz while full {readyz_failed['failing']}")
    assert report["lost"] == [] and report["unexpected"] == [] and report["failed"] == [], report
    assert report["duplicated"] == {}, report["duplicated"]
    assert all(info[p]["statename"] == "RUNNING" for p in PROGRAMS), {p: info[p]["statename"] for p in PROGRAMS}
    assert exits(node) == dict.fromkeys(PROGRAMS, 0) and not any(restarts.values()), "no process exits for ENOSPC"
    assert all(0 < n <= 3 for p, n in episodes.items() if p != "uploader"), f"one line per episode: {episodes}"
    assert node.spool.corrupt_entries() == []
    wait_until(lambda: os.listdir(node.spool.tmp) == [], 10, lambda: f"tmp/ clean: {os.listdir(node.spool.tmp)}")
    assert unfinished(node) == 0
    assert len(node.executions()) >= len(every)


def restarts_metric(node: Node, program: str, reason: str) -> float:
    status, _ = http(node, "/readyz")  # any answer: the watchdog listens
    url = f"http://127.0.0.1:{node.env['METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    pattern = rf'^selfix_process_restarts_total{{program="{program}",reason="{reason}"}} (\S+)$'
    match = re.search(pattern, text, re.M)
    return float(match[1]) if match else 0.0


def test_a_fatal_program_is_started_again_by_the_watchdog_and_the_probes_say_so(
        kafka_broker: KafkaBroker, make_node: Callable[..., Node]) -> None:
    topics = Topics(kafka_broker, 1)
    # A consumer that cannot log in exits with 69 at once; supervisord marks it FATAL after its startretries.
    node = make_node("fatal", env=topics.env("scram", KAFKA_SASL_PASSWORD=f"wrong-{uuid.uuid4().hex[:6]}",
                                             FATAL_RESTART_S="1", LOG_LEVEL="INFO"))
    node.start(wait_programs=tuple(p for p in PROGRAMS if p != "consumer"))
    wait_until(lambda: node.info().get("consumer", {}).get("statename") == "FATAL", 90, "consumer FATAL")
    ready = wait_until(lambda: (lambda r: r if r[0] == 503 and "program:consumer" in r[1].get("failing", []) else
                                None)(http(node, "/readyz")), 30, "/readyz naming the FATAL consumer")
    health = http(node, "/healthz")
    assert health[0] == 503 and health[1]["down"] == ["consumer"], health
    wait_until(lambda: restarts_metric(node, "consumer", "fatal") >= 1, 60,
               lambda: f"the watchdog starting the FATAL consumer again\n{node.log_tail()}")
    wait_until(lambda: restarts_metric(node, "consumer", "fatal") >= 2, 180, "and again when it is FATAL again")
    text = node.log_path.read_text(errors="replace")
    assert "starting consumer again (fatal)" in text
    print(f"\nFATAL: /readyz {ready[1]['failing']}, /healthz down {health[1]['down']}, watchdog restarts "
          f"{restarts_metric(node, 'consumer', 'fatal'):g}, consumer exits seen {exits(node)['consumer']}")
