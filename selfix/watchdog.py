"""The watchdog process: GPU health (NVML), ComfyUI liveness and memory, stuck selfix processes, and the node's
HTTP face: `/metrics` (Prometheus), `/healthz` (supervisord programs), `/readyz` (ComfyUI, spool, disk).

Every WATCHDOG_INTERVAL_S it gathers one set of readings (supervisord, ComfyUI /system_stats and /queue, NVML,
ComfyUI's RSS, heartbeats, the spool), lets the pure policies in `selfix.policies` decide, and carries out what
they say through ComfyUI (/free) and supervisord's XML-RPC (restarts). Its own state (rate limits, counters, a
restart in progress) lives in run/watchdog.state.json, so a watchdog killed at any instruction picks up where it
was: a ComfyUI it stopped but had not started yet is started by the next watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web
from loguru import logger

from selfix import console
from selfix import policies as pol
from selfix import supervisor as sv
from selfix.comfy import ComfyClient, ComfyUnavailable
from selfix.gpu import GpuReading, Nvml, comfy_gpus, merge, nvml_error_text
from selfix.metrics import CONTENT_TYPE, NodeView, make_registry, render
from selfix.process import EXIT_ERROR, EXIT_OK, Program, StopFlags, run_async
from selfix.settings import Settings
from selfix.spool import Spool, dumps
from selfix.stats import JobStats, read_all
from selfix.supervisor import ProgramInfo, Supervisor, SupervisorError

STATE_FILE = "watchdog.state.json"
STATUS_FILE = "watchdog.json"
PROBE_TIMEOUT_S = 3.0  # a healthy ComfyUI answers /system_stats in milliseconds, also mid-job
STOP_TIMEOUT_S = 90.0  # supervisord escalates to SIGKILL after the program's stopwaitsecs (30 s for comfyui)
PENDING_RESTART_MAX_S = 600.0
GB = 1 << 30
DOWN_STATES = frozenset({"FATAL", "BACKOFF"})  # supervisord gave up on it, or it keeps exiting while starting


def comfy_alive(settings: Settings, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(settings.comfy_url + "/system_stats", timeout=timeout) as resp:
            json.loads(resp.read())
            return bool(resp.status == 200)
    except (OSError, ValueError, urllib.error.URLError):
        return False


def disk_free(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def tree_bytes(root: Path, suffix: str = ".safetensors") -> int:
    total = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    if not entry.name.startswith("."):
                        stack.append(Path(entry.path))
                elif entry.name.endswith(suffix):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def process_rss(pid: int) -> int | None:
    """RSS of a process and all its descendants (ComfyUI may spawn helpers)."""
    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        total = int(proc.memory_info().rss)
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += int(child.memory_info().rss)
        return total
    except psutil.Error:
        return None


class Once:
    """Log a condition when it starts and when it ends, never on every tick."""

    def __init__(self) -> None:
        self.active: dict[str, str] = {}

    def on(self, key: str, message: str, level: str = "WARNING") -> None:
        if key not in self.active:
            logger.log(level, message)
        self.active[key] = message

    def off(self, key: str, message: str | None = None) -> None:
        if self.active.pop(key, None) is not None and message:
            logger.info(message)


class Watchdog:
    def __init__(self, settings: Settings, spool: Spool, client: ComfyClient, supervisor: Supervisor,
                 nvml: Nvml | None) -> None:
        self.settings = settings
        self.spool = spool
        self.client = client
        self.sup = supervisor
        self.nvml = nvml
        self.nvml_ok = nvml is not None
        self.limits = pol.Limits.from_settings(settings)
        self.once = Once()
        self.view = NodeView(nvml_up=self.nvml_ok)
        self.registry = make_registry(lambda: self.view)
        self.events: deque[dict[str, Any]] = deque(maxlen=20)
        self.jobs = JobStats()
        self.comfy_restarts: dict[str, int] = {}
        self.frees: dict[str, int] = {}
        self.process_restarts: dict[tuple[str, str], int] = {}
        self.known_comfy_pid = 0
        self.restart_pending: dict[str, Any] | None = None
        self.pstate = pol.PolicyState(last_free_at=time.time())
        self.readings: pol.Readings | None = None
        self.dirty = False
        self.load()

    # --- persisted state ------------------------------------------------------------------------------------
    def load(self) -> None:
        try:
            data = json.loads((self.spool.run / STATE_FILE).read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.warning("{} unreadable ({}): starting with empty counters", STATE_FILE, exc)
            return
        self.jobs = JobStats.load(data.get("jobs"))
        self.comfy_restarts = {str(k): int(v) for k, v in (data.get("comfyRestarts") or {}).items()}
        self.frees = {str(k): int(v) for k, v in (data.get("frees") or {}).items()}
        self.process_restarts = {(str(p), str(r)): int(n) for p, r, n in data.get("processRestarts") or []}
        self.known_comfy_pid = int(data.get("comfyPid") or 0)
        self.restart_pending = data.get("restartPending") or None
        last = {str(k): float(v) for k, v in (data.get("lastRestart") or {}).items()}
        self.pstate = replace(self.pstate, last_restart=last, jobs_at_last_free=self.jobs.ran,
                              soft_freed_jobs=self.jobs.ran)

    def persist(self) -> None:
        data = {
            "jobs": self.jobs.dump(), "comfyRestarts": self.comfy_restarts, "frees": self.frees,
            "processRestarts": [[p, r, n] for (p, r), n in sorted(self.process_restarts.items())],
            "comfyPid": self.known_comfy_pid, "restartPending": self.restart_pending,
            "lastRestart": dict(self.pstate.last_restart),
        }
        self.spool.write_run_file(STATE_FILE, dumps(data))
        self.dirty = False

    def event(self, kind: str, program: str, reason: str, detail: str = "") -> None:
        self.events.appendleft({"at": time.time(), "kind": kind, "program": program, "reason": reason,
                                "detail": detail})

    # --- readings -------------------------------------------------------------------------------------------
    async def programs(self) -> dict[str, ProgramInfo] | None:
        try:
            programs = await asyncio.to_thread(self.sup.programs)
        except SupervisorError as exc:
            self.once.on("supervisor", f"supervisord not reachable: {exc}")
            return None
        self.once.off("supervisor", "supervisord reachable again")
        return programs

    def read_gpus(self, system_stats: dict[str, Any] | None) -> list[GpuReading]:
        nvml: list[GpuReading] = []
        if self.nvml is not None:
            try:
                nvml = self.nvml.read()
                self.nvml_ok = True
                self.once.off("nvml", "NVML readings work again")
            except Exception as exc:  # noqa: BLE001 - any NVML failure means: no GPU readings this tick
                self.nvml_ok = False
                self.once.on("nvml", f"NVML read failed ({nvml_error_text(exc)}); GPU readings from ComfyUI only",
                             "ERROR")
        gpus = merge(nvml, comfy_gpus(system_stats))
        for g in gpus:
            if g.xid_errors:
                self.once.on(f"xid{g.index}:{g.xid_errors}", f"GPU {g.index}: {g.xid_errors} critical Xid error(s), "
                                                             f"last Xid {g.last_xid}", "ERROR")
        return gpus

    async def read(self) -> pol.Readings:
        now = time.time()
        programs = await self.programs()
        system_stats: dict[str, Any] | None = None
        running: frozenset[str] | None = None
        pending = 0
        try:
            system_stats = await self.client.system_stats()
            try:
                queue = await self.client.queue()
                running, pending = frozenset(queue.running), len(queue.pending)
            except (ComfyUnavailable, ValueError):
                running = None
        except (ComfyUnavailable, ValueError):
            system_stats = None
        comfy_up = system_stats is not None
        gpus = self.read_gpus(system_stats)
        comfy = (programs or {}).get(pol.COMFYUI)
        self.track_comfy_pid(comfy)
        rss = process_rss(comfy.pid) if comfy is not None and comfy.running else None
        counts = self.spool.counts()
        if self.jobs.scan(self.spool, now):
            self.dirty = True
        beats = {p: self.beat_time(p) for p in (*pol.WATCHED, "watchdog")}
        self.view = NodeView(
            comfy_up=comfy_up, comfy_rss=rss, queue_running=len(running or ()), queue_pending=pending,
            gpus=gpus, nvml_up=self.nvml_ok, programs=programs,
            heartbeat_age={p: (None if t is None else max(0.0, now - t)) for p, t in beats.items()},
            spool_counts=counts, oldest_inbox_age=self.oldest_inbox_age(now),
            unresolved=len(self.spool.unresolved(self.settings.unresolved_after_s, now)),
            lora_cache_bytes=tree_bytes(self.settings.lora_cache_dir), disk_free=self.disk_free(),
            jobs=self.jobs, comfy_restarts=self.comfy_restarts, frees=self.frees,
            process_restarts=self.process_restarts, counters=read_all(self.spool),
        )
        self.view.ready = not self.ready_problems(comfy_up, programs)
        fractions = [g.memory_fraction for g in gpus if g.memory_total > 0]
        return pol.Readings(
            now=now, comfy_up=comfy_up, running_prompts=running, pending_prompts=pending,
            processing=counts["processing"], mem_fraction=max(fractions) if fractions else None, comfy_rss=rss,
            jobs_ran=self.jobs.ran,
            programs=None if programs is None else {
                n: pol.Program(p.state, p.pid, p.started) for n, p in programs.items()},
            heartbeats={p: beats[p] for p in pol.WATCHED},
        )

    def beat_time(self, process: str) -> float | None:
        try:
            return self.spool.heartbeat_path(process).stat().st_mtime
        except OSError:
            return None

    def oldest_inbox_age(self, now: float) -> float:
        entries = self.spool.inbox_entries()
        if not entries:
            return 0.0
        return max(0.0, now - min(e.enqueued_ms for e in entries) / 1000)

    def disk_free(self) -> dict[str, int]:
        out = {}
        for name, path in (("spool", self.settings.spool_dir), ("lora_cache", self.settings.lora_cache_dir)):
            free = disk_free(path)
            if free is not None:
                out[name] = free
        return out

    def track_comfy_pid(self, comfy: ProgramInfo | None) -> None:
        """Count ComfyUI restarts the watchdog did not make (a crash, an operator): its pid changed."""
        if comfy is None or not comfy.pid:
            return
        if self.known_comfy_pid and comfy.pid != self.known_comfy_pid and self.restart_pending is None:
            self.comfy_restarts["exited"] = self.comfy_restarts.get("exited", 0) + 1
            logger.warning("ComfyUI was restarted outside the watchdog (pid {} -> {})", self.known_comfy_pid,
                           comfy.pid)
            self.event("restarted", pol.COMFYUI, "exited", f"pid {self.known_comfy_pid} -> {comfy.pid}")
        if comfy.pid != self.known_comfy_pid:
            self.known_comfy_pid = comfy.pid
            self.dirty = True

    def ready_problems(self, comfy_up: bool, programs: dict[str, ProgramInfo] | None = None) -> list[str]:
        problems = []
        if not comfy_up:
            problems.append("comfyui")
        for name, prog in sorted((programs or {}).items()):
            if prog.state in DOWN_STATES:
                problems.append(f"program:{name}")  # it does no work: FATAL until the watchdog starts it again
        if not self.spool.writable():
            problems.append("spool")
        floor = self.settings.disk_free_floor_gb * GB
        for name, free in self.disk_free().items():
            if free < floor:
                problems.append(f"disk:{name}")
        if self.nvml is not None and not self.nvml_ok:
            problems.append("gpu")
        return problems

    # --- one tick -------------------------------------------------------------------------------------------
    async def tick(self) -> None:
        r = await self.read()
        self.readings = r
        await self.resume_pending_restart(r)
        self.pstate, actions = pol.decide(r, self.pstate, self.limits)
        waiting = set()
        for action in actions:
            if action.kind == "wait":
                key = f"wait:{action.program}:{action.reason}"
                waiting.add(key)
                self.once.on(key, f"{action.program} restart due ({action.reason}): {action.detail}", "INFO")
            elif action.kind == "free":
                await self.free(r, action)
            elif action.reason == "fatal":
                await self.start_fatal(r, action)
            elif action.program == pol.COMFYUI:
                await self.restart_comfy(r, action)
            else:
                await self.restart_process(r, action)
        for key in [k for k in self.once.active if k.startswith("wait:") and k not in waiting]:
            self.once.off(key)
        if self.dirty:
            try:
                self.persist()
                self.once.off("persist", f"{STATE_FILE} written again")
            except OSError as exc:  # a full disk: the counters stay in memory (dirty) and are written later
                self.once.on("persist", f"could not write {STATE_FILE}, keeping the state in memory: {exc}")
        self.write_status()

    async def free(self, r: pol.Readings, action: pol.Action) -> None:
        try:
            await self.client.free(unload_models=True, free_memory=True)
        except ComfyUnavailable as exc:
            logger.warning("POST /free ({}) failed: {}", action.reason, exc)
            return
        self.pstate = pol.after_free(self.pstate, r)
        self.frees[action.reason] = self.frees.get(action.reason, 0) + 1
        self.dirty = True
        logger.info("asked ComfyUI to free memory ({}): {}", action.reason, action.detail)
        self.event("free", pol.COMFYUI, action.reason, action.detail)

    async def restart_comfy(self, r: pol.Readings, action: pol.Action) -> None:
        """stop, wait for STOPPED, start: with the intent persisted first, so a watchdog killed in between leaves a
        note that the next one acts on (ComfyUI is never left stopped by a crash)."""
        logger.warning("restarting ComfyUI ({}): {}", action.reason, action.detail)
        self.restart_pending = {"reason": action.reason, "at": r.now, "pid": self.known_comfy_pid}
        self.pstate = pol.after_restart(self.pstate, r, pol.COMFYUI)  # rate limit counts from the attempt
        self.persist()
        if action.reason == "unresponsive" and await self.kill_comfy(r):
            return  # supervisord's autorestart starts it; resume_pending_restart() sees the new pid
        try:
            await asyncio.to_thread(self.sup.stop, pol.COMFYUI)
            await self.wait_stopped(pol.COMFYUI)
            await asyncio.to_thread(self.sup.start, pol.COMFYUI)
        except SupervisorError as exc:
            logger.error("ComfyUI restart ({}) failed: {}; retrying on the next tick", action.reason, exc)
            return
        self.finish_comfy_restart(action.reason, action.detail)

    async def kill_comfy(self, r: pol.Readings) -> bool:
        """SIGKILL ComfyUI's process group at once: a ComfyUI that does not answer cannot drain, and a stopped
        (SIGSTOP) or wedged one ignores the SIGTERM of stopProcess, which would only cost its stopwaitsecs."""
        comfy = r.program(pol.COMFYUI)
        if comfy is None or comfy.pid <= 0:
            return False
        try:
            group = os.getpgid(comfy.pid)
            if group == comfy.pid and group != os.getpgrp():
                os.killpg(group, signal.SIGKILL)  # supervisord makes each program the leader of its own group
            else:
                os.kill(comfy.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # gone already: supervisord restarts it anyway
        except OSError as exc:
            logger.warning("killing ComfyUI's process group {} failed ({}); asking supervisord", comfy.pid, exc)
            try:
                await asyncio.to_thread(self.sup.signal, pol.COMFYUI, "KILL")
            except SupervisorError as sup_exc:
                logger.error("SIGKILL of ComfyUI through supervisord failed: {}", sup_exc)
                return False
        logger.warning("ComfyUI (pid {}) killed; supervisord starts it again", comfy.pid)
        return True

    def finish_comfy_restart(self, reason: str, detail: str, happened: bool = True) -> None:
        self.restart_pending = None
        if happened:
            self.known_comfy_pid = 0  # the next pid is the one we started, not an "exited" restart
            self.comfy_restarts[reason] = self.comfy_restarts.get(reason, 0) + 1
            self.event("restart", pol.COMFYUI, reason, detail)
        self.persist()

    async def wait_stopped(self, name: str) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            info = await asyncio.to_thread(self.sup.program, name)
            if info.state in sv.STOPPED_STATES:
                return
            await asyncio.sleep(0.1)
        raise SupervisorError(f"{name} did not stop within {STOP_TIMEOUT_S:g}s")

    async def resume_pending_restart(self, r: pol.Readings) -> None:
        """A restart this watchdog (or a killed predecessor) began: start ComfyUI if it is still stopped."""
        pending = self.restart_pending
        if pending is None or r.programs is None:
            return
        comfy = r.programs.get(pol.COMFYUI)
        reason = str(pending.get("reason", "unknown"))
        if comfy is None:
            return
        if comfy.state in (sv.STOPPED, sv.EXITED):
            logger.warning("ComfyUI was left stopped by an interrupted restart ({}): starting it", reason)
            try:
                await asyncio.to_thread(self.sup.start, pol.COMFYUI)
            except SupervisorError as exc:
                logger.error("could not start ComfyUI: {}", exc)
                return
            self.finish_comfy_restart(reason, "resumed after an interrupted restart")
        elif comfy.pid and comfy.pid != pending.get("pid"):
            self.finish_comfy_restart(reason, "completed by supervisord")
        elif r.now - float(pending.get("at", 0)) > PENDING_RESTART_MAX_S:
            logger.warning("ComfyUI restart ({}) never took effect (still pid {}); dropping it", reason, comfy.pid)
            self.finish_comfy_restart(reason, "", happened=False)

    async def start_fatal(self, r: pol.Readings, action: pol.Action) -> None:
        """supervisord gave up on a program (FATAL): start it again; the policy spaced the tries out."""
        logger.warning("starting {} again ({}): {}", action.program, action.reason, action.detail)
        self.pstate = pol.after_fatal_start(self.pstate, r, action.program)  # the backoff counts from the attempt
        try:
            await asyncio.to_thread(self.sup.start, action.program)
        except SupervisorError as exc:
            logger.error("start of FATAL {} failed: {}; trying again after the next backoff", action.program, exc)
        if action.program == pol.COMFYUI:
            self.known_comfy_pid = 0  # the next pid is the one we started, not an "exited" restart
        key = (action.program, action.reason)
        self.process_restarts[key] = self.process_restarts.get(key, 0) + 1
        self.dirty = True
        self.event("restart", action.program, action.reason, action.detail)

    async def restart_process(self, r: pol.Readings, action: pol.Action) -> None:
        """A RUNNING but silent selfix process: SIGKILL (it is not reading its signals; the spool makes the kill
        harmless) and supervisord's autorestart starts a fresh one."""
        logger.warning("restarting {} ({}): {}", action.program, action.reason, action.detail)
        try:
            await asyncio.to_thread(self.sup.signal, action.program, "KILL")
        except SupervisorError as exc:
            logger.error("restart of {} failed: {}", action.program, exc)
            return
        self.pstate = pol.after_restart(self.pstate, r, action.program)
        key = (action.program, action.reason)
        self.process_restarts[key] = self.process_restarts.get(key, 0) + 1
        self.dirty = True
        self.event("restart", action.program, action.reason, action.detail)

    def write_status(self) -> None:
        """run/watchdog.json: what `selfix status` shows (GPU, ComfyUI, programs, recent actions)."""
        v = self.view
        data = {
            "at": time.time(), "intervalS": self.settings.watchdog_interval_s,
            "mode": "nvml" if self.nvml is not None and self.nvml_ok else "cpu",
            "comfyui": {"up": v.comfy_up, "pid": self.known_comfy_pid, "rssBytes": v.comfy_rss,
                        "running": v.queue_running, "pending": v.queue_pending},
            "gpus": [asdict(g) for g in v.gpus],
            "programs": None if v.programs is None else {n: p.state for n, p in v.programs.items()},
            "ready": v.ready, "comfyRestarts": self.comfy_restarts, "frees": self.frees,
            "processRestarts": [[p, r, n] for (p, r), n in sorted(self.process_restarts.items())],
            "waiting": [m for k, m in self.once.active.items() if k.startswith("wait:")],
            "events": list(self.events),
        }
        try:
            self.spool.write_run_file(STATUS_FILE, dumps(data))
        except OSError as exc:
            self.once.on("status-file", f"could not write {STATUS_FILE}: {exc}")

    # --- HTTP ---------------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.http_metrics)
        app.router.add_get("/healthz", self.http_healthz)
        app.router.add_get("/readyz", self.http_readyz)
        console.mount(app, self)  # `/` and `/api/status`: the operator's page (selfix/console.py)
        return app

    async def http_metrics(self, _request: web.Request) -> web.Response:
        body = render(self.registry)  # on the loop thread: the tick mutates the counters between awaits only
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def http_healthz(self, _request: web.Request) -> web.Response:
        """200 when supervisord runs every program; 503 (with the states) otherwise."""
        try:
            programs = await asyncio.to_thread(self.sup.programs)
        except SupervisorError as exc:
            return web.json_response({"healthy": False, "error": str(exc)}, status=503)
        states = {n: p.state for n, p in sorted(programs.items())}
        healthy = all(p.running for p in programs.values())
        down = sorted(n for n, p in programs.items() if p.state in DOWN_STATES)
        return web.json_response({"healthy": healthy, "programs": states, "down": down},
                                 status=200 if healthy else 503)

    async def http_readyz(self, _request: web.Request) -> web.Response:
        """200 when this node can take work: ComfyUI answers now, the spool is writable, disk above the floor."""
        up = await self.client.alive()
        try:
            programs: dict[str, ProgramInfo] | None = await asyncio.to_thread(self.sup.programs)
        except SupervisorError:
            programs = None  # supervisord unreachable: /healthz says so; readiness judges the work itself
        problems = await asyncio.to_thread(self.ready_problems, up, programs)
        free = self.disk_free()
        body = {"ready": not problems, "failing": problems, "comfyui": up,
                "diskFreeBytes": free, "diskFloorBytes": int(self.settings.disk_free_floor_gb * GB)}
        return web.json_response(body, status=503 if problems else 200)


async def _sleep(flags: StopFlags, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not flags.stopping.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 0.1))


def open_nvml() -> Nvml | None:
    nvml, note = Nvml.open()
    if nvml is None:
        logger.info("no usable GPU driver: CPU mode ({}); watching ComfyUI's RSS and /system_stats", note)
    else:
        logger.info("GPU mode: {}", note)
    return nvml


async def amain(program: Program) -> int:
    settings, spool, flags = program.settings, program.spool, program.flags
    nvml = open_nvml()
    async with aiohttp.ClientSession() as session:
        client = ComfyClient(settings.comfy_url, "selfix-watchdog", session, timeout_s=PROBE_TIMEOUT_S)
        wd = Watchdog(settings, spool, client, Supervisor(settings.supervisor_rpc_url), nvml)
        runner = web.AppRunner(wd.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.metrics_host, settings.metrics_port).start()
        except OSError as exc:
            logger.error("cannot listen on {}:{}: {}", settings.metrics_host, settings.metrics_port, exc)
            await runner.cleanup()
            return EXIT_ERROR
        logger.info("watchdog: /metrics /healthz /readyz on {}:{}, tick {:g}s", settings.metrics_host,
                    settings.metrics_port, settings.watchdog_interval_s)
        try:
            while not flags.stopping.is_set():
                flags.beat()
                try:
                    await wd.tick()
                except Exception:  # noqa: BLE001 - one bad tick must not take the node's supervision down
                    logger.exception("watchdog tick failed")
                await _sleep(flags, settings.watchdog_interval_s)
        finally:
            with contextlib.suppress(OSError):
                wd.persist()
            await runner.cleanup()
            if nvml is not None:
                nvml.close()
    return EXIT_OK


def main() -> int:
    return run_async("watchdog", amain)


if __name__ == "__main__":
    raise SystemExit(main())
