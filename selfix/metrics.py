"""Prometheus exposition for the watchdog's `/metrics`: one catalogue (name, type, labels, help) that both the
collector and the README's metrics table come from, so a metric cannot exist undocumented.

Values come from a `NodeView` that the watchdog rebuilds every tick (GPU, ComfyUI, supervisord, spool) plus the
persisted job counts and the processes' counters in run/stats.*.json, so a scrape costs no I/O beyond those files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from selfix.gpu import GpuReading
from selfix.stats import CounterKey, JobStats
from selfix.supervisor import ProgramInfo

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Family = CounterMetricFamily | GaugeMetricFamily


@dataclass(frozen=True)
class MetricDoc:
    name: str  # as exposed (counters with _total)
    kind: str  # counter gauge histogram
    labels: tuple[str, ...]
    help: str
    nvml_only: bool = False  # present only where NVML (a driver) is available

    @property
    def family(self) -> str:
        """prometheus_client family name: counters without the _total suffix."""
        return self.name[: -len("_total")] if self.kind == "counter" else self.name


M = MetricDoc
CATALOGUE: tuple[MetricDoc, ...] = (
    M("selfix_jobs_total", "counter", ("status", "code"),
      "Results published to done/, by status (completed, failed) and error code (`none` when completed)."),
    M("selfix_job_duration_seconds", "histogram", (), "Task enqueued to result written (metadata.totalTime)."),
    M("selfix_job_generation_seconds", "histogram", (),
      "Time inside ComfyUI of completed jobs, from its execution timestamps (metadata.generationTime)."),
    M("selfix_job_queue_seconds", "histogram", (), "Task enqueued to execution start (metadata.queueTime)."),
    M("selfix_control_saved_seconds_total", "counter", (),
      "ComfyUI seconds that cancelled and expired tasks did not use (estimate: this node's mean generation time "
      "per such task, less what it had run before the interrupt)."),
    M("selfix_job_retries_total", "counter", ("code",),
      "Jobs the runner sent back to inbox/ for another attempt, by the error that caused it."),
    M("selfix_spool_jobs", "gauge", ("state",), "Entries per spool state (inbox, processing, outbox, done, corrupt, "
                                                "tmp)."),
    M("selfix_spool_oldest_inbox_age_seconds", "gauge", (), "Age of the oldest job waiting in inbox/ (0: empty)."),
    M("selfix_unresolved_tasks", "gauge", (),
      "Tasks accepted longer ago than UNRESOLVED_AFTER_S and still without a published result (alert on > 0)."),
    M("selfix_lora_cache_hits_total", "counter", (), "LoRA uses served from the local cache."),
    M("selfix_lora_cache_misses_total", "counter", (), "LoRA downloads into the cache (prefetches included)."),
    M("selfix_lora_download_bytes_total", "counter", (), "Bytes of LoRA files downloaded into the cache."),
    M("selfix_lora_cache_bytes", "gauge", (), "Bytes of LoRA files in LORA_CACHE_DIR."),
    M("selfix_comfyui_up", "gauge", (), "1 when ComfyUI answered /system_stats at the last tick."),
    M("selfix_comfyui_restarts_total", "counter", ("reason",),
      "ComfyUI restarts: by the watchdog (gpu_hard_mark, rss_limit, unresponsive) or seen after it exited (exited)."),
    M("selfix_comfyui_frees_total", "counter", ("reason",),
      "POST /free sent by the watchdog (gpu_soft_mark, every_jobs, every_min)."),
    M("selfix_comfyui_rss_bytes", "gauge", (), "Resident memory of the ComfyUI process and its children."),
    M("selfix_comfyui_queue_prompts", "gauge", ("state",), "Prompts in ComfyUI's own queue (running, pending)."),
    M("selfix_gpu_memory_used_bytes", "gauge", ("gpu",),
      "GPU memory in use (NVML; ComfyUI's /system_stats where NVML is unavailable or sees less)."),
    M("selfix_gpu_memory_total_bytes", "gauge", ("gpu",), "GPU memory size."),
    M("selfix_gpu_info", "gauge", ("gpu", "name", "source"), "Always 1; names each GPU and where its readings come "
                                                             "from (nvml or comfyui)."),
    M("selfix_gpu_utilization_ratio", "gauge", ("gpu",), "GPU busy fraction over the driver's last sample period.",
      nvml_only=True),
    M("selfix_gpu_temperature_celsius", "gauge", ("gpu",), "GPU core temperature.", nvml_only=True),
    M("selfix_gpu_power_watts", "gauge", ("gpu",), "GPU power draw.", nvml_only=True),
    M("selfix_gpu_xid_errors_total", "counter", ("gpu",),
      "Critical Xid errors reported by the driver since the watchdog started (where the driver exposes events).",
      nvml_only=True),
    M("selfix_gpu_ecc_errors_total", "counter", ("gpu", "type"),
      "ECC memory errors since the driver loaded, corrected and uncorrected (where the GPU has ECC).",
      nvml_only=True),
    M("selfix_nvml_up", "gauge", (), "1 when NVML readings work; 0 is CPU mode (RSS and /system_stats only)."),
    M("selfix_program_up", "gauge", ("program",), "1 when supervisord reports the program RUNNING."),
    M("selfix_heartbeat_age_seconds", "gauge", ("program",), "Seconds since the process last beat its heartbeat."),
    M("selfix_process_restarts_total", "counter", ("program", "reason"),
      "Programs restarted by the watchdog (heartbeat_stale: RUNNING but silent; fatal: FATAL per supervisord, "
      "started again after a backoff)."),
    M("selfix_disk_free_bytes", "gauge", ("path",), "Free bytes on the spool's and the LoRA cache's filesystems."),
    M("selfix_ready", "gauge", (), "1 when the node is ready (what /readyz answers)."),
)
del M
BY_NAME = {m.name: m for m in CATALOGUE}


@dataclass
class NodeView:
    """Everything /metrics shows, as of the last watchdog tick."""

    comfy_up: bool = False
    comfy_rss: int | None = None
    queue_running: int = 0
    queue_pending: int = 0
    gpus: list[GpuReading] = field(default_factory=list)
    nvml_up: bool = False
    programs: Mapping[str, ProgramInfo] | None = None
    heartbeat_age: Mapping[str, float | None] = field(default_factory=dict)
    spool_counts: Mapping[str, int] = field(default_factory=dict)
    oldest_inbox_age: float = 0.0
    unresolved: int = 0
    lora_cache_bytes: int = 0
    disk_free: Mapping[str, int] = field(default_factory=dict)
    ready: bool = False
    jobs: JobStats = field(default_factory=JobStats)
    comfy_restarts: Mapping[str, int] = field(default_factory=dict)
    frees: Mapping[str, int] = field(default_factory=dict)
    process_restarts: Mapping[tuple[str, str], int] = field(default_factory=dict)
    counters: Mapping[CounterKey, float] = field(default_factory=dict)


def _counter_sum(counters: Mapping[CounterKey, float], name: str) -> float:
    return sum(v for (n, _), v in counters.items() if n == name)


def _labelled(counters: Mapping[CounterKey, float], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in counters.items():
        if n == name:
            key = dict(labels).get(label, "unknown")
            out[key] = out.get(key, 0.0) + v
    return out


class SelfixCollector(Collector):
    def __init__(self, view: Callable[[], NodeView]) -> None:
        self.view = view

    def _family(self, name: str) -> Family:
        doc = BY_NAME[name]
        if doc.kind == "counter":
            return CounterMetricFamily(doc.family, doc.help, labels=doc.labels)
        return GaugeMetricFamily(doc.family, doc.help, labels=doc.labels)

    def collect(self) -> Iterator[Metric]:
        v = self.view()
        fam = self._family

        jobs = fam("selfix_jobs_total")
        for (status, code), n in sorted(v.jobs.jobs.items()):
            jobs.add_metric([status, code], n)
        if not v.jobs.jobs:
            jobs.add_metric(["completed", "none"], 0)
        yield jobs
        for hist, name in (("duration", "selfix_job_duration_seconds"), ("generation", "selfix_job_generation_seconds"),
                           ("queue", "selfix_job_queue_seconds")):
            h = v.jobs.hists[hist]
            yield HistogramMetricFamily(name, BY_NAME[name].help, buckets=h.cumulative(), sum_value=h.total)
        yield _gauge(fam("selfix_control_saved_seconds_total"), v.jobs.saved_s)
        retries = fam("selfix_job_retries_total")
        for code, count in sorted(_labelled(v.counters, "job_retries", "code").items()):
            retries.add_metric([code], count)
        yield retries

        spool = fam("selfix_spool_jobs")
        for state, n in v.spool_counts.items():
            spool.add_metric([state], n)
        yield spool
        yield _gauge(fam("selfix_spool_oldest_inbox_age_seconds"), v.oldest_inbox_age)
        yield _gauge(fam("selfix_unresolved_tasks"), v.unresolved)

        for name, counter in (("selfix_lora_cache_hits_total", "lora_cache_hits"),
                              ("selfix_lora_cache_misses_total", "lora_cache_misses"),
                              ("selfix_lora_download_bytes_total", "lora_download_bytes")):
            yield _gauge(fam(name), _counter_sum(v.counters, counter))
        yield _gauge(fam("selfix_lora_cache_bytes"), v.lora_cache_bytes)

        yield _gauge(fam("selfix_comfyui_up"), 1 if v.comfy_up else 0)
        for name, values, reasons in (("selfix_comfyui_restarts_total", v.comfy_restarts,
                                       ("gpu_hard_mark", "rss_limit", "unresponsive", "exited")),
                                      ("selfix_comfyui_frees_total", v.frees,
                                       ("gpu_soft_mark", "every_jobs", "every_min"))):
            f = fam(name)
            for reason in sorted(set(reasons) | set(values)):
                f.add_metric([reason], values.get(reason, 0))
            yield f
        rss = fam("selfix_comfyui_rss_bytes")
        if v.comfy_rss is not None:
            rss.add_metric([], v.comfy_rss)
        yield rss
        queue = fam("selfix_comfyui_queue_prompts")
        queue.add_metric(["running"], v.queue_running)
        queue.add_metric(["pending"], v.queue_pending)
        yield queue

        yield from self._gpus(v)

        programs = fam("selfix_program_up")
        for name, info in sorted((v.programs or {}).items()):
            programs.add_metric([name], 1 if info.running else 0)
        yield programs
        beats = fam("selfix_heartbeat_age_seconds")
        for name, age in sorted(v.heartbeat_age.items()):
            if age is not None:
                beats.add_metric([name], round(age, 3))
        yield beats
        restarts = fam("selfix_process_restarts_total")
        for (program, reason), n in sorted(v.process_restarts.items()):
            restarts.add_metric([program, reason], n)
        if not v.process_restarts:
            for program in ("runner", "uploader", "consumer"):
                restarts.add_metric([program, "heartbeat_stale"], 0)
        yield restarts
        disk = fam("selfix_disk_free_bytes")
        for path, n in sorted(v.disk_free.items()):
            disk.add_metric([path], n)
        yield disk
        yield _gauge(fam("selfix_ready"), 1 if v.ready else 0)

    def _gpus(self, v: NodeView) -> Iterator[Metric]:
        fam = self._family
        used, total, info = fam("selfix_gpu_memory_used_bytes"), fam("selfix_gpu_memory_total_bytes"), fam(
            "selfix_gpu_info")
        util, temp, power = (fam("selfix_gpu_utilization_ratio"), fam("selfix_gpu_temperature_celsius"),
                             fam("selfix_gpu_power_watts"))
        xid, ecc = fam("selfix_gpu_xid_errors_total"), fam("selfix_gpu_ecc_errors_total")
        for g in v.gpus:
            gpu = str(g.index)
            used.add_metric([gpu], g.memory_used)
            total.add_metric([gpu], g.memory_total)
            info.add_metric([gpu, g.name, g.source], 1)
            for fam_, value in ((util, g.utilization), (temp, g.temperature_c), (power, g.power_w),
                                (xid, g.xid_errors)):
                if value is not None:
                    fam_.add_metric([gpu], value)
            for kind, value in (("corrected", g.ecc_corrected), ("uncorrected", g.ecc_uncorrected)):
                if value is not None:
                    ecc.add_metric([gpu, kind], value)
        yield from (used, total, info)
        if v.nvml_up:  # NVML-only families are left out entirely in CPU mode
            yield from (util, temp, power, xid, ecc)
        yield _gauge(fam("selfix_nvml_up"), 1 if v.nvml_up else 0)


def _gauge(family: Family, value: float) -> Family:
    family.add_metric([], value)
    return family


def make_registry(view: Callable[[], NodeView]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SelfixCollector(view))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def metrics_table() -> str:
    """The README's metrics table (between <!-- metrics:begin --> and <!-- metrics:end -->)."""
    rows = ["| metric | type | labels | what it measures |", "|---|---|---|---|"]
    for m in CATALOGUE:
        labels = ", ".join(f"`{lbl}`" for lbl in m.labels) or "-"
        note = " NVML only." if m.nvml_only else ""
        rows.append(f"| `{m.name}` | {m.kind} | {labels} | {m.help.replace('|', '/')}{note} |")
    return "\n".join(rows)
