"""Cross-process counters, kept in the spool so that they survive restarts of any process.

Two sources, both read by the watchdog's /metrics:

- `incr(name, amount, **labels)`: a counter of the process that calls it (LoRA cache hits/misses/bytes in the
  runner, retries), kept in `run/stats.<process>.json` (rewritten whole through tmp + rename on every change; a
  process only ever writes its own file). Nothing is written until the process calls `configure(spool, name)`,
  so library code (loras.py) can count unconditionally and tests that use it in-process write nothing.
- `JobStats`: the results in `done/`, counted once each by the watchdog (status, error code, and histograms of
  metadata.totalTime / generationTime / queueTime), persisted in `run/watchdog.state.json` together with what it
  has counted, so a restarted watchdog neither loses nor repeats counts although done/ is pruned by age.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from selfix.spool import Spool, dumps

LabelKey = tuple[tuple[str, str], ...]
CounterKey = tuple[str, LabelKey]

# --- per-process counters ---------------------------------------------------------------------------------------


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spool: Spool | None = None
        self.process = ""
        self.values: dict[CounterKey, float] = {}

    def file_name(self) -> str:
        return f"stats.{self.process}.json"


_counters = _Counters()


def _key(name: str, labels: Mapping[str, object]) -> CounterKey:
    return name, tuple(sorted((str(k), str(v)) for k, v in labels.items()))


def _decode(raw: bytes) -> dict[CounterKey, float]:
    data = json.loads(raw)
    out: dict[CounterKey, float] = {}
    for item in data.get("counters", []):
        out[_key(str(item["name"]), dict(item.get("labels") or {}))] = float(item["value"])
    return out


def _encode(process: str, values: Mapping[CounterKey, float]) -> bytes:
    items = [{"name": n, "labels": dict(lbl), "value": v} for (n, lbl), v in sorted(values.items())]
    return dumps({"process": process, "updatedAt": time.time(), "counters": items})


def configure(spool: Spool, process: str) -> None:
    """Make `incr` persist into run/stats.<process>.json, continuing from the counts already there."""
    with _counters.lock:
        _counters.spool, _counters.process = spool, process
        try:
            _counters.values = _decode((spool.run / _counters.file_name()).read_bytes())
        except FileNotFoundError:
            _counters.values = {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("stats file of {} unreadable ({}); counting from zero", process, exc)
            _counters.values = {}


def incr(name: str, amount: float = 1.0, **labels: object) -> None:
    """Add `amount` to a counter of this process. Never raises: a metric must not fail a job."""
    with _counters.lock:
        spool = _counters.spool
        if spool is None or amount < 0:
            return
        key = _key(name, labels)
        _counters.values[key] = _counters.values.get(key, 0.0) + amount
        try:
            spool.write_run_file(_counters.file_name(), _encode(_counters.process, _counters.values))
        except OSError as exc:
            logger.debug("could not persist counter {}: {}", name, exc)


def reset_for_tests() -> None:
    with _counters.lock:
        _counters.spool, _counters.process, _counters.values = None, "", {}


def read_all(spool: Spool) -> dict[CounterKey, float]:
    """Every process's counters summed by (name, labels)."""
    total: dict[CounterKey, float] = {}
    try:
        names = os.listdir(spool.run)
    except FileNotFoundError:
        return total
    for fname in names:
        if not (fname.startswith("stats.") and fname.endswith(".json")):
            continue
        try:
            values = _decode((spool.run / fname).read_bytes())
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for key, value in values.items():
            total[key] = total.get(key, 0.0) + value
    return total


# --- histograms and job results -----------------------------------------------------------------------------------

DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)


@dataclass
class Histogram:
    """Non-cumulative counts per bucket (the last one is +Inf), a sum and a count: JSON-friendly."""

    bounds: tuple[float, ...] = DURATION_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bounds) + 1:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """prometheus_client's HistogramMetricFamily buckets: [(le, cumulative count)], ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else f"{bound:g}", float(running)))
        return out

    def dump(self) -> dict[str, Any]:
        return {"counts": self.counts, "sum": self.total}

    @staticmethod
    def load(data: Mapping[str, Any] | None) -> Histogram:
        hist = Histogram()
        if data and len(data.get("counts", [])) == len(hist.counts):
            hist.counts = [int(c) for c in data["counts"]]
            hist.total = float(data.get("sum", 0.0))
        return hist


HISTOGRAMS = ("duration", "generation", "queue")
# Failures that happened inside ComfyUI: these count as jobs that ran (for FREE_EVERY_JOBS), like completed ones.
RAN_CODES = frozenset({"execution_error", "out_of_memory", "timeout", "no_output", "interrupted"})
CONTROL_CODES = frozenset({"cancelled", "expired"})  # selfix/control.py
RECENT_WINDOW_S = 600.0  # names seen within this window are persisted, so a restart does not count them again
RESTART_SLACK_S = 120.0  # results newer than the last save minus this, and not known, are counted at start-up


@dataclass
class JobStats:
    """Counts of published results (done/), exact across watchdog restarts. Owned by the watchdog alone."""

    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (status, code) -> count
    hists: dict[str, Histogram] = field(default_factory=lambda: {h: Histogram() for h in HISTOGRAMS})
    ran: int = 0  # results of jobs that ran inside ComfyUI (FREE_EVERY_JOBS counts these)
    saved_s: float = 0.0  # ComfyUI seconds cancels and expiries saved (estimate: see count_result)
    known: set[str] = field(default_factory=set)  # every done/ name currently counted (memory only)
    recent: dict[str, float] = field(default_factory=dict)  # name -> when first seen (persisted)
    saved_at: float | None = None  # when the persisted copy was written (None: no history, count all)
    started: bool = False  # the first scan after loading decides from mtimes what was counted before

    def count_result(self, result: Mapping[str, Any]) -> None:
        status = str(result.get("status") or "unknown")
        raw_error, raw_meta = result.get("error"), result.get("metadata")
        error: Mapping[str, Any] = raw_error if isinstance(raw_error, dict) else {}
        meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        code = str(error.get("code") or "none") if status != "completed" else "none"
        self.jobs[(status, code)] = self.jobs.get((status, code), 0) + 1
        for hist, field_name, only_completed in (("duration", "totalTime", False),
                                                 ("generation", "generationTime", True),
                                                 ("queue", "queueTime", False)):
            value = meta.get(field_name)
            if isinstance(value, int | float) and value >= 0 and (status == "completed" or not only_completed):
                if hist == "generation" and value == 0:
                    continue
                self.hists[hist].observe(float(value))
        raw_ran = meta.get("ranS")
        ran_s = float(raw_ran) if isinstance(raw_ran, int | float) else 0.0
        if status == "completed" or code in RAN_CODES or ran_s > 0:
            self.ran += 1
        if code in CONTROL_CODES:
            # Estimate: what a job of this node takes on average, less what this one had run before it stopped.
            generation = self.hists["generation"]
            mean = generation.total / generation.count if generation.count else 0.0
            self.saved_s += max(0.0, mean - ran_s)

    def scan(self, spool: Spool, now: float | None = None) -> int:
        """Count the results that appeared in done/ since the last scan; returns how many."""
        now = time.time() if now is None else now
        try:
            names = {n for n in os.listdir(spool.done) if n.endswith(".json")}
        except FileNotFoundError:
            names = set()
        new = names - self.known
        if not self.started:
            self.started = True
            if self.saved_at is not None:
                new = self._unseen_at_start(spool, new)
        counted = 0
        for name in sorted(new):
            try:
                result = json.loads((spool.done / name).read_bytes())
            except FileNotFoundError:
                names.discard(name)
                continue
            except (OSError, ValueError):
                result = {"status": "unknown"}
            if isinstance(result, dict):
                self.count_result(result)
                counted += 1
            self.recent[name] = now
        self.known = names
        cutoff = now - RECENT_WINDOW_S
        self.recent = {n: t for n, t in self.recent.items() if t >= cutoff and n in names}
        return counted

    def _unseen_at_start(self, spool: Spool, names: Iterable[str]) -> set[str]:
        """At start-up with a persisted state: results published after the last save (and not in `recent`)."""
        assert self.saved_at is not None
        threshold = self.saved_at - RESTART_SLACK_S
        unseen = set()
        for name in names:
            if name in self.recent:
                continue
            with contextlib.suppress(FileNotFoundError):
                if (spool.done / name).stat().st_mtime >= threshold:
                    unseen.add(name)
        return unseen

    def dump(self, now: float | None = None) -> dict[str, Any]:
        return {
            "jobs": [[s, c, n] for (s, c), n in sorted(self.jobs.items())],
            "hists": {k: h.dump() for k, h in self.hists.items()},
            "ran": self.ran, "savedS": self.saved_s, "recent": self.recent,
            "savedAt": time.time() if now is None else now,
        }

    @staticmethod
    def load(data: Mapping[str, Any] | None) -> JobStats:
        stats = JobStats()
        if not data:
            return stats
        stats.jobs = {(str(s), str(c)): int(n) for s, c, n in data.get("jobs", [])}
        stats.hists = {h: Histogram.load((data.get("hists") or {}).get(h)) for h in HISTOGRAMS}
        stats.ran = int(data.get("ran", 0))
        stats.saved_s = float(data.get("savedS", 0.0))
        stats.recent = {str(k): float(v) for k, v in (data.get("recent") or {}).items()}
        saved = data.get("savedAt")
        stats.saved_at = float(saved) if isinstance(saved, int | float) else None
        return stats
