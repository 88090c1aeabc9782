"""PublishedLedger: which waited-for offsets are published, and which left the spool without a result (no broker).

The spool is a dict taskId -> state ("inbox", "processing", "outbox", "done"; absent: in no state)."""

from __future__ import annotations

import pytest

from selfix.kafka.ledger import PublishedLedger, Rewind

A = ("tasks", 0)
B = ("tasks", 1)


def ledger_over(states: dict[str, str]) -> PublishedLedger:
    return PublishedLedger(lambda task_id: states.get(task_id) == "done", states.get)


def live_in(states: dict[str, str]) -> set[str]:
    return {t for t, s in states.items() if s in ("inbox", "processing", "outbox")}


@pytest.mark.parametrize(("states", "settled"), [
    ({"t0": "inbox", "t1": "processing", "t2": "outbox"}, []),
    ({"t0": "done", "t1": "processing", "t2": "done"}, [(A, 0), (A, 2)]),
    ({"t0": "done", "t1": "done", "t2": "done"}, [(A, 0), (A, 1), (A, 2)]),
    ({}, []),  # in no state is not published: the audit's business, not settle's
])
def test_settle_reports_the_offsets_whose_result_is_published(states: dict[str, str],
                                                              settled: list[tuple[tuple[str, int], int]]) -> None:
    ledger = ledger_over(states)
    for offset in range(3):
        ledger.wait(A, offset, f"t{offset}")
    assert ledger.settle() == settled
    assert len(ledger) == 3 - len(settled)
    assert ledger.settle() == [], "settled offsets are no longer waited for"


# Each row: the task's state at the first audit, at the second, and what the second audit returns.
@pytest.mark.parametrize(("first", "second", "rewinds"), [
    ("inbox", "inbox", False),
    ("processing", "outbox", False),
    (None, "inbox", False),  # back in the spool (a retry's rename): not missing twice in a row
    ("inbox", None, False),  # missing once only so far
    (None, None, True),  # missing on two audits in a row: read again
    (None, "done", False),  # published meanwhile
])
def test_audit_rewinds_a_task_missing_on_two_audits_in_a_row(first: str | None, second: str | None,
                                                             rewinds: bool) -> None:
    states: dict[str, str] = {"t7": first} if first else {}
    ledger = ledger_over(states)
    ledger.wait(A, 7, "t7")
    assert ledger.audit(live_in(states)) == []
    states.clear()
    if second:
        states["t7"] = second
    assert ledger.audit(live_in(states)) == ([Rewind(A, 7, "t7")] if rewinds else [])


def test_a_stale_listing_is_confirmed_by_state_of_before_a_rewind() -> None:
    # The listing missed the task (it was renamed between two listdirs), but state_of finds it: no rewind.
    states = {"t1": "processing"}
    ledger = ledger_over(states)
    ledger.wait(A, 1, "t1")
    assert ledger.audit(set()) == []
    assert ledger.audit(set()) == []
    assert ledger.missing == {(A, 1)}, "still missing by the listing: checked again next time"


def test_one_rewind_per_partition_from_its_lowest_missing_offset() -> None:
    states = {"a3": "inbox"}
    ledger = ledger_over(states)
    for tp, offset, task_id in [(A, 1, "a1"), (A, 2, "a2"), (A, 3, "a3"), (B, 5, "b5")]:
        ledger.wait(tp, offset, task_id)
    ledger.audit(live_in(states))
    assert ledger.audit(live_in(states)) == [Rewind(A, 1, "a1"), Rewind(B, 5, "b5")]


def test_rewound_forgets_from_the_offset_on_and_keeps_what_is_below() -> None:
    states = {"t1": "processing"}
    ledger = ledger_over(states)
    for offset in (1, 2, 3):
        ledger.wait(A, offset, f"t{offset}")
    ledger.audit(live_in(states))
    assert ledger.missing == {(A, 2), (A, 3)}
    ledger.rewound(A, 2)
    assert ledger.waiting == {A: {1: "t1"}}
    assert ledger.missing == set()
    ledger.wait(A, 2, "t2")  # delivered again: waited for afresh, one audit from the start
    assert ledger.audit(live_in(states)) == []


def test_forget_drops_a_partition_and_started_counts_tasks_still_on_the_node() -> None:
    states = {"a1": "inbox", "a2": "done", "b1": "outbox"}
    ledger = ledger_over(states)
    ledger.wait(A, 1, "a1")
    ledger.wait(A, 2, "a2")
    ledger.wait(A, 3, "a3")  # in no state: not started, nothing to wait for
    ledger.wait(B, 1, "b1")
    assert ledger.started() == 2
    ledger.forget(B)
    assert ledger.started() == 1
    assert len(ledger) == 3
