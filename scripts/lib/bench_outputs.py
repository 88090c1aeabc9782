"""Benchmark: memory of every selfix process while one large output goes ComfyUI -> spool -> MinIO.

A node under real supervisord runs one task whose SaveVideo writes a video of about the requested size (the double
stores raw 4096x4096 RGB frames, 48 MiB each). The runner streams it from /view into outbox/, the uploader streams it
to MinIO by multipart. Every 50 ms the RSS of each supervisord program (and supervisord itself) is read with psutil;
the peaks are printed, with ComfyUI's (the double's, not selfix's) for comparison. Exit status 1 when a selfix
process went over the limit (default 150 MB).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.servers.minio_server import MinioServer  # noqa: E402
from tests.servers.node_plugin import Node  # noqa: E402

BUCKET = "bench-outputs"
SIDE = 4096
FRAME = SIDE * SIDE * 3


def video_task(frames: int) -> dict[str, Any]:
    return {"taskId": "big-video", "userId": "bench", "workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": frames,
                                                     "color": 0x3366FF}},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 24.0}},
        "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "big",
                                                    "format": "mp4", "codec": "h264"}},
    }}


class Sampler(threading.Thread):
    """Peak RSS per program (the process and its children) until stopped."""

    def __init__(self, node: Node) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.peaks: dict[str, int] = {}
        self.done = threading.Event()

    def pids(self) -> dict[str, int]:
        found = {name: int(info["pid"]) for name, info in self.node.info().items() if info.get("pid")}
        if self.node.proc is not None:
            found["supervisord"] = self.node.proc.pid
        return found

    def run(self) -> None:
        pids = self.pids()
        while not self.done.wait(0.05):
            for name, pid in pids.items():
                try:
                    proc = psutil.Process(pid)
                    rss = proc.memory_info().rss
                    if name != "supervisord":
                        rss += sum(c.memory_info().rss for c in proc.children(recursive=True))
                except psutil.Error:
                    pids = self.pids()  # restarted meanwhile
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0), rss)


def main() -> int:
    megabytes = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    limit_mb = float(sys.argv[2]) if len(sys.argv) > 2 else 150.0
    frames = max(1, math.ceil(megabytes * 1_000_000 / FRAME))
    work = Path(tempfile.mkdtemp(prefix="selfix-bench-outputs-"))
    server = MinioServer(work / "minio")
    server.start()
    node = Node(work / "node", seconds_per_step=0.0, env={
        "S3_ENDPOINT": server.endpoint, "S3_ACCESS_KEY": server.access_key, "S3_SECRET_KEY": server.secret_key,
        "S3_BUCKET": BUCKET, "S3_USE_SSL": "false", "DISK_FREE_FLOOR_GB": "0", "LOG_LEVEL": "INFO"})
    try:
        server.client().make_bucket(BUCKET)
        node.start()
        sampler = Sampler(node)
        sampler.start()
        time.sleep(1.0)  # a baseline sample of every process before the task
        idle = dict(sampler.peaks)
        began = time.monotonic()
        node.drop("big-video.json", video_task(frames))
        result = node.wait_results({"big-video"}, timeout=1800)["big-video"]
        took = time.monotonic() - began
        sampler.done.set()
        sampler.join()
        return report(server, result, frames, took, idle, sampler.peaks, limit_mb)
    finally:
        node.stop()
        server.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def report(server: MinioServer, result: dict[str, Any], frames: int, took: float, idle: dict[str, int],
           peaks: dict[str, int], limit_mb: float) -> int:
    if result["status"] != "completed":
        print(f"task failed: {result.get('error')}")
        return 1
    (entry,) = result["outputs"]
    stat = server.client().stat_object(BUCKET, entry["objectKey"])
    parts = stat.etag.rsplit("-", 1)[-1] if "-" in (stat.etag or "") else "1 (single part)"
    print(f"output: {entry['objectKey']} {entry['contentType']} {entry['bytes'] / 1e6:.0f} MB "
          f"({frames} frames of {SIDE}x{SIDE}); in MinIO {stat.size / 1e6:.0f} MB, {parts} parts; "
          f"task to published: {took:.1f}s; {os.cpu_count()} CPUs")
    print(f"{'process':<12} {'idle RSS MB':>12} {'peak RSS MB':>12}")
    over = []
    for name in sorted(peaks):
        mark = "" if name == "comfyui" else " (selfix)"
        print(f"{name:<12} {idle.get(name, 0) / 1e6:>12.1f} {peaks[name] / 1e6:>12.1f}{mark}")
        if name != "comfyui" and peaks[name] / 1e6 >= limit_mb:
            over.append(name)
    print(f"every selfix process under {limit_mb:g} MB: {'yes' if not over else 'NO: ' + ', '.join(over)}")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
