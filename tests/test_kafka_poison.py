"""Poison values through a whole node (real supervisord, real Kafka, the double), checked like Jepsen's total queue:
every taskId gets exactly one result, nothing is lost or duplicated, corrupt/ stays empty, tmp/ is clean, the
committed offsets reach the end of every partition, and every program is still RUNNING (never restarted).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.servers.kafka_broker import KafkaBroker
from tests.servers.kafka_tools import produce, read_topic, results_of
from tests.servers.node_plugin import Node, task, wait_until
from tests.test_kafka_node import Topics, unfinished

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]


def raw(msg: dict[str, Any], old: bytes = b"", new: bytes = b"", encoding: str = "utf-8") -> bytes:
    text = json.dumps(msg, ensure_ascii=False)
    data = text.encode(encoding) if encoding != "utf-8" else text.encode()
    return data.replace(old, new) if old else data


def _poison() -> tuple[list[bytes | dict[str, Any]], dict[str, str], int]:
    """(messages, {taskId: expected error code}, how many have no usable taskId and belong in the DLQ)."""
    addressable: dict[str, tuple[bytes | dict[str, Any], str]] = {}
    for name, char in {"nl": "\n", "cr": "\r", "tab": "\t", "nul": "\x00", "del": "\x7f", "ls": "\u2028",
                       "nel": "\x85"}.items():
        addressable[f"p-user-{name}"] = (task(f"p-user-{name}", user="u1" + char), "invalid_message")
        addressable[f"p-image-{name}"] = (task(f"p-image-{name}", images={"a.png" + char: "users/u1/inputs/a.png"}),
                                          "input_forbidden")
        addressable[f"p-imgkey-{name}"] = (task(f"p-imgkey-{name}", images={"a.png": "users/u1/inputs/a.png" + char}),
                                           "input_forbidden")
        addressable[f"p-lora-{name}"] = (task(f"p-lora-{name}", lora="users/u1/models/x.safetensors" + char),
                                         "lora_forbidden")
    steps = b'"steps": 1'
    strict = {
        "p-nan": raw(task("p-nan", steps=1), steps, b'"steps": NaN'),
        "p-inf": raw(task("p-inf", steps=1), steps, b'"steps": Infinity'),
        "p-minus-inf": raw(task("p-minus-inf", steps=1), steps, b'"steps": -Infinity'),
        "p-1e400": raw(task("p-1e400", steps=1), steps, b'"steps": 1e400'),
        "p-huge-int": raw(task("p-huge-int", steps=1), steps, b'"steps": ' + b"7" * 5000),
        "p-utf16": raw(task("p-utf16", steps=1), encoding="utf-16"),
        "p-utf16-le": raw(task("p-utf16-le", steps=1), encoding="utf-16-le"),
        "p-utf8-bom": b"\xef\xbb\xbf" + raw(task("p-utf8-bom", steps=1)),
        "p-surrogate": raw(task("p-surrogate", steps=1, note="x"), b'"note": "x"', b'"note": "\\ud800"'),
        "p-bad-utf8": raw(task("p-bad-utf8", steps=1, note="x"), b'"note": "x"', b'"note": "\xff\xfe"'),
        "p-dup-key": raw(task("p-dup-key", steps=1), steps, b'"steps": 1, "steps": 2'),
    }
    for task_id, message in strict.items():
        assert task_id.encode("utf-16-le" if "utf16" in task_id else "utf-8") in message
        addressable[task_id] = (message, "invalid_message")
    unaddressable: list[bytes | dict[str, Any]] = [
        raw(task("x", steps=1), b'"taskId": "x"', b'"taskId": "x\\n"'),
        raw(task("x", steps=1), b'"taskId": "x"', b'"taskId": "x\\r"'),
        raw(task("x", steps=1), b'"taskId": "x"', b'"taskId": "\\tx"'),
        raw(task("x", steps=1), b'"taskId": "x"', b'"taskId": "x\\u0000"'),
        raw(task("x", steps=1), b'"taskId": "x"', b'"taskId": "x\\u2028"'),
        raw(task("x", steps=1), b'"taskId": "x", ', b'"taskId": "x\\n", "steps": NaN, '),
    ]
    messages = [m for m, _ in addressable.values()] + unaddressable
    return messages, {t: code for t, (_, code) in addressable.items()}, len(unaddressable)


def settled(node: Node, topics: Topics) -> None:
    """The end state every poison test requires; waits for what settles asynchronously (commits, tmp/ cleanup)."""
    wait_until(topics.committed_at_end, 30, "committed offsets at the end of every partition")
    wait_until(lambda: os.listdir(node.spool.tmp) == [], 15, lambda: f"tmp/ clean: {os.listdir(node.spool.tmp)}")
    assert unfinished(node) == 0, node.spool.counts()
    states = {name: info.get("statename") for name, info in node.info().items()}
    assert set(states.values()) == {"RUNNING"}, states


def test_poison_values_among_good_tasks_every_task_answered_once(kafka_broker: KafkaBroker,
                                                                 make_node: Callable[..., Node]) -> None:
    topics = Topics(kafka_broker, 4, dlq=True)
    node = make_node("poison", seconds_per_step=0.005, env=topics.env()).start()
    pids = {p: node.pid(p) for p in ("consumer", "runner", "uploader")}
    good = [task(f"good-{i:02d}", steps=1) for i in range(40)]
    poison, codes, dead_count = _poison()
    mixed = [m for pair in zip(good, poison, strict=False) for m in pair] + good[len(poison):] + poison[len(good):]
    produce(kafka_broker, topics.input, mixed)
    expected = {str(m["taskId"]) for m in good} | set(codes)

    node.wait_results(expected, timeout=120)
    results = results_of(read_topic(kafka_broker, topics.output, min_count=len(expected), idle=1.0))
    ids = [r["taskId"] for r in results]
    lost, unexpected = expected - set(ids), set(ids) - expected
    duplicates = {t for t in ids if ids.count(t) > 1}
    print(f"\npoison: {len(good)} good + {len(codes)} addressable poison + {dead_count} without a usable taskId; "
          f"results {len(results)}, lost {len(lost)}, unexpected {len(unexpected)}, duplicated {len(duplicates)}")
    assert not lost and not unexpected and not duplicates, (lost, unexpected, duplicates)
    by_id = {r["taskId"]: r for r in results}
    for msg in good:
        assert by_id[msg["taskId"]]["status"] == "completed", by_id[msg["taskId"]]
    wrong = {t: (by_id[t]["status"], (by_id[t].get("error") or {}).get("code"), code) for t, code in codes.items()
             if by_id[t]["status"] != "failed" or by_id[t]["error"]["code"] != code}
    assert not wrong, wrong
    assert all(by_id[t]["error"]["retriable"] is False for t in codes)
    dead = read_topic(kafka_broker, str(topics.dlq), min_count=dead_count, idle=0.5)
    assert len(dead) == dead_count and all(r.headers.get("selfix-error") for r in dead)
    assert node.spool.corrupt_entries() == []
    settled(node, topics)
    assert {p: node.pid(p) for p in pids} == pids, "a program restarted"
    assert len(node.executions()) == len(good), "only the good tasks ran"


def test_unpublishable_results_end_as_failed_results_and_commits_advance(kafka_broker: KafkaBroker,
                                                                         make_node: Callable[..., Node]) -> None:
    """Three results that can never go out as they are: one too large for the output topic (the broker refuses it
    for good), one whose images the store refuses for good (retried for RESULT_RETRY_S, then answered), and the
    good tasks around them, which must not wait behind them."""
    topics = Topics(kafka_broker, 2, dlq=True)
    small = f"out-small-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(small, 2, config={"max.message.bytes": "3000"})
    node = make_node("unpub", seconds_per_step=0.005, env=topics.env(KAFKA_TOPIC_OUTPUT=small,
                                                                     RESULT_RETRY_S="3")).start()
    blocked = node.store / "users" / "blocked"
    blocked.mkdir(parents=True)
    (blocked / "images").write_text("a file where the store needs a directory")
    good = [task(f"fine-{i:02d}", steps=1) for i in range(10)]
    wide = task("wide", steps=1, batch=150)  # 150 image paths: a result over the topic's 3000 bytes
    stuck = task("stuck", steps=1, user="blocked")
    produce(kafka_broker, topics.input, [*good[:5], wide, stuck, *good[5:]])
    expected = {str(m["taskId"]) for m in [*good, wide, stuck]}

    node.wait_results(expected, timeout=120)
    results = results_of(read_topic(kafka_broker, small, min_count=len(expected), idle=1.0))
    ids = sorted(r["taskId"] for r in results)
    assert ids == sorted(expected), "each taskId exactly once"
    by_id = {r["taskId"]: r for r in results}
    assert all(by_id[m["taskId"]]["status"] == "completed" for m in good)
    for task_id, words in (("wide", "larger than the broker"), ("stuck", "FileExistsError")):
        result = by_id[task_id]
        assert result["status"] == "failed" and result["error"]["code"] == "output_invalid", result
        assert words in result["error"]["message"], result["error"]["message"]
    assert by_id["wide"]["metadata"]["attempts"] == 1
    log = node.log_path.read_text(errors="replace")
    uploader_log = "\n".join(p.read_text(errors="replace") for p in Path(node.env["SPOOL_DIR"], "run").glob("*.log"))
    assert "result cannot be delivered" in log + uploader_log
    assert node.spool.corrupt_entries() == []
    settled(node, topics)


def test_a_result_the_output_topic_refuses_even_as_a_failure_is_dead_lettered(kafka_broker: KafkaBroker,
                                                                              tmp_path: Path) -> None:
    """The last resort, with the real broker: the output topic takes no record this large, not even the failed
    result; the failed result goes to the DLQ, the outbox entry to corrupt/, and done/ settles the task (so the
    consumer commits its offset), while a small result behind it is still published."""
    from selfix.job import Job
    from selfix.kafka import ResultPublisher
    from selfix.messages import completed_result
    from selfix.process import StopFlags
    from selfix.settings import load
    from selfix.spool import Spool
    from selfix.storage import open_store
    from selfix.uploader import Uploader

    tiny, dlq = f"out-tiny-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(tiny, 1, config={"max.message.bytes": "400"})
    kafka_broker.create_topic(dlq, 1)
    settings = load({**kafka_broker.settings_env(), "KAFKA_TOPIC_OUTPUT": tiny, "KAFKA_TOPIC_DLQ": dlq,
                     "SPOOL_DIR": str(tmp_path / "spool"), "STORE_DIR": str(tmp_path / "store"),
                     "COMFY_OUTPUT_DIR": str(tmp_path / "out"), "COMFY_INPUT_DIR": str(tmp_path / "in")})
    spool = Spool(settings.spool_dir).ensure()
    publisher = ResultPublisher(settings, spool, wait_s=10.0)
    uploader = Uploader(settings, spool, open_store(settings), publisher, StopFlags())
    keys = [f"users/u1/images/huge-{i}.png" for i in range(40)]
    staged = spool.stage_result("huge")
    for key in keys:
        (staged / Path(key).name).write_bytes(b"\x89PNG\r\n\x1a\n")
    spool.publish_result(staged, completed_result(Job("huge", "u1"), keys,
                                                  {"attempts": 1, "note": "x" * 300}))
    spool.write_result({"taskId": "small", "userId": "u1", "status": "completed", "imagePaths": [], "metadata": {}})
    tries = 0
    try:
        while spool.outbox_tasks() and tries < 10:  # deliver() ignores the backoff that run() would wait out
            tries += 1
            for task_id in spool.outbox_tasks():
                uploader.deliver(task_id)
    finally:
        publisher.close()
    assert tries == 2, "a refusal is believed the second time: the first may be for a batch shared with others"
    assert spool.outbox_tasks() == [] and uploader.refused is None
    huge = spool.read_done("huge")
    assert huge is not None and huge["status"] == "failed" and huge["error"]["code"] == "output_invalid"
    assert spool.read_done("small") is not None
    (name, reason), = spool.corrupt_entries()
    assert "huge" in name and "failed result too" in reason
    dead = read_topic(kafka_broker, dlq, min_count=1, idle=0.5)
    assert [(r.key, r.json()["error"]["code"]) for r in dead] == [("huge", "output_invalid")]
    assert dead[0].headers["selfix-result-topic"] == tiny.encode() and b"failed result too" in dead[0].headers[
        "selfix-error"]
    assert [r["taskId"] for r in results_of(read_topic(kafka_broker, tiny, min_count=1, idle=0.5))] == ["small"]


def test_a_dlq_record_the_dlq_refuses_never_holds_the_commits(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    """A value too large for the DLQ topic goes there as headers only; the partition's commit reaches its end."""
    from tests.servers.kafka_tools import IntakeThread, committed, end_offsets

    tag = uuid.uuid4().hex[:8]
    source, dlq, group = f"in-{tag}", f"dlq-{tag}", f"g-{tag}"
    kafka_broker.create_topic(source, 1, config={"max.message.bytes": str(1 << 20)})
    kafka_broker.create_topic(dlq, 1, config={"max.message.bytes": "2000"})
    produce(kafka_broker, source, [b"\x00garbage without a taskId " * 2000, b"[1, 2, 3]"])
    intake = IntakeThread(tmp_path, {**kafka_broker.settings_env(), "KAFKA_TOPIC_INPUT": source,
                                     "KAFKA_TOPIC_DLQ": dlq, "KAFKA_GROUP_ID": group}).start()
    try:
        dead = read_topic(kafka_broker, dlq, min_count=2, idle=0.5)
        wait_until(lambda: committed(kafka_broker, group, source, 1) == end_offsets(kafka_broker, source, 1), 30,
                   "committed offsets at the end of the partition")
    finally:
        intake.stop()
    # The broker judges a whole batch: the small record may have shared the large one's and lost its value too.
    assert len(dead) == 2 and all(r.headers.get("selfix-source-topic") == source.encode() for r in dead)
    assert b"52000" in {r.headers.get("selfix-truncated-from") for r in dead}
