"""selfix.admission: accepting a task into the spool, de-duplication, hand-dropped inbox files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from selfix import messages as m
from selfix.admission import Outcome, accept, ingest_dropped_files, limits_of
from selfix.job import Job
from selfix.messages import Limits
from selfix.settings import load
from selfix.spool import RESULT_FILE, InboxEntry, Spool
from selfix.templates import Catalog

USER = "alice"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


@pytest.fixture
def sp(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool").ensure()


@pytest.fixture
def logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda msg: lines.append(msg.record["message"]), level="DEBUG")
    yield lines
    logger.remove(sink)


def task(task_id: str = "t1", **extra: Any) -> bytes:
    msg = {"taskId": task_id, "userId": USER, "template": "demo", "params": {"width": 64}, **extra}
    return json.dumps(msg).encode()


def bad_task(task_id: str = "t1") -> bytes:
    return json.dumps({"taskId": task_id, "userId": USER, "workflow": {"1": {"inputs": {}}}}).encode()


def run(sp: Spool, raw: bytes, catalog: Catalog, **kw: Any) -> Outcome:
    return accept(sp, raw, Limits(), catalog, **kw)


# --- accept ---------------------------------------------------------------------------------------------


def test_accepted_task_becomes_one_canonical_inbox_file(sp: Spool, catalog: Catalog) -> None:
    out = run(sp, task(priority=5), catalog, source={"topic": "tasks", "partition": 0, "offset": 9})
    assert out == Outcome("accepted", "t1", priority=5)
    files = os.listdir(sp.inbox)
    assert len(files) == 1
    entry = InboxEntry.parse(files[0])
    assert entry is not None and (entry.task_id, entry.priority, entry.attempt) == ("t1", 5, 1)
    job = json.loads((sp.inbox / files[0]).read_bytes())
    assert job["taskId"] == "t1" and job["userId"] == USER and job["template"] == "demo"
    assert job["workflow"]["1"]["inputs"]["width"] == 64
    assert job["source"] == {"topic": "tasks", "partition": 0, "offset": 9}
    assert os.listdir(sp.outbox) == [] and os.listdir(sp.tmp) == []


def test_same_task_id_again_is_a_duplicate(sp: Spool, catalog: Catalog) -> None:
    assert run(sp, task(), catalog).kind == "accepted"
    again = run(sp, task(priority=9), catalog)
    assert again.kind == "duplicate" and again.task_id == "t1"
    assert len(os.listdir(sp.inbox)) == 1
    assert sp.inbox_entries()[0].priority == 0  # the first one stays as it was


def test_duplicate_when_the_task_is_processing(sp: Spool, catalog: Catalog) -> None:
    run(sp, task(), catalog)
    sp.claim(sp.inbox_entries()[0])
    assert run(sp, task(), catalog).kind == "duplicate"
    assert sp.inbox_entries() == []


def test_duplicate_when_the_task_is_in_outbox(sp: Spool, catalog: Catalog) -> None:
    sp.write_result(m.completed_result(Job("t1", USER), [], {}))
    out = run(sp, task(), catalog)
    assert out.kind == "duplicate" and "outbox" in out.detail
    assert sp.inbox_entries() == []


def test_duplicate_when_the_task_is_done(sp: Spool, catalog: Catalog) -> None:
    sp.finish(m.completed_result(Job("t1", USER), [], {}))
    out = run(sp, task(), catalog)
    assert out.kind == "duplicate" and "done" in out.detail
    assert sp.inbox_entries() == [] and os.listdir(sp.outbox) == []


def test_invalid_task_with_a_task_id_becomes_a_failed_result(sp: Spool, catalog: Catalog) -> None:
    out = run(sp, bad_task("t9"), catalog, source={"file": "x.json"})
    assert out.kind == "failed" and out.task_id == "t9"
    assert out.detail.startswith(m.INVALID_WORKFLOW + ":")
    assert sp.inbox_entries() == []
    assert sorted(os.listdir(sp.outbox / "t9")) == [RESULT_FILE]
    res = sp.read_result("t9")
    assert res["status"] == "failed" and res["taskId"] == "t9" and res["userId"] == USER
    assert res["error"]["code"] == m.INVALID_WORKFLOW and res["error"]["retriable"] is False
    assert res["metadata"]["attempts"] == 0 and res["metadata"]["source"] == {"file": "x.json"}


def test_invalid_task_already_known_is_a_duplicate_and_changes_nothing(sp: Spool, catalog: Catalog) -> None:
    run(sp, task("t1"), catalog)
    out = run(sp, bad_task("t1"), catalog)
    assert out.kind == "duplicate"
    assert os.listdir(sp.outbox) == [] and len(sp.inbox_entries()) == 1


@pytest.mark.parametrize("code_raw", [
    (m.LORA_FORBIDDEN, task(loraModel="users/bob/x.safetensors")),
    (m.UNKNOWN_TEMPLATE, task(template="nope")),
    (m.MESSAGE_TOO_LARGE, task(pad="x" * (1 << 20))),
    (m.INVALID_MESSAGE, json.dumps({"taskId": "t1", "userId": "../etc", "template": "demo"}).encode()),
], ids=lambda p: p[0])
def test_failed_result_carries_the_code(sp: Spool, catalog: Catalog, code_raw: tuple[str, bytes]) -> None:
    code, raw = code_raw
    out = run(sp, raw, catalog)
    assert out.kind == "failed"
    assert sp.read_result("t1")["error"]["code"] == code


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"userId": "alice"}', b'{"taskId": "../x"}', b"\xff\xfe"])
def test_unaddressable_messages_are_left_to_the_caller(sp: Spool, catalog: Catalog, raw: bytes) -> None:
    out = run(sp, raw, catalog)
    assert out.kind == "unaddressable" and out.task_id is None and out.detail
    assert sp.counts() == {"inbox": 0, "processing": 0, "outbox": 0, "done": 0, "corrupt": 0, "tmp": 0}


def test_limits_of_settings() -> None:
    s = load({"MAX_MESSAGE_BYTES": "100", "MAX_WORKFLOW_NODES": "7", "MAX_DATA_URL_BYTES": "55",
              "USER_PREFIX": "t/{userId}"})
    assert limits_of(s) == Limits(100, 7, 55, "t/{userId}/")


# --- hand-dropped files -----------------------------------------------------------------------------------


def test_ingest_dropped_files(sp: Spool, catalog: Catalog) -> None:
    run(sp, task("known"), catalog)
    (sp.inbox / "good.json").write_bytes(task("good", priority=3))
    (sp.inbox / "bad-workflow.json").write_bytes(bad_task("bad"))
    (sp.inbox / "garbage.txt").write_bytes(b"\x00\x01 definitely not a task")
    (sp.inbox / "again.json").write_bytes(task("known"))
    (sp.inbox / ".partial.json").write_bytes(b"{")  # hidden: someone is still writing it

    outcomes = {o.task_id: o for o in ingest_dropped_files(sp, Limits(), catalog)}
    assert {o.kind for o in outcomes.values()} == {"accepted", "failed", "unaddressable", "duplicate"}
    assert outcomes["good"].kind == "accepted" and outcomes["good"].priority == 3
    assert outcomes["bad"].kind == "failed" and outcomes["bad"].detail.startswith(m.INVALID_WORKFLOW)
    assert outcomes["known"].kind == "duplicate"
    assert outcomes[None].kind == "unaddressable"

    # canonical job for the good file, with its origin
    assert sorted(e.task_id for e in sp.inbox_entries()) == ["good", "known"]
    good = next(e for e in sp.inbox_entries() if e.task_id == "good")
    assert json.loads(sp.read_inbox(good))["source"] == {"file": "good.json"}  # type: ignore[arg-type]
    # failed result for the invalid file
    assert sp.read_result("bad")["error"]["code"] == m.INVALID_WORKFLOW
    # the garbage is kept in corrupt/ with its reason, bytes intact
    [(name, reason)] = sp.corrupt_entries()
    assert name.endswith("garbage.txt") and reason
    assert (sp.corrupt / name).read_bytes() == b"\x00\x01 definitely not a task"
    # every hand-dropped file was handled; the hidden one is left alone
    assert sp.foreign_inbox_files() == []
    assert (sp.inbox / ".partial.json").exists()


def test_ingest_is_idempotent(sp: Spool, catalog: Catalog) -> None:
    (sp.inbox / "a.json").write_bytes(task("a"))
    assert [o.kind for o in ingest_dropped_files(sp, Limits(), catalog)] == ["accepted"]
    assert ingest_dropped_files(sp, Limits(), catalog) == []
    assert [e.task_id for e in sp.inbox_entries()] == ["a"]


def test_ingest_after_a_crash_between_enqueue_and_unlink(sp: Spool, catalog: Catalog) -> None:
    # the canonical job exists and the dropped file was not removed yet: a second pass must not run it twice
    run(sp, task("a"), catalog)
    (sp.inbox / "a.json").write_bytes(task("a"))
    assert [o.kind for o in ingest_dropped_files(sp, Limits(), catalog)] == ["duplicate"]
    assert [e.task_id for e in sp.inbox_entries()] == ["a"]
    assert sp.foreign_inbox_files() == []


def test_ingest_sets_directories_aside_with_a_reason(sp: Spool, catalog: Catalog) -> None:
    (sp.inbox / "a-dir").mkdir()
    assert ingest_dropped_files(sp, Limits(), catalog) == []
    assert not (sp.inbox / "a-dir").exists()
    [(name, reason)] = sp.corrupt_entries()
    assert name.endswith("a-dir") and "cannot read" in reason


def test_ingest_logs_what_it_quarantines(sp: Spool, catalog: Catalog, logs: list[str]) -> None:
    (sp.inbox / "junk.bin").write_bytes(b"junk")
    ingest_dropped_files(sp, Limits(), catalog)
    assert any("junk.bin" in line for line in logs)


def test_ingest_never_deletes_a_duplicate_silently(sp: Spool, catalog: Catalog, logs: list[str]) -> None:
    run(sp, task("known"), catalog)
    logs.clear()
    (sp.inbox / "resubmitted.json").write_bytes(task("known"))
    [out] = ingest_dropped_files(sp, Limits(), catalog)
    assert out.kind == "duplicate"
    assert (sp.inbox / "resubmitted.json").exists() or any("resubmitted.json" in line for line in logs)


def test_ingest_survives_an_unreadable_file(sp: Spool, catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = sp.inbox / "locked.json"
    locked.write_bytes(task("locked"))
    (sp.inbox / "ok.json").write_bytes(task("ok"))
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "locked.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)  # as root, chmod 000 would not stop the read
    ingest_dropped_files(sp, Limits(), catalog)
    assert [e.task_id for e in sp.inbox_entries()] == ["ok"]
