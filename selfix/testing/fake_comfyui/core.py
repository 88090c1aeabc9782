"""What every part of the double shares: the ComfyUI version it mimics, the INPUT_TYPES and preview shapes, and
small helpers that mirror real ComfyUI functions (full_type_name, is_link, the API's error dicts, psutil's memory)."""

from __future__ import annotations

import os
from typing import Any

from PIL import Image

COMFYUI_VERSION = "0.3.64"

InputTypes = dict[str, dict[str, Any]]
Preview = tuple[str, Image.Image, int | None]  # (PNG|JPEG, image, max size) like comfy's preview tuples


def full_type_name(klass: type) -> str:
    # real: execution.full_type_name
    module = klass.__module__
    return klass.__qualname__ if module == "builtins" else f"{module}.{klass.__qualname__}"


def is_link(value: Any) -> bool:
    # real: comfy_execution.graph_utils.is_link
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], (int, float))
    )


def api_error(kind: str, message: str, details: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def system_memory() -> tuple[int, int]:
    """(total, available) bytes, like psutil.virtual_memory() which the real server uses."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if len(line.split()) >= 2}
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return total, total
