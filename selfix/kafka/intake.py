"""The consumer process's Kafka loop: task messages → validated job files in inbox/ (or a failed result in outbox/).

- Every message goes through `admission.accept` (the same validation as `selfix submit`): a job in inbox/, a failed
  result in outbox/ (the uploader publishes it), or a duplicate of a taskId this node already knows (any state,
  done/ included), which is not run again.
- Offsets are committed by hand, per partition, only up to the contiguous low-watermark of tasks whose result is
  published: `done/<taskId>.json` exists (the uploader writes it after Kafka acknowledged the result); see
  `ledger.PublishedLedger`. A message without a readable taskId counts as published once it is on KAFKA_TOPIC_DLQ
  (`deadletters.DeadLetters`; without a DLQ, once logged). So a node that dies loses nothing: the group re-delivers
  everything past the last commit.
- At KAFKA_MAX_INFLIGHT unfinished tasks on the node (inbox/ + processing/ + outbox/) every assigned partition is
  paused; polling goes on (group membership, callbacks), and they resume below the mark. Among the tasks fetched,
  the inbox order runs higher priority first.
- On revocation: commit what is safe, then withdraw the revoked partitions' jobs that have not started (their
  `source` names topic/partition/offset), so the new owner runs them instead of both nodes.
- On SIGTERM (supervisord stops the consumer first): stop taking, withdraw the not-started jobs as above, then stay
  in the group, committing, until every task that has started is published (at most KAFKA_DRAIN_S), so the final
  commit covers every result this node publishes; then leave the group (close).
- Credentials or TLS refused: one log line naming the setting, exit EXIT_UNAVAILABLE (69), never a silent loop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from loguru import logger

from selfix.admission import Outcome, accept, adopt_dropped, limits_of
from selfix.clock import Clock, SystemClock
from selfix.control import listener_for
from selfix.files import DiskFull, disk_full_error
from selfix.kafka.config import LibrdkafkaLog, consumer_config
from selfix.kafka.deadletters import DeadLetters, dead_letter
from selfix.kafka.errors import ErrorTriage, PublishError, is_retriable
from selfix.kafka.ledger import PublishedLedger
from selfix.kafka.offsets import TP, OffsetTracker
from selfix.kafka.producer import KafkaSender
from selfix.kafka.publisher import event_message
from selfix.messages import peek_ids
from selfix.process import EXIT_ABORTED, EXIT_ERROR, EXIT_OK, EXIT_UNAVAILABLE, StopFlags
from selfix.settings import Settings
from selfix.spool import Spool
from selfix.templates import Catalog

TICK_S = 0.1  # how often finished tasks are looked for (done/), offsets committed, pausing decided
ADOPT_EVERY_S = 0.5  # hand-dropped inbox files
COMMIT_EVERY_S = 0.5
AUDIT_EVERY_S = 2.0  # a waited-for task in no spool state on two audits in a row is read again from Kafka


class KafkaIntake:
    """The Kafka loop. One instance per consumer process; `run()` returns the process exit code."""

    def __init__(self, settings: Settings, spool: Spool, catalog: Catalog, flags: StopFlags,
                 overrides: Mapping[str, Any] | None = None, clock: Clock | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.catalog = catalog
        self.flags = flags
        self.clock: Clock = clock or SystemClock()
        self.limits = limits_of(settings)
        self.topic = settings.kafka_topic_input
        self.tracker = OffsetTracker()
        self.ledger = PublishedLedger(lambda task_id: spool.done_path(task_id).exists(), spool.state_of)
        self.done_mtime = -1
        self.last_audit = self.clock.monotonic()
        self.paused = False
        self.stale_pause = False  # partitions came back that librdkafka may still hold paused (on_assign)
        self.held = 0
        self.disk = DiskFull("consumer")
        self.held_back: dict[TP, int] = {}  # per partition, the first offset to read again once space returns
        self.errors = ErrorTriage((settings.kafka_sasl_password,))
        self.last_tick = self.last_adopt = self.last_commit = 0.0
        self.counts = {"accepted": 0, "duplicate": 0, "failed": 0, "unaddressable": 0}
        self.sender: KafkaSender | None = None
        if settings.kafka_topic_dlq or settings.kafka_status_events:
            self.sender = KafkaSender(settings, "consumer")
        self.dead: DeadLetters | None = None
        if self.sender is not None and settings.kafka_topic_dlq:
            self.dead = DeadLetters(self.sender, settings.kafka_topic_dlq, self.tracker.done, self.clock)
        conf = consumer_config(settings, overrides={
            "error_cb": self.errors, "on_commit": self.on_commit, "logger": LibrdkafkaLog(), **(overrides or {})})
        self.consumer = Consumer(conf)
        self.control = listener_for(settings, spool)  # KAFKA_TOPIC_CONTROL, outside the group (control.py)
        logger.info("consumer: Kafka {} topic {} group {}, pause at {} unfinished task(s){}{}",
                    settings.kafka_bootstrap, self.topic, settings.kafka_group_id, settings.kafka_max_inflight,
                    f", DLQ {settings.kafka_topic_dlq}" if settings.kafka_topic_dlq else ", no DLQ (log only)",
                    ", status events on" if settings.kafka_status_events else "")

    # --- main loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        self.consumer.subscribe([self.topic], on_assign=self.on_assign, on_revoke=self.on_revoke,
                                on_lost=self.on_lost)
        code = EXIT_OK
        try:
            while not self.flags.stopping.is_set():
                self.flags.beat()
                if self.errors.fatal is not None:
                    code = self.fail_fast(self.errors.fatal)
                    break
                # Paused partitions deliver nothing, but polling goes on: heartbeats, rebalances, callbacks.
                msg = self.consumer.poll(0 if self.due() else TICK_S)
                self.errors.sort()
                if msg is not None:  # every message returned must be tracked, or the watermark would skip it
                    self.handle(msg)
                if self.due():
                    self.tick()
        finally:
            self.shutdown()
        if code == EXIT_OK and self.flags.abort.is_set():
            code = EXIT_ABORTED
        return code

    def due(self) -> bool:
        return self.clock.monotonic() - self.last_tick >= TICK_S

    def tick(self) -> None:
        now = self.clock.monotonic()
        self.last_tick = now
        if self.sender is not None:
            self.sender.poll(0)
        self.settle()
        self.control.poll()
        if self.dead is not None:
            self.dead.poll()
        if now - self.last_adopt >= ADOPT_EVERY_S or (self.disk.active and self.disk.due()):
            self.last_adopt = now
            adopt_dropped(self.spool, self.limits, self.catalog, self.disk)  # also probes a full disk
        self.flow_control(recount=True)
        if now - self.last_commit >= COMMIT_EVERY_S:
            self.commit(asynchronous=True)

    # --- one message -------------------------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return
            self.errors.report(err, "consume")
            return
        tp: TP = (str(msg.topic()), int(msg.partition() or 0))
        offset = int(msg.offset() or 0)
        if self.disk.active:  # fetched before the pause took effect: read again once space returns
            if offset >= self.tracker.next_offsets().get(tp, 0):
                self.hold_back(tp, offset)
            return
        if not self.tracker.received(tp, offset):
            return  # re-delivery of an offset this session already handled
        raw = msg.value() or b""
        source = {"topic": tp[0], "partition": tp[1], "offset": offset}
        try:
            outcome = accept(self.spool, raw, self.limits, self.catalog, source,
                             sent_at=max(0, msg.timestamp()[1]) / 1000 or None)  # ttlS counts from here
        except OSError as exc:
            full = disk_full_error(exc)
            if full is None:
                raise  # the spool's disk failing: crash, restart, read the message again (offset not committed)
            self.disk.hit(full, self.spool.root)
            self.hold_back(tp, offset)
            return
        except Exception as exc:  # noqa: BLE001 - a message selfix cannot digest must not block its partition
            logger.opt(exception=True).error("{}[{}]@{}: intake failed on this message", tp[0], tp[1], offset)
            outcome = Outcome("unaddressable", None, f"selfix could not process it: {exc!r}"[:300])
        self.counts[outcome.kind] += 1
        where = f"{tp[0]}[{tp[1]}]@{offset}"
        if outcome.kind == "unaddressable":
            self.unaddressable(tp, offset, msg, raw, outcome.detail, where)
            return
        assert outcome.task_id is not None
        if outcome.kind == "duplicate":
            logger.bind(task_id=outcome.task_id).info("{}: duplicate, {}: not run again", where, outcome.detail)
        if outcome.kind == "accepted":
            self.held += 1
            if self.settings.kafka_status_events:
                self.emit_accepted(outcome.task_id, raw, outcome.priority, source)
        if self.ledger.published(outcome.task_id):
            self.tracker.done(tp, offset)
        else:
            self.ledger.wait(tp, offset, outcome.task_id)
        self.flow_control(recount=False)

    def emit_accepted(self, task_id: str, raw: bytes, priority: int, source: dict[str, Any]) -> None:
        if self.sender is None:
            return
        value, headers = event_message("accepted", task_id, peek_ids(raw)[1], priority=priority, source=source)
        try:
            self.sender.send(self.settings.kafka_topic_output, task_id, value, headers)
        except PublishError as exc:
            logger.bind(task_id=task_id).debug("status event accepted dropped: {}", exc)

    def unaddressable(self, tp: TP, offset: int, msg: Message, raw: bytes, reason: str, where: str) -> None:
        preview = raw[:80].decode("utf-8", "replace").encode("unicode_escape").decode()
        if self.dead is None:
            logger.warning("{}: no readable taskId, nobody to answer ({}); {} byte(s) skipped (set KAFKA_TOPIC_DLQ "
                           "to keep such messages): {!r}", where, reason, len(raw), preview)
            self.tracker.done(tp, offset)
            return
        logger.warning("{}: no readable taskId ({}); {} byte(s) to the DLQ {}: {!r}", where, reason, len(raw),
                       self.dead.topic, preview)
        self.dead.add(dead_letter(tp, offset, msg.key(), raw, reason, msg.timestamp()[1], msg.headers() or []))

    # --- finished tasks and commits ----------------------------------------------------------------------
    def settle(self, force: bool = False) -> None:
        """Offsets whose task has a published result (done/<taskId>.json) are done. done/ changes by renames
        into it, so while its mtime stands still nothing new was published and the stat()s are skipped."""
        try:
            mtime = os.stat(self.spool.done).st_mtime_ns
        except FileNotFoundError:
            mtime = -1
        if force or mtime != self.done_mtime:
            self.done_mtime = mtime
            for tp, offset in self.ledger.settle():
                self.tracker.done(tp, offset)
        if self.clock.monotonic() - self.last_audit >= AUDIT_EVERY_S:
            self.audit()

    def audit(self) -> None:
        """Read again from Kafka what left the spool without a published result (ledger.PublishedLedger.audit)."""
        self.last_audit = self.clock.monotonic()
        live: set[str] = set()
        if len(self.ledger):
            live = {e.task_id for e in self.spool.inbox_entries()} | {p.stem for p in self.spool.processing_files()}
            live.update(self.spool.outbox_tasks())
        for rewind in self.ledger.audit(live):
            self.rewind(rewind.tp, rewind.offset, rewind.task_id)

    def rewind(self, tp: TP, offset: int, task_id: str) -> None:
        logger.bind(task_id=task_id).warning("{}[{}]@{}: task left the spool without a published result; "
                                             "reading the partition again from that offset", tp[0], tp[1], offset)
        try:
            self.consumer.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException as exc:
            logger.warning("seek {}[{}] to {} failed, trying again later: {}", tp[0], tp[1], offset, exc)
            return
        self.tracker.rewind(tp, offset)
        self.ledger.rewound(tp, offset)
        if self.dead is not None:
            self.dead.drop(tp, offset)

    def commit(self, asynchronous: bool, only: set[TP] | None = None) -> None:
        offsets = {tp: o for tp, o in self.tracker.committable().items() if only is None or tp in only}
        if not offsets:
            return
        self.last_commit = self.clock.monotonic()
        parts = [TopicPartition(tp[0], tp[1], o) for tp, o in offsets.items()]
        try:
            if asynchronous:
                self.consumer.commit(offsets=parts, asynchronous=True)
            else:
                self.consumer.commit(offsets=parts, asynchronous=False)
                self.tracker.mark_committed(offsets)
                logger.debug("committed {}", _show(offsets))
        except KafkaException as exc:
            self.errors.report(exc, "commit")

    def on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:
            self.errors.report(err, "commit")
            return
        good = {(p.topic, p.partition): p.offset for p in partitions if p.error is None and p.offset >= 0}
        self.tracker.mark_committed(good)
        if good:
            logger.debug("committed {}", _show(good))

    # --- pausing -------------------------------------------------------------------------------------------
    def unfinished(self) -> int:
        """Tasks on this node without a published result: names in inbox/ (hand-dropped ones included),
        processing/ and outbox/. One listdir each, no parsing: this runs ten times a second."""
        return sum(_count(d) for d in (self.spool.inbox, self.spool.processing, self.spool.outbox))

    def hold_back(self, tp: TP, offset: int) -> None:
        """The spool's disk is full: this message was not taken. Forget it and everything after it on its
        partition (nothing of it was written), pause intake, and read from it again once space returns."""
        self.tracker.rewind(tp, offset)
        self.held_back[tp] = min(self.held_back.get(tp, offset), offset)
        self.flow_control(recount=False)

    def flow_control(self, recount: bool) -> None:
        if recount:
            self.held = self.unfinished()
        want_paused = self.held >= self.settings.kafka_max_inflight or self.disk.active
        if want_paused == self.paused and not self.stale_pause:
            return
        parts = self.consumer.assignment()
        try:
            if want_paused:
                self.consumer.pause(parts)
            else:
                self.resume(parts)
        except KafkaException as exc:  # a rebalance in between: decide again on the next tick
            logger.debug("pause/resume postponed: {}", exc)
            return
        self.paused, self.stale_pause = want_paused, False
        logger.info("{} {} partition(s): {} unfinished task(s) on this node (KAFKA_MAX_INFLIGHT={}){}",
                    "paused" if want_paused else "resumed", len(parts), self.held, self.settings.kafka_max_inflight,
                    ", spool disk full" if self.disk.active else "")

    def resume(self, parts: list[TopicPartition]) -> None:
        """Resume, then seek each partition to the offset after the last one received. Pausing dropped what
        librdkafka had prefetched, and after a plain resume its fetcher idles up to a second before it fetches
        again; the seek (to exactly the next offset not yet delivered, so nothing is skipped) starts it at once."""
        self.consumer.resume(parts)
        assigned = {(p.topic, p.partition) for p in parts}
        for tp, offset in {**self.tracker.next_offsets(), **self.held_back}.items():
            if tp in assigned:
                self.consumer.seek(TopicPartition(tp[0], tp[1], offset))
        self.held_back = {}

    # --- rebalancing ---------------------------------------------------------------------------------------
    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            self.forget((p.topic, p.partition))
        consumer.incremental_assign(partitions)
        if self.paused and partitions:
            consumer.pause(partitions)
        elif partitions:
            # librdkafka keeps the pause of a partition revoked while paused, so one that comes back now would stay
            # paused for good. The next flow control resumes them all; not here, as a resume right after the assign
            # can outdate the assign's fetch start (librdkafka#2190).
            self.stale_pause = True
        logger.info("assigned {}", _show_parts(partitions) or "nothing new")

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        if revoked:
            self.settle(force=True)
            self.commit(asynchronous=False, only=revoked)
        self.release(revoked, "revoked")

    def on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.release({(p.topic, p.partition) for p in partitions}, "lost (session timed out)")

    def release(self, revoked: set[TP], why: str) -> None:
        if not revoked:
            return
        withdrawn = self.withdraw(revoked, why)
        for tp in revoked:
            self.forget(tp)
        logger.info("{} {}; {} not-started job(s) withdrawn", why, _show_parts(revoked), withdrawn)

    def withdraw(self, parts: set[TP], why: str) -> int:
        """Remove the not-started jobs of `parts` from inbox/: their offsets stay uncommitted, so the group
        delivers them again (to this node's successor or to another one)."""
        withdrawn = 0
        for entry in self.spool.inbox_entries():
            job = self.spool.read_inbox_job(entry)
            source = job.source if job is not None else None
            if source and (source.get("topic"), source.get("partition")) in parts and self.spool.withdraw(entry):
                withdrawn += 1
                logger.bind(task_id=entry.task_id).info("withdrawn from inbox/: {}", why)
        return withdrawn

    def forget(self, tp: TP) -> None:
        self.tracker.forget(tp)
        self.held_back.pop(tp, None)
        self.ledger.forget(tp)
        if self.dead is not None:
            self.dead.drop(tp)

    # --- draining ----------------------------------------------------------------------------------------
    def drain(self) -> None:
        """SIGTERM: give back what has not started, then stay in the group while the runner finishes and the
        uploader publishes what has, committing as results land. A second SIGTERM or KAFKA_DRAIN_S ends it."""
        assigned = {(p.topic, p.partition) for p in self.consumer.assignment()}
        withdrawn = self.withdraw(assigned, "draining")
        started = self.ledger.started()
        logger.info("draining: {} not-started job(s) withdrawn, waiting up to {:g}s for {} started task(s)",
                    withdrawn, self.settings.kafka_drain_s, started)
        deadline = self.clock.monotonic() + self.settings.kafka_drain_s
        while (started and self.clock.monotonic() < deadline and not self.flags.abort.is_set()
               and self.errors.fatal is None):
            self.flags.beat()
            msg = self.consumer.poll(TICK_S)  # paused: only callbacks (rebalance, commits, errors)
            self.errors.sort()
            if msg is not None:
                self.handle(msg)  # fetched before the pause: tracked like any other, it runs
            self.settle()
            if self.clock.monotonic() - self.last_commit >= COMMIT_EVERY_S:
                self.commit(asynchronous=True)
            started = self.ledger.started()
        if started:
            logger.warning("drain ended with {} started task(s) unpublished; they are delivered again", started)

    # --- fatal errors and shutdown ---------------------------------------------------------------------
    def fail_fast(self, fatal: KafkaError) -> int:
        line = self.errors.describe(fatal)
        if not is_retriable(fatal):
            logger.error("consumer: {}; exiting with {} (EX_UNAVAILABLE) until the settings are fixed", line,
                         EXIT_UNAVAILABLE)
            return EXIT_UNAVAILABLE
        logger.error("consumer: fatal Kafka error, restarting: {}", line)
        return EXIT_ERROR

    def shutdown(self) -> None:
        """Stop taking, wait for the started tasks, commit what is safe, send what the DLQ still owes, leave the
        group (revokes, withdraws)."""
        if self.errors.fatal is None:
            try:
                self.consumer.pause(self.consumer.assignment())
            except Exception as exc:  # noqa: BLE001 - best effort: close() stops fetching anyway
                logger.debug("pause at shutdown: {}", exc)
            if self.flags.stopping.is_set() and not self.flags.abort.is_set():
                self.drain()
            if self.sender is not None and self.dead is not None and len(self.dead):
                self.sender.close(5.0)
                self.dead.poll()
            self.settle(force=True)
            self.commit(asynchronous=False)
        self.control.close()
        if self.sender is not None:
            self.sender.close(0 if self.errors.fatal is not None else 2.0)
        try:
            self.consumer.close()
        except Exception as exc:  # noqa: BLE001 - closing after a fatal error may itself fail
            logger.debug("consumer close: {}", exc)
        logger.info("consumer stopped: {}", ", ".join(f"{v} {k}" for k, v in self.counts.items()))


def _count(directory: Path) -> int:
    try:
        return sum(1 for name in os.listdir(directory) if not name.startswith("."))
    except FileNotFoundError:
        return 0


def _show(offsets: Mapping[TP, int]) -> str:
    return ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(offsets.items()))


def _show_parts(parts: Any) -> str:
    pairs = sorted((p.topic, p.partition) if hasattr(p, "topic") else p for p in parts)
    return ", ".join(f"{t}[{p}]" for t, p in pairs)
