"""OffsetTracker: what may be committed is the contiguous low-watermark of published results (no broker)."""

from __future__ import annotations

import random

from selfix.kafka import OffsetTracker

A = ("tasks", 0)
B = ("tasks", 1)


def test_nothing_received_nothing_to_commit() -> None:
    t = OffsetTracker()
    assert t.committable() == {}
    assert t.inflight() == 0


def test_commit_is_next_offset_to_read() -> None:
    t = OffsetTracker()
    assert t.received(A, 0)
    assert t.committable() == {A: 0}  # nothing done yet: re-read from 0
    t.done(A, 0)
    assert t.committable() == {A: 1}
    assert t.inflight() == 0


def test_out_of_order_completion_holds_the_watermark() -> None:
    t = OffsetTracker()
    for off in (10, 11, 12, 13):
        t.received(A, off)
    t.done(A, 12)
    t.done(A, 13)
    assert t.committable() == {A: 10}  # 10 and 11 still running: a crash must re-deliver them
    t.done(A, 11)
    assert t.committable() == {A: 10}
    t.done(A, 10)
    assert t.committable() == {A: 14}
    assert t.inflight() == 0


def test_offset_gaps_are_not_waited_for() -> None:
    # Compaction and transaction markers leave holes; offsets never delivered must not block the commit.
    t = OffsetTracker()
    for off in (3, 7, 8, 20):
        t.received(A, off)
    for off in (3, 7, 8):
        t.done(A, off)
    assert t.committable() == {A: 20}
    t.done(A, 20)
    assert t.committable() == {A: 21}


def test_committable_only_reports_partitions_that_advanced() -> None:
    t = OffsetTracker()
    t.received(A, 0)
    t.received(B, 5)
    t.done(A, 0)
    assert t.committable() == {A: 1, B: 5}
    t.mark_committed(t.committable())
    assert t.committable() == {}
    t.done(B, 5)
    assert t.committable() == {B: 6}
    t.received(A, 1)  # received but not done: watermark stays 1, already committed
    assert t.committable() == {B: 6}


def test_mark_committed_never_moves_back() -> None:
    t = OffsetTracker()
    t.received(A, 0)
    t.done(A, 0)
    t.mark_committed({A: 1})
    t.mark_committed({A: 0})  # a late callback of an older commit
    assert t.committable() == {}


def test_duplicates_are_reported_and_ignored() -> None:
    t = OffsetTracker()
    assert t.received(A, 4)
    assert not t.received(A, 4)  # same message twice while pending
    assert t.inflight() == 1
    assert t.done(A, 4)
    assert not t.done(A, 4)  # result published twice
    assert not t.received(A, 4)  # re-delivered after it was handled
    assert t.inflight() == 0
    assert t.committable() == {A: 5}


def test_done_for_unknown_offset_or_partition_is_ignored() -> None:
    t = OffsetTracker()
    assert not t.done(A, 1)
    t.received(A, 2)
    assert not t.done(A, 1)
    assert t.committable() == {A: 2}


def test_revoke_forgets_the_partition() -> None:
    t = OffsetTracker()
    t.received(A, 0)
    t.received(A, 1)
    t.received(B, 0)
    t.done(A, 0)
    t.forget(A)
    assert t.inflight() == 1
    assert t.committable() == {B: 0}
    assert not t.done(A, 1)  # the job finished after revocation: the new owner commits, not us
    assert t.partitions() == [B]
    # Re-assigned later and re-delivered from the last commit: tracked afresh.
    assert t.received(A, 1)
    t.mark_committed({A: 1})
    assert t.committable() == {B: 0}
    t.done(A, 1)
    assert t.committable() == {A: 2, B: 0}


def test_forget_drops_committed_mark_too() -> None:
    t = OffsetTracker()
    t.received(A, 0)
    t.done(A, 0)
    t.mark_committed({A: 1})
    t.forget(A)
    t.mark_committed({A: 1})  # commit callback for a revoked partition: no resurrection
    assert t.partitions() == []


def test_pending_lists_unfinished_offsets() -> None:
    t = OffsetTracker()
    for off in range(5):
        t.received(A, off)
    t.done(A, 1)
    t.done(A, 3)
    assert t.pending(A) == {0, 2, 4}
    assert t.pending(B) == frozenset()


def test_random_completion_order_matches_a_model() -> None:
    rng = random.Random(7)
    for _ in range(200):
        t = OffsetTracker()
        offsets = sorted(rng.sample(range(100), rng.randint(1, 15)))
        for off in offsets:
            t.received(A, off)
        finished: set[int] = set()
        for off in rng.sample(offsets, len(offsets)):
            t.done(A, off)
            finished.add(off)
            undone = [o for o in offsets if o not in finished]
            expected = undone[0] if undone else offsets[-1] + 1
            assert t.committable() == {A: expected}
            assert t.inflight() == len(undone)
