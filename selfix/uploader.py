"""The uploader process: outbox/<taskId>/ → images in the store → result published → done/ → cleanup.

Order matters for the delivery guarantee: images first (a result never names a missing object), then the result is
published (Kafka delivery confirmed, when Kafka is configured), then done/ is written. A crash anywhere repeats the
steps that were not recorded yet; output keys are deterministic, so a repeat overwrites instead of duplicating.
"""

from __future__ import annotations

import mimetypes
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from loguru import logger

from selfix.backoff import compute_backoff
from selfix.faults import crashpoint
from selfix.messages import staged_name
from selfix.prepare import remove_task_files
from selfix.process import EXIT_ABORTED, EXIT_OK, EXIT_UNAVAILABLE, StopFlags, boot
from selfix.settings import Settings
from selfix.spool import Spool
from selfix.storage import DEFAULT_PART_SIZE, ObjectStore, StorageError, open_store

IDLE_POLL_S = 0.05
DRAIN_S = 30.0  # on SIGTERM, how long the uploader keeps publishing outbox/ (below its stopwaitsecs)
PRUNE_EVERY_S = 600.0
UPLOAD_THREADS = 4


class Publisher(Protocol):
    """Where results go besides done/: Kafka's output topic, or nowhere in offline mode."""

    def publish(self, result: dict[str, Any]) -> None:
        """Return only once the result is durably delivered; raise to retry later."""

    def idle(self) -> None:
        """Called on every turn of the uploader's loop (Kafka: delivery reports, optional status events)."""

    def close(self) -> None: ...


class NoPublisher:
    def publish(self, result: dict[str, Any]) -> None:
        return None

    def idle(self) -> None:
        return None

    def close(self) -> None:
        return None


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

    def run(self) -> int:
        drain_until: float | None = None
        while not self.flags.abort.is_set():
            self.spool.beat("uploader")
            pending = self.spool.outbox_tasks()
            if self.flags.stopping.is_set():
                # supervisord stops the uploader after the runner: publish everything in outbox/ (waiting out
                # backoffs), within DRAIN_S; what is left then survives in outbox/ for the next start.
                now = time.monotonic()
                if drain_until is None:
                    drain_until = now + DRAIN_S
                    logger.info("draining: {} result(s) in outbox/", len(pending))
                if not pending or now >= drain_until:
                    if pending:
                        logger.warning("drain ended after {:g}s with {} result(s) left in outbox/", DRAIN_S,
                                       len(pending))
                    break
            for task_id in self._ready(pending):
                if self.flags.abort.is_set() or self.refused:
                    break
                self.deliver(task_id)
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

    def deliver(self, task_id: str) -> None:
        log = logger.bind(task_id=task_id)
        try:
            result = self.spool.read_result(task_id)
        except FileNotFoundError:
            return  # gone meanwhile (another uploader instance, or finished just now)
        except (ValueError, UnicodeDecodeError) as exc:
            self.spool.quarantine(self.spool.outbox_dir(task_id), f"unreadable result.json: {exc}")
            log.error("outbox entry moved to corrupt/: {}", exc)
            return
        if self.spool.read_done(task_id) is not None:
            self.spool.discard_outbox(task_id)  # published before a crash; done/ is the ledger
            return
        try:
            self.upload_images(task_id, result)
            self.publisher.publish(result)
        except Exception as exc:  # noqa: BLE001 - any failure here is retried; the result stays in outbox/
            if getattr(exc, "permanent", False):
                self.refused = str(exc)  # e.g. wrong KAFKA_SASL_*: stop loudly instead of retrying forever
                return
            self.postpone(task_id, exc)
            return
        crashpoint(self.settings, self.spool, "uploader.before_done")
        self.spool.finish(result)
        remove_task_files(self.settings.comfy_output_dir, self.settings.comfy_input_dir, task_id)
        self.failures.pop(task_id, None)
        self.not_before.pop(task_id, None)
        log.info("published: {} ({} image(s), {} output(s))", result.get("status"), len(result.get("imagePaths") or []),
                 len(result.get("outputs") or []))

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
            return path if path.exists() else folder / Path(key).name  # a result staged before outputs/ existed

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


def main() -> int:
    settings = boot("uploader")
    spool = Spool(settings.spool_dir).ensure()
    flags = StopFlags().install()
    store = open_store(settings)
    logger.info("uploader starting: store {}, results {}", store.describe(),
                f"Kafka topic {settings.kafka_topic_output}" if settings.kafka_enabled else "done/ only")
    return Uploader(settings, spool, store, make_publisher(settings, spool), flags).run()


if __name__ == "__main__":
    raise SystemExit(main())
