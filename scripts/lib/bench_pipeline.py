"""Benchmark: how busy the (simulated) GPU stays. Prints one line per mode.

busy = sum of generation time / span, where span runs from the first job's start to the last job's end inside
ComfyUI (the GPU's point of view); overhead/job = (span - sum of generation) / N.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.servers.node_plugin import Node, task  # noqa: E402

STEPS = 10


def run(mode: str, queue_ahead: int, jobs: int, seconds: float, root: Path) -> None:
    node = Node(root / mode, seconds_per_step=seconds / STEPS,
                env={"QUEUE_AHEAD": str(queue_ahead), "LOG_LEVEL": "INFO"})
    try:
        node.start()
        ids = {f"bench-{i:04d}" for i in range(jobs)}
        t0 = time.time()
        for task_id in sorted(ids):
            node.drop(f"{task_id}.json", task(task_id, steps=STEPS))
        results = node.wait_results(ids, timeout=jobs * seconds * 3 + 60)
        wall = time.time() - t0
    finally:
        node.stop()
    metas = [r["metadata"] for r in results.values()]
    gen = sum(m["generationTime"] for m in metas)
    span = max(m["finishedAt"] for m in metas) - min(m["startedAt"] for m in metas)
    print(f"{mode:<14} jobs={jobs} gen/job={gen / jobs:.3f}s span={span:.2f}s busy={gen / span:.4f} "
          f"overhead/job={(span - gen) / jobs * 1000:.1f}ms end-to-end={wall:.2f}s", flush=True)


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    with tempfile.TemporaryDirectory(prefix="selfix-bench-") as tmp:
        run("queue-ahead=1", 1, jobs, seconds, Path(tmp))
        run("queue-ahead=0", 0, jobs, seconds, Path(tmp))


if __name__ == "__main__":
    main()
