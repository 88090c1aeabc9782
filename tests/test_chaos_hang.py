"""A hung ComfyUI (SIGSTOP of the double mid-job) in a whole node under real supervisord, with the default
watchdog and runner settings: the watchdog kills it, supervisord starts it again, and every task completes once.

`scripts/bench-hang` runs the same scenario several times and prints the recovery figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers.node_plugin import Node, task, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.watchdog]

# The harness speeds up retries and the WebSocket silence check; this scenario measures the shipped defaults.
DEFAULTS = {"RETRY_BASE_S": "2", "RETRY_MAX_S": "120", "WS_SILENCE_S": "5", "LOG_LEVEL": "INFO",
            "DISK_FREE_FLOOR_GB": "0"}


@dataclass(frozen=True)
class HangFigures:
    killed_s: float  # hang -> the stopped ComfyUI is gone (SIGKILL)
    next_result_s: float  # hang -> the first task completed after the hang
    all_results_s: float  # hang -> every task completed
    restarts: dict[str, int]  # the watchdog's ComfyUI restarts by reason


def hang_node(root: Path) -> Node:
    return Node(root, seconds_per_step=0.05, env=DEFAULTS)


def hang_scenario(node: Node, tasks: int = 3) -> HangFigures:
    """Start `node`, run `tasks` jobs of 2 s, SIGSTOP ComfyUI while the first one runs and the second waits in
    ComfyUI's queue, then wait for every result. The caller stops the node, also when this raises."""
    node.start()
    # A ComfyUI that has never answered gets COMFY_STARTUP_GRACE_S (it may be loading custom nodes): hang it only
    # once the watchdog has seen it up, as in production.
    wait_until(lambda: _watchdog_saw_comfy_up(node), 30, "the watchdog to see ComfyUI answer")
    ids = [f"hang-{i}" for i in range(tasks)]
    for task_id in ids:
        node.drop(f"{task_id}.json", task(task_id, steps=40))
    wait_until(lambda: len(node.spool.processing_files()) == 2 and any(
        json.loads(p.read_bytes()).get("startedAt") for p in node.spool.processing_files()), 30,
        "one job running and one queued in ComfyUI")
    pid = node.pid("comfyui")
    os.kill(pid, signal.SIGSTOP)
    hung_at = time.monotonic()
    try:
        wait_until(lambda: not _alive(pid), 120, "the stopped ComfyUI to be killed")
        killed = time.monotonic() - hung_at
        first = wait_until(lambda: node.results(), 120, lambda: f"a result after the hang\n{node.log_tail()}")
        next_result = time.monotonic() - hung_at
        assert first, first
        node.wait_results(set(ids), timeout=120)
        everything = time.monotonic() - hung_at
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGCONT)
    state = json.loads((node.spool.run / "watchdog.state.json").read_bytes())
    return HangFigures(killed, next_result, everything, dict(state.get("comfyRestarts") or {}))


def _watchdog_saw_comfy_up(node: Node) -> bool:
    try:
        return bool(json.loads((node.spool.run / "watchdog.json").read_bytes())["comfyui"]["up"])
    except (OSError, ValueError, KeyError):
        return False


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def check_total_queue(node: Node, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Jepsen-style: every task exactly one result, nothing left anywhere else in the spool."""
    results = node.results()
    assert sorted(results) == sorted(ids), "lost or unknown results"
    spool = node.spool
    counts = spool.counts()
    assert {k: counts[k] for k in ("inbox", "processing", "outbox", "corrupt", "tmp")} == dict.fromkeys(
        ("inbox", "processing", "outbox", "corrupt", "tmp"), 0), counts
    states: dict[str, list[str]] = {}
    for state, task_id in spool.iter_all_task_files():
        states.setdefault(task_id, []).append(state)
    assert all(v == ["done"] for v in states.values()), states
    executions = node.executions()
    assert len(executions) == len(set(executions)), f"a prompt ran twice: {executions}"
    return results


def test_sigstop_of_comfyui_mid_job_is_killed_at_once_and_every_task_completes(tmp_path: Path) -> None:
    node = hang_node(tmp_path / "node")
    try:
        figures = hang_scenario(node)
        results = check_total_queue(node, [f"hang-{i}" for i in range(3)])
        assert all(r["status"] == "completed" for r in results.values()), results
        assert results["hang-0"]["metadata"]["attempts"] == 2, "the job cut short ran again"
        assert results["hang-1"]["metadata"]["attempts"] == 1, "the queued one was only resubmitted"
        assert figures.restarts == {"unresponsive": 1}, figures
    finally:
        node.stop()
    print(f"\nhang -> ComfyUI killed {figures.killed_s:.1f}s, -> next result {figures.next_result_s:.1f}s, "
          f"-> all 3 results {figures.all_results_s:.1f}s; ComfyUI restarts {figures.restarts}")
    # COMFY_UNRESPONSIVE_S (15) + one watchdog tick with its probe (5 + 3) + restart, reconnect, retry, job (2 s)
    assert figures.next_result_s < 45, figures


async def test_unresponsive_restart_is_one_sigkill_of_the_process_group(tmp_path: Path) -> None:
    """What the watchdog does for `unresponsive`: SIGKILL to the group (a stopped leader and its child both die),
    no stopProcess (its SIGTERM would wait out stopwaitsecs), and the restart stays pending until a new pid."""
    import subprocess
    import sys

    import aiohttp

    from selfix import policies as pol
    from selfix import watchdog
    from selfix.comfy import ComfyClient
    from selfix.settings import load
    from selfix.spool import Spool

    leader = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                               "time.sleep(60)"], start_new_session=True)
    wait_until(lambda: _children(leader.pid), 10, "the child process")
    [child] = _children(leader.pid)
    os.kill(leader.pid, signal.SIGSTOP)
    settings = load({"SPOOL_DIR": str(tmp_path / "spool"), "LORA_CACHE_DIR": str(tmp_path / "loras")})
    calls: list[tuple[str, str]] = []

    class Supervisor:  # records what the watchdog asks of supervisord; it must ask nothing here
        def __getattr__(self, name: str) -> Any:
            return lambda *args: calls.append((name, *args))

    try:
        async with aiohttp.ClientSession() as session:
            wd = watchdog.Watchdog(settings, Spool(settings.spool_dir).ensure(),
                                   ComfyClient(settings.comfy_url, "t", session), Supervisor(),  # type: ignore[arg-type]
                                   None)
            r = pol.Readings(now=time.time(), comfy_up=False,
                             programs={pol.COMFYUI: pol.Program("RUNNING", leader.pid, time.time() - 100)})
            await wd.restart_comfy(r, pol.Action("restart", pol.COMFYUI, "unresponsive", "test"))
        assert leader.wait(5) == -signal.SIGKILL
        wait_until(lambda: not _alive(child), 5, "the child killed with its group")
        assert calls == [], calls
        assert wd.restart_pending is not None and wd.restart_pending["reason"] == "unresponsive"
    finally:
        for pid in (leader.pid, child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        leader.wait(5)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []
