"""Benchmark: a hung ComfyUI, from SIGSTOP to the next result, with the default watchdog and runner settings.

The scenario is the one of tests/test_chaos_hang.py: three 2 s jobs, ComfyUI stopped while the first runs and the
second waits in its queue. Prints one line per run and the worst case.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.test_chaos_hang import HangFigures, hang_node, hang_scenario  # noqa: E402


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    figures: list[HangFigures] = []
    with tempfile.TemporaryDirectory(prefix="selfix-bench-hang-") as tmp:
        for i in range(runs):
            node = hang_node(Path(tmp) / f"run{i}")
            try:
                f = hang_scenario(node)
            finally:
                node.stop()
            figures.append(f)
            print(f"run {i + 1}: hang -> killed {f.killed_s:.1f}s, -> next result {f.next_result_s:.1f}s, "
                  f"-> all results {f.all_results_s:.1f}s, restarts {f.restarts}", flush=True)
    print(f"worst of {runs}: killed {max(f.killed_s for f in figures):.1f}s, "
          f"next result {max(f.next_result_s for f in figures):.1f}s")


if __name__ == "__main__":
    main()
