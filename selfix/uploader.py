"""The uploader process: outbox/<taskId>/ → images in the store → result published → done/ → cleanup.

Order matters for the delivery guarantee: images first (a result never names a missing object), then the result is
published (Kafka delivery confirmed, when Kafka is configured), then done/ is written. A crash anywhere repeats the
steps that were not recorded yet; output keys are deterministic, so a repeat overwrites instead of duplicating.

No result waits for ever: every error is classified (`classify`). Kafka being down or slow is waited out (results
stay in outbox/; nothing else could be published either). Store errors are retried with backoff for RESULT_RETRY_S
after the result was written. A result that can never be delivered as it is (an invalid key, an image missing, a
message the broker refuses) is replaced by a failed result with a specific code; if even that is refused, the
result goes to corrupt/ (and to KAFKA_TOPIC_DLQ), and done/ records the failed result so the offset is committed.
"""

from __future__ import annotations

import mimetypes
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol

from loguru import logger

from selfix.backoff import compute_backoff
from selfix.faults import crashpoint
from selfix.files import DiskFull, disk_full_error
from selfix.messages import OUTPUT_FORBIDDEN, OUTPUT_INVALID, STORAGE_UNAVAILABLE, TaskError, failed_result, staged_name
from selfix.prepare import remove_task_files
from selfix.process import EXIT_ABORTED, EXIT_OK, EXIT_UNAVAILABLE, Program, StopFlags, run
from selfix.settings import Settings
from selfix.spool import Spool
from selfix.storage import (
    DEFAULT_PART_SIZE,
    InvalidKey,
    ObjectForbidden,
    ObjectStore,
    ObjectTooLarge,
    StorageError,
    open_store,
)

IDLE_POLL_S = 0.05
DRAIN_S = 30.0  # on SIGTERM, how long the uploader keeps publishing outbox/ (below its stopwaitsecs)
PRUNE_EVERY_S = 600.0
UPLOAD_THREADS = 4


class Publisher(Protocol):
    """Where results go besides done/: Kafka's output topic, or nowhere in offline mode."""

    def publish(self, result: dict[str, Any]) -> None:
        """Return only once the result is durably delivered; raise to retry later. An exception with
        `retriable = False` (kafka.PublishRefused) stops the uploader (the node cannot publish at all); one with
        `rejected = True` says that this result can never be published as it is."""

    def dead_letter(self, result: dict[str, Any], reason: str) -> None:
        """Keep a result that cannot be published where an operator finds it (Kafka: KAFKA_TOPIC_DLQ); may raise."""

    def idle(self) -> None:
        """Called on every turn of the uploader's loop (Kafka: delivery reports, optional status events)."""

    def close(self) -> None: ...


class NoPublisher:
    def publish(self, result: dict[str, Any]) -> None:
        return None

    def dead_letter(self, result: dict[str, Any], reason: str) -> None:
        return None

    def idle(self) -> None:
        return None

    def close(self) -> None:
        return None


Verdict = Literal["refused", "rejected", "wait", "bounded"]


def classify(stage: Literal["store", "publish"], exc: BaseException) -> Verdict:
    """What an error while delivering one result means.

    refused: the node cannot publish anything (credentials): stop loudly, results wait in outbox/.
    rejected: this result can never be delivered as it is: publish a failed result instead.
    wait: Kafka is down or slow: retry with backoff, without bound (a failed result could not go out either).
    bounded: the store failed: retry with backoff until RESULT_RETRY_S, then publish a failed result.
    """
    if stage == "publish" and not getattr(exc, "retriable", True):  # kafka.PublishRefused (imported lazily)
        return "refused"
    if getattr(exc, "rejected", False) or isinstance(exc, InvalidKey | ObjectTooLarge | FileNotFoundError):
        return "rejected"
    if isinstance(exc, StorageError | OSError):
        return "bounded"
    if stage == "publish" and not isinstance(exc, ValueError | TypeError | KeyError):
        return "wait"
    return "rejected"  # a result selfix cannot handle (unserializable, malformed): the same bytes fail again


def replacement(task_id: str, result: dict[str, Any], exc: BaseException, verdict: Verdict) -> dict[str, Any]:
    """The failed result published instead of one that cannot be delivered."""
    if verdict == "bounded" and isinstance(exc, StorageError) and exc.retriable:
        error = TaskError(STORAGE_UNAVAILABLE, f"the images could not be stored: {exc}", retriable=True)
    elif verdict == "bounded" and isinstance(exc, ObjectForbidden):
        error = TaskError(OUTPUT_FORBIDDEN, f"the store refused the images: {exc}")
    else:
        error = TaskError(OUTPUT_INVALID, f"the result could not be delivered as it is: {type(exc).__name__}: {exc}")
    # The cause may itself be the poison (a lone surrogate in a message): the replacement must be plain UTF-8.
    error.message = error.message[:1000].encode("utf-8", "backslashreplace").decode()
    metadata = result.get("metadata")
    user_id = result.get("userId")
    return failed_result(task_id, user_id if isinstance(user_id, str) else None, error,
                         dict(metadata) if isinstance(metadata, dict) else {})


class Uploader:
    def __init__(self, settings: Settings, spool: Spool, store: ObjectStore, publisher: Publisher,
                 flags: StopFlags) -> None:
        self.settings = settings
        self.spool = spool
        self.store = store
        self.publisher = publisher
        self.flags = flags
        self.failures: dict[str, int] = {}
        self.not_before: dict[str, float] = {}
        self.last_prune = 0.0
        self.refused: str | None = None
        # Results Kafka acknowledged whose done/ record is not written yet (a full disk): they are never published
        # again by this process, only their done/ step is retried.
        self.acked: dict[str, dict[str, Any]] = {}
        self.disk = DiskFull("uploader")

    def run(self) -> int:
        drain_until: float | None = None
        while not self.flags.abort.is_set():
            self.flags.beat()
            pending = self.spool.outbox_tasks()
            if self.flags.stopping.is_set():
                # supervisord stops the uploader after the runner: publish everything in outbox/ (waiting out
                # backoffs), within DRAIN_S; what is left then survives in outbox/ for the next start.
                now = time.monotonic()
                if drain_until is None:
                    drain_until = now + DRAIN_S
                    # Listed again: the stop may have come after the listing above, and a result the runner wrote
                    # in between must be drained, not left behind by a stale empty list.
                    pending = self.spool.outbox_tasks()
                    logger.info("draining: {} result(s) in outbox/", len(pending))
                if not pending or now >= drain_until:
                    if pending:
                        logger.warning("drain ended after {:g}s with {} result(s) left in outbox/", DRAIN_S,
                                       len(pending))
                    break
            for task_id in self._ready(pending):
                if self.flags.abort.is_set() or self.refused:
                    break
                self.deliver_guarded(task_id)
            if self.refused:
                logger.error("results cannot be published, stopping (they wait in outbox/): {}", self.refused)
                self.publisher.close()
                return EXIT_UNAVAILABLE
            self.maintain()
            self.publisher.idle()
            if not self._ready(self.spool.outbox_tasks()):
                self.flags.abort.wait(IDLE_POLL_S)
        self.publisher.close()
        return EXIT_ABORTED if self.flags.abort.is_set() else EXIT_OK

    def _ready(self, task_ids: list[str]) -> list[str]:
        now = time.monotonic()
        return [t for t in task_ids if self.not_before.get(t, 0.0) <= now]

    def deliver_guarded(self, task_id: str) -> None:
        """deliver(), except that a full disk never ends the process: this task waits out a bounded backoff
        (logged once per episode) and everything else goes on."""
        try:
            self.deliver(task_id)
        except Exception as exc:
            full = disk_full_error(exc)
            if full is None:
                raise
            self.not_before[task_id] = time.monotonic() + self.disk.hit(full, self.spool.root)
            return
        if not self.acked:
            self.disk.clear()

    def deliver(self, task_id: str) -> None:
        log = logger.bind(task_id=task_id)
        if self.spool.read_done(task_id) is not None:
            self.spool.discard_outbox(task_id)  # published before a crash; done/ is the ledger
            self.acked.pop(task_id, None)
            return
        if task_id in self.acked:
            self.record(task_id, self.acked[task_id])  # acknowledged already: only done/ is left to do
            return
        try:
            result = self.spool.read_result(task_id)
        except FileNotFoundError:
            return  # gone meanwhile (another uploader instance, or finished just now)
        except (ValueError, UnicodeDecodeError) as exc:
            self.spool.quarantine(self.spool.outbox_dir(task_id), f"unreadable result.json: {exc}")
            log.error("outbox entry moved to corrupt/: {}", exc)
            return
        sent = self.send(task_id, result)
        if sent is None:
            return
        crashpoint(self.settings, self.spool, "uploader.before_done")
        result = sent
        self.acked[task_id] = result
        log.info("published: {} ({} image(s), {} output(s))", result.get("status"), len(result.get("imagePaths") or []),
                 len(result.get("outputs") or []))
        self.record(task_id, result)

    def record(self, task_id: str, result: dict[str, Any]) -> None:
        """done/ (one rename of the outbox's result.json when that is what was published), then the task's ComfyUI
        files go."""
        self.spool.finish(result)
        self.acked.pop(task_id, None)
        remove_task_files(self.settings.comfy_output_dir, self.settings.comfy_input_dir, task_id)
        self.failures.pop(task_id, None)
        self.not_before.pop(task_id, None)

    def send(self, task_id: str, result: dict[str, Any]) -> dict[str, Any] | None:
        """Store the images and publish the result; returns what was published (the result, or the failed result
        that replaced it), or None when it must wait (postponed, or the uploader is stopping)."""
        stage: Literal["store", "publish"] = "store"
        try:
            self.upload_images(task_id, result)
            stage = "publish"
            self.publisher.publish(result)
            return result
        except Exception as exc:  # noqa: BLE001 - classified: retried, bounded or replaced, never ignored
            if disk_full_error(exc) is not None:
                raise  # a local store on a full disk: one episode (deliver_guarded), never a replaced result
            verdict = self.verdict(task_id, stage, exc)
            if verdict is None:
                return None
            cause: Exception = exc
        failed = replacement(task_id, result, cause, verdict)
        logger.bind(task_id=task_id).error("result cannot be delivered ({}), publishing a failed {} result instead: "
                                           "{}", verdict, failed["error"]["code"], cause)
        try:
            self.publisher.publish(failed)
            return failed
        except Exception as again:  # noqa: BLE001 - the failed result itself is refused: dead-letter it
            if self.verdict(task_id, "publish", again, bounded=False) is None:
                return None
            self.dead_letter(task_id, failed, f"result unpublishable: {cause}; failed result too: {again}")
            return failed

    def verdict(self, task_id: str, stage: Literal["store", "publish"], exc: Exception,
                bounded: bool = True) -> Verdict | None:
        """None when the result must wait (postponed, or the node cannot publish at all), else why to replace it."""
        verdict = classify(stage, exc)
        if isinstance(exc, FileNotFoundError) and not self.spool.outbox_dir(task_id).exists():
            return None  # finished meanwhile (by an uploader before a restart): nothing left to deliver
        if verdict == "refused":
            self.refused = str(exc)  # e.g. wrong KAFKA_SASL_*: stop loudly instead of retrying forever
            return None
        if verdict == "wait" or (verdict == "bounded" and not (bounded and self.overdue(task_id))):
            self.postpone(task_id, exc)
            return None
        return verdict

    def overdue(self, task_id: str) -> bool:
        written = self.spool.result_written_at(task_id)
        return written is not None and time.time() - written > self.settings.result_retry_s

    def dead_letter(self, task_id: str, failed: dict[str, Any], reason: str) -> None:
        """corrupt/ keeps the outbox entry, the DLQ gets the failed result; done/ (written by the caller) records
        the task as settled, so its offset is committed and the consumer does not read it again."""
        log = logger.bind(task_id=task_id)
        reason = reason.encode("utf-8", "backslashreplace").decode()  # the cause may hold the poison itself
        try:
            self.publisher.dead_letter(failed, reason)
        except Exception as exc:  # noqa: BLE001 - the DLQ is best effort here: corrupt/ keeps the bytes
            log.error("dead letter not delivered: {}", exc)
        self.spool.quarantine(self.spool.outbox_dir(task_id), reason[:2000])
        log.error("result moved to corrupt/ and settled unpublished: {}", reason)

    def upload_images(self, task_id: str, result: dict[str, Any]) -> None:
        """Every object of the result (stills, videos, audio, ...), each streamed from its file; any failure raises
        (after the others finished).

        Memory stays bounded whatever the outputs' sizes: a single-part PUT holds at most one part size, so small
        files go UPLOAD_THREADS at a time; a multipart upload holds a few parts itself (the client's own parallel
        parts), so large files go one at a time, after the small ones.
        """
        folder = self.spool.outbox_dir(task_id)

        def path_of(key: str) -> Path:
            path = folder / staged_name(key)
            try:
                return path if path.exists() else folder / Path(key).name  # a result staged before outputs/ existed
            except OSError:  # a name too long for the filesystem: the key is refused by the store instead
                return folder / Path(key).name

        def put(item: tuple[str, str]) -> None:
            key, content_type = item
            self.store.put_file(key, path_of(key), content_type)
            crashpoint(self.settings, self.spool, "uploader.mid_upload")

        objects = upload_list(result)
        large = [o for o in objects if _size(path_of(o[0])) > DEFAULT_PART_SIZE]
        small = [o for o in objects if o not in large]
        if len(small) > 1:
            with ThreadPoolExecutor(min(UPLOAD_THREADS, len(small)), thread_name_prefix="upload") as pool:
                for future in [pool.submit(put, item) for item in small]:
                    future.result()
        else:
            for item in small:
                put(item)
        for item in large:
            put(item)

    def postpone(self, task_id: str, exc: Exception) -> None:
        count = self.failures.get(task_id, 0) + 1
        self.failures[task_id] = count
        delay = compute_backoff(min(count, 10), 0.5, 30.0)
        self.not_before[task_id] = time.monotonic() + delay
        kind = "store" if isinstance(exc, StorageError) else "publish"
        logger.bind(task_id=task_id).warning("{} failed (try {}), again in {:.1f}s: {}", kind, count, delay, exc)

    def maintain(self) -> None:
        now = time.monotonic()
        if now - self.last_prune < PRUNE_EVERY_S:
            return
        self.last_prune = now
        removed = self.spool.prune_done(self.settings.done_retention_h * 3600)
        if removed:
            logger.info("pruned {} done/ entries older than {:g}h", removed, self.settings.done_retention_h)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # missing: put_file raises the specific error


def upload_list(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(object key, content type) of every file a result names: its `outputs` entries with an objectKey, and
    for results written before `outputs` existed, its imagePaths (type from the name; they were PNGs)."""
    found: dict[str, str] = {}
    for entry in result.get("outputs") or []:
        if isinstance(entry, dict) and isinstance(entry.get("objectKey"), str):
            found[entry["objectKey"]] = str(entry.get("contentType") or "application/octet-stream")
    for key in result.get("imagePaths") or []:
        found.setdefault(key, mimetypes.guess_type(key)[0] or "application/octet-stream")
    return list(found.items())


def make_publisher(settings: Settings, spool: Spool | None = None) -> Publisher:
    if not settings.kafka_enabled:
        return NoPublisher()
    from selfix.kafka import ResultPublisher  # lazily: offline nodes never load librdkafka

    return ResultPublisher(settings, spool)


def serve(program: Program) -> int:
    settings, spool = program.settings, program.spool
    store = open_store(settings)
    logger.info("uploader starting: store {}, results {}", store.describe(),
                f"Kafka topic {settings.kafka_topic_output}" if settings.kafka_enabled else "done/ only")
    return Uploader(settings, spool, store, make_publisher(settings, spool), program.flags).run()


def main() -> int:
    return run("uploader", serve)


if __name__ == "__main__":
    raise SystemExit(main())
