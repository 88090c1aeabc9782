"""GPU readings: NVML (nvidia-ml-py, `import pynvml`) where a driver is present, ComfyUI's /system_stats otherwise.

Every pynvml call goes through the module attribute at call time (`pynvml.nvmlDeviceGetMemoryInfo(...)`), so tests
replace single functions with monkeypatch and drive every branch without a GPU. A counter or sensor the driver does
not expose (NVML_ERROR_NOT_SUPPORTED, common for ECC on consumer cards and Xid events in containers) reads as None
and its metric is left out, never reported as 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

with warnings.catch_warnings():
    # The deprecated `pynvml` wrapper distribution, when installed beside nvidia-ml-py, warns on import.
    warnings.simplefilter("ignore", FutureWarning)
    try:
        import pynvml
    except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency; keep CPU mode working without it
        pynvml = None


@dataclass(frozen=True)
class GpuReading:
    """One GPU as seen at one tick. `source` is "nvml" or "comfyui" (ComfyUI's own view from /system_stats)."""

    index: int
    name: str
    memory_used: int
    memory_total: int
    source: str
    utilization: float | None = None  # 0..1
    temperature_c: float | None = None
    power_w: float | None = None
    xid_errors: int | None = None  # critical Xid events seen since the watchdog started (None: not supported)
    last_xid: int | None = None
    ecc_corrected: int | None = None  # volatile counters (since the driver loaded)
    ecc_uncorrected: int | None = None

    @property
    def memory_fraction(self) -> float:
        return self.memory_used / self.memory_total if self.memory_total > 0 else 0.0


def nvml_error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _is_nvml_error(exc: BaseException) -> bool:
    return pynvml is not None and isinstance(exc, pynvml.NVMLError)


def _optional(fn: Any, *args: Any) -> Any:
    """Call an NVML getter; None where the driver does not support it (or it fails for this device)."""
    try:
        return fn(*args)
    except Exception as exc:
        if _is_nvml_error(exc):
            return None
        raise


@dataclass
class _Device:
    index: int
    handle: Any
    name: str
    events: Any = None  # an NVML event set registered for critical Xid errors, or None where not supported
    xid_errors: int = 0
    last_xid: int | None = None


@dataclass
class Nvml:
    """An initialised NVML with its devices. `open()` returns None where there is no driver or GPU (CPU mode)."""

    devices: list[_Device] = field(default_factory=list)
    driver: str = ""

    @classmethod
    def open(cls) -> tuple[Nvml | None, str]:
        """(Nvml, description) or (None, why not)."""
        if pynvml is None:
            return None, "nvidia-ml-py is not installed"
        try:
            pynvml.nvmlInit()
        except Exception as exc:
            if _is_nvml_error(exc) or isinstance(exc, OSError):
                return None, f"NVML unavailable ({nvml_error_text(exc)})"
            raise
        try:
            count = int(pynvml.nvmlDeviceGetCount())
            devices = []
            for index in range(count):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = _optional(pynvml.nvmlDeviceGetName, handle) or f"gpu{index}"
                devices.append(_Device(index, handle, name.decode() if isinstance(name, bytes) else str(name)))
            driver = _optional(pynvml.nvmlSystemGetDriverVersion) or ""
        except Exception as exc:
            if not _is_nvml_error(exc):
                raise
            _shutdown()
            return None, f"NVML failed while listing GPUs ({nvml_error_text(exc)})"
        if not devices:
            _shutdown()
            return None, "NVML reports no GPU"
        nvml = cls(devices, driver.decode() if isinstance(driver, bytes) else str(driver))
        for dev in devices:
            dev.events = nvml._register_xid(dev)
        names = ", ".join(f"{d.index}: {d.name}" for d in devices)
        return nvml, f"NVML driver {nvml.driver or '?'}: {names}"

    @staticmethod
    def _register_xid(dev: _Device) -> Any:
        try:
            events = pynvml.nvmlEventSetCreate()
            pynvml.nvmlDeviceRegisterEvents(dev.handle, pynvml.nvmlEventTypeXidCriticalError, events)
            return events
        except Exception as exc:
            if _is_nvml_error(exc):
                return None
            raise

    def _drain_xid(self, dev: _Device) -> None:
        """Count the critical Xid events queued since the last tick (wait 0 ms: never blocks)."""
        if dev.events is None:
            return
        for _ in range(1000):
            try:
                data = pynvml.nvmlEventSetWait_v2(dev.events, 0)
            except Exception as exc:
                if not _is_nvml_error(exc):
                    raise
                if getattr(exc, "value", None) != pynvml.NVML_ERROR_TIMEOUT:
                    dev.events = None  # the event API broke for this device: stop reporting Xid for it
                return
            dev.xid_errors += 1
            dev.last_xid = int(getattr(data, "eventData", 0))

    def read(self) -> list[GpuReading]:
        """Readings of every GPU; raises pynvml.NVMLError when even the memory of a GPU cannot be read (GPU lost)."""
        out = []
        for dev in self.devices:
            mem = pynvml.nvmlDeviceGetMemoryInfo(dev.handle)
            util = _optional(pynvml.nvmlDeviceGetUtilizationRates, dev.handle)
            temp = _optional(pynvml.nvmlDeviceGetTemperature, dev.handle, pynvml.NVML_TEMPERATURE_GPU)
            power_mw = _optional(pynvml.nvmlDeviceGetPowerUsage, dev.handle)
            ecc = [_optional(pynvml.nvmlDeviceGetTotalEccErrors, dev.handle, kind, pynvml.NVML_VOLATILE_ECC)
                   for kind in (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)]
            self._drain_xid(dev)
            out.append(GpuReading(
                index=dev.index, name=dev.name, memory_used=int(mem.used), memory_total=int(mem.total),
                source="nvml",
                utilization=None if util is None else float(util.gpu) / 100.0,
                temperature_c=None if temp is None else float(temp),
                power_w=None if power_mw is None else float(power_mw) / 1000.0,
                xid_errors=dev.xid_errors if dev.events is not None or dev.xid_errors else None,
                last_xid=dev.last_xid,
                ecc_corrected=None if ecc[0] is None else int(ecc[0]),
                ecc_uncorrected=None if ecc[1] is None else int(ecc[1]),
            ))
        return out

    def close(self) -> None:
        for dev in self.devices:
            if dev.events is not None:
                _optional(pynvml.nvmlEventSetFree, dev.events)
                dev.events = None
        _shutdown()


def _shutdown() -> None:
    if pynvml is not None:
        _optional(pynvml.nvmlShutdown)


def comfy_gpus(system_stats: dict[str, Any] | None) -> list[GpuReading]:
    """GPU devices in ComfyUI's /system_stats (`devices[]`). On CPU ComfyUI reports system RAM as a "cpu" device:
    that one is not a GPU, and GPU memory marks never apply to it."""
    out: list[GpuReading] = []
    if not system_stats:
        return out
    for position, dev in enumerate(system_stats.get("devices") or []):
        if not isinstance(dev, dict) or str(dev.get("type", "cpu")).lower() == "cpu":
            continue
        try:
            total, free = int(dev["vram_total"]), int(dev["vram_free"])
        except (KeyError, TypeError, ValueError):
            continue
        index = dev.get("index")
        out.append(GpuReading(index=index if isinstance(index, int) else position, name=str(dev.get("name", "")),
                              memory_used=max(0, total - free), memory_total=total, source="comfyui"))
    return out


def merge(nvml: list[GpuReading], comfy: list[GpuReading]) -> list[GpuReading]:
    """One reading per GPU index: NVML's, with the memory in use raised to ComfyUI's figure where ComfyUI sees more
    (the two views of one GPU; taking the fuller one errs on the side of freeing). GPUs only ComfyUI reports (no
    NVML in this container) are kept as they are."""
    by_index = {g.index: g for g in nvml}
    for g in comfy:
        known = by_index.get(g.index)
        if known is None:
            by_index[g.index] = g
        elif g.memory_total > 0 and g.memory_fraction > known.memory_fraction:
            by_index[g.index] = replace(known, memory_used=round(g.memory_fraction * known.memory_total))
    return [by_index[i] for i in sorted(by_index)]
