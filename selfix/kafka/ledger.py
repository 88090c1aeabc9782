"""Which received offsets still wait for a published result, and which of those left the spool without one (pure).

The consumer commits a partition only up to the offsets whose task result is published (`OffsetTracker`). This
ledger maps each waited-for offset to its taskId and answers two questions through callables over the spool, with
no consumer and no broker; the caller applies the answers to the tracker and the consumer:
- `settle`: which waited-for offsets have a published result now (done/<taskId>.json): they are done.
- `audit`: which waited-for tasks are in no spool state on two audits in a row (withdrawn as the duplicate of
  another partition's copy, moved to corrupt/ by hand). Their result will never come, so their partition is read
  again from there: the caller seeks, then calls `rewound`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from selfix.kafka.offsets import TP

Key = tuple[TP, int]  # (topic, partition), offset


@dataclass(frozen=True)
class Rewind:
    """Read `tp` again from `offset`: the task received there left the spool without a published result."""

    tp: TP
    offset: int
    task_id: str


class PublishedLedger:
    """Offsets waited for, by partition, with their taskId. `published(task_id)`: done/<taskId>.json exists;
    `state_of(task_id)`: the spool state that holds the task, None when none does."""

    def __init__(self, published: Callable[[str], bool], state_of: Callable[[str], str | None]) -> None:
        self.published = published
        self.state_of = state_of
        self.waiting: dict[TP, dict[int, str]] = {}
        self.missing: set[Key] = set()  # waited-for offsets the last audit found in no spool state

    def __len__(self) -> int:
        return sum(len(offsets) for offsets in self.waiting.values())

    def wait(self, tp: TP, offset: int, task_id: str) -> None:
        self.waiting.setdefault(tp, {})[offset] = task_id

    def settle(self) -> list[Key]:
        """Waited-for offsets whose result is published now; they are no longer waited for."""
        settled: list[Key] = []
        for tp, offsets in self.waiting.items():
            for offset, task_id in list(offsets.items()):
                if self.published(task_id):
                    del offsets[offset]
                    self.missing.discard((tp, offset))
                    settled.append((tp, offset))
        return settled

    def audit(self, live: Collection[str]) -> list[Rewind]:
        """`live`: the taskIds in inbox/, processing/ or outbox/ right now (a cheap listing, possibly stale). A task
        missing from it and unpublished on this audit and the one before, and in no state by `state_of` (the
        precise look), is read again: one Rewind per partition, from the lowest such offset."""
        missing = {(tp, offset) for tp, offsets in self.waiting.items() for offset, task_id in offsets.items()
                   if task_id not in live and not self.published(task_id)}
        rewinds: dict[TP, Rewind] = {}
        for tp, offset in sorted(missing & self.missing):
            task_id = self.waiting[tp][offset]
            if tp not in rewinds and self.state_of(task_id) is None:
                rewinds[tp] = Rewind(tp, offset, task_id)
        self.missing = missing
        return list(rewinds.values())

    def rewound(self, tp: TP, offset: int) -> None:
        """The consumer reads `tp` again from `offset`: what was received from there on is delivered again."""
        self.waiting[tp] = {o: t for o, t in self.waiting.get(tp, {}).items() if o < offset}
        self.missing = {key for key in self.missing if key[0] != tp or key[1] < offset}

    def forget(self, tp: TP) -> None:
        """The partition was revoked: its next owner waits for its own copies."""
        self.waiting.pop(tp, None)
        self.missing = {key for key in self.missing if key[0] != tp}

    def started(self) -> int:
        """Waited-for tasks still on this node (inbox/ after a retry, processing/, outbox/)."""
        return sum(1 for offsets in self.waiting.values() for task_id in offsets.values()
                   if self.state_of(task_id) not in (None, "done"))
