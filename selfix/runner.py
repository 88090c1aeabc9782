"""The runner process: inbox → ComfyUI → outbox, keeping ComfyUI's own queue one job ahead.

State lives in processing/ (one file per claimed job, with its prompt id and whether ComfyUI started it) and in
ComfyUI (/queue, /history). Memory is a cache of both: after a restart the runner re-attaches to the prompts it had
queued instead of running them again, because prompt ids are derived from (taskId, attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from loguru import logger

from selfix import messages as m
from selfix import outputs, stats
from selfix.backoff import compute_backoff
from selfix.clock import Clock, SystemClock
from selfix.comfy import ComfyClient, ComfyRejected, ComfyUnavailable, EventStream, OutputTooLarge, prompt_id_for
from selfix.control import RunnerControl, deadline_label, deadline_s
from selfix.faults import crashpoint
from selfix.files import DISK_RETRY_MAX_S, DiskFull, disk_full_error
from selfix.isolation import Guard
from selfix.job import Job, Progress
from selfix.loras import LoraCache, Prefetcher
from selfix.outcomes import (
    INTERRUPT_GRACE_S,
    Slot,
    after_failure,
    cancel_step,
    deadline_step,
    error_from,
    hand_back,
    on_lost,
    terminal_message,
)
from selfix.prepare import prepare, remove_task_files
from selfix.previews import PreviewFrame, PreviewKeeper
from selfix.process import EXIT_ABORTED, EXIT_OK, Program, StopFlags, run_async
from selfix.settings import Settings
from selfix.spool import Spool
from selfix.storage import ObjectStore, StorageError, open_store
from selfix.workflow import collect_outputs

TICK_S = 0.05  # inbox look-up when idle: one listdir, cheap; it bounds pick-up latency
HEARTBEAT_S = 1.0
DEADLINE_TICK_S = 0.25  # the deadline task's period: a deadline fires at most this late, whatever ComfyUI does
PREFETCH_POKE_S = 1.0
PROGRESS_WRITE_S = 1.0
CANCEL_POLL_S = 0.2  # how often a prompt being removed (200 with node_errors) is looked at in /queue


@dataclass
class Inflight:
    """A job this runner queued in ComfyUI (or is about to)."""

    job: Job  # replaced (frozen), never changed in place: what processing/ holds, or is about to
    prompt_id: str
    head_since: float | None = None
    started_at: float | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    history: dict[str, Any] | None = None
    timed_out_at: float | None = None
    gave_up: bool = False  # past the deadline and its grace: failed without waiting for ComfyUI any longer
    rejection: m.TaskError | None = None  # ComfyUI queued it in part: remove it, then fail with this error
    cancel_at: float = 0.0
    cancelled_by: m.TaskError | None = None  # a cancel request interrupted it (selfix/control.py)
    progress_written: float = 0.0

    @property
    def task_id(self) -> str:
        return self.job.task_id

    def log(self) -> Any:
        return logger.bind(task_id=self.task_id)


class Runner:
    def __init__(self, settings: Settings, spool: Spool, store: ObjectStore, client: ComfyClient,
                 flags: StopFlags, clock: Clock | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.loras = LoraCache.from_settings(settings, store, spool)  # never evicts what processing/ names
        self.guard = Guard.from_settings(settings)  # which file names a workflow may give ComfyUI
        self.prefetcher = Prefetcher(self.loras, spool)  # next inbox jobs' LoRAs, in its own thread
        self.client = client
        self.flags = flags
        self.inflight: dict[str, Inflight] = {}
        self.wake = asyncio.Event()
        self.previews = PreviewKeeper(spool, self.clock)  # the console's preview of the running task
        self.stream = EventStream(client, self.on_event, self.on_reconnect,
                                  self.on_preview if settings.console_previews else None)
        self.needs_reconcile = True
        self.handed_back = False
        self.last_poke = 0.0
        self.interrupt_grace_s = INTERRUPT_GRACE_S
        self.tasks: set[asyncio.Task[None]] = set()
        self.disk = DiskFull("runner")
        self.control = RunnerControl(self)  # cancel, expiry, per-task deadlines

    # --- main loop -------------------------------------------------------------------------------------
    async def run(self, until_idle: bool = False) -> int:
        """Work until stopped; with `until_idle` (a burst, as arq's run_check) return once nothing is in inbox/
        and nothing in ComfyUI: tests drive the runner that way, in-process."""
        self.recover()
        self.stream.start()
        self.prefetcher.start()
        side = [asyncio.create_task(self.heartbeat(), name="heartbeat"),
                asyncio.create_task(self.watch_deadlines(), name="deadlines")]
        try:
            while not self.flags.abort.is_set():
                try:
                    if await self.step():
                        break
                except Exception as exc:
                    full = disk_full_error(exc)
                    if full is None:
                        raise
                    await self.disk_full(full)
                    continue
                if self.disk.active and not self.spool.writable():
                    await self.disk_full(None)
                    continue
                self.disk.clear()
                if until_idle and self.idle():
                    break
                await self.wait_for_change()
        finally:
            for task in [*side, *self.tasks]:
                task.cancel()
            self.prefetcher.close()
            await self.stream.stop()
        return EXIT_ABORTED if self.flags.abort.is_set() else EXIT_OK

    def idle(self) -> bool:
        return not self.inflight and not self.spool.inbox_entries()

    async def step(self) -> bool:
        """One turn of the loop; True when drained and done."""
        if self.flags.stopping.is_set():
            await self.hand_back_pending()
            if not self.inflight:
                return True
        elif self.stream.connected.is_set() and not self.disk.active:
            await self.fill()  # a full disk takes no new job: what is claimed already comes first
        await self.settle()
        return False

    async def disk_full(self, exc: OSError | None) -> None:
        """A write failed for want of space (or a probe found none): nothing is lost, since every job is still in
        processing/ or inbox/; jobs whose step was cut short are taken up again from processing/, then the loop
        waits out a bounded backoff (one log line per episode) and tries again."""
        delay = self.disk.hit(exc, self.spool.root)
        try:
            self.readopt()
        except Exception as again:  # noqa: BLE001 - checked: only a full disk is swallowed here
            if disk_full_error(again) is None:
                raise
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(self.flags.abort.wait, delay), delay + 1)

    async def heartbeat(self) -> None:
        """Beat from its own task: a long LoRA download inside fill() must not look like a stuck runner, while a
        blocked event loop (the real kind of stuck) still stops the beats."""
        while True:
            self.flags.beat()
            await asyncio.sleep(HEARTBEAT_S)

    async def watch_deadlines(self) -> None:
        """Deadlines in their own task: the main loop may be waiting on ComfyUI (bounded, but a few seconds),
        and a job's deadline must not wait for it."""
        while True:
            await self.check_deadline()
            await asyncio.sleep(DEADLINE_TICK_S)

    async def wait_for_change(self) -> None:
        """Sleep until an event (a prompt finished, a job was collected) or the next tick; a wake that came
        while we were busy returns at once, so a freed slot is refilled without waiting for the tick."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), TICK_S)
        self.wake.clear()

    def capacity(self) -> int:
        return 1 + self.settings.queue_ahead

    def head(self) -> Inflight | None:
        return next(iter(self.inflight.values()), None)

    # --- taking jobs ---------------------------------------------------------------------------------
    async def fill(self) -> None:
        claimed = False
        while len(self.inflight) < self.capacity() and not self.flags.stopping.is_set():
            entry = self.spool.next_ready(self.clock.time())
            if entry is None:
                break
            path = self.spool.claim(entry)
            if path is None:
                continue
            claimed = True
            job = self.load_job(path)
            if job is not None:
                await self.start(job)
        now = self.clock.monotonic()
        if claimed or now - self.last_poke >= PREFETCH_POKE_S:
            # Returns at once: the prefetch thread reads the head of inbox/ and downloads. Poked when the head
            # moved, else once a second for new arrivals, not on every 50 ms tick.
            self.last_poke = now
            self.prefetcher.poke()

    def load_job(self, path: Path) -> Job | None:
        try:
            job = self.spool.load_job(path)
            # Without these it could never end (metadata, output keys): quarantined rather than crash-looping on it.
            missing = [key for key, value in (("workflow", job.workflow), ("userId", job.user_id),
                                              ("enqueuedAt", job.enqueued_at)) if value is None]
            if missing:
                raise ValueError(f"not a selfix job object: no {', '.join(missing)}")
            return job
        except (ValueError, UnicodeDecodeError) as exc:
            self.spool.quarantine(path, f"unreadable job file: {exc}")
            logger.error("{} moved to corrupt/: {}", path.name, exc)
            return None

    async def start(self, job: Job) -> None:
        """Prepare (LoRA, inputs, patch) and queue one job; on failure, finish or hand it back."""
        prompt_id = prompt_id_for(job.task_id, job.attempt)
        job = job.claimed(prompt_id, self.clock.time())
        self.spool.write_processing(job)
        inf = Inflight(job, prompt_id)
        if self.control.refuse(inf):
            return
        try:
            workflow = await asyncio.to_thread(
                prepare, job, self.store, self.loras, self.settings.comfy_input_dir, self.settings.max_data_url_bytes,
                self.guard)
        except m.TaskError as exc:
            self.fail(inf, exc)
            return
        except StorageError as exc:
            if disk_full_error(exc) is not None:
                raise  # LoRA cache or ComfyUI's input dir full: the loop backs off, the job stays claimed
            self.defer(inf, f"storage unavailable: {exc}")
            return
        if self.control.refuse(inf):  # cancelled or expired while its LoRA/inputs were downloading
            return
        await self.submit(inf, workflow)

    async def submit(self, inf: Inflight, workflow: dict[str, Any]) -> None:
        inf.job = inf.job.submitting()
        self.spool.write_processing(inf.job)
        self.inflight[inf.prompt_id] = inf
        if inf.head_since is None and next(iter(self.inflight)) == inf.prompt_id:
            inf.head_since = self.clock.time()
        try:
            await self.client.queue_prompt(workflow, inf.prompt_id, {"selfix": {"taskId": inf.task_id}})
        except ComfyRejected as exc:
            error = m.TaskError(m.INVALID_WORKFLOW, str(exc), node_errors=exc.node_errors)
            if exc.queued:
                self.begin_cancel(inf, error)
                return
            del self.inflight[inf.prompt_id]
            self.promote_head()
            self.fail(inf, error)
            return
        except ComfyUnavailable as exc:
            # It may or may not have been queued: reconcile() looks in /queue and /history before resubmitting.
            inf.log().warning("ComfyUI unavailable while queueing: {}", exc)
            self.needs_reconcile = True
            return
        inf.job = inf.job.submitted(self.clock.time())
        self.spool.write_processing(inf.job)
        inf.log().info("queued in ComfyUI as {} (attempt {})", inf.prompt_id, inf.job.attempt)

    # --- ComfyUI events --------------------------------------------------------------------------------
    async def on_event(self, kind: str, data: dict[str, Any]) -> None:
        inf = self.inflight.get(str(data.get("prompt_id")))
        if inf is None:
            return
        if kind == "execution_start":
            inf.started_at = self.clock.time()
            inf.job = inf.job.started(inf.started_at)
            self.note(inf.job)
            crashpoint(self.settings, self.spool, "runner.after_start")
        elif kind == "executing" and data.get("node") is None:
            inf.finished.set()
            self.wake.set()
        elif kind == "progress":
            self.record_progress(inf, data)

    def record_progress(self, inf: Inflight, data: dict[str, Any]) -> None:
        inf.job = inf.job.with_progress(Progress.of(data) or Progress())
        now = self.clock.monotonic()
        if now - inf.progress_written >= PROGRESS_WRITE_S:
            inf.progress_written = now
            self.note(inf.job)

    def note(self, job: Job) -> None:
        """Record a running job's progress in processing/; on a full disk memory keeps it for the next write."""
        try:
            self.spool.write_processing(job)
        except OSError as exc:
            if disk_full_error(exc) is None:
                raise

    def on_preview(self, frame: PreviewFrame) -> None:
        """Kept only for the prompt this runner knows is running: ComfyUI broadcasts the previews of a prompt that
        has no client id (someone else's) to every socket."""
        inf = self.inflight.get(str(frame.prompt_id))
        if inf is not None and inf.started_at is not None and not inf.finished.is_set() and inf.rejection is None:
            self.previews.keep(inf.task_id, frame)

    async def on_reconnect(self) -> None:
        self.needs_reconcile = True
        self.wake.set()

    # --- finishing -------------------------------------------------------------------------------------
    async def settle(self) -> None:
        for inf in [i for i in self.inflight.values() if i.gave_up]:
            self.give_up(inf)  # first: reconcile() below may wait on a hung ComfyUI
        silent = time.monotonic() - self.stream.last_frame_at > self.settings.ws_silence_s
        if self.inflight and (self.needs_reconcile or silent):
            await self.reconcile()
        for inf in list(self.inflight.values()):
            if self.inflight.get(inf.prompt_id) is not inf:
                continue  # finished meanwhile
            if inf.rejection is not None:
                await self.cancel(inf)
            elif inf.finished.is_set():
                await self.collect(inf)
        await self.control.tick()

    async def reconcile(self) -> None:
        """Ask ComfyUI where each inflight prompt is: queued, finished (history) or lost (ComfyUI restarted)."""
        try:
            queue = await self.client.queue()  # queue before history: a prompt moves from one to the other
            for inf in list(self.inflight.values()):
                if inf.rejection is not None or inf.finished.is_set() or queue.holds(inf.prompt_id):
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
        self.promote_head()
        verdict = on_lost(started=bool(inf.job.started_at))
        if verdict.kind == "retry" and verdict.error is not None:
            inf.log().warning("prompt {} vanished from ComfyUI mid-run (ComfyUI restarted?)", inf.prompt_id)
            self.retry(inf, verdict.error)
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
        verdict = self.control.judge(inf, entry)  # outcomes.judge(), or cancelled when a cancel interrupted it
        try:
            if verdict.kind == "complete":
                await self.complete(inf, entry)
        except ComfyUnavailable as exc:
            inf.log().warning("could not fetch outputs yet: {}", exc)
            return
        if verdict.kind != "complete" and _disk_full_text(terminal_message(entry.get("status", {}))[1]):
            # ComfyUI could not write its output (its disk is full): not the job's fault, so it runs again once
            # there is room, without using up an attempt, and as soon as the runner's disk backoff allows.
            self.defer(inf, "ComfyUI's disk is full", delay=compute_backoff(
                min(inf.job.deferrals + 1, 20), 0.25, DISK_RETRY_MAX_S))
        elif verdict.kind == "retry" and verdict.error is not None:
            self.retry(inf, verdict.error)
        elif verdict.error is not None:
            self.control.fail(inf, verdict.error, entry)
        del self.inflight[inf.prompt_id]
        self.promote_head()
        self.wake.set()
        with contextlib.suppress(ComfyUnavailable):
            await self.client.forget_history([inf.prompt_id])

    def promote_head(self) -> None:
        head = self.head()
        if head is not None and head.head_since is None:
            head.head_since = self.clock.time()

    async def complete(self, inf: Inflight, entry: dict[str, Any]) -> None:
        items = collect_outputs(entry)
        if not items:
            self.fail(inf, m.TaskError(m.NO_OUTPUT, "the workflow produced no output (no file of type output under "
                                                    "any key of /history, no text)"))
            return
        settings = self.settings
        plan = outputs.Plan(settings.user_prefix_for(str(inf.job.user_id)), inf.task_id,  # set: see load_job()
                            outputs.Encoding.of(inf.job.output, settings.output_strip_metadata),
                            settings.max_output_bytes, settings.max_text_output_bytes)
        staged = self.spool.stage_result(inf.task_id)
        try:
            done = await outputs.stage_outputs(items, self.client.download, staged, plan)
        except OutputTooLarge as exc:
            shutil.rmtree(staged, ignore_errors=True)
            self.fail(inf, m.TaskError(m.OUTPUT_TOO_LARGE, str(exc)))
            return
        except BaseException as exc:
            self.spool.discard_staged(staged)  # ComfyUnavailable, a full disk: collected again on the next try
            full = disk_full_error(exc)
            if full is not None:
                raise full from None  # the downloads wait out the runner's disk backoff, not one try per tick
            raise
        result = m.completed_result(inf.job, done.image_paths, self.metadata(inf, entry), done.outputs)
        self.spool.publish_result(staged, result)
        crashpoint(self.settings, self.spool, "runner.after_outbox")
        self.spool.drop_processing(inf.task_id)
        inf.log().info("completed: {} output(s), {} image(s), {:.2f}s generation", len(done.outputs),
                       len(done.image_paths), result["metadata"]["generationTime"])

    def metadata(self, inf: Inflight, entry: dict[str, Any] | None = None) -> dict[str, Any]:
        job, now = inf.job, self.clock.time()
        started = _history_times(entry)
        gen = (started[1] - started[0]) if started else 0.0
        began = started[0] if started else (job.started_at or now)
        enqueued = job.enqueued_at if job.enqueued_at is not None else began  # load_job() makes sure it is there
        meta = {
            "generationTime": round(gen, 3), "queueTime": round(max(0.0, began - enqueued), 3),
            "totalTime": round(now - enqueued, 3), "attempts": job.attempt,
            "promptId": inf.prompt_id,
        }
        if started:
            meta.update(startedAt=started[0], finishedAt=started[1])
        return meta

    def fail(self, inf: Inflight, error: m.TaskError) -> None:
        result = m.failed_result(inf.task_id, inf.job.user_id, error, self.metadata(inf))
        self.spool.write_result(result)
        self.spool.drop_processing(inf.task_id)
        inf.log().warning("failed: {} {}", error.code, error.message)

    def retry(self, inf: Inflight, error: m.TaskError) -> None:
        """Back to inbox/ with attempt + 1 after a jittered backoff, or a final failure past MAX_ATTEMPTS."""
        attempt = inf.job.attempt
        verdict = after_failure(error, attempt, self.settings.max_attempts)
        if verdict.kind == "fail" and verdict.error is not None:
            self.fail(inf, verdict.error)
            return
        delay = compute_backoff(attempt, self.settings.retry_base_s, self.settings.retry_max_s)
        self.spool.requeue(inf.job.retried(self.clock.time() + delay, error.as_error()))
        stats.incr("job_retries", code=error.code)  # watchdog metric selfix_job_retries_total
        inf.log().warning("retry {} in {:.1f}s after {}: {}", attempt + 1, delay, error.code, error.message)

    def defer(self, inf: Inflight, reason: str, delay: float | None = None) -> None:
        """An outage outside the job (store down, a full disk): wait and try again without using up an attempt."""
        job = dataclasses.replace(inf.job, deferrals=inf.job.deferrals + 1)  # inf.job unchanged if this is cut short
        if delay is None:
            delay = compute_backoff(min(job.deferrals, 10), max(self.settings.retry_base_s, 0.5),
                                    max(self.settings.retry_max_s, 1.0))
        self.spool.requeue(job.deferred(self.clock.time() + delay))
        inf.log().warning("deferred {:.1f}s: {}", delay, reason)

    # --- a prompt ComfyUI accepted in part (200 with node_errors) --------------------------------------
    def begin_cancel(self, inf: Inflight, error: m.TaskError) -> None:
        """ComfyUI queued the outputs that validated and will run them. The task fails, but only once nothing of
        that prompt is left: the intent is in processing/ first, so a runner restarted meanwhile finishes it."""
        inf.rejection = error
        inf.job = inf.job.cancelling(error.as_error())
        self.spool.write_processing(inf.job)
        inf.log().warning("ComfyUI queued prompt {} in part ({}); removing it before failing the task",
                          inf.prompt_id, error.message)
        self.wake.set()

    async def cancel(self, inf: Inflight) -> None:
        now = self.clock.monotonic()
        if now < inf.cancel_at:
            return
        inf.cancel_at = now + CANCEL_POLL_S
        try:
            step = cancel_step(await self.client.queue(), inf.prompt_id)
            if step == "delete":
                await self.client.delete_pending([inf.prompt_id])
                step = cancel_step(await self.client.queue(), inf.prompt_id)
            if step == "interrupt":
                await self.client.interrupt(inf.prompt_id)
                return  # it leaves the queue when ComfyUI stops it; look again then
            if step != "clean":
                return
            await self.client.forget_history([inf.prompt_id])
        except ComfyUnavailable as exc:
            inf.log().debug("removing prompt {} postponed: {}", inf.prompt_id, exc)
            return
        # Gone from /queue: it writes no more files, so what is removed now stays removed.
        remove_task_files(self.settings.comfy_output_dir, self.settings.comfy_input_dir, inf.task_id)
        del self.inflight[inf.prompt_id]
        self.promote_head()
        self.wake.set()
        assert inf.rejection is not None
        self.fail(inf, inf.rejection)

    # --- deadlines and draining ------------------------------------------------------------------------
    async def check_deadline(self) -> None:
        head = self.head()
        if head is None or head.rejection is not None or head.gave_up:
            return
        now = self.clock.time()
        limit = deadline_s(head.job, self.settings.job_timeout_s)  # the task's timeoutS, capped by JOB_TIMEOUT_S
        step = deadline_step(head.started_at or head.head_since, head.timed_out_at, now, limit,
                             self.interrupt_grace_s)
        if step == "interrupt":
            head.timed_out_at = now
            head.log().warning("deadline of {:g}s passed: interrupting {}", limit, head.prompt_id)
            # Not awaited here: on a hung ComfyUI the call takes its whole timeout, and the grace counts already.
            self.background(self.client.interrupt(head.prompt_id), "interrupt")
        elif step == "give_up":
            head.gave_up = True
            self.wake.set()

    def background(self, call: Coroutine[Any, Any, None], what: str) -> None:
        async def guarded() -> None:
            with contextlib.suppress(ComfyUnavailable):
                await call

        task = asyncio.create_task(guarded(), name=what)
        self.tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.tasks.discard)

    def give_up(self, inf: Inflight) -> None:
        del self.inflight[inf.prompt_id]
        self.promote_head()
        label = deadline_label(inf.job, self.settings.job_timeout_s)
        self.fail(inf, m.TaskError(m.TIMEOUT, f"job exceeded {label} and ComfyUI did not stop it"))

    async def hand_back_pending(self) -> None:
        """Draining: jobs queued in ComfyUI but not started go back to inbox/ (same attempt)."""
        if self.handed_back:
            return
        slots = [Slot(i.prompt_id, bool(i.job.started_at), i.rejection is not None)
                 for i in self.inflight.values()]
        pending = [self.inflight[pid] for pid in hand_back(slots)]
        try:
            if pending:
                await self.client.delete_pending([inf.prompt_id for inf in pending])
                queue = await self.client.queue()
                for inf in pending:
                    if not queue.holds(inf.prompt_id) and await self.client.history(inf.prompt_id) is None:
                        del self.inflight[inf.prompt_id]
                        self.spool.requeue(inf.job.handed_back())
                        inf.log().info("handed back to inbox/ (draining)")
        except ComfyUnavailable as exc:
            logger.debug("hand-back postponed: {}", exc)
            return  # again on the next turn
        self.handed_back = True

    # --- recovery --------------------------------------------------------------------------------------
    def recover(self) -> None:
        """Re-attach to every job in processing/; reconcile() then learns from ComfyUI where each one is."""
        self.spool.clean_tmp()
        self.previews.clear()
        self.readopt()

    def readopt(self) -> None:
        """Take up every job in processing/ that this runner does not hold in memory (all of them at start; after
        a step cut short by a full disk, the job it was handling)."""
        held = {inf.task_id for inf in self.inflight.values()}
        jobs = []
        for path in self.spool.processing_files():
            if path.stem in held:
                continue
            job = self.load_job(path)
            if job is None:
                continue
            if self.spool.state_of(job.task_id) in ("outbox", "done"):
                # Crashed between the outbox rename and this cleanup (the uploader may have published since).
                self.spool.drop_processing(job.task_id)
                continue
            jobs.append(job)
        for job in sorted(jobs, key=lambda j: j.submitted_at or j.claimed_at or 0):
            pid = job.prompt_id or prompt_id_for(job.task_id, job.attempt)
            job = dataclasses.replace(job, prompt_id=pid)
            rejection = error_from(job.rejection) if job.rejection is not None else None
            self.inflight[pid] = Inflight(job, pid, started_at=job.started_at, rejection=rejection)
            logger.bind(task_id=job.task_id).info("re-attaching to prompt {}", pid)
        self.promote_head()
        self.needs_reconcile = True


def _disk_full_text(data: dict[str, Any]) -> bool:
    """ComfyUI's execution_error names an OSError ENOSPC/EDQUOT (it reports exceptions as text)."""
    text = f"{data.get('exception_type', '')} {data.get('exception_message', '')}"
    return any(s in text for s in ("No space left on device", "Errno 28]", "Disk quota exceeded", "Errno 122]"))


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


async def amain(program: Program) -> int:
    settings = program.settings
    logger.info("runner starting: ComfyUI at {}, queue ahead {}", settings.comfy_url, settings.queue_ahead)
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = ComfyClient(settings.comfy_url, f"selfix-runner-{socket.gethostname()}", session)
        runner = Runner(settings, program.spool, open_store(settings), client, program.flags)
        return await runner.run()


def main() -> int:
    return run_async("runner", amain)


if __name__ == "__main__":
    raise SystemExit(main())
