"""Watchdog pieces without a node: fake NVML (monkeypatched pynvml functions), GPU views, job accounting across
restarts, process counters, the Prometheus exposition and its README table, the watchdog's tick against the
ComfyUI double with a stub supervisord."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

from selfix import gpu, stats
from selfix.metrics import CATALOGUE, NodeView, make_registry, metrics_table, render
from selfix.spool import Spool
from selfix.supervisor import ProgramInfo
from tests.servers.node_plugin import Double

pytestmark = pytest.mark.watchdog
README = Path(__file__).resolve().parents[1] / "README.md"
pynvml = gpu.pynvml


# --- a fake NVML ----------------------------------------------------------------------------------------------------

@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    used: int = 10 << 30
    total: int = 80 << 30
    util: int = 42
    temp: int = 61
    power_mw: int = 312_500
    ecc: tuple[int, int] | None = (3, 0)
    events: list[int] = field(default_factory=list)  # pending Xid codes
    events_supported: bool = True
    lost: bool = False


def nvml_error(code: int) -> Exception:
    return pynvml.NVMLError(code)  # type: ignore[no-any-return]


def install_fake_nvml(monkeypatch: pytest.MonkeyPatch, gpus: list[FakeGpu] | None, init_error: int | None = None
                      ) -> list[FakeGpu]:
    devices = gpus or []

    def init() -> None:
        if init_error is not None:
            raise nvml_error(init_error)

    def dev(handle: Any) -> FakeGpu:
        return devices[handle]

    def memory(handle: Any) -> Any:
        if dev(handle).lost:
            raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        card = dev(handle)
        return SimpleNamespace(used=card.used, total=card.total, free=card.total - card.used)

    def ecc(handle: Any, kind: int, _counter: int) -> int:
        if dev(handle).ecc is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return dev(handle).ecc[kind]  # type: ignore[index]

    def register(handle: Any, _types: int, event_set: Any) -> None:
        if not dev(handle).events_supported:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        event_set["handle"] = handle

    def wait(event_set: Any, _timeout: int) -> Any:
        pending = devices[event_set["handle"]].events
        if not pending:
            raise nvml_error(pynvml.NVML_ERROR_TIMEOUT)
        return SimpleNamespace(eventData=pending.pop(0))

    fakes = {
        "nvmlInit": init, "nvmlShutdown": lambda: None, "nvmlDeviceGetCount": lambda: len(devices),
        "nvmlDeviceGetHandleByIndex": lambda i: i, "nvmlDeviceGetName": lambda h: dev(h).name.encode(),
        "nvmlSystemGetDriverVersion": lambda: "550.54.15", "nvmlDeviceGetMemoryInfo": memory,
        "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(gpu=dev(h).util, memory=0),
        "nvmlDeviceGetTemperature": lambda h, _s: dev(h).temp, "nvmlDeviceGetPowerUsage": lambda h: dev(h).power_mw,
        "nvmlDeviceGetTotalEccErrors": ecc, "nvmlEventSetCreate": lambda: {}, "nvmlDeviceRegisterEvents": register,
        "nvmlEventSetWait_v2": wait, "nvmlEventSetFree": lambda _s: None,
    }
    for name, fn in fakes.items():
        monkeypatch.setattr(pynvml, name, fn)
    return devices


def test_fake_nvml_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    cards = install_fake_nvml(monkeypatch, [FakeGpu(), FakeGpu(name="L4", ecc=None, events_supported=False)])
    nvml, note = gpu.Nvml.open()
    assert nvml is not None and "550.54.15" in note and "0: NVIDIA H100" in note
    cards[0].events.extend([79, 48])
    first, second = nvml.read()
    assert (first.memory_used, first.memory_total, first.source) == (10 << 30, 80 << 30, "nvml")
    assert first.utilization == pytest.approx(0.42) and first.temperature_c == 61 and first.power_w == 312.5
    assert (first.xid_errors, first.last_xid, first.ecc_corrected, first.ecc_uncorrected) == (2, 48, 3, 0)
    assert second.name == "L4" and second.xid_errors is None and second.ecc_corrected is None, \
        "unsupported counters are absent, not 0"
    assert nvml.read()[0].xid_errors == 2, "Xid counts accumulate"
    cards[0].lost = True
    with pytest.raises(pynvml.NVMLError):
        nvml.read()
    nvml.close()


def test_real_nvml_where_a_gpu_is_present() -> None:
    """On a machine with an NVIDIA driver: the real readings are sane. Elsewhere: CPU mode, with the reason."""
    nvml, note = gpu.Nvml.open()
    if nvml is None:
        assert note
        pytest.skip(f"no GPU here: {note}")
    try:
        readings = nvml.read()
        assert readings and note.startswith("NVML driver")
        for g in readings:
            assert g.source == "nvml" and g.name and 0 < g.memory_used <= g.memory_total
            assert g.utilization is None or 0 <= g.utilization <= 1
            assert g.temperature_c is None or 0 < g.temperature_c < 120
            assert g.power_w is None or 0 < g.power_w < 2000
    finally:
        nvml.close()


@pytest.mark.parametrize("code", ["NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_DRIVER_NOT_LOADED"])
def test_no_driver_means_cpu_mode(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    install_fake_nvml(monkeypatch, [], init_error=getattr(pynvml, code))
    nvml, note = gpu.Nvml.open()
    assert nvml is None and "NVML unavailable" in note


def test_no_gpu_means_cpu_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_nvml(monkeypatch, [])
    assert gpu.Nvml.open() == (None, "NVML reports no GPU")


def test_comfyui_view_of_gpus_and_merge() -> None:
    cpu_stats = {"devices": [{"name": "cpu", "type": "cpu", "index": None, "vram_total": 64, "vram_free": 1}]}
    assert gpu.comfy_gpus(cpu_stats) == [], "ComfyUI on CPU reports RAM as a 'cpu' device: not a GPU"
    cuda = {"devices": [{"name": "cuda:0 X", "type": "cuda", "index": 0, "vram_total": 100, "vram_free": 10}]}
    (view,) = gpu.comfy_gpus(cuda)
    assert view.memory_fraction == pytest.approx(0.9) and view.source == "comfyui"
    nv = gpu.GpuReading(0, "H100", 20, 200, "nvml", utilization=0.5)
    (merged,) = gpu.merge([nv], [view])
    assert merged.source == "nvml" and merged.memory_fraction == pytest.approx(0.9) and merged.utilization == 0.5
    (kept,) = gpu.merge([replace_used(nv, 190)], [view])
    assert kept.memory_used == 190


def replace_used(g: gpu.GpuReading, used: int) -> gpu.GpuReading:
    from dataclasses import replace

    return replace(g, memory_used=used)


# --- job accounting and counters ----------------------------------------------------------------------------------

def done(spool: Spool, task_id: str, status: str = "completed", code: str | None = None, total: float = 3.0,
         gen: float = 1.5, queue: float = 0.2, mtime: float | None = None) -> None:
    result: dict[str, Any] = {"taskId": task_id, "status": status,
                              "metadata": {"totalTime": total, "generationTime": gen, "queueTime": queue}}
    if code:
        result["error"] = {"code": code, "message": "x"}
    spool.finish(result)
    if mtime is not None:
        import os

        os.utime(spool.done_path(task_id), (mtime, mtime))


def test_job_stats_count_each_result_once_across_restarts_and_pruning(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    old = time.time() - 7200
    done(spool, "old-1", mtime=old)
    done(spool, "f-1", "failed", "invalid_workflow", gen=0)
    js = stats.JobStats()
    assert js.scan(spool) == 2 and js.scan(spool) == 0
    assert js.jobs == {("completed", "none"): 1, ("failed", "invalid_workflow"): 1}
    assert js.hists["generation"].count == 1, "failed jobs have no generation time"
    assert js.hists["duration"].count == 2 and js.ran == 1
    saved = json.loads(json.dumps(js.dump()))

    done(spool, "t-2", "failed", "out_of_memory")  # published while the watchdog was down
    spool.done_path("old-1").unlink()  # pruned by age meanwhile
    restarted = stats.JobStats.load(saved)
    assert restarted.scan(spool) == 1, "only the result published since the last save is new"
    assert restarted.jobs[("failed", "out_of_memory")] == 1 and restarted.ran == 2
    assert restarted.jobs[("completed", "none")] == 1, "pruning never lowers a counter"
    done(spool, "t-3")
    assert restarted.scan(spool) == 1 and restarted.jobs[("completed", "none")] == 2


def test_histogram_buckets_are_cumulative() -> None:
    h = stats.Histogram()
    for v in (0.1, 0.5, 7.0, 5000.0):
        h.observe(v)
    buckets = dict(h.cumulative())
    assert buckets["0.5"] == 2 and buckets["10"] == 3 and buckets["3600"] == 3 and buckets["+Inf"] == 4
    assert stats.Histogram.load(h.dump()).cumulative() == h.cumulative()


def test_process_counters_persist_and_sum(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    stats.reset_for_tests()
    stats.incr("lora_cache_hits")  # not configured: a no-op (library code in tests)
    assert stats.read_all(spool) == {}
    try:
        stats.configure(spool, "runner")
        stats.incr("lora_cache_hits")
        stats.incr("lora_download_bytes", 1024)
        stats.incr("job_retries", code="out_of_memory")
        stats.configure(spool, "runner")  # a restarted runner continues from the file
        stats.incr("lora_cache_hits")
        stats.configure(spool, "uploader")
        stats.incr("lora_cache_hits", 5)
    finally:
        stats.reset_for_tests()
    totals = stats.read_all(spool)
    assert totals[("lora_cache_hits", ())] == 7 and totals[("lora_download_bytes", ())] == 1024
    assert totals[("job_retries", (("code", "out_of_memory"),))] == 1


# --- exposition -------------------------------------------------------------------------------------------------------

def full_view() -> NodeView:
    js = stats.JobStats()
    js.count_result({"status": "completed", "metadata": {"totalTime": 2, "generationTime": 1, "queueTime": 0.1}})
    js.count_result({"status": "failed", "error": {"code": "timeout"}, "metadata": {"totalTime": 600}})
    g = gpu.GpuReading(0, "H100", 10 << 30, 80 << 30, "nvml", utilization=0.4, temperature_c=60, power_w=300,
                       xid_errors=0, ecc_corrected=1, ecc_uncorrected=0)
    return NodeView(
        comfy_up=True, comfy_rss=2 << 30, queue_running=1, queue_pending=1, gpus=[g], nvml_up=True,
        programs={"runner": ProgramInfo("runner", "RUNNING", 5, 0.0)}, heartbeat_age={"runner": 0.5},
        spool_counts={"inbox": 2, "processing": 1}, oldest_inbox_age=3.0, lora_cache_bytes=4096,
        disk_free={"spool": 1 << 40}, ready=True, jobs=js, comfy_restarts={"gpu_hard_mark": 1},
        frees={"gpu_soft_mark": 2}, process_restarts={("runner", "heartbeat_stale"): 1},
        counters={("lora_cache_hits", ()): 3.0, ("lora_cache_misses", ()): 1.0,
                  ("lora_download_bytes", ()): 4096.0, ("job_retries", (("code", "timeout"),)): 1.0},
    )


def parse(text: str) -> dict[str, list[Any]]:
    """{exposed sample-family name: samples}, keyed the way the catalogue names metrics."""
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = list(fam.samples)
    return out


def test_every_catalogued_metric_is_exposed_and_parses() -> None:
    text = render(make_registry(full_view)).decode()
    families = parse(text)
    assert set(families) == {m.name for m in CATALOGUE}
    for m in CATALOGUE:
        assert families[m.name], f"{m.name} has no sample"
        assert re.fullmatch(r"selfix_[a-z_]+", m.name)
        assert (m.kind == "counter") == m.name.endswith("_total")
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f}
    assert value[("selfix_jobs_total", (("code", "timeout"), ("status", "failed")))] == 1
    assert value[("selfix_job_duration_seconds_count", ())] == 2
    assert value[("selfix_job_generation_seconds_count", ())] == 1
    assert value[("selfix_lora_cache_hits_total", ())] == 3
    assert value[("selfix_gpu_memory_used_bytes", (("gpu", "0"),))] == 10 << 30
    assert value[("selfix_gpu_ecc_errors_total", (("gpu", "0"), ("type", "corrected")))] == 1
    assert value[("selfix_comfyui_restarts_total", (("reason", "gpu_hard_mark"),))] == 1


def test_cpu_mode_leaves_nvml_only_metrics_out() -> None:
    view = NodeView(comfy_up=True)
    families = parse(render(make_registry(lambda: view)).decode())
    assert not {m.name for m in CATALOGUE if m.nvml_only} & set(families)
    assert families["selfix_nvml_up"][0].value == 0


def test_readme_metrics_table_matches_code() -> None:
    text = README.read_text()
    match = re.search(r"<!-- metrics:begin -->\n(.*?)\n<!-- metrics:end -->", text, re.S)
    assert match, "README lacks the metrics markers"
    assert match[1] == metrics_table(), "README metrics table is stale: regenerate with metrics_table()"


# --- one watchdog against the ComfyUI double, supervisord stubbed ---------------------------------------------------

class StubSupervisor:
    def __init__(self, comfy_pid: int) -> None:
        now = time.time()
        self.infos = {name: ProgramInfo(name, "RUNNING", pid, now - 3600)
                      for name, pid in (("comfyui", comfy_pid), ("runner", 2), ("uploader", 3), ("consumer", 4))}
        self.calls: list[tuple[str, ...]] = []

    def programs(self) -> dict[str, ProgramInfo]:
        return dict(self.infos)

    def program(self, name: str) -> ProgramInfo:
        return self.infos[name]

    def signal(self, name: str, sig: str) -> None:
        self.calls.append(("signal", name, sig))

    def stop(self, name: str) -> None:
        self.calls.append(("stop", name))
        self.infos[name] = ProgramInfo(name, "STOPPED", 0, self.infos[name].started)

    def start(self, name: str) -> None:
        self.calls.append(("start", name))
        self.infos[name] = ProgramInfo(name, "RUNNING", 777, time.time())


def fake_vram(double: Double, used_fraction: float, total: int = 24 << 30) -> None:
    body = json.dumps({"vram_total": total, "vram_free": int(total * (1 - used_fraction))}).encode()
    req = urllib.request.Request(double.url + "/fake/vram", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()


def fake_stats(double: Double) -> dict[str, Any]:
    return dict(json.loads(urllib.request.urlopen(double.url + "/fake/stats", timeout=5).read()))


async def test_watchdog_ticks_with_fake_nvml_free_restart_and_cpu_mode_note_once(
        tmp_path: Path, comfy_double: Double, monkeypatch: pytest.MonkeyPatch) -> None:
    import aiohttp

    from selfix import watchdog
    from selfix.comfy import ComfyClient
    from selfix.settings import load

    spool_dir = tmp_path / "spool"
    settings = load({"SPOOL_DIR": str(spool_dir), "LORA_CACHE_DIR": str(tmp_path / "loras"),
                     "COMFY_PORT": str(comfy_double.port), "RESTART_MIN_INTERVAL_S": "0", "RESTART_GRACE_S": "0",
                     "DISK_FREE_FLOOR_GB": "0"})
    spool = Spool(spool_dir).ensure()
    for p in ("runner", "uploader", "consumer"):
        spool.beat(p)
    assert comfy_double.proc is not None
    sup = StubSupervisor(comfy_double.proc.pid)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    try:
        # no driver: CPU mode, said once
        install_fake_nvml(monkeypatch, [], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        assert watchdog.open_nvml() is None
        async with aiohttp.ClientSession() as session:
            client = ComfyClient(comfy_double.url, "test-watchdog", session)
            wd = watchdog.Watchdog(settings, spool, client, sup, None)  # type: ignore[arg-type]
            for _ in range(3):
                await wd.tick()
            assert sum("CPU mode" in line for line in lines) == 1
            assert wd.view.comfy_up and wd.view.comfy_rss and wd.view.ready and not wd.view.nvml_up

            # a fake GPU at 90 %: idle -> /free reaches the double
            cards = install_fake_nvml(monkeypatch, [FakeGpu(used=int(0.9 * (80 << 30)))])
            nvml = watchdog.open_nvml()
            assert nvml is not None
            wd = watchdog.Watchdog(settings, spool, client, sup, nvml)  # type: ignore[arg-type]
            await wd.tick()
            assert fake_stats(comfy_double)["free_calls"] == [{"unload_models": True, "free_memory": True}]
            assert wd.frees == {"gpu_soft_mark": 1} and wd.view.gpus[0].utilization == pytest.approx(0.42)

            # above the hard mark: restarted through supervisord (stop, then start)
            cards[0].used = int(0.99 * (80 << 30))
            await wd.tick()
            assert sup.calls == [("stop", "comfyui"), ("start", "comfyui")]
            assert wd.comfy_restarts == {"gpu_hard_mark": 1}
            state = json.loads((spool.run / "watchdog.state.json").read_bytes())
            assert state["restartPending"] is None and state["comfyRestarts"] == {"gpu_hard_mark": 1}

            # a GPU lost mid-run: logged once, not ready
            cards[0].lost = True
            await wd.tick()
            await wd.tick()
            assert sum("NVML read failed" in line for line in lines) == 1
            assert "gpu" in wd.ready_problems(True)
    finally:
        logger.remove(sink)


async def test_interrupted_restart_is_finished_by_the_next_watchdog(tmp_path: Path, comfy_double: Double) -> None:
    import aiohttp

    from selfix import watchdog
    from selfix.comfy import ComfyClient
    from selfix.settings import load

    settings = load({"SPOOL_DIR": str(tmp_path / "spool"), "LORA_CACHE_DIR": str(tmp_path / "loras"),
                     "COMFY_PORT": str(comfy_double.port)})
    spool = Spool(settings.spool_dir).ensure()
    for p in ("runner", "uploader", "consumer"):
        spool.beat(p)
    assert comfy_double.proc is not None
    sup = StubSupervisor(comfy_double.proc.pid)
    sup.stop("comfyui")  # a watchdog stopped it and was killed before starting it again
    spool.write_run_file("watchdog.state.json", json.dumps(
        {"restartPending": {"reason": "gpu_hard_mark", "at": time.time(), "pid": comfy_double.proc.pid},
         "comfyPid": comfy_double.proc.pid}).encode())
    async with aiohttp.ClientSession() as session:
        wd = watchdog.Watchdog(settings, spool, ComfyClient(comfy_double.url, "t", session), sup,  # type: ignore[arg-type]
                               None)
        await wd.tick()
    assert sup.calls == [("stop", "comfyui"), ("start", "comfyui")] and wd.restart_pending is None
    assert wd.comfy_restarts == {"gpu_hard_mark": 1}, "counted once, not also as 'exited'"
