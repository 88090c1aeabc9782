"""The consumer's Kafka loop against the real broker, without ComfyUI: publication is simulated by writing done/
(what the runner + uploader do), so each property is checked exactly and fast.

Commits follow the contiguous low-watermark of published results; duplicates are not run again; partitions pause
at KAFKA_MAX_INFLIGHT; revocation withdraws not-started jobs; SIGTERM commits and leaves; wrong credentials exit 69
naming the setting; a task that leaves the spool without a result is read again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from selfix.clock import OffsetClock
from selfix.kafka.intake import AUDIT_EVERY_S
from selfix.process import EXIT_UNAVAILABLE
from selfix.spool import Spool
from tests.servers.kafka_broker import KafkaBroker
from tests.servers.kafka_tools import (
    IntakeThread,
    committed,
    end_offsets,
    finish,
    inbox_ids,
    produce,
    read_topic,
    sources,
    wait_for,
)
from tests.servers.node_plugin import ROOT, task

pytestmark = pytest.mark.kafka


def env_for(broker: KafkaBroker, topic: str, auth: Any = "none", **extra: str) -> dict[str, str]:
    return {**broker.settings_env(auth), "KAFKA_TOPIC_INPUT": topic, "KAFKA_TOPIC_OUTPUT": f"{topic}-out",
            "KAFKA_GROUP_ID": f"g-{uuid.uuid4().hex[:8]}", "KAFKA_MAX_INFLIGHT": "100", **extra}


def test_commit_follows_the_watermark_of_published_results(kafka_broker: KafkaBroker,
                                                           kafka_topic: str, tmp_path: Path) -> None:
    env = env_for(kafka_broker, kafka_topic)
    intake = IntakeThread(tmp_path / "n1", env).start()
    group = env["KAFKA_GROUP_ID"]
    try:
        ids = [f"w{i}" for i in range(6)]
        produce(kafka_broker, kafka_topic, [task(t, priority=i % 3) for i, t in enumerate(ids)])
        wait_for(lambda: len(inbox_ids(intake.spool)) == 6, 20, lambda: f"6 jobs, inbox {inbox_ids(intake.spool)}")
        # Higher priority first among prefetched tasks: the inbox names order them.
        assert [e.priority for e in intake.spool.inbox_entries()] == [2, 2, 1, 1, 0, 0]
        assert sources(intake.spool)["w3"] == {"topic": kafka_topic, "partition": 0, "offset": 3}
        time.sleep(0.7)
        assert committed(kafka_broker, group, kafka_topic, 1)[0] in (0, -1001)  # nothing published: nothing moves

        for t in ("w0", "w1", "w3"):
            finish(intake.spool, t)
        wait_for(lambda: committed(kafka_broker, group, kafka_topic, 1)[0] == 2, 10, "commit at 2 (w2 pending)")
        time.sleep(0.7)
        assert committed(kafka_broker, group, kafka_topic, 1)[0] == 2  # w3 done but w2 not: the watermark holds
        finish(intake.spool, "w2")
        wait_for(lambda: committed(kafka_broker, group, kafka_topic, 1)[0] == 4, 10, "commit at 4")

        # Hand-dropped files are adopted in Kafka mode too.
        (intake.spool.inbox / "by-hand.json").write_text(json.dumps(task("by-hand")))
        wait_for(lambda: "by-hand" in inbox_ids(intake.spool), 10, "the dropped file adopted")

        for t in ("w4", "w5"):
            finish(intake.spool, t)
        wait_for(lambda: committed(kafka_broker, group, kafka_topic, 1)[0] == 6, 10, "commit at the end")
    finally:
        assert intake.stop() == 0


def test_known_task_ids_are_not_run_again(kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path) -> None:
    env = env_for(kafka_broker, kafka_topic)
    group = env["KAFKA_GROUP_ID"]
    first = IntakeThread(tmp_path / "n1", env).start()
    produce(kafka_broker, kafka_topic, [task("d1"), task("d2"), task("d3")])
    wait_for(lambda: len(inbox_ids(first.spool)) == 3, 20, "3 jobs")
    finish(first.spool, "d1")
    produce(kafka_broker, kafka_topic, [task("d2"), task("d1")])  # the same taskIds once more: inbox/, done/
    wait_for(lambda: first.intake.counts["duplicate"] == 2, 20, lambda: f"2 duplicates, {first.intake.counts}")
    assert sorted(inbox_ids(first.spool)) == ["d2", "d3"]
    wait_for(lambda: committed(kafka_broker, group, kafka_topic, 1)[0] == 1, 10, "commit at 1")
    # Leaving the group withdraws d2/d3 (not started) and commits only d1: a restart reads them again, and the
    # second d2 (offset 3) waits for the first one's result instead of running twice.
    first.stop()
    assert inbox_ids(first.spool) == []
    assert committed(kafka_broker, group, kafka_topic, 1)[0] == 1

    again = IntakeThread(tmp_path / "n1", env).start()
    try:
        wait_for(lambda: again.intake.counts["duplicate"] == 2, 20, lambda: f"2 duplicates, {again.intake.counts}")
        assert again.intake.counts["accepted"] == 2
        assert sorted(inbox_ids(again.spool)) == ["d2", "d3"]
        finish(again.spool, "d2")
        finish(again.spool, "d3")
        wait_for(lambda: committed(kafka_broker, group, kafka_topic, 1)[0] == 5, 10, "commit at the end")
    finally:
        again.stop()


def test_partitions_pause_at_max_inflight_and_resume(kafka_broker: KafkaBroker, kafka_topic_factory: Callable[..., str],
                                                     tmp_path: Path) -> None:
    topic = kafka_topic_factory(2)
    env = env_for(kafka_broker, topic, KAFKA_MAX_INFLIGHT="3")
    intake = IntakeThread(tmp_path / "n1", env).start()
    try:
        ids = [f"p{i:02d}" for i in range(10)]
        produce(kafka_broker, topic, [task(t) for t in ids])
        wait_for(lambda: len(inbox_ids(intake.spool)) == 3, 20, "3 jobs")
        time.sleep(1.0)  # paused: polling goes on, nothing more is taken
        assert len(inbox_ids(intake.spool)) == 3 and intake.intake.paused
        assert intake.alive()
        finished: set[str] = set()
        while len(finished) < 10:
            held = set(inbox_ids(intake.spool))
            assert len(held) <= 3, held
            for t in held:
                finish(intake.spool, t)
                finished.add(t)
            wait_for(lambda: set(inbox_ids(intake.spool)) - finished or len(finished) == 10, 10,
                     lambda: f"more jobs after resume (finished {sorted(finished)})")
        assert finished == set(ids)
        ends = end_offsets(kafka_broker, topic, 2)
        wait_for(lambda: committed(kafka_broker, env["KAFKA_GROUP_ID"], topic, 2) == ends, 10,
                 "commits at the end of both partitions")
    finally:
        intake.stop()


def test_revocation_withdraws_not_started_jobs(kafka_broker: KafkaBroker, kafka_topic_factory: Callable[..., str],
                                               tmp_path: Path) -> None:
    topic = kafka_topic_factory(2)
    env = env_for(kafka_broker, topic)
    a = IntakeThread(tmp_path / "a", env).start()
    b = None
    try:
        for p in (0, 1):
            produce(kafka_broker, topic, [task(f"r{p}-{i}") for i in range(4)], partition=p)
        wait_for(lambda: len(inbox_ids(a.spool)) == 8, 20, "8 jobs on node a")
        claimed = next(e for e in a.spool.inbox_entries() if e.task_id == "r0-0")
        assert a.spool.claim(claimed)  # started by a's runner: stays with a whatever happens
        b = IntakeThread(tmp_path / "b", env).start()
        wait_for(lambda: len(a.assigned()) == 1 and len(b.assigned()) == 1, 30,
                 lambda: f"one partition each (a {a.assigned()}, b {b.assigned() if b else None})")
        kept, = a.assigned()
        moved = 1 - kept
        wait_for(lambda: len(inbox_ids(b.spool)) == 4, 20, "the moved partition's 4 jobs on node b")
        assert {s["partition"] for s in sources(a.spool).values()} == {kept}, "a kept jobs of a revoked partition"
        assert {s["partition"] for s in sources(b.spool).values()} == {moved}
        # Nothing was committed for the moved partition: b re-read it from the start.
        assert committed(kafka_broker, env["KAFKA_GROUP_ID"], topic, 2)[moved] in (0, -1001)
    finally:
        if b is not None:
            b.stop()
        a.stop()


def in_inbox(spool: Spool, task_id: str) -> Callable[[], bool]:
    return lambda: task_id in inbox_ids(spool)


def test_a_partition_revoked_while_paused_is_read_again_when_it_comes_back(
        kafka_broker: KafkaBroker, kafka_topic_factory: Callable[..., str], tmp_path: Path) -> None:
    # librdkafka keeps the pause of a partition revoked while paused: node a gets it back while not paused.
    topic = kafka_topic_factory(2)
    env = env_for(kafka_broker, topic)
    a = IntakeThread(tmp_path / "a", {**env, "KAFKA_MAX_INFLIGHT": "2"}).start()
    b = None
    try:
        for p in (0, 1):
            produce(kafka_broker, topic, [task(f"p{p}-{i}") for i in range(3)], partition=p)
        wait_for(lambda: len(inbox_ids(a.spool)) >= 2 and a.intake.paused, 20, "node a paused at 2 jobs")
        b = joined = IntakeThread(tmp_path / "b", env).start()  # takes a partition from a, which is paused meanwhile
        wait_for(lambda: len(a.assigned()) == 1 and len(joined.assigned()) == 1, 30, "one partition each")
        kept, = a.assigned()
        moved = 1 - kept
        for own in [f"p{kept}-{i}" for i in range(3)]:  # a finishes its partition: not paused when the other returns
            wait_for(in_inbox(a.spool, own), 20, f"{own} on node a")
            finish(a.spool, own)
        wait_for(lambda: len(inbox_ids(joined.spool)) == 3, 20, "the moved partition's 3 jobs on node b")
        b.stop()  # withdraws them and leaves: the partition goes back to a
        b = None
        wait_for(lambda: any(t.startswith(f"p{moved}-") for t in inbox_ids(a.spool)), 20,
                 lambda: f"the partition that came back is read again (a: {inbox_ids(a.spool)}, paused "
                         f"{a.intake.paused})")
    finally:
        if b is not None:
            b.stop()
        a.stop()


def test_task_that_leaves_the_spool_without_result_is_read_again(kafka_broker: KafkaBroker, kafka_topic: str,
                                                                  tmp_path: Path) -> None:
    env = env_for(kafka_broker, kafka_topic)
    clock = OffsetClock()
    intake = IntakeThread(tmp_path / "n1", env, clock=clock).start()
    try:
        produce(kafka_broker, kafka_topic, [task("v1"), task("v2")])
        wait_for(lambda: len(inbox_ids(intake.spool)) == 2, 20, "2 jobs")
        entry = next(e for e in intake.spool.inbox_entries() if e.task_id == "v1")
        (intake.spool.inbox / entry.name).unlink()  # e.g. moved to corrupt/ by hand
        # Two audits in a row must find it missing: the clock jumps to each instead of waiting AUDIT_EVERY_S.
        clock.advance(AUDIT_EVERY_S)
        wait_for(lambda: intake.intake.ledger.missing, 10, "an audit that finds v1 missing")
        assert "v1" not in inbox_ids(intake.spool), "read again after one audit: a task in flight would be too"
        clock.advance(AUDIT_EVERY_S)
        wait_for(lambda: "v1" in inbox_ids(intake.spool), 10, "v1 read again from Kafka")
        assert sorted(inbox_ids(intake.spool)) == ["v1", "v2"]
        finish(intake.spool, "v1")
        finish(intake.spool, "v2")
        wait_for(lambda: committed(kafka_broker, env["KAFKA_GROUP_ID"], kafka_topic, 1)[0] == 2, 10, "commit at 2")
    finally:
        intake.stop()


def _consumer_process(env: dict[str, str], tmp_path: Path) -> subprocess.Popen[str]:
    full = {**os.environ, "SPOOL_DIR": str(tmp_path / "spool"), "KAFKA_SESSION_TIMEOUT_MS": "3000", **env}
    return subprocess.Popen([sys.executable, "-m", "selfix", "consumer"], env=full, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigterm_commits_what_is_safe_and_withdraws_the_rest(kafka_broker: KafkaBroker, kafka_topic: str,
                                                             tmp_path: Path) -> None:
    env = env_for(kafka_broker, kafka_topic)
    proc = _consumer_process(env, tmp_path)
    spool = Spool(tmp_path / "spool")
    try:
        produce(kafka_broker, kafka_topic, [task("s1"), task("s2"), task("s3")])
        wait_for(lambda: spool.inbox.exists() and len(inbox_ids(spool)) == 3, 30, "3 jobs")
        finish(spool, "s1")
        finish(spool, "s2")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert committed(kafka_broker, env["KAFKA_GROUP_ID"], kafka_topic, 1)[0] == 2, out
    assert inbox_ids(spool) == [], "s3 (not started) should be withdrawn when the consumer leaves the group"
    assert "withdrawn" in out


@pytest.mark.parametrize("auth", ["plain", "scram"])
def test_sasl_right_credentials_consume(kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path,
                                        auth: str) -> None:
    env = env_for(kafka_broker, kafka_topic, auth)
    intake = IntakeThread(tmp_path / "n1", env).start()
    try:
        produce(kafka_broker, kafka_topic, [task(f"sasl-{auth}")])
        wait_for(lambda: inbox_ids(intake.spool) == [f"sasl-{auth}"], 20, "the task accepted over SASL")
        finish(intake.spool, f"sasl-{auth}")
        wait_for(lambda: committed(kafka_broker, env["KAFKA_GROUP_ID"], kafka_topic, 1)[0] == 1, 10, "commit")
    finally:
        assert intake.stop() == 0


@pytest.mark.parametrize("auth", ["plain", "scram"])
def test_sasl_wrong_password_exits_69_naming_the_setting(kafka_broker: KafkaBroker, kafka_topic: str,
                                                         tmp_path: Path, auth: str) -> None:
    wrong = f"wrong-{uuid.uuid4().hex[:8]}"
    env = {**env_for(kafka_broker, kafka_topic, auth), "KAFKA_SASL_PASSWORD": wrong}
    began = time.monotonic()
    proc = _consumer_process(env, tmp_path)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - began
    assert proc.returncode == EXIT_UNAVAILABLE, out
    assert "KAFKA_SASL_USERNAME" in out and "KAFKA_SASL_PASSWORD" in out, out
    assert "authentication failed" in out.lower(), out
    assert wrong not in out
    assert took < 15, f"took {took:.1f}s to give up"


def test_status_event_accepted_is_told_apart_from_results(kafka_broker: KafkaBroker, kafka_topic: str,
                                                          tmp_path: Path) -> None:
    env = env_for(kafka_broker, kafka_topic, KAFKA_STATUS_EVENTS="true")
    kafka_broker.create_topic(env["KAFKA_TOPIC_OUTPUT"])
    intake = IntakeThread(tmp_path / "n1", env).start()
    try:
        produce(kafka_broker, kafka_topic, [task("ev1", priority=3)])
        records = read_topic(kafka_broker, env["KAFKA_TOPIC_OUTPUT"], min_count=1, idle=0.3)
    finally:
        intake.stop()
    (rec,) = records
    assert rec.key == "ev1" and rec.headers["selfix-event"] == b"accepted"
    body = rec.json()
    assert body["event"] == "accepted" and body["taskId"] == "ev1" and body["priority"] == 3
    assert "status" not in body
