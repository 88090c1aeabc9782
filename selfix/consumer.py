"""The consumer process: tasks in → validated job files in inbox/ (or a failed result straight to outbox/).

Without KAFKA_BOOTSTRAP_SERVER it only adopts files that people drop into inbox/ by hand (any file name): each is
validated and renamed to the canonical, ordered name the runner reads. With Kafka it does that too, and:

- Every message goes through `intake.accept` (the same validation as `selfix submit`): a job in inbox/, a failed
  result in outbox/ (the uploader publishes it), or a duplicate of a taskId this node already knows (any state,
  done/ included), which is not run again.
- Offsets are committed by hand, per partition, only up to the contiguous low-watermark of tasks whose result is
  published: `done/<taskId>.json` exists (the uploader writes it after Kafka acknowledged the result). A message
  without a readable taskId counts as published once it is on KAFKA_TOPIC_DLQ (or, without a DLQ, logged).
  So a node that dies loses nothing: the group re-delivers everything past the last commit.
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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from loguru import logger

from selfix import kafka as k
from selfix.backoff import compute_backoff
from selfix.control import listener_for
from selfix.files import DiskFull, disk_full_error
from selfix.intake import Outcome, accept, ingest_dropped_files, limits_of
from selfix.messages import Limits, peek_ids
from selfix.process import EXIT_ABORTED, EXIT_ERROR, EXIT_OK, EXIT_UNAVAILABLE, Program, StopFlags, run
from selfix.settings import Settings
from selfix.spool import Spool
from selfix.templates import Catalog

POLL_S = 0.2
TICK_S = 0.1  # how often finished tasks are looked for (done/), offsets committed, pausing decided
ADOPT_EVERY_S = 0.5  # hand-dropped inbox files
COMMIT_EVERY_S = 0.5
AUDIT_EVERY_S = 2.0  # a waited-for task in no spool state on two audits in a row is read again from Kafka
DLQ_MAX_BYTES = 512 * 1024  # larger unaddressable values go to the DLQ truncated (header says from how much)
DLQ_RETRY_S = (1.0, 60.0)


def run_offline(settings: Settings, spool: Spool, catalog: Catalog, flags: StopFlags) -> int:
    limits = limits_of(settings)
    disk = DiskFull("consumer")
    while not flags.stopping.is_set():
        flags.beat()
        delay = POLL_S
        if adopt_dropped(spool, limits, catalog, disk) is False:
            delay = max(POLL_S, disk.retry_at - time.monotonic())
        flags.wait(delay)
    return EXIT_ABORTED if flags.abort.is_set() else EXIT_OK


def adopt_dropped(spool: Spool, limits: Limits, catalog: Catalog, disk: DiskFull) -> bool | None:
    """Hand-dropped inbox/ files, unless the disk is full: then they stay where they are, untouched, until a probe
    finds room again. False: the disk is full (backing off); None: waiting out the backoff; True: adopted."""
    if disk.active:
        if not disk.due():
            return None
        if not spool.writable():
            disk.hit(None, spool.root)
            return False
        disk.clear()
    try:
        ingest_dropped_files(spool, limits, catalog)
    except OSError as exc:
        full = disk_full_error(exc)
        if full is None:
            raise
        disk.hit(full, spool.root)
        return False
    return True


# ------------------------------------------------------------------------------------------------- Kafka

class KafkaIntake:
    """The Kafka loop. One instance per consumer process; `run()` returns the process exit code."""

    def __init__(self, settings: Settings, spool: Spool, catalog: Catalog, flags: StopFlags,
                 overrides: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.catalog = catalog
        self.flags = flags
        self.limits = limits_of(settings)
        self.topic = settings.kafka_topic_input
        self.secrets = (settings.kafka_sasl_password,)
        self.tracker = k.OffsetTracker()
        self.waiting: dict[k.TP, dict[int, str]] = {}  # offsets whose task result is not published yet
        self.missing: set[tuple[k.TP, int]] = set()  # waited-for tasks the last audit found in no spool state
        self.dlq: dict[tuple[k.TP, int], _DlqItem] = {}
        self.done_mtime = -1
        self.last_audit = time.monotonic()
        self.paused = False
        self.held = 0
        self.disk = DiskFull("consumer")
        self.held_back: dict[k.TP, int] = {}  # per partition, the first offset to read again once space returns
        self.fatal: KafkaError | None = None
        self.errors: list[KafkaError] = []
        self.throttle = k.Throttle()
        self.last_tick = self.last_adopt = self.last_commit = 0.0
        self.counts = {"accepted": 0, "duplicate": 0, "failed": 0, "unaddressable": 0}
        self.sender: k.KafkaSender | None = None
        if settings.kafka_topic_dlq or settings.kafka_status_events:
            self.sender = k.KafkaSender(settings, "consumer")
        conf = k.consumer_config(settings, overrides={
            "error_cb": self.on_error, "on_commit": self.on_commit, "logger": k.LibrdkafkaLog(), **(overrides or {})})
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
                if self.fatal is not None:
                    code = self.fail_fast()
                    break
                # Paused partitions deliver nothing, but polling goes on: heartbeats, rebalances, callbacks.
                msg = self.consumer.poll(0 if self.due() else TICK_S)
                self.drain_errors()
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
        return time.monotonic() - self.last_tick >= TICK_S

    def tick(self) -> None:
        now = time.monotonic()
        self.last_tick = now
        if self.sender is not None:
            self.sender.poll(0)
        self.settle()
        self.control.poll()
        self.retry_dlq()
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
            self.report(err, "consume")
            return
        tp: k.TP = (str(msg.topic()), int(msg.partition() or 0))
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
        if self.spool.done_path(outcome.task_id).exists():
            self.tracker.done(tp, offset)
        else:
            self.waiting.setdefault(tp, {})[offset] = outcome.task_id
        self.flow_control(recount=False)

    def emit_accepted(self, task_id: str, raw: bytes, priority: int, source: dict[str, Any]) -> None:
        if self.sender is None:
            return
        value, headers = k.event_message("accepted", task_id, peek_ids(raw)[1], priority=priority, source=source)
        try:
            self.sender.send(self.settings.kafka_topic_output, task_id, value, headers)
        except k.PublishError as exc:
            logger.bind(task_id=task_id).debug("status event accepted dropped: {}", exc)

    def unaddressable(self, tp: k.TP, offset: int, msg: Message, raw: bytes, reason: str, where: str) -> None:
        preview = raw[:80].decode("utf-8", "replace").encode("unicode_escape").decode()
        if not self.settings.kafka_topic_dlq or self.sender is None:
            logger.warning("{}: no readable taskId, nobody to answer ({}); {} byte(s) skipped (set KAFKA_TOPIC_DLQ "
                           "to keep such messages): {!r}", where, reason, len(raw), preview)
            self.tracker.done(tp, offset)
            return
        logger.warning("{}: no readable taskId ({}); {} byte(s) to the DLQ {}: {!r}", where, reason, len(raw),
                       self.settings.kafka_topic_dlq, preview)
        headers: list[tuple[str, str | bytes | None]] = [
            ("selfix-error", reason.encode()[:1000]), ("selfix-source-topic", tp[0].encode()),
            ("selfix-source-partition", str(tp[1]).encode()), ("selfix-source-offset", str(offset).encode()),
            ("selfix-source-timestamp", str(msg.timestamp()[1]).encode())]
        value = raw
        if len(raw) > DLQ_MAX_BYTES:
            value = raw[:DLQ_MAX_BYTES]
            headers.append(("selfix-truncated-from", str(len(raw)).encode()))
        item = _DlqItem(tp, offset, msg.key(), value, headers + list(msg.headers() or []))
        self.dlq[(tp, offset)] = item
        self.send_dlq(item)

    # --- dead letters ------------------------------------------------------------------------------------
    def send_dlq(self, item: _DlqItem) -> None:
        assert self.sender is not None and self.settings.kafka_topic_dlq
        try:
            item.delivery = self.sender.send(self.settings.kafka_topic_dlq, item.key, item.value, item.headers)
        except k.MessageRejected as exc:
            self.dlq_rejected(item, str(exc))
        except k.PublishError as exc:
            item.tries += 1
            item.not_before = time.monotonic() + compute_backoff(min(item.tries, 10), *DLQ_RETRY_S)
            logger.error("DLQ {}: message {}[{}]@{} refused: {} (try {})", self.settings.kafka_topic_dlq,
                         item.tp[0], item.tp[1], item.offset, exc, item.tries)

    def retry_dlq(self) -> None:
        if self.sender is None:
            return
        now = time.monotonic()
        for key, item in list(self.dlq.items()):
            d = item.delivery
            if d is not None and d.done and d.error is None:
                del self.dlq[key]
                self.tracker.done(item.tp, item.offset)
                continue
            if d is not None and d.done and k.is_rejection(d.error):
                self.dlq_rejected(item, self.sender.describe(d.error))
                continue
            if d is not None and d.done:
                item.tries += 1
                item.delivery = None
                item.not_before = now + compute_backoff(min(item.tries, 10), *DLQ_RETRY_S)
                logger.error("DLQ {}: message {}[{}]@{} not delivered: {} (try {})", self.settings.kafka_topic_dlq,
                             item.tp[0], item.tp[1], item.offset, self.sender.describe(d.error), item.tries)
            if item.delivery is None and now >= item.not_before:
                self.send_dlq(item)

    def dlq_rejected(self, item: _DlqItem, why: str) -> None:
        """The DLQ refuses this record itself (too large for the topic): send it once more without the value, then
        give up on it, so one record never holds its partition's commits back."""
        where = f"{item.tp[0]}[{item.tp[1]}]@{item.offset}"
        if item.value:
            logger.error("DLQ {}: message {} refused ({}); sending its headers without the value",
                         self.settings.kafka_topic_dlq, where, why)
            item.headers.append(("selfix-truncated-from", str(len(item.value)).encode()))
            item.value, item.delivery = b"", None
            self.send_dlq(item)
            return
        logger.error("DLQ {}: message {} refused even without its value ({}); logged here only",
                     self.settings.kafka_topic_dlq, where, why)
        self.dlq.pop((item.tp, item.offset), None)
        self.tracker.done(item.tp, item.offset)

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
            for tp, offsets in self.waiting.items():
                for offset, task_id in list(offsets.items()):
                    if self.spool.done_path(task_id).exists():
                        del offsets[offset]
                        self.tracker.done(tp, offset)
                        self.missing.discard((tp, offset))
        if time.monotonic() - self.last_audit >= AUDIT_EVERY_S:
            self.audit()

    def audit(self) -> None:
        """A waited-for task that two audits in a row find in no spool state left without a result (withdrawn as
        the duplicate of another partition's copy, or moved to corrupt/): read its partition again from there."""
        self.last_audit = time.monotonic()
        if not any(self.waiting.values()):
            self.missing = set()
            return
        live = {e.task_id for e in self.spool.inbox_entries()} | {p.stem for p in self.spool.processing_files()}
        live.update(self.spool.outbox_tasks())
        missing: set[tuple[k.TP, int]] = set()
        for tp, offsets in self.waiting.items():
            for offset, task_id in offsets.items():
                if task_id not in live and not self.spool.done_path(task_id).exists():
                    missing.add((tp, offset))
        for tp, offset in sorted(missing & self.missing):
            if offset in self.waiting.get(tp, {}) and self.spool.state_of(self.waiting[tp][offset]) is None:
                self.rewind(tp, offset, self.waiting[tp][offset])
        self.missing = {key for key in missing if key[1] in self.waiting.get(key[0], {})}

    def rewind(self, tp: k.TP, offset: int, task_id: str) -> None:
        logger.bind(task_id=task_id).warning("{}[{}]@{}: task left the spool without a published result; "
                                             "reading the partition again from that offset", tp[0], tp[1], offset)
        try:
            self.consumer.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException as exc:
            logger.warning("seek {}[{}] to {} failed, trying again later: {}", tp[0], tp[1], offset, exc)
            return
        self.tracker.rewind(tp, offset)
        self.waiting[tp] = {o: t for o, t in self.waiting.get(tp, {}).items() if o < offset}
        for key in [key for key in self.dlq if key[0] == tp and key[1] >= offset]:
            del self.dlq[key]

    def commit(self, asynchronous: bool, only: set[k.TP] | None = None) -> None:
        offsets = {tp: o for tp, o in self.tracker.committable().items() if only is None or tp in only}
        if not offsets:
            return
        self.last_commit = time.monotonic()
        parts = [TopicPartition(tp[0], tp[1], o) for tp, o in offsets.items()]
        try:
            if asynchronous:
                self.consumer.commit(offsets=parts, asynchronous=True)
            else:
                self.consumer.commit(offsets=parts, asynchronous=False)
                self.tracker.mark_committed(offsets)
                logger.debug("committed {}", _show(offsets))
        except KafkaException as exc:
            self.report(exc, "commit")

    def on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:
            self.report(err, "commit")
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

    def hold_back(self, tp: k.TP, offset: int) -> None:
        """The spool's disk is full: this message was not taken. Forget it and everything after it on its
        partition (nothing of it was written), pause intake, and read from it again once space returns."""
        self.tracker.rewind(tp, offset)
        self.held_back[tp] = min(self.held_back.get(tp, offset), offset)
        self.flow_control(recount=False)

    def flow_control(self, recount: bool) -> None:
        if recount:
            self.held = self.unfinished()
        want_paused = self.held >= self.settings.kafka_max_inflight or self.disk.active
        if want_paused == self.paused:
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
        self.paused = want_paused
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
        logger.info("assigned {}", _show_parts(partitions) or "nothing new")

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        if revoked:
            self.settle(force=True)
            self.commit(asynchronous=False, only=revoked)
        self.release(revoked, "revoked")

    def on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.release({(p.topic, p.partition) for p in partitions}, "lost (session timed out)")

    def release(self, revoked: set[k.TP], why: str) -> None:
        if not revoked:
            return
        withdrawn = self.withdraw(revoked, why)
        for tp in revoked:
            self.forget(tp)
        logger.info("{} {}; {} not-started job(s) withdrawn", why, _show_parts(revoked), withdrawn)

    def withdraw(self, parts: set[k.TP], why: str) -> int:
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

    def forget(self, tp: k.TP) -> None:
        self.tracker.forget(tp)
        self.held_back.pop(tp, None)
        self.waiting.pop(tp, None)
        self.missing = {key for key in self.missing if key[0] != tp}
        for key in [key for key in self.dlq if key[0] == tp]:
            del self.dlq[key]

    # --- draining ----------------------------------------------------------------------------------------
    def drain(self) -> None:
        """SIGTERM: give back what has not started, then stay in the group while the runner finishes and the
        uploader publishes what has, committing as results land. A second SIGTERM or KAFKA_DRAIN_S ends it."""
        assigned = {(p.topic, p.partition) for p in self.consumer.assignment()}
        withdrawn = self.withdraw(assigned, "draining")
        started = self.started()
        logger.info("draining: {} not-started job(s) withdrawn, waiting up to {:g}s for {} started task(s)",
                    withdrawn, self.settings.kafka_drain_s, started)
        deadline = time.monotonic() + self.settings.kafka_drain_s
        while started and time.monotonic() < deadline and not self.flags.abort.is_set() and self.fatal is None:
            self.flags.beat()
            msg = self.consumer.poll(TICK_S)  # paused: only callbacks (rebalance, commits, errors)
            self.drain_errors()
            if msg is not None:
                self.handle(msg)  # fetched before the pause: tracked like any other, it runs
            self.settle()
            if time.monotonic() - self.last_commit >= COMMIT_EVERY_S:
                self.commit(asynchronous=True)
            started = self.started()
        if started:
            logger.warning("drain ended with {} started task(s) unpublished; they are delivered again", started)

    def started(self) -> int:
        """Waited-for tasks that are still on this node (inbox/ after a retry, processing/, outbox/)."""
        return sum(1 for offsets in self.waiting.values() for task_id in offsets.values()
                   if self.spool.state_of(task_id) not in (None, "done"))

    # --- errors and shutdown ---------------------------------------------------------------------------
    def on_error(self, err: KafkaError) -> None:
        self.errors.append(err)

    def drain_errors(self) -> None:
        """After each poll: a permanent error ends the process; it wins over the "all brokers down" that librdkafka
        reports alongside it, which would only mislead the operator."""
        errors, self.errors = self.errors, []
        fatal = next((e for e in errors if k.is_permanent(e) or e.fatal()), None)
        if fatal is not None:
            self.fatal = fatal
        else:
            for err in errors:
                self.report(err, "kafka")

    def report(self, err: object, what: str) -> None:
        inner = err.args[0] if isinstance(err, KafkaException) and err.args else err
        code = inner.code() if isinstance(inner, KafkaError) else type(inner).__name__
        if code == KafkaError._NO_OFFSET:
            return
        hidden = self.throttle(f"{what}:{code}")
        if hidden is not None:
            more = f" (and {hidden} more like it)" if hidden else ""
            logger.warning("{}: {}{}", what, k.classify_kafka_error(err, secrets=self.secrets), more)

    def fail_fast(self) -> int:
        assert self.fatal is not None
        line = k.classify_kafka_error(self.fatal, secrets=self.secrets)
        if k.is_permanent(self.fatal):
            logger.error("consumer: {}; exiting with {} (EX_UNAVAILABLE) until the settings are fixed", line,
                         EXIT_UNAVAILABLE)
            return EXIT_UNAVAILABLE
        logger.error("consumer: fatal Kafka error, restarting: {}", line)
        return EXIT_ERROR

    def shutdown(self) -> None:
        """Stop taking, wait for the started tasks, commit what is safe, send what the DLQ still owes, leave the
        group (revokes, withdraws)."""
        if self.fatal is None:
            try:
                self.consumer.pause(self.consumer.assignment())
            except Exception as exc:  # noqa: BLE001 - best effort: close() stops fetching anyway
                logger.debug("pause at shutdown: {}", exc)
            if self.flags.stopping.is_set() and not self.flags.abort.is_set():
                self.drain()
            if self.sender is not None and self.dlq:
                self.sender.close(5.0)
                self.retry_dlq()
            self.settle(force=True)
            self.commit(asynchronous=False)
        self.control.close()
        if self.sender is not None:
            self.sender.close(0 if self.fatal is not None else 2.0)
        try:
            self.consumer.close()
        except Exception as exc:  # noqa: BLE001 - closing after a fatal error may itself fail
            logger.debug("consumer close: {}", exc)
        logger.info("consumer stopped: {}", ", ".join(f"{v} {k}" for k, v in self.counts.items()))


class _DlqItem:
    def __init__(self, tp: k.TP, offset: int, key: bytes | None, value: bytes, headers: list[Any]) -> None:
        self.tp, self.offset, self.key, self.value, self.headers = tp, offset, key, value, headers
        self.delivery: k.Delivery | None = None
        self.tries = 0
        self.not_before = 0.0


def _count(directory: Path) -> int:
    try:
        return sum(1 for name in os.listdir(directory) if not name.startswith("."))
    except FileNotFoundError:
        return 0


def _show(offsets: Mapping[k.TP, int]) -> str:
    return ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(offsets.items()))


def _show_parts(parts: Any) -> str:
    pairs = sorted((p.topic, p.partition) if hasattr(p, "topic") else p for p in parts)
    return ", ".join(f"{t}[{p}]" for t, p in pairs)


def run_kafka(settings: Settings, spool: Spool, catalog: Catalog, flags: StopFlags) -> int:
    return KafkaIntake(settings, spool, catalog, flags).run()


def serve(program: Program) -> int:
    settings, spool, flags = program.settings, program.spool, program.flags
    catalog = Catalog.load(settings.templates_dir)
    if settings.kafka_enabled:
        return run_kafka(settings, spool, catalog, flags)
    logger.info("consumer: no KAFKA_BOOTSTRAP_SERVER, taking jobs from files dropped into {}", spool.inbox)
    return run_offline(settings, spool, catalog, flags)


def main() -> int:
    return run("consumer", serve)


if __name__ == "__main__":
    raise SystemExit(main())
