"""Task control: cancel requests, expiry and per-task deadlines (README: "Task control").

A cancel request becomes a tombstone `cancel/<taskId>.json` in the spool, whoever sent it: the control topic
(`ControlListener`, in the consumer process) or `selfix cancel` (offline). The runner (`RunnerControl`, a few hooks
in runner.py) applies tombstones by where the task is:

- inbox/: taken out and never run;
- queued in ComfyUI (not started): deleted from ComfyUI's queue (POST /queue {"delete": [id]});
- running: POST /interrupt {"prompt_id": id}, which ComfyUI honours only while that prompt runs, so a cancel never
  stops another task's prompt;
- outbox/ or done/: nothing; the result stands and the log says so.

A tombstone whose task is not on the node yet stays (pruned after CANCEL_RETENTION_H): the task is cancelled at
intake or when the runner claims it. Its `userId` must be the task's (a tombstone without one comes from the node's
operator and matches any task); else the cancel is refused and logged. A tombstone that did something is rewritten
with `handled`, so a restarted runner does not apply it twice.

A cancelled or expired task ends as a failed result with code `cancelled` or `expired` (retriable: false): clients
already branch on `status` completed/failed, and the code says why; its offset is committed like any result.

Why the control topic is read by `assign()` of all its partitions, not by a consumer group: every node must see
every message, and a group shares partitions out. A group per node would need a stable, unique name per node and
leaves one dead group on the broker per replaced node; assign() has no membership, no rebalances coupled to the
task group and no commits. Its position is kept in memory only: at start it seeks to CANCEL_RETENTION_H back
(offsets_for_times), which re-reads at most what the tombstones remember anyway; writing a tombstone that exists
is a no-op, so reading a message twice is harmless.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Message, TopicPartition
from loguru import logger

from selfix import kafka as k
from selfix import messages as m
from selfix.comfy import ComfyUnavailable
from selfix.job import Job, JobState
from selfix.outcomes import Verdict, judge, terminal_message
from selfix.prepare import remove_task_files
from selfix.settings import Settings
from selfix.spool import Spool, valid_task_id

if TYPE_CHECKING:
    from selfix.runner import Inflight, Runner

CANCELLED = "cancelled"
EXPIRED = "expired"
CONTROL_MAX_BYTES = 64 * 1024  # a cancel is ~100 bytes; anything near this is not one
ACTIONS = ("cancel",)
PRUNE_EVERY_S = 60.0
REASSIGN_EVERY_S = 60.0  # the control topic's partitions are looked up again (partitions added)


# --- pure decisions ------------------------------------------------------------------------------------------

def deadline_s(job: Job, default_s: float) -> float:
    """The job's time allowed inside ComfyUI: its own timeoutS (validated at intake to be <= the cap), else
    JOB_TIMEOUT_S."""
    own = job.timeout_s
    return min(float(own), default_s) if own is not None and own > 0 else default_s


def deadline_label(job: Job, default_s: float) -> str:
    own = job.timeout_s
    if own is not None and 0 < own < default_s:
        return f"timeoutS={float(own):g}s"
    return f"JOB_TIMEOUT_S={default_s:g}s"


def expiry_error(job: Job, now: float) -> m.TaskError | None:
    expires = job.expires_at
    if expires is not None and now >= expires:
        late = now - float(expires)
        return m.TaskError(EXPIRED, f"the task expired {late:.1f}s ago (expiresAt {float(expires):.3f}) before "
                                    "it started; it was not run")
    return None


def user_matches(record: dict[str, Any], job: Job) -> bool:
    """A tombstone without userId is an operator's (`selfix cancel` without --user): it matches any task."""
    return record.get("userId") is None or record.get("userId") == job.user_id


def cancel_error(record: dict[str, Any], where: str) -> m.TaskError:
    via = record.get("via", "?")
    return m.TaskError(CANCELLED, f"cancelled by request ({via}) while {where}")


class ControlRejected(ValueError):
    """A control message selfix skips: the text says why."""


@dataclass(frozen=True)
class ControlRequest:
    action: str
    task_id: str
    user_id: str


def parse_control(raw: bytes) -> ControlRequest:
    """`{"action": "cancel", "taskId": ..., "userId": ...}`; raises ControlRejected naming the problem."""
    if len(raw) > CONTROL_MAX_BYTES:
        raise ControlRejected(f"value is {len(raw)} bytes; a control message is at most {CONTROL_MAX_BYTES}")
    try:
        obj = m.strict_loads(raw)  # the same strict JSON as tasks: a cancel that says two things is refused
    except ValueError as exc:
        raise ControlRejected(f"not JSON: {str(exc)[:80]}") from None
    if not isinstance(obj, dict):
        raise ControlRejected(f"must be a JSON object, got {type(obj).__name__}")
    action = obj.get("action")
    if action not in ACTIONS:
        raise ControlRejected(f"unknown action {str(action)[:40]!r} (known: {', '.join(ACTIONS)})")
    for name in ("taskId", "userId"):
        if not valid_task_id(obj.get(name)):
            raise ControlRejected(f"{name} missing or not [A-Za-z0-9._-]{{1,128}}: {str(obj.get(name))[:60]!r}")
    return ControlRequest(str(action), str(obj["taskId"]), str(obj["userId"]))


# --- tombstones -----------------------------------------------------------------------------------------------

def request_cancel(spool: Spool, task_id: str, user_id: str | None, via: str,
                   source: dict[str, Any] | None = None) -> bool:
    """Write the tombstone; False when one was already there (a message read twice, a second request)."""
    record = {"taskId": task_id, "userId": user_id, "via": via, "at": round(time.time(), 3), "source": source}
    return spool.write_cancel(record)


def refusal(spool: Spool, job: Job, now: float | None = None) -> m.TaskError | None:
    """Why this not-yet-started job must not run (a matching tombstone, or its expiry), or None. At intake and
    when the runner claims it. A tombstone of another user is refused here, once, and logged."""
    record = spool.read_cancel(job.task_id)
    # "interrupted": the runner died before it wrote the cancelled result, and the retry must not run it again
    if record is not None and record.get("handled") in (None, "interrupted"):
        if user_matches(record, job):
            _mark(spool, record, "cancelled before it ran")
            return cancel_error(record, "waiting to run")
        _refuse(spool, record, job)
    return expiry_error(job, time.time() if now is None else now)


def _mark(spool: Spool, record: dict[str, Any], outcome: str) -> None:
    record.update(handled=outcome, handledAt=round(time.time(), 3))
    spool.mark_cancel(record)


def _refuse(spool: Spool, record: dict[str, Any], job: Job) -> None:
    logger.bind(task_id=record["taskId"]).warning(
        "cancel refused: its userId {!r} is not the task's ({!r})", record.get("userId"), job.user_id)
    _mark(spool, record, "refused: userId does not match")


# --- runner side ----------------------------------------------------------------------------------------------

class RunnerControl:
    """The runner's part: called from Runner.start (refuse), Runner.settle (tick) and Runner.collect (judge, fail)."""

    def __init__(self, runner: Runner) -> None:
        self.r = runner
        self.cancel_mtime = -2
        self.known: set[str] = set()
        self.active: set[str] = set()  # tombstones to apply (again: ComfyUI did not answer, or a race)
        self.last_prune = 0.0

    def refuse(self, inf: Inflight) -> bool:
        """Before queueing (after claim, and again after LoRA/input downloads): end it here if it must not run."""
        error = refusal(self.r.spool, inf.job)
        if error is None:
            return False
        self.finish(inf, error)
        return True

    def finish(self, inf: Inflight, error: m.TaskError, entry: dict[str, Any] | None = None) -> None:
        """Failed result with code cancelled/expired, processing/ entry and ComfyUI files removed."""
        settings = self.r.settings
        remove_task_files(settings.comfy_output_dir, settings.comfy_input_dir, inf.task_id)
        ran = 0.0
        began = inf.started_at or inf.job.started_at
        if began:
            ran = max(0.0, time.time() - float(began))
        meta = {**self.r.metadata(inf, entry), "ranS": round(ran, 3)}
        self.r.spool.write_result(m.failed_result(inf.task_id, inf.job.user_id, error, meta))
        self.r.spool.drop_processing(inf.task_id)
        inf.log().warning("{}: {}", error.code, error.message)

    def judge(self, inf: Inflight, entry: dict[str, Any]) -> Verdict:
        """A finished prompt: cancelled when a cancel interrupted it, else outcomes.judge with the task's deadline."""
        if inf.cancelled_by is not None and terminal_message(entry.get("status", {}))[0] == "execution_interrupted":
            return Verdict("fail", inf.cancelled_by)
        cap = self.r.settings.job_timeout_s
        return judge(entry, inf.timed_out_at is not None, deadline_s(inf.job, cap), deadline_label(inf.job, cap))

    def fail(self, inf: Inflight, error: m.TaskError, entry: dict[str, Any] | None = None) -> None:
        if error.code == CANCELLED:
            self.finish(inf, error, entry)
        else:
            self.r.fail(inf, error)

    async def tick(self) -> None:
        spool, now = self.r.spool, time.time()
        mtime = spool.cancel_dir_mtime()
        if mtime != self.cancel_mtime:
            self.cancel_mtime = mtime
            ids = spool.cancel_ids()
            self.active.update(t for t in ids if t not in self.known)
            self.known = set(ids)
        for task_id in sorted(self.active):
            record = spool.read_cancel(task_id)
            outcome = None if record is None or record.get("handled") else await self.apply(record)
            if outcome != "retry":
                self.active.discard(task_id)
            if record is not None and outcome not in (None, "retry", "remembered"):
                _mark(spool, record, outcome)
        await self.expire_queued(now)
        if now - self.last_prune >= PRUNE_EVERY_S:
            self.last_prune = now
            spool.prune_cancels(self.r.settings.cancel_retention_h * 3600)

    async def apply(self, record: dict[str, Any]) -> str | None:
        task_id = str(record["taskId"])
        log = logger.bind(task_id=task_id)
        inf = next((i for i in self.r.inflight.values() if i.task_id == task_id), None)
        if inf is not None and inf.rejection is not None:
            return "retry"  # being removed from ComfyUI already (accepted in part); its failed result follows
        if inf is not None:
            if not user_matches(record, inf.job):
                _refuse(self.r.spool, record, inf.job)
                return None
            return await self.stop(inf, record)
        state = self.r.spool.state_of(task_id)
        if state in ("outbox", "done"):
            log.info("cancel request: the task already has a result ({}); the result stands", state)
            return f"result stands ({state})"
        if state == "inbox":
            return self.take_from_inbox(record)
        if state == "processing":
            return "retry"  # claimed, not queued yet: start() looks at the tombstone before queueing
        log.info("cancel request remembered: the task is not on this node (yet)")
        return "remembered"

    def take_from_inbox(self, record: dict[str, Any]) -> str | None:
        from selfix.runner import Inflight

        spool = self.r.spool
        entry = spool.inbox_entry_of(str(record["taskId"]))
        job = spool.read_inbox_job(entry) if entry is not None else None
        if entry is None or job is None:
            return "retry"  # taken meanwhile, or unreadable: the runner quarantines it when it reaches it
        if not user_matches(record, job):
            _refuse(spool, record, job)
            return None
        if spool.claim(entry) is None:
            return "retry"  # the runner claimed it first: it is about to look at the tombstone itself
        self.finish(Inflight(job, job.prompt_id or ""), cancel_error(record, "in inbox/"))
        return "cancelled in inbox/"

    async def stop(self, inf: Inflight, record: dict[str, Any]) -> str:
        if inf.cancelled_by is not None:
            return "interrupted"
        try:
            if not (inf.started_at or inf.job.started_at):
                withdrawn = await self.withdraw(inf, cancel_error(record, "queued in ComfyUI"))
                if withdrawn is not None:
                    return withdrawn
            inf.cancelled_by = cancel_error(record, "running")  # before the POST: the prompt may end at once
            inf.log().info("cancel: interrupting prompt {} (only that prompt)", inf.prompt_id)
            await self.r.client.interrupt(inf.prompt_id)
        except ComfyUnavailable as exc:
            inf.cancelled_by = None  # sent again on the next tick
            inf.log().warning("cancel postponed, ComfyUI did not answer: {}", exc)
            return "retry"
        return "interrupted"

    async def withdraw(self, inf: Inflight, error: m.TaskError) -> str | None:
        """Delete a not-started prompt from ComfyUI's queue and end the task; None when it started meanwhile."""
        client = self.r.client
        await client.delete_pending([inf.prompt_id])
        queue = await client.queue()
        if inf.prompt_id in queue.running:
            return None
        if queue.holds(inf.prompt_id):
            return "retry"
        if await client.history(inf.prompt_id) is not None:
            inf.log().info("cancel: the prompt finished meanwhile; the result stands")
            return "result stands (finished meanwhile)"
        del self.r.inflight[inf.prompt_id]
        self.r.promote_head()
        self.r.wake.set()
        self.finish(inf, error)
        return "deleted from ComfyUI's queue"

    async def expire_queued(self, now: float) -> None:
        """A job queued ahead in ComfyUI whose expiry passes before it starts is taken out of the queue."""
        for inf in list(self.r.inflight.values()):
            if (inf.started_at or inf.job.started_at or inf.job.state != JobState.SUBMITTED
                    or inf.rejection is not None):
                continue
            error = expiry_error(inf.job, now)
            if error is None:
                continue
            try:
                await self.withdraw(inf, error)
            except ComfyUnavailable:
                return


# --- consumer side: the control topic ---------------------------------------------------------------------------

class Listener(Protocol):
    def poll(self) -> None: ...

    def close(self) -> None: ...


class _Off:
    def poll(self) -> None:
        return None

    def close(self) -> None:
        return None


def listener_for(settings: Settings, spool: Spool) -> Listener:
    if not settings.kafka_topic_control or not settings.kafka_bootstrap:
        return _Off()
    return ControlListener(settings, spool)


class ControlListener:
    """Reads every partition of KAFKA_TOPIC_CONTROL (assign, no group, no commits) into tombstones."""

    def __init__(self, settings: Settings, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool
        self.topic = str(settings.kafka_topic_control)
        self.lookback_s = settings.cancel_retention_h * 3600
        self.assigned: set[int] = set()
        self.last_assign = -REASSIGN_EVERY_S
        self.throttle = k.Throttle()
        conf = k.consumer_config(settings, client_id=f"{k.default_client_id()}-control", overrides={
            # never joins (no subscribe) and never commits: the group id only satisfies librdkafka
            "group.id": f"{settings.kafka_group_id}.control.{socket.gethostname()}",
            "auto.offset.reset": "latest", "logger": k.LibrdkafkaLog()})
        self.consumer = Consumer(conf)
        logger.info("control topic {}: every partition, from {:g}h back", self.topic, settings.cancel_retention_h)

    def poll(self) -> None:
        if time.monotonic() - self.last_assign >= REASSIGN_EVERY_S:
            self.assign()
        if not self.assigned:
            return
        try:
            batch = self.consumer.consume(num_messages=500, timeout=0)
        except KafkaException as exc:
            logger.warning("control topic {}: {}", self.topic, exc)
            return
        for msg in batch:
            self.handle(msg)

    def assign(self) -> None:
        self.last_assign = time.monotonic()
        try:
            meta = self.consumer.list_topics(self.topic, timeout=2.0).topics.get(self.topic)
            if meta is None or meta.error is not None:
                raise KafkaException(meta.error if meta is not None else "no metadata")
            new = sorted(set(meta.partitions) - self.assigned)
            if not new:
                return
            since_ms = int((time.time() - self.lookback_s) * 1000)
            found = self.consumer.offsets_for_times([TopicPartition(self.topic, p, since_ms) for p in new], 5.0)
        except KafkaException as exc:
            if self.throttle("assign") is not None:
                logger.warning("control topic {} not readable yet: {}", self.topic, exc)
            return
        starts = [TopicPartition(self.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END)
                  for tp in found]
        self.consumer.incremental_assign(starts)
        self.assigned.update(tp.partition for tp in starts)
        logger.info("control topic {}: reading partition(s) {}", self.topic, [tp.partition for tp in starts])

    def handle(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                logger.warning("control topic {}: {}", self.topic, err)
            return
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        raw = msg.value() or b""
        try:
            req = parse_control(raw)
        except ControlRejected as exc:
            preview = raw[:80].decode("utf-8", "replace").encode("unicode_escape").decode()
            logger.warning("control {}: skipped: {}: {!r}", where, exc, preview)
            return
        source = {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
                  "timestamp": max(0, msg.timestamp()[1]) / 1000}
        if request_cancel(self.spool, req.task_id, req.user_id, "kafka", source):
            logger.bind(task_id=req.task_id).info("control {}: cancel requested by user {}", where, req.user_id)

    def close(self) -> None:
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            logger.debug("control consumer close: {}", exc)
