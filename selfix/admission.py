"""Admission: raw task bytes → a job in the spool. One `accept` for the Kafka intake, `selfix submit` and files
dropped into inbox/ by hand (`ingest_dropped_files`, `adopt_dropped`), so every way in validates the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loguru import logger

from selfix import control
from selfix.files import DiskFull, disk_full_error, is_disk_full
from selfix.messages import INVALID_MESSAGE, InvalidTask, Limits, Task, failed_result, parse_task, peek_ids
from selfix.settings import Settings
from selfix.spool import Spool
from selfix.templates import Catalog

Kind = Literal["accepted", "duplicate", "failed", "unaddressable"]


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    task_id: str | None
    detail: str = ""
    priority: int = 0


def limits_of(settings: Settings) -> Limits:
    return Limits(settings.max_message_bytes, settings.max_workflow_nodes, settings.max_data_url_bytes,
                  settings.user_prefix, settings.node_denylist, settings.node_allowlist,
                  max_timeout_s=settings.job_timeout_s)


def accept(spool: Spool, raw: bytes, limits: Limits, catalog: Catalog,
           source: dict[str, Any] | None = None, sent_at: float | None = None) -> Outcome:
    """Validate `raw` and put it in the spool: a job in inbox/, or a failed result in outbox/.

    A taskId already known on this node (any state, done/ included) is a duplicate and changes nothing, so a
    re-delivered message never runs twice here. `unaddressable` (no readable taskId) is left to the caller:
    corrupt/ for files, the DLQ for Kafka.
    """
    try:
        task = _parse(raw, limits, catalog)
    except InvalidTask as exc:
        if exc.task_id is None:
            return Outcome("unaddressable", None, exc.message)
        if spool.state_of(exc.task_id):
            return Outcome("duplicate", exc.task_id, "already known")
        spool.write_result(failed_result(exc.task_id, exc.user_id, exc, {"attempts": 0, "source": source}))
        logger.bind(task_id=exc.task_id).warning("rejected: {} {}", exc.code, exc.message)
        return Outcome("failed", exc.task_id, f"{exc.code}: {exc.message}")
    state = spool.state_of(task.task_id)
    if state:
        return Outcome("duplicate", task.task_id, f"already {state}")
    job = task.to_job(source=source, sent_at=sent_at)
    refused = control.refusal(spool, job)  # a cancel that came first, or already expired
    if refused is not None:
        spool.write_result(failed_result(task.task_id, task.user_id, refused, {"attempts": 0, "source": source}))
        logger.bind(task_id=task.task_id).warning("{} at intake: {}", refused.code, refused.message)
        return Outcome("failed", task.task_id, f"{refused.code}: {refused.message}")
    spool.enqueue(job)
    logger.bind(task_id=task.task_id).info("accepted (priority {})", task.priority)
    return Outcome("accepted", task.task_id, priority=task.priority)


def _parse(raw: bytes, limits: Limits, catalog: Catalog) -> Task:
    """parse_task, and a task that makes selfix itself fail (a bug, not the client's fault) is still answered
    when its taskId can be read, instead of leaving the client without a result."""
    try:
        return parse_task(raw, limits, catalog)
    except InvalidTask:
        raise
    except Exception as exc:  # noqa: BLE001 - one message must never stop intake
        task_id, user_id = peek_ids(raw)
        logger.bind(task_id=task_id).opt(exception=True).error("intake failed on this message")
        raise InvalidTask(INVALID_MESSAGE, f"selfix could not process this task: {type(exc).__name__}: {exc}"[:300],
                          task_id, user_id) from exc


def _printable(name: str) -> str:
    """A file name as it may go into a result: undecodable bytes (os.listdir's surrogate escapes) replaced."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _quarantine(spool: Spool, path: Path, reason: str) -> None:
    try:
        spool.quarantine(path, reason)
        logger.warning("{} moved to corrupt/: {}", path.name, reason)
    except OSError as exc:
        if is_disk_full(exc):
            raise  # the disk is full: the file stays where it is, the caller backs off
        logger.error("{} could not be moved to corrupt/ ({}): {}", path.name, exc, reason)


def ingest_dropped_files(spool: Spool, limits: Limits, catalog: Catalog) -> list[Outcome]:
    """Hand-dropped inbox/ files (any name) → canonical jobs, failed results, or corrupt/ with the reason."""
    outcomes = []
    for path in spool.foreign_inbox_files():
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:  # unreadable (permissions, a directory): set it aside, keep the loop alive
            _quarantine(spool, path, f"cannot read dropped file: {exc}")
            continue
        outcome = accept(spool, raw, limits, catalog, source={"file": _printable(path.name)})
        if outcome.kind == "unaddressable":
            _quarantine(spool, path, outcome.detail)
        else:
            path.unlink(missing_ok=True)
            if outcome.kind == "duplicate":
                logger.bind(task_id=outcome.task_id).info("dropped file {} removed: duplicate, {}", path.name,
                                                          outcome.detail)
        outcomes.append(outcome)
    return outcomes


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
