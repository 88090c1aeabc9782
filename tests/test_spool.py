"""selfix.spool: names that order the inbox, atomic moves between states, maintenance."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from selfix import spool as spool_mod
from selfix.job import Job
from selfix.spool import RESULT_FILE, InboxEntry, Spool, valid_task_id


@pytest.fixture
def sp(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool").ensure()


def job(task_id: str, priority: int = 0, enqueued: float = 1_700_000_000.0, **extra: Any) -> Job:
    return Job.from_dict({"taskId": task_id, "userId": "u1", "priority": priority,
                          "workflow": {"1": {"class_type": "X"}}, "attempt": 1, "enqueuedAt": enqueued, "notBefore": 0,
                          **extra})


def result(task_id: str, status: str = "completed") -> dict[str, Any]:
    return {"taskId": task_id, "userId": "u1", "status": status, "imagePath": None, "imagePaths": [],
            "metadata": {}}


def states(sp: Spool) -> list[tuple[str, str]]:
    return sorted(sp.iter_all_task_files())


# --- names -------------------------------------------------------------------------------------------


def test_ensure_creates_every_state_dir(sp: Spool) -> None:
    for d in ("tmp", "inbox", "processing", "outbox", "done", "corrupt", "run"):
        assert (sp.root / d).is_dir()


def test_inbox_order_is_priority_desc_then_oldest(sp: Spool) -> None:
    t0 = 1_700_000_000.0
    sp.enqueue(job("low-old", priority=-5, enqueued=t0))
    sp.enqueue(job("zero-new", priority=0, enqueued=t0 + 20))
    sp.enqueue(job("zero-old", priority=0, enqueued=t0 + 10))
    sp.enqueue(job("high-new", priority=10, enqueued=t0 + 30))
    sp.enqueue(job("high-old", priority=10, enqueued=t0 + 1))
    sp.enqueue(job("neg-one", priority=-1, enqueued=t0 + 40))
    sp.enqueue(job("most-negative", priority=-999_999, enqueued=t0))
    sp.enqueue(job("most-positive", priority=999_999, enqueued=t0 + 50))
    order = [e.task_id for e in sp.inbox_entries()]
    assert order == ["most-positive", "high-old", "high-new", "zero-old", "zero-new", "neg-one", "low-old",
                     "most-negative"]
    # the order follows from the names alone: a plain sort of the file names gives it
    assert [InboxEntry.parse(n).task_id for n in sorted(os.listdir(sp.inbox))] == order  # type: ignore[union-attr]


def test_inbox_ties_on_priority_and_time_are_deterministic(sp: Spool) -> None:
    for tid in ("c", "a", "b"):
        sp.enqueue(job(tid, priority=3, enqueued=1_700_000_000.0))
    assert [e.task_id for e in sp.inbox_entries()] == ["a", "b", "c"]
    assert [e.task_id for e in sp.inbox_entries()] == [e.task_id for e in sp.inbox_entries()]


def test_negative_priorities_sort_below_zero_by_magnitude() -> None:
    names = [InboxEntry.make_name(f"p{p}", p, 1000) for p in (-1, -100, 0, -2, 5)]
    ordered = [InboxEntry.parse(n).priority for n in sorted(names)]  # type: ignore[union-attr]
    assert ordered == [5, 0, -1, -2, -100]


@pytest.mark.parametrize(
    ("task_id", "priority", "enq", "nb", "attempt"),
    [
        ("task-1", 0, 1_700_000_000_123, 0, 1),
        ("a.b_c-D9", -999_999, 0, 1_700_000_999_000, 99),
        ("x" * 128, 999_999, 9_999_999_999_999, 9_999_999_999_999, 2),
        ("t.json", -1, 5, 6, 7),
    ],
)
def test_make_name_round_trips_through_parse(task_id: str, priority: int, enq: int, nb: int, attempt: int) -> None:
    name = InboxEntry.make_name(task_id, priority, enq, nb, attempt)
    entry = InboxEntry.parse(name)
    assert entry == InboxEntry(name, priority, enq, nb, attempt, task_id)


def test_make_name_clamps_out_of_range_priority_and_attempt() -> None:
    entry = InboxEntry.parse(InboxEntry.make_name("t", 10**9, 1, 0, 500))
    assert entry is not None and entry.priority == 999_999 and entry.attempt == 99
    entry = InboxEntry.parse(InboxEntry.make_name("t", -(10**9), 1))
    assert entry is not None and entry.priority == -999_999


@pytest.mark.parametrize("bad", ["", ".", "..", ".hidden", "a/b", "a b", "x" * 129, "é", "a\x00", None, 12])
def test_invalid_task_ids_are_refused(bad: Any) -> None:
    assert not valid_task_id(bad)
    with pytest.raises(ValueError):
        InboxEntry.make_name(bad, 0, 1)


@pytest.mark.parametrize("good", ["a", "A-Z_0.9", "x" * 128, "a..b", "trailing."])
def test_valid_task_ids(good: str) -> None:
    assert valid_task_id(good)


@pytest.mark.parametrize("name", ["job.json", "0000001.json", "README", ".0000001.x.json",
                                  "1000000.0000000000001.0000000000000.01..hidden.json",
                                  "1000000.0000000000001.0000000000000.01.a.txt"])
def test_parse_refuses_non_canonical_names(name: str) -> None:
    assert InboxEntry.parse(name) is None


# --- inbox → processing ---------------------------------------------------------------------------------


def test_enqueue_writes_the_job_whole(sp: Spool) -> None:
    path = sp.enqueue(job("t1", priority=2))
    assert path.parent == sp.inbox
    assert json.loads(path.read_bytes())["taskId"] == "t1"
    assert os.listdir(sp.tmp) == []


def test_claim_is_exclusive(sp: Spool) -> None:
    sp.enqueue(job("t1"))
    entry = sp.inbox_entries()[0]
    first = sp.claim(entry)
    assert first == sp.processing_path("t1") and first.exists()
    assert sp.claim(entry) is None
    assert sp.inbox_entries() == []
    assert states(sp) == [("processing", "t1")]


def test_next_ready_honours_not_before(sp: Spool) -> None:
    now = time.time()
    sp.enqueue(job("later", priority=9, notBefore=now + 60))
    sp.enqueue(job("now", priority=0))
    assert sp.next_ready(now).task_id == "now"  # type: ignore[union-attr]
    assert sp.next_ready(now + 61).task_id == "later"  # type: ignore[union-attr]
    assert sp.next_wakeup() == pytest.approx(0.0)  # "now" has notBefore 0


def test_next_ready_is_none_when_everything_waits(sp: Spool) -> None:
    now = time.time()
    sp.enqueue(job("later", notBefore=now + 60))
    assert sp.next_ready(now) is None
    assert sp.next_wakeup() == pytest.approx(now + 60, abs=0.002)
    assert Spool(sp.root / "empty").next_ready() is None


def test_requeue_moves_processing_back_to_inbox_with_new_attempt_and_not_before(sp: Spool) -> None:
    sp.enqueue(job("t1", priority=4))
    sp.claim(sp.inbox_entries()[0])
    j = sp.load_job(sp.processing_path("t1"))
    target = sp.requeue(dataclasses.replace(j, attempt=2, not_before=1_800_000_000.5))
    assert not sp.processing_path("t1").exists()
    entry = InboxEntry.parse(target.name)
    assert entry is not None
    assert (entry.task_id, entry.attempt, entry.not_before_ms, entry.priority) == ("t1", 2, 1_800_000_000_500, 4)
    assert json.loads(target.read_bytes())["attempt"] == 2
    assert states(sp) == [("inbox", "t1")]


def test_withdraw_removes_a_not_started_job(sp: Spool) -> None:
    sp.enqueue(job("t1"))
    entry = sp.inbox_entries()[0]
    assert sp.withdraw(entry) is True
    assert sp.withdraw(entry) is False
    assert states(sp) == [] and os.listdir(sp.tmp) == []


# --- outbox, done -------------------------------------------------------------------------------------


def test_publish_result_moves_a_whole_dir_in_one_rename(sp: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    staged = sp.stage_result("t1")
    assert staged.parent == sp.tmp
    (staged / "0.png").write_bytes(b"png-0")
    (staged / "1.png").write_bytes(b"png-1")
    renames: list[tuple[str, str]] = []
    real_rename = os.rename

    def spy(src: Any, dst: Any) -> None:
        renames.append((str(src), str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", spy)
    assert sp.publish_result(staged, result("t1")) is True
    assert renames == [(str(staged), str(sp.outbox_dir("t1")))]
    assert not staged.exists()
    assert sorted(p.name for p in sp.outbox_dir("t1").iterdir()) == ["0.png", "1.png", RESULT_FILE]
    assert sp.read_result("t1")["status"] == "completed"
    assert [p.name for p in sp.result_images("t1")] == ["0.png", "1.png"]
    assert sp.outbox_tasks() == ["t1"]


def test_publish_result_refuses_when_outbox_entry_exists(sp: Spool) -> None:
    first = sp.stage_result("t1")
    (first / "0.png").write_bytes(b"first")
    assert sp.publish_result(first, result("t1")) is True
    second = sp.stage_result("t1")
    (second / "0.png").write_bytes(b"second")
    assert sp.publish_result(second, result("t1", status="failed")) is False
    assert (sp.outbox_dir("t1") / "0.png").read_bytes() == b"first"
    assert sp.read_result("t1")["status"] == "completed"
    assert not second.exists()  # the loser's staging dir is cleaned up
    assert sp.write_result(result("t1", status="failed")) is False
    assert sp.read_result("t1")["status"] == "completed"


def test_finish_writes_done_and_removes_the_outbox(sp: Spool) -> None:
    sp.write_result(result("t1"))
    sp.finish(result("t1"))
    assert not sp.outbox_dir("t1").exists()
    assert sp.read_done("t1") == result("t1")
    assert states(sp) == [("done", "t1")]
    assert os.listdir(sp.tmp) == []
    assert sp.read_done("unknown") is None


def test_finish_without_an_outbox_entry_still_records_done(sp: Spool) -> None:
    sp.finish(result("t1", status="failed"))
    assert sp.state_of("t1") == "done"


# --- knowledge across states ----------------------------------------------------------------------------


def test_state_of_and_known_task_ids_cover_every_state(sp: Spool) -> None:
    sp.enqueue(job("in-inbox"))
    sp.enqueue(job("in-processing"))
    sp.claim(next(e for e in sp.inbox_entries() if e.task_id == "in-processing"))
    sp.write_result(result("in-outbox"))
    sp.finish(result("in-done"))
    expected = {"in-inbox": "inbox", "in-processing": "processing", "in-outbox": "outbox", "in-done": "done"}
    for task_id, state in expected.items():
        assert sp.state_of(task_id) == state
    assert sp.state_of("nowhere") is None
    assert sp.known_task_ids() == expected
    assert states(sp) == sorted((s, t) for t, s in expected.items())
    counts = sp.counts()
    assert (counts["inbox"], counts["processing"], counts["outbox"], counts["done"]) == (1, 1, 1, 1)


def test_state_of_prefers_the_later_state_during_a_crash_window(sp: Spool) -> None:
    # finish() writes done/ before removing outbox/: between the two, done/ is what counts
    sp.write_result(result("t1"))
    sp._atomic_write(sp.done_path("t1"), b"{}")
    assert sp.state_of("t1") == "done"
    assert sp.known_task_ids() == {"t1": "done"}


# --- corrupt, maintenance --------------------------------------------------------------------------------


def test_quarantine_keeps_the_file_and_a_reason(sp: Spool) -> None:
    bad = sp.inbox / "broken.json"
    bad.write_bytes(b"{not json")
    target = sp.quarantine(bad, "invalid JSON at line 1")
    assert not bad.exists()
    assert target.parent == sp.corrupt and target.read_bytes() == b"{not json"
    assert target.name.endswith("broken.json")
    assert target.with_name(target.name + ".reason").read_text().strip() == "invalid JSON at line 1"
    assert sp.corrupt_entries() == [(target.name, "invalid JSON at line 1")]
    assert sp.counts()["corrupt"] == 1


def test_quarantine_bytes_keeps_the_bytes(sp: Spool) -> None:
    target = sp.quarantine_bytes(b"\xff\xfe raw", "../../etc/passwd", "not UTF-8")
    assert target.parent == sp.corrupt and target.read_bytes() == b"\xff\xfe raw"
    assert "/" not in target.name[len(str(sp.corrupt)):].lstrip("/")
    assert sp.corrupt_entries()[0][1] == "not UTF-8"


def test_prune_done_by_age(sp: Spool) -> None:
    sp.finish(result("old"))
    sp.finish(result("new"))
    week_ago = time.time() - 8 * 86400
    os.utime(sp.done_path("old"), (week_ago, week_ago))
    assert sp.prune_done(7 * 86400) == 1
    assert sp.read_done("old") is None and sp.read_done("new") is not None
    assert sp.prune_done(7 * 86400) == 0


def test_clean_tmp_only_removes_old_entries(sp: Spool) -> None:
    old_file = sp.tmp / "old-file"
    old_file.write_bytes(b"x")
    old_dir = sp.stage_result("old-dir")
    (old_dir / "0.png").write_bytes(b"x")
    fresh = sp.tmp / "fresh-file"
    fresh.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    for p in (old_file, old_dir):
        os.utime(p, (two_hours_ago, two_hours_ago))
    assert sp.clean_tmp(3600) == 2
    assert os.listdir(sp.tmp) == ["fresh-file"]


def test_foreign_inbox_files_lists_hand_dropped_names_only(sp: Spool) -> None:
    sp.enqueue(job("canonical"))
    (sp.inbox / "mine.json").write_text("{}")
    (sp.inbox / "other-name").write_text("{}")
    (sp.inbox / ".editor.swp").write_text("")
    assert [p.name for p in sp.foreign_inbox_files()] == ["mine.json", "other-name"]
    assert [e.task_id for e in sp.inbox_entries()] == ["canonical"]
    assert sp.counts()["inbox"] == 3


def test_a_reader_never_sees_a_partial_file(sp: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(src: Any, dst: Any) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed before"):
        sp.enqueue(job("t1"))
    assert os.listdir(sp.inbox) == []
    assert sp.inbox_entries() == [] and sp.foreign_inbox_files() == []
    assert os.listdir(sp.tmp) == []  # the failed writer removed its temp file (a kill -9 leaves it for clean_tmp)


def test_a_failure_while_staging_a_result_leaves_nothing(sp: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    staged = sp.stage_result("t1")
    (staged / "0.png").write_bytes(b"img")

    def crash(src: Any, dst: Any) -> None:
        raise PermissionError("killed before the rename")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(PermissionError):
        sp.publish_result(staged, result("t1"))
    assert os.listdir(sp.outbox) == []
    assert not staged.exists()  # the writer removes its own staging dir (a kill -9 leaves it for clean_tmp)


def test_heartbeats(sp: Spool) -> None:
    assert sp.heartbeat_age("runner") is None
    sp.beat("runner")
    age = sp.heartbeat_age("runner")
    assert age is not None and 0 <= age < 5
    old = time.time() - 100
    os.utime(sp.heartbeat_path("runner"), (old, old))
    assert sp.heartbeat_age("runner") >= 99  # type: ignore[operator]
    sp.beat("runner")
    assert sp.heartbeat_age("runner") < 5  # type: ignore[operator]


def test_writable(sp: Spool, tmp_path: Path) -> None:
    assert sp.writable() is True
    assert Spool(tmp_path / "missing").writable() is False


# --- property: random interleavings keep every task in exactly one state ---------------------------------


def _check_one_state_each(sp: Spool, model: dict[str, str | None]) -> None:
    seen: dict[str, list[str]] = {}
    for state, task_id in sp.iter_all_task_files():
        seen.setdefault(task_id, []).append(state)
    for task_id, found in seen.items():
        assert len(found) == 1, f"{task_id} is in {found}"
    assert {t: s[0] for t, s in seen.items()} == {t: s for t, s in model.items() if s is not None}
    assert sp.known_task_ids() == {t: s[0] for t, s in seen.items()}
    for tid, expected in model.items():
        assert sp.state_of(tid) == expected


@pytest.mark.parametrize("seed", range(3))
def test_random_interleavings_keep_every_task_in_exactly_one_state(tmp_path: Path, seed: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not under test here; speed is needed
    rng = random.Random(seed)
    sp = Spool(tmp_path / f"s{seed}").ensure()
    tasks = [f"task-{i:02d}" for i in range(50)]
    model: dict[str, str | None] = dict.fromkeys(tasks)
    base = 1_700_000_000.0

    def enqueue(t: str) -> None:
        sp.enqueue(job(t, priority=rng.randint(-3, 3), enqueued=base + rng.random() * 100))
        model[t] = "inbox"

    def claim(t: str) -> None:
        entry = next(e for e in sp.inbox_entries() if e.task_id == t)
        assert sp.claim(entry) is not None
        assert sp.claim(entry) is None  # a competing claim loses
        model[t] = "processing"

    def requeue(t: str) -> None:
        j = sp.load_job(sp.processing_path(t))
        sp.requeue(dataclasses.replace(j, attempt=j.attempt + 1, not_before=base + rng.random() * 10))
        model[t] = "inbox"

    def publish(t: str) -> None:
        staged = sp.stage_result(t)
        for i in range(rng.randint(0, 2)):
            (staged / f"{i}.png").write_bytes(b"img")
        assert sp.publish_result(staged, result(t)) is True
        sp.drop_processing(t)
        model[t] = "outbox"

    def finish(t: str) -> None:
        sp.finish(sp.read_result(t))
        model[t] = "done"

    moves = {None: [enqueue], "inbox": [claim], "processing": [requeue, publish, publish], "outbox": [finish],
             "done": []}
    for _ in range(600):
        live = [t for t in tasks if moves[model[t]]]
        if not live:
            break
        t = rng.choice(live)
        rng.choice(moves[model[t]])(t)
        _check_one_state_each(sp, model)
    for t in tasks:  # drive everything to done
        while model[t] != "done":
            {None: enqueue, "inbox": claim, "processing": publish, "outbox": finish}[model[t]](t)
    _check_one_state_each(sp, model)
    assert sp.counts()["done"] == 50
    assert os.listdir(sp.tmp) == []


def test_module_exposes_consistent_state_names() -> None:
    assert spool_mod.STATES == ("tmp", "inbox", "processing", "outbox", "done", "corrupt")
