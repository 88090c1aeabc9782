"""The runner process: inbox → ComfyUI → outbox, keeping ComfyUI's own queue one job ahead.

State lives in processing/ (one file per claimed job, with its prompt id and whether ComfyUI started it) and in
ComfyUI (/queue, /history). Memory is a cache of both: after a restart the runner re-attaches to the prompts it had
queued instead of running them again, because prompt ids are derived from (taskId, attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from loguru import logger

from selfix import messages as m
from selfix import stats
from selfix.backoff import compute_backoff
from selfix.comfy import ComfyClient, ComfyRejected, ComfyUnavailable, EventStream, prompt_id_for
from selfix.faults import crashpoint
from selfix.isolation import Guard
from selfix.loras import LoraCache, Prefetcher
from selfix.prepare import prepare
from selfix.process import EXIT_ABORTED, EXIT_OK, StopFlags, boot
from selfix.settings import Settings
from selfix.spool import Spool, valid_task_id
from selfix.storage import ObjectStore, StorageError, open_store
from selfix.workflow import output_images

TICK_S = 0.05  # inbox look-up when idle: one listdir, cheap; it bounds pick-up latency
HEARTBEAT_S = 1.0
PREFETCH_POKE_S = 1.0
PROGRESS_WRITE_S = 1.0
INTERRUPT_GRACE_S = 30.0


@dataclass
class Inflight:
    """A job this runner queued in ComfyUI (or is about to)."""

    job: dict[str, Any]
    prompt_id: str
    head_since: float | None = None
    started_at: float | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    history: dict[str, Any] | None = None
    timed_out_at: float | None = None
    progress_written: float = 0.0

    @property
    def task_id(self) -> str:
        return str(self.job["taskId"])

    def log(self) -> Any:
        return logger.bind(task_id=self.task_id)


class Runner:
    def __init__(self, settings: Settings, spool: Spool, store: ObjectStore, client: ComfyClient,
                 flags: StopFlags) -> None:
        self.settings = settings
        self.spool = spool
        self.store = store
        self.loras = LoraCache.from_settings(settings, store, spool)  # never evicts what processing/ names
        self.guard = Guard.from_settings(settings)  # which file names a workflow may give ComfyUI
        self.prefetcher = Prefetcher(self.loras, spool)  # next inbox jobs' LoRAs, in its own thread
        self.client = client
        self.flags = flags
        self.inflight: dict[str, Inflight] = {}
        self.wake = asyncio.Event()
        self.stream = EventStream(client, self.on_event, self.on_reconnect)
        self.needs_reconcile = True
        self.handed_back = False
        self.last_poke = 0.0

    # --- main loop -------------------------------------------------------------------------------------
    async def run(self) -> int:
        self.recover()
        self.stream.start()
        self.prefetcher.start()
        beating = asyncio.create_task(self.heartbeat(), name="heartbeat")
        try:
            while not self.flags.abort.is_set():
                if self.flags.stopping.is_set():
                    await self.hand_back_pending()
                    if not self.inflight:
                        break
                elif self.stream.connected.is_set():
                    await self.fill()
                await self.settle()
                await self.wait_for_change()
        finally:
            beating.cancel()
            self.prefetcher.close()
            await self.stream.stop()
        return EXIT_ABORTED if self.flags.abort.is_set() else EXIT_OK

    async def heartbeat(self) -> None:
        """Beat from its own task: a long LoRA download inside fill() must not look like a stuck runner, while a
        blocked event loop (the real kind of stuck) still stops the beats."""
        while True:
            self.spool.beat("runner")
            await asyncio.sleep(HEARTBEAT_S)

    async def wait_for_change(self) -> None:
        """Sleep until an event (a prompt finished, a job was collected) or the next tick; a wake that came
        while we were busy returns at once, so a freed slot is refilled without waiting for the tick."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), TICK_S)
        self.wake.clear()

    def capacity(self) -> int:
        return 1 + self.settings.queue_ahead

    # --- taking jobs ---------------------------------------------------------------------------------
    async def fill(self) -> None:
        claimed = False
        while len(self.inflight) < self.capacity() and not self.flags.stopping.is_set():
            entry = self.spool.next_ready()
            if entry is None:
                break
            path = self.spool.claim(entry)
            if path is None:
                continue
            claimed = True
            job = self.load_job(path)
            if job is not None:
                await self.start(job)
        now = time.monotonic()
        if claimed or now - self.last_poke >= PREFETCH_POKE_S:
            # Returns at once: the prefetch thread reads the head of inbox/ and downloads. Poked when the head
            # moved, else once a second for new arrivals, not on every 50 ms tick.
            self.last_poke = now
            self.prefetcher.poke()

    def load_job(self, path: Path) -> dict[str, Any] | None:
        try:
            job = m.strict_loads(path.read_bytes())
            if not isinstance(job, dict) or not valid_task_id(job.get("taskId")) or "workflow" not in job:
                raise ValueError("not a selfix job object")
            return job
        except (ValueError, UnicodeDecodeError) as exc:
            self.spool.quarantine(path, f"unreadable job file: {exc}")
            logger.error("{} moved to corrupt/: {}", path.name, exc)
            return None

    async def start(self, job: dict[str, Any]) -> None:
        """Prepare (LoRA, inputs, patch) and queue one job; on failure, finish or hand it back."""
        attempt = int(job.get("attempt", 1))
        job.update(promptId=prompt_id_for(job["taskId"], attempt), state="claimed", claimedAt=time.time())
        job.pop("startedAt", None)
        self.spool.write_processing(job)
        inf = Inflight(job, job["promptId"])
        try:
            workflow = await asyncio.to_thread(
                prepare, job, self.store, self.loras, self.settings.comfy_input_dir, self.settings.max_data_url_bytes,
                self.guard)
        except m.TaskError as exc:
            self.fail(inf, exc)
            return
        except StorageError as exc:
            self.defer(inf, f"storage unavailable: {exc}")
            return
        await self.submit(inf, workflow)

    async def submit(self, inf: Inflight, workflow: dict[str, Any]) -> None:
        inf.job["state"] = "submitting"
        self.spool.write_processing(inf.job)
        self.inflight[inf.prompt_id] = inf
        if inf.head_since is None and next(iter(self.inflight)) == inf.prompt_id:
            inf.head_since = time.time()
        try:
            await self.client.queue_prompt(workflow, inf.prompt_id, {"selfix": {"taskId": inf.task_id}})
        except ComfyRejected as exc:
            del self.inflight[inf.prompt_id]
            self.fail(inf, m.TaskError(m.INVALID_WORKFLOW, str(exc), node_errors=exc.node_errors))
            return
        except ComfyUnavailable as exc:
            # It may or may not have been queued: reconcile() looks in /queue and /history before resubmitting.
            inf.log().warning("ComfyUI unavailable while queueing: {}", exc)
            self.needs_reconcile = True
            return
        inf.job.update(state="submitted", submittedAt=time.time())
        self.spool.write_processing(inf.job)
        inf.log().info("queued in ComfyUI as {} (attempt {})", inf.prompt_id, inf.job.get("attempt", 1))

    # --- ComfyUI events --------------------------------------------------------------------------------
    async def on_event(self, kind: str, data: dict[str, Any]) -> None:
        inf = self.inflight.get(str(data.get("prompt_id")))
        if inf is None:
            return
        if kind == "execution_start":
            inf.started_at = time.time()
            inf.job["startedAt"] = inf.started_at
            self.spool.write_processing(inf.job)
            crashpoint(self.settings, self.spool, "runner.after_start")
        elif kind == "executing" and data.get("node") is None:
            inf.finished.set()
            self.wake.set()
        elif kind == "progress":
            self.record_progress(inf, data)

    def record_progress(self, inf: Inflight, data: dict[str, Any]) -> None:
        inf.job["progress"] = {"value": data.get("value"), "max": data.get("max"), "node": data.get("node")}
        now = time.monotonic()
        if now - inf.progress_written >= PROGRESS_WRITE_S:
            inf.progress_written = now
            self.spool.write_processing(inf.job)

    async def on_reconnect(self) -> None:
        self.needs_reconcile = True
        self.wake.set()

    # --- finishing -------------------------------------------------------------------------------------
    async def settle(self) -> None:
        silent = time.monotonic() - self.stream.last_frame_at > self.settings.ws_silence_s
        if self.inflight and (self.needs_reconcile or silent):
            await self.reconcile()
        for inf in list(self.inflight.values()):
            if inf.finished.is_set():
                await self.collect(inf)
        await self.check_deadline()

    async def reconcile(self) -> None:
        """Ask ComfyUI where each inflight prompt is: queued, finished (history) or lost (ComfyUI restarted)."""
        try:
            queue = await self.client.queue()  # queue before history: a prompt moves from one to the other
            for inf in list(self.inflight.values()):
                if inf.finished.is_set() or queue.holds(inf.prompt_id):
                    continue
                inf.history = await self.client.history(inf.prompt_id)
                if inf.history is not None:
                    inf.finished.set()
                else:
                    await self.lost(inf)
        except ComfyUnavailable as exc:
            logger.debug("reconcile postponed: {}", exc)
            return
        self.needs_reconcile = False
        self.stream.last_frame_at = time.monotonic()

    async def lost(self, inf: Inflight) -> None:
        del self.inflight[inf.prompt_id]
        if inf.job.get("startedAt"):
            inf.log().warning("prompt {} vanished from ComfyUI mid-run (ComfyUI restarted?)", inf.prompt_id)
            self.retry(inf, m.TaskError(m.COMFYUI_UNAVAILABLE, "ComfyUI stopped while running the job",
                                        retriable=True))
        else:
            inf.log().info("prompt {} never reached ComfyUI; queueing it again", inf.prompt_id)
            await self.start(inf.job)

    async def collect(self, inf: Inflight) -> None:
        try:
            entry = inf.history or await self.client.history(inf.prompt_id)
        except ComfyUnavailable:
            return
        if entry is None:
            inf.finished.clear()  # executing(null) without history yet: look again on the next reconcile
            self.needs_reconcile = True
            return
        try:
            await self.conclude(inf, entry)
        except ComfyUnavailable as exc:
            inf.log().warning("could not fetch outputs yet: {}", exc)
            return
        del self.inflight[inf.prompt_id]
        self.promote_head()
        self.wake.set()
        with contextlib.suppress(ComfyUnavailable):
            await self.client.forget_history([inf.prompt_id])

    def promote_head(self) -> None:
        head = next(iter(self.inflight.values()), None)
        if head is not None and head.head_since is None:
            head.head_since = time.time()

    async def conclude(self, inf: Inflight, entry: dict[str, Any]) -> None:
        status = entry.get("status", {})
        if status.get("status_str") == "success" and status.get("completed", True):
            await self.complete(inf, entry)
            return
        kind, data = _terminal_message(status)
        if kind == "execution_interrupted" and inf.timed_out_at is not None:
            self.fail(inf, m.TaskError(m.TIMEOUT, f"job exceeded JOB_TIMEOUT_S={self.settings.job_timeout_s:g}s "
                                                  f"in node {data.get('node_id')} ({data.get('node_type')})"))
        elif kind == "execution_interrupted":
            self.retry(inf, m.TaskError(m.INTERRUPTED, "ComfyUI interrupted the job", retriable=True))
        else:
            self.fail_or_retry(inf, _execution_error(data))

    async def complete(self, inf: Inflight, entry: dict[str, Any]) -> None:
        images = output_images(entry)
        if not images:
            self.fail(inf, m.TaskError(m.NO_OUTPUT, "the workflow produced no output image (SaveImage)"))
            return
        prefix = self.settings.user_prefix_for(inf.job["userId"])
        staged = self.spool.stage_result(inf.task_id)
        keys = []
        for index, image in enumerate(images):
            ext = Path(image["filename"]).suffix.lstrip(".").lower() or "png"
            key = m.output_key(prefix, inf.task_id, index, ext)
            await self.client.download(image, staged / Path(key).name)
            keys.append(key)
        result = m.completed_result(inf.job, keys, self.metadata(inf, entry))
        self.spool.publish_result(staged, result)
        crashpoint(self.settings, self.spool, "runner.after_outbox")
        self.spool.drop_processing(inf.task_id)
        inf.log().info("completed: {} image(s), {:.2f}s generation", len(keys), result["metadata"]["generationTime"])

    def metadata(self, inf: Inflight, entry: dict[str, Any] | None = None) -> dict[str, Any]:
        job, now = inf.job, time.time()
        started = _history_times(entry)
        gen = (started[1] - started[0]) if started else 0.0
        began = started[0] if started else (job.get("startedAt") or now)
        meta = {
            "generationTime": round(gen, 3), "queueTime": round(max(0.0, began - job["enqueuedAt"]), 3),
            "totalTime": round(now - job["enqueuedAt"], 3), "attempts": int(job.get("attempt", 1)),
            "promptId": inf.prompt_id,
        }
        if started:
            meta.update(startedAt=started[0], finishedAt=started[1])
        return meta

    def fail(self, inf: Inflight, error: m.TaskError) -> None:
        result = m.failed_result(inf.task_id, inf.job.get("userId"), error, self.metadata(inf))
        self.spool.write_result(result)
        self.spool.drop_processing(inf.task_id)
        inf.log().warning("failed: {} {}", error.code, error.message)

    def fail_or_retry(self, inf: Inflight, error: m.TaskError) -> None:
        (self.retry if error.retriable else self.fail)(inf, error)

    def retry(self, inf: Inflight, error: m.TaskError) -> None:
        """Back to inbox/ with attempt + 1 after a jittered backoff, or a final failure past MAX_ATTEMPTS."""
        job, attempt = inf.job, int(inf.job.get("attempt", 1))
        if attempt >= self.settings.max_attempts:
            self.fail(inf, m.TaskError(m.RETRIES_EXHAUSTED, f"gave up after {attempt} attempt(s); last error "
                                                           f"{error.code}: {error.message}"))
            return
        delay = compute_backoff(attempt, self.settings.retry_base_s, self.settings.retry_max_s)
        job.update(attempt=attempt + 1, notBefore=time.time() + delay, lastError=error.as_error(), state="queued")
        for key in ("promptId", "startedAt", "progress"):
            job.pop(key, None)
        self.spool.requeue(job)
        stats.incr("job_retries", code=error.code)  # watchdog metric selfix_job_retries_total
        inf.log().warning("retry {} in {:.1f}s after {}: {}", attempt + 1, delay, error.code, error.message)

    def defer(self, inf: Inflight, reason: str) -> None:
        """An outage outside the job (store down): wait and try again without using up an attempt."""
        job = inf.job
        job["deferrals"] = int(job.get("deferrals", 0)) + 1
        delay = compute_backoff(min(job["deferrals"], 10), max(self.settings.retry_base_s, 0.5),
                                max(self.settings.retry_max_s, 1.0))
        job.update(notBefore=time.time() + delay, state="queued")
        job.pop("promptId", None)
        self.spool.requeue(job)
        inf.log().warning("deferred {:.1f}s: {}", delay, reason)

    # --- deadlines and draining ------------------------------------------------------------------------
    async def check_deadline(self) -> None:
        head = next(iter(self.inflight.values()), None)
        if head is None:
            return
        since = head.started_at or head.head_since
        now = time.time()
        if since is None or now - since < self.settings.job_timeout_s:
            return
        if head.timed_out_at is None:
            head.timed_out_at = now
            head.log().warning("deadline of {:g}s passed: interrupting {}", self.settings.job_timeout_s,
                               head.prompt_id)
            with contextlib.suppress(ComfyUnavailable):
                await self.client.interrupt(head.prompt_id)
        elif now - head.timed_out_at > INTERRUPT_GRACE_S:
            del self.inflight[head.prompt_id]
            self.promote_head()
            self.fail(head, m.TaskError(m.TIMEOUT, f"job exceeded JOB_TIMEOUT_S={self.settings.job_timeout_s:g}s "
                                                   "and ComfyUI did not stop it"))

    async def hand_back_pending(self) -> None:
        """Draining: jobs queued in ComfyUI but not started go back to inbox/ (same attempt)."""
        if self.handed_back:
            return
        self.handed_back = True
        pending = [inf for inf in list(self.inflight.values())[1:] if not inf.job.get("startedAt")]
        if not pending:
            return
        try:
            await self.client.delete_pending([inf.prompt_id for inf in pending])
            queue = await self.client.queue()
        except ComfyUnavailable:
            return
        for inf in pending:
            if not queue.holds(inf.prompt_id) and await self.client.history(inf.prompt_id) is None:
                del self.inflight[inf.prompt_id]
                inf.job.update(state="queued")
                inf.job.pop("promptId", None)
                self.spool.requeue(inf.job)
                inf.log().info("handed back to inbox/ (draining)")

    # --- recovery --------------------------------------------------------------------------------------
    def recover(self) -> None:
        """Re-attach to every job in processing/; reconcile() then learns from ComfyUI where each one is."""
        self.spool.clean_tmp()
        jobs = []
        for path in self.spool.processing_files():
            job = self.load_job(path)
            if job is None:
                continue
            if self.spool.state_of(job["taskId"]) in ("outbox", "done"):
                # Crashed between the outbox rename and this cleanup (the uploader may have published since).
                self.spool.drop_processing(job["taskId"])
                continue
            jobs.append(job)
        for job in sorted(jobs, key=lambda j: j.get("submittedAt") or j.get("claimedAt") or 0):
            pid = job.get("promptId") or prompt_id_for(job["taskId"], int(job.get("attempt", 1)))
            job["promptId"] = pid
            self.inflight[pid] = Inflight(job, pid, started_at=job.get("startedAt"))
            logger.bind(task_id=job["taskId"]).info("re-attaching to prompt {}", pid)
        self.promote_head()
        self.needs_reconcile = True


def _terminal_message(status: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    for kind, data in reversed(status.get("messages", [])):
        if kind in ("execution_error", "execution_interrupted"):
            return kind, data
    return "unknown", {}


def _execution_error(data: dict[str, Any]) -> m.TaskError:
    exc_type, exc_msg = str(data.get("exception_type", "")), str(data.get("exception_message", "")).strip()
    where = f"node {data.get('node_id')} ({data.get('node_type')})"
    if "OutOfMemory" in exc_type or "out of memory" in exc_msg.lower():
        return m.TaskError(m.OUT_OF_MEMORY, f"{where}: {exc_type}: {exc_msg}", retriable=True)
    if not data:
        return m.TaskError(m.EXECUTION_ERROR, "ComfyUI reported the job as failed without details")
    return m.TaskError(m.EXECUTION_ERROR, f"{where}: {exc_type}: {exc_msg}")


def _history_times(entry: dict[str, Any] | None) -> tuple[float, float] | None:
    """(start, end) in seconds from the execution_* timestamps in /history: true GPU time, restart-proof."""
    if not entry:
        return None
    stamps = {kind: data.get("timestamp") for kind, data in entry.get("status", {}).get("messages", [])}
    start = stamps.get("execution_start")
    end = stamps.get("execution_success") or stamps.get("execution_error") or stamps.get("execution_interrupted")
    if not isinstance(start, int | float) or not isinstance(end, int | float):
        return None
    return start / 1000, end / 1000


async def amain(settings: Settings) -> int:
    spool = Spool(settings.spool_dir).ensure()
    stats.configure(spool, "runner")  # counters (LoRA cache, retries) persist in run/stats.runner.json
    flags = StopFlags().install()
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = ComfyClient(settings.comfy_url, f"selfix-runner-{socket.gethostname()}", session)
        runner = Runner(settings, spool, open_store(settings), client, flags)
        return await runner.run()


def main() -> int:
    settings = boot("runner")
    logger.info("runner starting: ComfyUI at {}, queue ahead {}", settings.comfy_url, settings.queue_ahead)
    return asyncio.run(amain(settings))


if __name__ == "__main__":
    raise SystemExit(main())
