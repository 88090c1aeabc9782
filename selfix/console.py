"""The operator's console: a read-only web page on the watchdog's HTTP port (`/`) and the JSON API beneath it
(`/api/status`, which `selfix status --json` prints too, and `/api/preview/<taskId>`).

The document is rebuilt in the background (every SAMPLE_S, and the GPU history once per watchdog tick) from what
the watchdog already holds in memory: its NodeView, its run/watchdog.json, the set of done/ names its JobStats
keeps, plus the few processing/ files. A request only sends the last document's bytes, so its cost does not grow
with done/ (100,000 entries cost the same as ten); only a result that is new since the last tick is ever read.

What it never shows: settings (no secret can leak), a task's workflow or prompt text, user ids, image keys and
images, except one: with CONSOLE_PREVIEWS=true (and ComfyUI started with --preview-method) the running task's
latest latent preview, which the runner keeps in the spool while the task is in processing/ (selfix/previews.py).
It is off by default because a preview is a user's picture, and the operators of a fleet should not see what users
make unless they have a reason (a node to debug) and the right to; with it off, nothing is decoded or written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from loguru import logger

from selfix.comfy import IMAGE_MAGIC
from selfix.job import Job
from selfix.settings import Settings
from selfix.spool import Spool, valid_task_id

if TYPE_CHECKING:
    from selfix.watchdog import Watchdog

SAMPLE_S = 1.0  # how fresh the page is: the running task's progress moves at this pace
HISTORY_S = 600.0  # GPU charts cover the last ten minutes
RECENT = 20  # results and failures kept for the page
MESSAGE_MAX = 200  # characters of a failure's message
STARTUP_SCAN = 400  # at start, the newest this many done/ entries are read for the recent lists
API_PATH = "/api/status"
PREVIEW_PATH = "/api/preview/{task_id}"
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Nothing but this origin: the page works air-gapped and cannot be made to load anything from elsewhere.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
}


def result_summary(task_id: str, result: dict[str, Any], mtime: float) -> dict[str, Any]:
    """What the page shows of one result: status, code, timings. Never the prompt, the user or image keys."""
    meta = result.get("metadata") if isinstance(result.get("metadata"), dict) else {}
    error = result.get("error") if isinstance(result.get("error"), dict) else {}
    assert isinstance(meta, dict) and isinstance(error, dict)
    paths = result.get("imagePaths")
    out: dict[str, Any] = {
        "taskId": task_id, "status": str(result.get("status") or "unknown"), "at": mtime,
        "totalTime": _number(meta.get("totalTime")), "generationTime": _number(meta.get("generationTime")),
        "queueTime": _number(meta.get("queueTime")), "attempts": _number(meta.get("attempts")),
        "images": len(paths) if isinstance(paths, list) else 0,
    }
    if out["status"] != "completed":
        out["code"] = str(error.get("code") or "unknown")
        out["message"] = str(error.get("message") or "")[:MESSAGE_MAX]
    return out


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def running_jobs(jobs: Iterable[Job], now: float, previews: Spool | None = None) -> list[dict[str, Any]]:
    """The claimed jobs (processing/), reduced to id, state, attempt, progress and timing; with `previews` (the
    spool, CONSOLE_PREVIEWS on) whether each has a preview and its version, which changes with every new one."""
    out = []
    for job in jobs:
        started = None if job.started_at is None else float(job.started_at)
        version = previews.preview_version(job.task_id) if previews else None
        out.append({"taskId": job.task_id, "state": job.state and job.state.value, "attempt": job.attempt,
                    "progress": job.progress and job.progress.to_dict(), "startedAt": started,
                    "elapsedS": round(now - started, 1) if started is not None else None,
                    "preview": version is not None, "previewVersion": version})
    return out


def sniff(image: bytes) -> str | None:
    """The media type of a preview file by its first bytes (a file cut short by a crash is not served)."""
    return next((kind for kind, magic in IMAGE_MAGIC.items() if image.startswith(magic)), None)


class GpuHistory:
    """Per GPU: (time, memory used, utilisation, temperature) for the last HISTORY_S, one point per tick."""

    def __init__(self) -> None:
        self.points: dict[str, deque[tuple[float, int, float | None, float | None]]] = {}
        self.total: dict[str, int] = {}

    def add(self, now: float, gpus: Iterable[Any]) -> None:
        for g in gpus:
            key = str(g.index)
            series = self.points.setdefault(key, deque())
            series.append((round(now, 1), int(g.memory_used), g.utilization, g.temperature_c))
            self.total[key] = int(g.memory_total)
        for series in self.points.values():
            while series and series[0][0] < now - HISTORY_S:
                series.popleft()

    def dump(self) -> dict[str, Any]:
        return {k: {"memTotal": self.total.get(k, 0), "t": [p[0] for p in s], "memUsed": [p[1] for p in s],
                    "util": [p[2] for p in s], "temp": [p[3] for p in s]} for k, s in self.points.items()}


class Console:
    def __init__(self, wd: Watchdog) -> None:
        self.wd = wd
        self.hostname = socket.gethostname()
        self.spool_id = spool_id(wd.settings.spool_dir)
        self.history = GpuHistory()
        self.results: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.failures: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.seen: set[str] | None = None  # the JobStats.known set last looked at (replaced, never mutated, per scan)
        self.view_seen: object = None
        self.body = b"{}"
        self.task: asyncio.Task[None] | None = None
        self.page = resources.files("selfix").joinpath("console.html").read_bytes()

    # --- the document -------------------------------------------------------------------------------------------
    def new_results(self, known: set[str]) -> None:
        """Results that appeared in done/ since the last look: the watchdog's JobStats already listed them."""
        if known is self.seen:
            return
        fresh = known if self.seen is None else known - self.seen
        self.seen = known
        done = self.wd.spool.done
        dated = []
        for name in fresh:
            with contextlib.suppress(OSError):
                dated.append(((done / name).stat().st_mtime, name))
        dated.sort()
        for mtime, name in dated[-STARTUP_SCAN:]:  # at start, of 100,000 old results only the newest matter
            try:
                result = json.loads((done / name).read_bytes())
            except (OSError, ValueError):
                continue
            if not isinstance(result, dict):
                continue
            summary = result_summary(name.removesuffix(".json"), result, mtime)
            self.results.appendleft(summary)
            if summary["status"] != "completed":
                self.failures.appendleft(summary)

    def read_files(self, known: set[str], now: float) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The file I/O of a refresh (in a thread): new results, run/watchdog.json, processing/."""
        self.new_results(known)
        status: dict[str, Any] | None = None
        with contextlib.suppress(OSError, ValueError, TypeError):
            raw = json.loads((self.wd.spool.run / "watchdog.json").read_bytes())
            if isinstance(raw, dict):
                status = {**raw, "ageS": round(now - float(raw.get("at", 0)), 1)}
        previews = self.wd.spool if self.wd.settings.console_previews else None
        return status, running_jobs(self.wd.spool.processing_jobs(), now, previews)

    async def refresh(self) -> None:
        """Rebuild the document. Memory is read on the loop thread (the tick mutates it there), files in a thread."""
        now = time.time()
        wd, v = self.wd, self.wd.view
        if v is not self.view_seen:  # one chart point per watchdog tick
            self.view_seen = v
            self.history.add(now, v.gpus)
        totals: dict[str, int] = {}
        for (state, _code), n in wd.jobs.jobs.items():
            totals[state] = totals.get(state, 0) + n
        status, running = await asyncio.to_thread(self.read_files, wd.jobs.known, now)
        doc = {
            "source": "watchdog", "spoolId": self.spool_id, "at": round(now, 3), "node": self.hostname,
            "ready": v.ready,
            "programs": None if v.programs is None else {n: p.state for n, p in sorted(v.programs.items())},
            "comfyui": {"up": v.comfy_up, "rssBytes": v.comfy_rss, "running": v.queue_running,
                        "pending": v.queue_pending},
            "gpus": [asdict(g) for g in v.gpus], "gpuHistory": self.history.dump(), "nvml": v.nvml_up,
            "counts": dict(v.spool_counts), "oldestInboxAgeS": round(v.oldest_inbox_age, 1),
            "running": running, "jobs": totals, "recentResults": list(self.results),
            "recentFailures": [{"taskId": f["taskId"], "code": f.get("code"), "message": f.get("message", ""),
                                "ageS": round(now - f["at"])} for f in self.failures],
            "heartbeatAgeS": {k: (None if a is None else round(a, 1)) for k, a in v.heartbeat_age.items()},
            "diskFreeBytes": dict(v.disk_free), "watchdog": status,
        }
        self.body = json.dumps(doc, separators=(",", ":")).encode()

    async def sampler(self) -> None:
        interval = min(SAMPLE_S, self.wd.settings.watchdog_interval_s)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the page must never take the watchdog down
                logger.exception("console refresh failed")

    # --- HTTP ---------------------------------------------------------------------------------------------------
    async def http_page(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.page, content_type="text/html", charset="utf-8", headers=HEADERS)

    async def http_status(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.body, content_type="application/json", headers=HEADERS)

    async def http_preview(self, request: web.Request) -> web.Response:
        """The running task's latest preview; 404 when previews are off, the id is not a task id, the task is not
        in processing/ or has no preview (yet)."""
        task_id = request.match_info["task_id"]
        if not self.wd.settings.console_previews or not valid_task_id(task_id):
            raise web.HTTPNotFound(headers=HEADERS)
        image = await asyncio.to_thread(self.wd.spool.read_preview, task_id)
        kind = sniff(image) if image else None
        if image is None or kind is None:
            raise web.HTTPNotFound(headers=HEADERS)
        return web.Response(body=image, content_type=kind, headers=HEADERS)

    async def start(self, _app: web.Application) -> None:
        with contextlib.suppress(Exception):
            await self.refresh()
        self.task = asyncio.create_task(self.sampler())

    async def stop(self, _app: web.Application) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def mount(app: web.Application, wd: Watchdog) -> Console:
    """Add `/`, `/api/status` and `/api/preview/<taskId>` to the watchdog's HTTP app; the document refreshes while
    the app runs."""
    console = Console(wd)
    app.router.add_get("/", console.http_page)
    app.router.add_get(API_PATH, console.http_status)
    app.router.add_get(PREVIEW_PATH, console.http_preview)
    app.on_startup.append(console.start)
    app.on_cleanup.append(console.stop)
    return console


def api_url(settings: Settings) -> str:
    """Where this machine reaches its own watchdog's API (a wildcard bind is reached on loopback)."""
    host = settings.metrics_host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.metrics_port}{API_PATH}"


def spool_id(path: Path) -> str | None:
    """Names a spool without its path: the watchdog that answers must be the one of the spool the caller means."""
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def fetch_status(settings: Settings, timeout: float = 2.0) -> dict[str, Any] | None:
    """The watchdog's /api/status document, or None where it does not answer, or where the watchdog on that port
    watches another spool (then the caller reads the spool)."""
    try:
        with urllib.request.urlopen(api_url(settings), timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    if not isinstance(doc, dict) or doc.get("source") != "watchdog":
        return None
    return doc if doc.get("spoolId") == spool_id(settings.spool_dir) else None

