"""The runner in-process against the ComfyUI double (a real subprocess), with a temp spool and the local store.

No supervisord: each test builds a `Runner`, feeds it through the spool and lets it work in a burst
(`run(until_idle=True)`) or as a task that the test stops, kills (cancels) or starves (SIGSTOP of the double).
The pure decisions it takes are in `selfix.outcomes`; their table tests are at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from selfix import messages as m
from selfix import outcomes as oc
from selfix.admission import accept, limits_of
from selfix.clock import OffsetClock
from selfix.comfy import CONTROL_TIMEOUT_S, ComfyClient, QueueState, prompt_id_for
from selfix.process import Heartbeat, StopFlags
from selfix.runner import DEADLINE_TICK_S, Runner
from selfix.settings import Settings, load
from selfix.spool import Spool
from selfix.storage import open_store
from selfix.templates import Catalog
from selfix.workflow import task_subfolder
from tests.servers.node_plugin import Double, task

pytestmark = pytest.mark.timeout(60)


class Bench:
    """A spool, a store and settings around one double; `runner()` builds a Runner on them."""

    def __init__(self, root: Path, double: Double, **env: str) -> None:
        self.double = double
        self.settings: Settings = load({
            "SPOOL_DIR": str(root / "spool"), "STORE_DIR": str(root / "store"),
            "LORA_CACHE_DIR": str(root / "loras"), "TEMP_DIR": str(root / "temp"),
            "MODELS_DIR": str(double.dirs["models"]), "COMFY_PORT": str(double.port),
            "COMFY_OUTPUT_DIR": str(double.dirs["output"]), "COMFY_INPUT_DIR": str(double.dirs["input"]),
            "RETRY_BASE_S": "0", "RETRY_MAX_S": "0", "WS_SILENCE_S": "1", "DISK_FREE_FLOOR_GB": "0", **env})
        self.settings.store_dir.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(self.settings.spool_dir).ensure()
        self.catalog = Catalog.load()
        self.flags = StopFlags(Heartbeat(self.spool, "runner"))  # as the lifecycle gives the real one
        self.clock = OffsetClock()

    def submit(self, task_id: str, workflow: dict[str, Any] | None = None, **kw: Any) -> str:
        msg = task(task_id, **kw)
        if workflow is not None:
            msg["workflow"] = workflow
        outcome = accept(self.spool, json.dumps(msg).encode(), limits_of(self.settings), self.catalog)
        assert outcome.kind == "accepted", outcome
        return task_id

    @asynccontextmanager
    async def runner(self) -> AsyncIterator[Runner]:
        async with aiohttp.ClientSession() as session:
            client = ComfyClient(self.settings.comfy_url, f"test-runner-{id(self)}", session)
            yield Runner(self.settings, self.spool, open_store(self.settings), client, self.flags, self.clock)

    async def burst(self, timeout: float = 30) -> int:
        async with self.runner() as runner:
            return await asyncio.wait_for(runner.run(until_idle=True), timeout)

    def result(self, task_id: str) -> dict[str, Any]:
        return self.spool.read_result(task_id)

    def results(self) -> dict[str, dict[str, Any]]:
        return {t: self.spool.read_result(t) for t in self.spool.outbox_tasks()}

    def processing(self, task_id: str) -> dict[str, Any] | None:
        path = self.spool.processing_path(task_id)
        return json.loads(path.read_bytes()) if path.exists() else None

    def executions(self) -> list[str]:
        return self.double.exec_log.read_text().split() if self.double.exec_log.exists() else []

    def comfy(self, method: str, path: str, body: Any = None) -> Any:
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.double.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def outputs_of(self, task_id: str) -> list[Path]:
        folder = self.double.dirs["output"] / task_subfolder(task_id)
        return sorted(folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def make_bench(tmp_path: Path) -> Iterator[Callable[..., Bench]]:
    doubles: list[Double] = []

    def factory(seconds_per_step: float = 0.0, **env: str) -> Bench:
        root = tmp_path / f"bench{len(doubles)}"
        root.mkdir()
        (root / "double").mkdir()
        double = Double(root / "double", seconds_per_step=seconds_per_step)
        doubles.append(double)
        double.start()
        return Bench(root, double, **env)

    yield factory
    for double in doubles:
        if double.proc is not None and double.proc.poll() is None:
            os.kill(double.proc.pid, signal.SIGCONT)  # a test that failed while the double was stopped
        double.stop()


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


def partial_workflow(prefix: str = "ok") -> dict[str, Any]:
    """t2i plus a second SaveImage fed by an invalid EmptyImage (width 0): ComfyUI answers 200 with node_errors
    for output 20 and queues output 9."""
    from tests.servers.node_plugin import t2i_workflow

    wf = t2i_workflow(steps=3, prefix=prefix)
    wf["21"] = {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}}
    wf["20"] = {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "bad"}}
    return wf


# --- completion, rejection, retries ---------------------------------------------------------------------


async def test_burst_completes_every_job_and_stops_when_idle(make_bench: Callable[..., Bench]) -> None:
    bench = make_bench()
    ids = [bench.submit(f"t-{i}") for i in range(3)]
    assert await bench.burst() == 0
    results = bench.results()
    assert sorted(results) == ids and all(r["status"] == "completed" for r in results.values())
    for tid in ids:
        assert [p.name for p in bench.spool.result_images(tid)] == [f"images.{tid}-0.png"]  # staged by outputs.py
        assert results[tid]["metadata"]["attempts"] == 1
    assert bench.executions() == [prompt_id_for(t, 1) for t in ids]
    assert not bench.spool.processing_files() and not bench.spool.inbox_entries()
    assert bench.comfy("GET", "/history") == {}, "the runner forgets each prompt's history once collected"


async def test_rejected_workflow_fails_with_node_errors_and_runs_nothing(make_bench: Callable[..., Bench]) -> None:
    bench = make_bench()
    wf = task("x")["workflow"]
    wf["3"]["inputs"]["steps"] = 0  # below KSampler's min: every output fails -> 400
    bench.submit("bad", workflow=wf)
    await bench.burst()
    error = bench.result("bad")["error"]
    assert error["code"] == m.INVALID_WORKFLOW and not error["retriable"]
    assert error["nodeErrors"]["3"]["class_type"] == "KSampler"
    assert bench.executions() == []


async def test_out_of_memory_is_retried_with_the_next_attempt(make_bench: Callable[..., Bench]) -> None:
    bench = make_bench()
    bench.comfy("POST", "/fake/oom", {"times": 1})
    bench.submit("oom")
    await bench.burst()
    result = bench.result("oom")
    assert result["status"] == "completed" and result["metadata"]["attempts"] == 2
    assert bench.executions() == [prompt_id_for("oom", 1), prompt_id_for("oom", 2)]


async def test_out_of_memory_past_max_attempts_is_final(make_bench: Callable[..., Bench]) -> None:
    bench = make_bench(MAX_ATTEMPTS="2")
    bench.comfy("POST", "/fake/oom", {"times": 5})
    bench.submit("oom")
    await bench.burst()
    error = bench.result("oom")["error"]
    assert error["code"] == m.RETRIES_EXHAUSTED and "out_of_memory" in error["message"]
    assert len(bench.executions()) == 2


# --- restarts: re-attach and lost prompts ---------------------------------------------------------------


async def test_a_new_runner_reattaches_to_the_prompt_instead_of_running_it_again(
        make_bench: Callable[..., Bench]) -> None:
    bench = make_bench(seconds_per_step=0.1)
    bench.submit("long", steps=10)
    async with bench.runner() as first:
        run = asyncio.create_task(first.run())
        await until(lambda: (bench.processing("long") or {}).get("startedAt"), 10, "the job started")
        run.cancel()  # the runner dies mid-job; processing/ and ComfyUI's queue are what is left
        with pytest.raises(asyncio.CancelledError):
            await run
    assert bench.processing("long") is not None
    await bench.burst()
    assert bench.result("long")["status"] == "completed"
    assert bench.result("long")["metadata"]["attempts"] == 1
    assert bench.executions() == [prompt_id_for("long", 1)], "ran once"


async def test_lost_prompts_are_retried_if_started_and_resubmitted_if_not(make_bench: Callable[..., Bench]) -> None:
    bench = make_bench()
    for tid, started in (("was-running", True), ("was-queued", False)):
        bench.submit(tid)
        entry = bench.spool.next_ready()
        assert entry is not None
        path = bench.spool.claim(entry)
        assert path is not None
        job = bench.spool.load_job(path).claimed(prompt_id_for(tid, 1), time.time()).submitted(time.time())
        if started:
            job = job.started(time.time())
        bench.spool.write_processing(job)  # as a runner left it before ComfyUI restarted (a fresh double)
    await bench.burst()
    assert bench.result("was-running")["metadata"]["attempts"] == 2
    assert bench.result("was-queued")["metadata"]["attempts"] == 1
    assert sorted(bench.executions()) == sorted([prompt_id_for("was-running", 2), prompt_id_for("was-queued", 1)])


# --- deadlines --------------------------------------------------------------------------------------------


async def test_deadline_interrupts_the_job_and_fails_it_with_timeout(make_bench: Callable[..., Bench]) -> None:
    bench = make_bench(seconds_per_step=0.1)
    bench.submit("slow", steps=100)
    async with bench.runner() as runner:
        run = asyncio.create_task(runner.run(until_idle=True))
        await until(lambda: (bench.processing("slow") or {}).get("startedAt"), 10, "the job started")
        bench.clock.advance(bench.settings.job_timeout_s)
        await asyncio.wait_for(run, 10)
    error = bench.result("slow")["error"]
    assert error["code"] == m.TIMEOUT and "in node 3 (KSampler)" in error["message"]
    assert bench.comfy("GET", "/fake/stats")["interrupts"] == 1


async def test_hung_comfyui_never_blocks_the_runner_beyond_the_control_timeout(
        make_bench: Callable[..., Bench]) -> None:
    """SIGSTOP of the double mid-job: the deadline still fires on time (its own task), every call to ComfyUI
    gives up after CONTROL_TIMEOUT_S, the heartbeat goes on, and after the grace the job fails `timeout`."""
    bench = make_bench(seconds_per_step=0.1)
    bench.submit("hung", steps=100)
    double = bench.double.proc
    assert double is not None
    async with bench.runner() as runner:
        run = asyncio.create_task(runner.run(until_idle=True))
        await until(lambda: (bench.processing("hung") or {}).get("startedAt"), 10, "the job started")
        os.kill(double.pid, signal.SIGSTOP)
        try:
            beat = bench.spool.heartbeat_path("runner")
            bench.clock.advance(bench.settings.job_timeout_s)
            t0 = time.monotonic()
            await until(lambda: runner.inflight and next(iter(runner.inflight.values())).timed_out_at, 2,
                        "the deadline to fire while ComfyUI hangs")
            fired = time.monotonic() - t0
            bench.clock.advance(runner.interrupt_grace_s + 1)
            t1 = time.monotonic()
            await until(lambda: bench.spool.state_of("hung") == "outbox", 3 * CONTROL_TIMEOUT_S,
                        "the timeout result while ComfyUI hangs")
            gave_up = time.monotonic() - t1
            assert time.time() - beat.stat().st_mtime < 2, "the heartbeat goes on"
        finally:
            os.kill(double.pid, signal.SIGCONT)
        await asyncio.wait_for(run, 10)
    print(f"\nhung ComfyUI: deadline fired after {fired:.2f}s, gave up {gave_up:.2f}s after the grace")
    assert fired <= DEADLINE_TICK_S + 0.5
    assert gave_up <= CONTROL_TIMEOUT_S + DEADLINE_TICK_S + 0.5, "the main loop waits on one bounded call at most"
    error = bench.result("hung")["error"]
    assert error["code"] == m.TIMEOUT and "did not stop it" in error["message"]


# --- draining ---------------------------------------------------------------------------------------------


async def test_drain_hands_back_the_queued_job_and_finishes_the_running_one(
        make_bench: Callable[..., Bench]) -> None:
    bench = make_bench(seconds_per_step=0.1)
    bench.submit("first", steps=10)
    bench.submit("second", steps=10)
    async with bench.runner() as runner:
        run = asyncio.create_task(runner.run())
        await until(lambda: (bench.processing("first") or {}).get("startedAt")
                    and (bench.processing("second") or {}).get("state") == "submitted", 10,
                    "one job running and one queued in ComfyUI")
        bench.flags.stopping.set()
        assert await asyncio.wait_for(run, 20) == 0
    assert bench.result("first")["status"] == "completed"
    [entry] = bench.spool.inbox_entries()
    assert entry.task_id == "second" and entry.attempt == 1
    assert bench.executions() == [prompt_id_for("first", 1)], "the handed-back prompt never ran"
    assert bench.comfy("GET", "/queue") == {"queue_running": [], "queue_pending": []}


# --- a 200 with node_errors -------------------------------------------------------------------------------


async def test_partly_valid_prompt_waiting_in_comfyui_is_deleted_before_it_runs(
        make_bench: Callable[..., Bench]) -> None:
    bench = make_bench(seconds_per_step=0.1)
    bench.submit("ahead", steps=10)
    bench.submit("partial", workflow=partial_workflow())
    await bench.burst()
    assert bench.result("ahead")["status"] == "completed"
    error = bench.result("partial")["error"]
    assert error["code"] == m.INVALID_WORKFLOW and "21" in error["nodeErrors"]
    assert prompt_id_for("partial", 1) not in bench.executions(), "deleted from the queue, never executed"
    assert_nothing_left(bench, "partial")


@pytest.mark.parametrize("seconds_per_step", [0.0, 0.2], ids=["ran-already", "interrupted"])
async def test_partly_valid_prompt_that_started_leaves_no_file_and_no_history(
        make_bench: Callable[..., Bench], seconds_per_step: float) -> None:
    bench = make_bench(seconds_per_step=seconds_per_step)
    bench.submit("partial", workflow=partial_workflow())
    await bench.burst()
    error = bench.result("partial")["error"]
    assert error["code"] == m.INVALID_WORKFLOW and "21" in error["nodeErrors"]
    assert bench.executions() == [prompt_id_for("partial", 1)]  # the double starts it at once
    if seconds_per_step:
        assert bench.comfy("GET", "/fake/stats")["interrupts"] >= 1
    assert_nothing_left(bench, "partial")


async def test_partly_valid_prompt_is_removed_by_a_restarted_runner(make_bench: Callable[..., Bench]) -> None:
    bench = make_bench(seconds_per_step=0.2)
    bench.submit("partial", workflow=partial_workflow())
    async with bench.runner() as first:
        run = asyncio.create_task(first.run())
        await until(lambda: (bench.processing("partial") or {}).get("state") == "cancelling", 10,
                    "the runner noticed the node_errors")
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    await bench.burst()
    assert bench.result("partial")["error"]["code"] == m.INVALID_WORKFLOW
    assert_nothing_left(bench, "partial")


def assert_nothing_left(bench: Bench, task_id: str) -> None:
    pid = prompt_id_for(task_id, 1)
    queue = bench.comfy("GET", "/queue")
    assert pid not in json.dumps(queue), "not in ComfyUI's queue, so no file can appear later"
    assert bench.comfy("GET", f"/history/{pid}") == {}
    assert bench.outputs_of(task_id) == []
    assert not bench.spool.processing_files()


# --- the pure decisions -----------------------------------------------------------------------------------


def _entry(status: str, messages: list[Any], images: bool = True) -> dict[str, Any]:
    outputs = {"9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}} if images else {}
    return {"status": {"status_str": status, "completed": status == "success", "messages": messages},
            "outputs": outputs}


@pytest.mark.parametrize(("entry", "timed_out", "kind", "code"), [
    (_entry("success", []), False, "complete", None),
    (_entry("success", [], images=False), False, "fail", m.NO_OUTPUT),
    (_entry("error", [["execution_interrupted", {"node_id": "3", "node_type": "KSampler"}]]), True, "fail",
     m.TIMEOUT),
    (_entry("error", [["execution_interrupted", {}]]), False, "retry", m.INTERRUPTED),
    (_entry("error", [["execution_error", {"exception_type": "torch.OutOfMemoryError",
                                           "exception_message": "CUDA out of memory"}]]), False, "retry",
     m.OUT_OF_MEMORY),
    (_entry("error", [["execution_error", {"exception_type": "ValueError", "exception_message": "x"}]]), False,
     "fail", m.EXECUTION_ERROR),
    (_entry("error", []), False, "fail", m.EXECUTION_ERROR),
])
def test_judge(entry: dict[str, Any], timed_out: bool, kind: str, code: str | None) -> None:
    verdict = oc.judge(entry, timed_out, 600)
    assert (verdict.kind, verdict.error and verdict.error.code) == (kind, code)


def test_after_failure_and_on_lost() -> None:
    oom = m.TaskError(m.OUT_OF_MEMORY, "x", retriable=True)
    assert oc.after_failure(oom, 1, 3).kind == "retry"
    final = oc.after_failure(oom, 3, 3)
    assert final.kind == "fail" and final.error is not None and final.error.code == m.RETRIES_EXHAUSTED
    assert oc.after_failure(m.TaskError(m.EXECUTION_ERROR, "x"), 1, 3).kind == "fail"
    assert oc.on_lost(started=True).kind == "retry" and oc.on_lost(started=False).kind == "resubmit"


@pytest.mark.parametrize(("since", "timed_out_at", "now", "step"), [
    (None, None, 1000.0, None), (0.0, None, 599.0, None), (0.0, None, 600.0, "interrupt"),
    (0.0, 600.0, 630.0, None), (0.0, 600.0, 630.5, "give_up"),
])
def test_deadline_step(since: float | None, timed_out_at: float | None, now: float, step: str | None) -> None:
    assert oc.deadline_step(since, timed_out_at, now, 600.0, 30.0) == step


def test_hand_back_and_cancel_step() -> None:
    slots = [oc.Slot("a", True), oc.Slot("b", False), oc.Slot("c", True), oc.Slot("d", False, cancelling=True),
             oc.Slot("e", False)]
    assert oc.hand_back(slots) == ["b", "e"]
    assert oc.hand_back([oc.Slot("a", False)]) == [], "the head stays: it may start any moment"
    queue = QueueState(running=("r",), pending=("p",))
    assert [oc.cancel_step(queue, p) for p in ("p", "r", "x")] == ["delete", "interrupt", "clean"]


def test_error_round_trips_through_the_job_file() -> None:
    err = m.TaskError(m.INVALID_WORKFLOW, "bad", node_errors={"21": {"errors": []}})
    back = oc.error_from(json.loads(json.dumps(err.as_error())))
    assert (back.code, back.message, back.retriable, back.node_errors) == (err.code, err.message, False,
                                                                           err.node_errors)
