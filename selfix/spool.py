"""The spool: every path and every state change of a task lives here (Maildir/Postfix discipline).

States are directories; a task is in exactly one. Each change is one rename() of a file or a directory that was
written whole in tmp/ and fsync'd first, so a process killed at any instruction leaves either the old state or the
new one. Names carry what the runner needs to order the inbox (priority, age, not-before time), so choosing the next
job costs one listdir and no reads.

Job files (inbox/, processing/) are turned into `selfix.job.Job` and back here only: every other module reads them
through load_job/read_job/processing_jobs/read_inbox_job (tests/test_job.py checks that).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfix.files import fsync_dir, write_synced
from selfix.job import Job, JobFormatError
from selfix.job import valid_task_id as valid_task_id  # where every module has always found it

STATES = ("tmp", "inbox", "processing", "outbox", "done", "corrupt")
# Every pattern here is used with fullmatch(): `$` would also match before a final "\n" ("x\n" passing as an id).
PRIORITY_MIN, PRIORITY_MAX = -999_999, 999_999
_PRIO_OFFSET = 1_000_000  # name key = offset - priority: ascending names = descending priority
INBOX_RE = re.compile(
    r"(?P<key>\d{7})\.(?P<enq>\d{13})\.(?P<nb>\d{13})\.(?P<attempt>\d{2})\.(?P<task>(?!\.)[A-Za-z0-9._-]{1,128})\.json"
)
# Characters no id, user id, file name or object key may hold: C0/C1 controls and DEL, Unicode line and paragraph
# separators, invisible format characters (zero-width, bidi overrides, BOM) and surrogates.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff\ud800-\udfff]")
RESULT_FILE = "result.json"
PREVIEW_MAX_BYTES = 2 << 20  # a 512 px latent preview is ~40 KB; a SaveImageWebsocket PNG may be far larger
PREVIEW_SUFFIX = ".preview"
_NAME_PREFIX_LEN = len("0000000.0000000000000.0000000000000.00.")  # the fixed-width part before the taskId


def has_control(text: str) -> bool:
    return CONTROL_RE.search(text) is not None


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, order=True)
class InboxEntry:
    """One job waiting in inbox/, decoded from its file name alone."""

    name: str
    priority: int
    enqueued_ms: int
    not_before_ms: int
    attempt: int
    task_id: str

    @staticmethod
    def parse(name: str) -> InboxEntry | None:
        m = INBOX_RE.fullmatch(name)
        if not m:
            return None
        return InboxEntry(
            name=name,
            priority=_PRIO_OFFSET - int(m["key"]),
            enqueued_ms=int(m["enq"]),
            not_before_ms=int(m["nb"]),
            attempt=int(m["attempt"]),
            task_id=m["task"],
        )

    @staticmethod
    def make_name(task_id: str, priority: int, enqueued_ms: int, not_before_ms: int = 0, attempt: int = 1) -> str:
        if not valid_task_id(task_id):
            raise ValueError(f"invalid taskId {task_id!r}")
        prio = max(PRIORITY_MIN, min(PRIORITY_MAX, priority))
        key = _PRIO_OFFSET - prio
        return f"{key:07d}.{enqueued_ms:013d}.{not_before_ms:013d}.{min(attempt, 99):02d}.{task_id}.json"


def _write_synced(path: Path, data: bytes) -> None:
    write_synced(path, data)  # removes its own file when the write fails (a full disk)


def dumps(obj: Any) -> bytes:
    # A lone surrogate (from a message ComfyUI echoed, say) cannot be UTF-8: written as its JSON escape instead of
    # crashing the writer. It only occurs inside strings, where "\\udXXX" is exactly what JSON reads back.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")


class Spool:
    """Paths and atomic moves under SPOOL_DIR. Stateless: every method reads the filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp, self.inbox, self.processing, self.outbox, self.done, self.corrupt = (
            self.root / s for s in STATES
        )
        self.run = self.root / "run"
        self.cancel = self.root / "cancel"  # tombstones of cancel requests (selfix/control.py), pruned by age
        self.previews = self.run / "previews"  # the running task's latest preview (CONSOLE_PREVIEWS), see below

    def ensure(self) -> Spool:
        for d in (*(self.root / s for s in STATES), self.run, self.cancel):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # --- low-level atomic writes -------------------------------------------------------------------
    def _tmp_path(self, hint: str) -> Path:
        return self.tmp / f"{uuid.uuid4().hex[:12]}.{os.getpid()}.{hint[:80]}"

    def _atomic_write(self, target: Path, data: bytes) -> None:
        """tmp → fsync → rename → fsync dir: a reader sees the old file or the new one, never half of one."""
        tmp = self._tmp_path(target.name)
        _write_synced(tmp, data)
        try:
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind in tmp/
            raise
        fsync_dir(target.parent)

    def _move(self, src: Path, dst: Path) -> bool:
        """Rename src to dst; False when another process moved src first (lost race), so callers can skip."""
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return False
        fsync_dir(dst.parent)
        return True

    # --- inbox ---------------------------------------------------------------------------------------
    def enqueue(self, job: Job) -> Path:
        """Place a validated job in inbox/ under a name that encodes its order."""
        target = self.inbox / _inbox_name(job)
        self._atomic_write(target, dumps(job.to_dict()))
        return target

    def inbox_entries(self) -> list[InboxEntry]:
        """Canonical inbox files in run order: priority desc, then oldest (sorting the names does it)."""
        entries = (InboxEntry.parse(n) for n in self._names(self.inbox))
        return sorted(e for e in entries if e is not None)

    def foreign_inbox_files(self) -> list[Path]:
        """Files a person dropped into inbox/ by hand; the consumer validates and renames them."""
        return sorted(
            self.inbox / n for n in self._names(self.inbox)
            if InboxEntry.parse(n) is None and not n.startswith(".")
        )

    def next_ready(self, now: float | None = None) -> InboxEntry | None:
        cutoff = now_ms() if now is None else int(now * 1000)
        return next((e for e in self.inbox_entries() if e.not_before_ms <= cutoff), None)

    def next_wakeup(self) -> float | None:
        """Earliest not-before time of a deferred job, so the runner can sleep exactly until then."""
        times = [e.not_before_ms for e in self.inbox_entries()]
        return min(times) / 1000 if times else None

    def read_inbox(self, entry: InboxEntry) -> bytes | None:
        try:
            return (self.inbox / entry.name).read_bytes()
        except FileNotFoundError:
            return None

    def read_inbox_job(self, entry: InboxEntry) -> Job | None:
        """The job behind an inbox entry; None when it was taken meanwhile or cannot be read (the runner
        quarantines it when it claims it)."""
        return self.read_job(self.inbox / entry.name)

    def withdraw(self, entry: InboxEntry) -> bool:
        """Remove a not-started job (partition revoked): the group re-delivers it elsewhere."""
        grave = self._tmp_path("withdrawn-" + entry.name)
        if not self._move(self.inbox / entry.name, grave):
            return False
        grave.unlink(missing_ok=True)
        return True

    # --- processing ----------------------------------------------------------------------------------
    def processing_path(self, task_id: str) -> Path:
        return self.processing / f"{task_id}.json"

    def claim(self, entry: InboxEntry) -> Path | None:
        """Atomically take a job from inbox/; None if someone else took it first."""
        target = self.processing_path(entry.task_id)
        return target if self._move(self.inbox / entry.name, target) else None

    def write_processing(self, job: Job) -> None:
        self._atomic_write(self.processing_path(job.task_id), dumps(job.to_dict()))

    def processing_files(self) -> list[Path]:
        return sorted(self.processing / n for n in self._names(self.processing) if n.endswith(".json"))

    def processing_jobs(self) -> list[Job]:
        """The readable jobs in processing/, by taskId; a file gone meanwhile or unreadable is skipped (the runner
        quarantines those)."""
        jobs = (self.read_job(path) for path in self.processing_files())
        return [job for job in jobs if job is not None]

    def processing_job(self, task_id: str) -> Job | None:
        return self.read_job(self.processing_path(task_id))

    def requeue(self, job: Job) -> Path:
        """processing → inbox in one rename (job already carries its new attempt and notBefore)."""
        self.write_processing(job)
        target = self.inbox / _inbox_name(job)
        self._move(self.processing_path(job.task_id), target)
        self.drop_preview(job.task_id)
        return target

    # --- job files: the only place that turns them into Job and back --------------------------------------
    @staticmethod
    def load_job(path: Path) -> Job:
        """The job in an inbox/ or processing/ file. Raises OSError, or ValueError naming what is wrong."""
        return Job.from_bytes(path.read_bytes())

    def read_job(self, path: Path) -> Job | None:
        """load_job for readers that only look: None when the file is gone or unreadable."""
        try:
            return self.load_job(path)
        except (OSError, ValueError):
            return None

    def drop_processing(self, task_id: str) -> None:
        self.drop_preview(task_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.processing_path(task_id))
            fsync_dir(self.processing)

    # --- the running task's preview (CONSOLE_PREVIEWS) ------------------------------------------------
    # A user's picture, so it exists only while its task is in processing/: requeue() and drop_processing() remove
    # it, the runner clears all of them when it starts, and the console serves one only for a task in processing/.
    # Not fsync'd: it is replaced a few times a second and worth nothing after a crash (the runner clears it then).
    def preview_path(self, task_id: str) -> Path:
        if not valid_task_id(task_id):
            raise ValueError(f"invalid taskId {task_id!r}")
        return self.previews / f"{task_id}{PREVIEW_SUFFIX}"

    def write_preview(self, task_id: str, image: bytes) -> bool:
        """Replace the task's preview (tmp → rename); False when the image is over PREVIEW_MAX_BYTES or the task is
        not in processing/ (it finished: nothing of it is written after that)."""
        if len(image) > PREVIEW_MAX_BYTES or not self.processing_path(task_id).exists():
            return False
        target = self.preview_path(task_id)
        tmp = self._tmp_path("preview-" + task_id)
        try:
            tmp.write_bytes(image)
            try:
                os.replace(tmp, target)
            except FileNotFoundError:
                self.previews.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return True

    def read_preview(self, task_id: str) -> bytes | None:
        """The preview of a task in processing/, None otherwise."""
        try:
            data = self.preview_path(task_id).read_bytes()
        except OSError:
            return None
        return data if self.processing_path(task_id).exists() else None

    def preview_version(self, task_id: str) -> str | None:
        """Changes with every new preview, so the page reloads the image only then: inode and mtime, since each
        write is a new file, created while the one it replaces still held its inode number."""
        try:
            st = self.preview_path(task_id).stat()
        except OSError:
            return None
        return f"{st.st_ino:x}.{st.st_mtime_ns:x}"

    def drop_preview(self, task_id: str) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.preview_path(task_id).unlink()

    def clear_previews(self) -> int:
        """Remove every preview (runner start: what a killed runner left is not shown, nor kept)."""
        removed = 0
        for name in self._names(self.previews):
            with contextlib.suppress(FileNotFoundError):
                (self.previews / name).unlink()
                removed += 1
        return removed

    # --- outbox --------------------------------------------------------------------------------------
    def outbox_dir(self, task_id: str) -> Path:
        return self.outbox / task_id

    def stage_result(self, task_id: str) -> Path:
        """A fresh directory in tmp/ to assemble result.json and images before publish_result()."""
        staged = self._tmp_path(task_id)
        staged.mkdir()
        return staged

    def publish_result(self, staged: Path, result: dict[str, Any]) -> bool:
        """Write result.json into the staged dir and move the whole dir to outbox/<taskId> in one rename.

        False when outbox/<taskId> already exists (a result from before a crash): the first result wins.
        """
        task_id = result["taskId"]
        target = self.outbox_dir(task_id)
        try:
            _write_synced(staged / RESULT_FILE, dumps(result))
            for child in staged.iterdir():
                if child.name != RESULT_FILE:
                    with open(child, "rb") as fh:
                        os.fsync(fh.fileno())
            fsync_dir(staged)
            os.rename(staged, target)
        except BaseException as exc:
            self.discard_staged(staged)  # a failed write (a full disk) leaves nothing behind in tmp/
            if isinstance(exc, OSError) and target.exists():
                return False
            raise
        fsync_dir(self.outbox)
        return True

    def discard_staged(self, staged: Path) -> None:
        """Remove a result directory that will not be published (its writer failed or gave up)."""
        shutil.rmtree(staged, ignore_errors=True)

    def write_result(self, result: dict[str, Any]) -> bool:
        """A result without images (a failure) straight to outbox/."""
        return self.publish_result(self.stage_result(result["taskId"]), result)

    def outbox_tasks(self) -> list[str]:
        """Task ids with a complete result waiting for the uploader, oldest first."""
        names = [n for n in self._names(self.outbox) if valid_task_id(n)]
        return sorted(names, key=lambda n: self._mtime(self.outbox / n))

    def result_written_at(self, task_id: str) -> float | None:
        """When outbox/<taskId>/result.json was written (its mtime), None when it is gone."""
        try:
            return (self.outbox_dir(task_id) / RESULT_FILE).stat().st_mtime
        except FileNotFoundError:
            return None

    def read_result(self, task_id: str) -> dict[str, Any]:
        return dict(json.loads((self.outbox_dir(task_id) / RESULT_FILE).read_bytes()))

    def result_images(self, task_id: str) -> list[Path]:
        return sorted(p for p in self.outbox_dir(task_id).iterdir() if p.name != RESULT_FILE)

    # --- done ----------------------------------------------------------------------------------------
    def done_path(self, task_id: str) -> Path:
        return self.done / f"{task_id}.json"

    def finish(self, result: dict[str, Any]) -> None:
        """done/<taskId>.json, then outbox/<taskId> removed: a crash between leaves both, and the uploader then
        removes the outbox copy (done/ is the ledger that says it was published).

        When what was published is the outbox's own result.json, done/ gets that file by one rename: no new blocks,
        so a full disk cannot keep a result that Kafka has acknowledged from being recorded (and published again
        after a restart). Anything else (a failed result that replaced it, no outbox entry) is written anew.
        """
        task_id = result["taskId"]
        published = self.outbox_dir(task_id) / RESULT_FILE
        try:
            same = json.loads(published.read_bytes()) == result
        except (OSError, ValueError):
            same = False
        if same:
            os.utime(published)  # mtime = published at (done/ retention, the watchdog's counting)
            os.rename(published, self.done_path(task_id))
            fsync_dir(self.done)
        else:
            self._atomic_write(self.done_path(task_id), dumps(result))
        self.discard_outbox(task_id)

    def discard_outbox(self, task_id: str) -> None:
        src = self.outbox_dir(task_id)
        if not src.exists():
            return
        graveyard = self._tmp_path("finished-" + task_id)
        if self._move(src, graveyard):
            shutil.rmtree(graveyard, ignore_errors=True)

    def read_done(self, task_id: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.done_path(task_id).read_bytes()))
        except FileNotFoundError:
            return None

    def prune_done(self, max_age_s: float) -> int:
        cutoff = time.time() - max_age_s
        removed = 0
        for name in self._names(self.done):
            path = self.done / name
            if self._mtime(path) < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed

    # --- knowledge of a task across states -----------------------------------------------------------
    def state_of(self, task_id: str) -> str | None:
        """Which state holds this task, if any (for de-duplication of re-delivered tasks)."""
        if self.done_path(task_id).exists():
            return "done"
        if self.outbox_dir(task_id).exists():
            return "outbox"
        if self.processing_path(task_id).exists():
            return "processing"
        # Called for every incoming message: compare the fixed-width name's tail instead of parsing and sorting.
        wanted = f"{task_id}.json"
        if any(n[_NAME_PREFIX_LEN:] == wanted and INBOX_RE.fullmatch(n) for n in self._names(self.inbox)):
            return "inbox"
        return None

    def accepted_at(self) -> dict[str, float]:
        """taskId → when it was accepted, for every task without a published result (inbox/, processing/, outbox/).

        From the inbox name, the job's enqueuedAt, or the result's write time less its totalTime; a file that cannot
        be read counts from its mtime, so an unreadable task still shows up as old rather than not at all."""
        out: dict[str, float] = {e.task_id: e.enqueued_ms / 1000 for e in self.inbox_entries()}
        for path in self.foreign_inbox_files():
            out[path.name] = self._mtime(path)
        for path in self.processing_files():
            job = self.read_job(path)
            stamp = job.enqueued_at if job is not None else None
            out[path.stem] = float(stamp) if stamp is not None else self._mtime(path)
        for task_id in self.outbox_tasks():
            written = self.result_written_at(task_id)
            if written is None:
                continue
            took = _read_object(self.outbox_dir(task_id) / RESULT_FILE).get("metadata", {})
            total = took.get("totalTime") if isinstance(took, dict) else None
            out[task_id] = written - (float(total) if isinstance(total, int | float) else 0.0)
        return out

    def unresolved(self, older_than_s: float, now: float | None = None) -> list[tuple[str, float]]:
        """(taskId, age in seconds) of the tasks accepted more than `older_than_s` ago and not published, oldest
        first: a task the node should have answered by now (a stuck stage, a result that cannot go out)."""
        stamp = time.time() if now is None else now
        aged = ((t, stamp - at) for t, at in self.accepted_at().items())
        return sorted(((t, age) for t, age in aged if age > older_than_s), key=lambda item: -item[1])

    def known_task_ids(self) -> dict[str, str]:
        """taskId → state for every task on this node (one listdir per state)."""
        known: dict[str, str] = {}
        for e in self.inbox_entries():
            known[e.task_id] = "inbox"
        for p in self.processing_files():
            known[p.stem] = "processing"
        for t in self.outbox_tasks():
            known[t] = "outbox"
        for n in self._names(self.done):
            if n.endswith(".json"):
                known[n[:-5]] = "done"
        return known

    # --- cancel tombstones (selfix/control.py decides what they do) ---------------------------------------
    def cancel_path(self, task_id: str) -> Path:
        return self.cancel / f"{task_id}.json"

    def write_cancel(self, record: dict[str, Any]) -> bool:
        """Remember a cancel request; False when one for this taskId is already there (the first one stands)."""
        target = self.cancel_path(record["taskId"])
        if target.exists():
            return False
        self.cancel.mkdir(parents=True, exist_ok=True)
        self._atomic_write(target, dumps(record))
        return True

    def mark_cancel(self, record: dict[str, Any]) -> None:
        """Rewrite a tombstone with what it did (`handled`), so a restarted runner does not apply it twice."""
        self._atomic_write(self.cancel_path(record["taskId"]), dumps(record))

    def read_cancel(self, task_id: str) -> dict[str, Any] | None:
        try:
            obj = json.loads(self.cancel_path(task_id).read_bytes())
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None
        return obj if isinstance(obj, dict) else None

    def cancel_ids(self) -> list[str]:
        return sorted(n[:-5] for n in self._names(self.cancel) if n.endswith(".json") and valid_task_id(n[:-5]))

    def cancel_dir_mtime(self) -> int:
        try:
            return os.stat(self.cancel).st_mtime_ns
        except FileNotFoundError:
            return -1

    def prune_cancels(self, max_age_s: float) -> int:
        cutoff = time.time() - max_age_s
        removed = 0
        for name in self._names(self.cancel):
            path = self.cancel / name
            if self._mtime(path) < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed

    def inbox_entry_of(self, task_id: str) -> InboxEntry | None:
        wanted = f"{task_id}.json"
        return next((e for e in self.inbox_entries() if e.name[_NAME_PREFIX_LEN:] == wanted), None)

    # --- corrupt -------------------------------------------------------------------------------------
    def quarantine(self, path: Path, reason: str) -> Path:
        """Move an unusable file aside with its reason beside it; never delete it silently."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.corrupt / f"{stamp}.{uuid.uuid4().hex[:6]}.{path.name[:150]}"
        self._atomic_write(target.with_name(target.name + ".reason"), reason.encode() + b"\n")
        if not self._move(path, target):
            target.with_name(target.name + ".reason").unlink(missing_ok=True)
        return target

    def quarantine_bytes(self, data: bytes, hint: str, reason: str) -> Path:
        tmp = self._tmp_path("corrupt")
        _write_synced(tmp, data)
        named = tmp.rename(tmp.with_name(_safe_name(hint)))
        try:
            return self.quarantine(named, reason)
        except BaseException:
            named.unlink(missing_ok=True)
            raise

    def corrupt_entries(self) -> list[tuple[str, str]]:
        out = []
        for n in self._names(self.corrupt):
            if n.endswith(".reason"):
                continue
            reason_file = self.corrupt / (n + ".reason")
            out.append((n, reason_file.read_text().strip() if reason_file.exists() else ""))
        return out

    # --- heartbeats and run state ---------------------------------------------------------------------
    def heartbeat_path(self, process: str) -> Path:
        return self.run / f"heartbeat.{process}"

    def beat(self, process: str) -> None:
        path = self.heartbeat_path(process)
        try:
            os.utime(path)
        except FileNotFoundError:
            path.touch()

    def heartbeat_age(self, process: str) -> float | None:
        try:
            return time.time() - self.heartbeat_path(process).stat().st_mtime
        except FileNotFoundError:
            return None

    def write_run_file(self, name: str, data: bytes) -> Path:
        target = self.run / name
        self._atomic_write(target, data)
        return target

    # --- maintenance --------------------------------------------------------------------------------
    def clean_tmp(self, max_age_s: float = 3600) -> int:
        """Remove tmp/ leftovers of crashed writers. Every process writes through tmp/, so only entries
        older than any write in progress can be stale: the age keeps one process from deleting another's work."""
        removed = 0
        cutoff = time.time() - max_age_s
        for name in self._names(self.tmp):
            path = self.tmp / name
            if self._mtime(path) > cutoff:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
        return removed

    def counts(self) -> dict[str, int]:
        return {
            "inbox": len(self.inbox_entries()) + len(self.foreign_inbox_files()),
            "processing": len(self.processing_files()),
            "outbox": len(self.outbox_tasks()),
            "done": sum(1 for n in self._names(self.done) if n.endswith(".json")),
            "corrupt": sum(1 for n in self._names(self.corrupt) if not n.endswith(".reason")),
            "tmp": len(self._names(self.tmp)),
        }

    def writable(self) -> bool:
        try:
            probe = self._tmp_path("probe")
            _write_synced(probe, b"ok")
            probe.unlink()
            return True
        except OSError:
            return False

    def iter_all_task_files(self) -> Iterator[tuple[str, str]]:
        """(state, taskId) for every task file, for consistency checks in tests and `selfix status`."""
        for e in self.inbox_entries():
            yield "inbox", e.task_id
        for p in self.processing_files():
            yield "processing", p.stem
        for t in self.outbox_tasks():
            yield "outbox", t
        for n in self._names(self.done):
            if n.endswith(".json"):
                yield "done", n[:-5]

    @staticmethod
    def _names(directory: Path) -> list[str]:
        try:
            return os.listdir(directory)
        except FileNotFoundError:
            return []

    @staticmethod
    def _mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:
            return 0.0


def _inbox_name(job: Job) -> str:
    if job.enqueued_at is None:
        raise JobFormatError(f"job {job.task_id} has no enqueuedAt: its place in the inbox order is unknown")
    return InboxEntry.make_name(job.task_id, job.priority, int(job.enqueued_at * 1000), int(job.not_before * 1000),
                                job.attempt)


def _read_object(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _safe_name(hint: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", hint)[:100].lstrip(".")
    return cleaned or "unnamed"
