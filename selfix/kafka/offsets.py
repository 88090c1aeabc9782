"""Per partition, what may be committed: the contiguous low-watermark of offsets whose result is published (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

TP = tuple[str, int]  # (topic, partition)


@dataclass
class _Partition:
    pending: set[int] = field(default_factory=set)  # received, result not yet published
    high: int = -1  # highest offset received
    committed: int | None = None  # last offset handed to mark_committed

    def watermark(self) -> int | None:
        if self.high < 0:
            return None
        return min(self.pending) if self.pending else self.high + 1


class OffsetTracker:
    """Per partition: which received offsets still wait for their result, and what may be committed.

    The committed offset is the next one to read: every received offset below it has its result published.
    Kafka delivers a partition in offset order, possibly with gaps (compaction, transaction markers), so the
    watermark is "lowest offset still pending", or "highest received + 1" when nothing is pending. An offset at or
    below the highest one received that is not pending was already handled: receiving it again is a duplicate.
    """

    def __init__(self) -> None:
        self._parts: dict[TP, _Partition] = {}

    def received(self, tp: TP, offset: int) -> bool:
        """Track a delivered message; False for a re-delivery of an offset already tracked or handled."""
        part = self._parts.setdefault(tp, _Partition())
        if offset <= part.high:
            return False
        part.high = offset
        part.pending.add(offset)
        return True

    def done(self, tp: TP, offset: int) -> bool:
        """The result of this offset is published; False if it was not pending (revoked partition, repeat)."""
        part = self._parts.get(tp)
        if part is None or offset not in part.pending:
            return False
        part.pending.discard(offset)
        return True

    def committable(self) -> dict[TP, int]:
        """Offsets to commit: partitions whose watermark moved past the last `mark_committed`."""
        out: dict[TP, int] = {}
        for tp, part in self._parts.items():
            mark = part.watermark()
            if mark is not None and (part.committed is None or mark > part.committed):
                out[tp] = mark
        return out

    def mark_committed(self, offsets: Mapping[TP, int]) -> None:
        for tp, offset in offsets.items():
            part = self._parts.get(tp)
            if part is not None and (part.committed is None or offset > part.committed):
                part.committed = offset

    def forget(self, tp: TP) -> None:
        """On revocation: the partition's next owner re-reads from the last commit."""
        self._parts.pop(tp, None)

    def rewind(self, tp: TP, offset: int) -> None:
        """The consumer seeks back to `offset`: what was received from there on will be delivered again."""
        part = self._parts.get(tp)
        if part is None:
            return
        part.pending = {o for o in part.pending if o < offset}
        part.high = min(part.high, offset - 1)
        if not part.pending and part.high < 0:
            self._parts.pop(tp, None)

    def next_offsets(self) -> dict[TP, int]:
        """Per partition, the offset after the highest one received: where consuming stands."""
        return {tp: part.high + 1 for tp, part in self._parts.items() if part.high >= 0}

    def pending(self, tp: TP) -> frozenset[int]:
        part = self._parts.get(tp)
        return frozenset(part.pending) if part else frozenset()

    def partitions(self) -> list[TP]:
        return list(self._parts)

    def inflight(self) -> int:
        return sum(len(p.pending) for p in self._parts.values())
