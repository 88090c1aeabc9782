"""Benchmark: the console's /api/status with many results in done/. Prints the figures, one line each.

A node (real supervisord, the ComfyUI double, default WATCHDOG_INTERVAL_S) starts on a spool whose done/ already
holds N results of ~1 KB, as a node that ran for days would. After the watchdog has counted them and the console
lists the newest, R requests are made one after another, each on a new connection (what a poll of the page does).

- latency: wall time of each request (connect, answer, read), p50 / p95 / max;
- CPU per request: the watchdog process's CPU time (user + system, psutil) while the requests ran, minus its CPU
  over an idle period of the same length measured just before (the ticks and the console's background refresh,
  which cost the same with or without requests), divided by R. The raw figure is printed too;
- background: the watchdog's CPU over 20 s without requests (its ticks list done/; the console refreshes once a
  second), as a share of one core.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.servers.node_plugin import Node, wait_until  # noqa: E402

BACKGROUND_S = 20.0


def fill_done(done: Path, n: int) -> None:
    done.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for i in range(n):
        tid = f"old-{i:06d}"
        failed = i % 20 == 0
        result = {"taskId": tid, "userId": f"u{i % 50}", "status": "failed" if failed else "completed",
                  "imagePath": None if failed else f"users/u{i % 50}/images/{tid}-0.png",
                  "imagePaths": [] if failed else [f"users/u{i % 50}/images/{tid}-0.png"],
                  "metadata": {"generationTime": 12.5, "queueTime": 0.4, "totalTime": 14.1, "attempts": 1,
                               "promptId": f"{i:032x}", "startedAt": now - 3600, "finishedAt": now - 3500}}
        if failed:
            result["error"] = {"code": "execution_error", "message": "node 3 (KSampler): RuntimeError: " + "x" * 400,
                               "retriable": False}
        path = done / f"{tid}.json"
        path.write_text(json.dumps(result))
        t = now - (n - i)  # one a second, the newest last
        os.utime(path, (t, t))


def request(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read()
    return time.perf_counter() - t0, len(body)


def cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    with tempfile.TemporaryDirectory(prefix="selfix-bench-console-") as tmp:
        node = Node(Path(tmp) / "node", env={"LOG_LEVEL": "INFO", "DISK_FREE_FLOOR_GB": "0"})
        t0 = time.time()
        fill_done(Path(node.env["SPOOL_DIR"]) / "done", n)
        print(f"done/ filled with {n} results in {time.time() - t0:.1f}s", flush=True)
        try:
            node.start()
            url = f"http://127.0.0.1:{node.env['METRICS_PORT']}/api/status"

            def warm() -> dict[str, object] | None:
                try:
                    with urllib.request.urlopen(url, timeout=10) as resp:
                        doc = json.loads(resp.read())
                except OSError:
                    return None
                counts = doc.get("counts") or {}
                return doc if counts.get("done") == n and doc.get("recentResults") else None

            t1 = time.time()
            doc = wait_until(warm, 600, "the watchdog counting done/ and the console listing results", interval=0.5)
            print(f"watchdog warm in {time.time() - t1:.1f}s: counts.done={doc['counts']['done']} "  # type: ignore[index]
                  f"recentResults={len(doc['recentResults'])}", flush=True)  # type: ignore[arg-type]
            proc = psutil.Process(node.pid("watchdog"))
            for _ in range(5):
                request(url)
            # The same wall time, idle and busy: the difference is what the requests cost the watchdog.
            busy_t0, busy_c0 = time.perf_counter(), cpu(proc)
            latencies, size = [], 0
            for _ in range(requests):
                latency, size = request(url)
                latencies.append(latency)
            busy_wall, busy_cpu = time.perf_counter() - busy_t0, cpu(proc) - busy_c0
            idle_c0 = cpu(proc)
            time.sleep(busy_wall)
            idle_cpu = cpu(proc) - idle_c0
            # What the watchdog costs the node in the background with this done/ (ticks + console refresh).
            bg_t0, bg_c0 = time.perf_counter(), cpu(proc)
            time.sleep(BACKGROUND_S)
            background = (cpu(proc) - bg_c0) / (time.perf_counter() - bg_t0)
        finally:
            node.stop()
    latencies.sort()
    p95 = latencies[max(0, int(len(latencies) * 0.95) - 1)]
    print(f"/api/status with {n} done/ entries, {requests} sequential requests, body {size} bytes", flush=True)
    print(f"latency p50={statistics.median(latencies) * 1000:.2f}ms p95={p95 * 1000:.2f}ms "
          f"max={latencies[-1] * 1000:.2f}ms", flush=True)
    print(f"watchdog CPU during requests {busy_cpu * 1000:.0f}ms over {busy_wall:.2f}s, idle over the same time "
          f"{idle_cpu * 1000:.0f}ms: {(busy_cpu - idle_cpu) / requests * 1000:.3f}ms per request "
          f"(raw {busy_cpu / requests * 1000:.3f}ms)", flush=True)
    print(f"watchdog in the background (ticks every {node.env.get('WATCHDOG_INTERVAL_S', '5')}s + console refresh "
          f"every 1s): {background * 100:.2f}% of one core over {BACKGROUND_S:g}s", flush=True)
    ok = p95 < 0.050 and (busy_cpu - idle_cpu) / requests < 0.005
    print("PASS (p95 < 50 ms, < 5 ms CPU per request)" if ok else "FAIL", flush=True)


if __name__ == "__main__":
    main()
