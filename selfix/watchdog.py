"""The watchdog process: ComfyUI liveness (and, as it grows, GPU health, stuck processes, metrics).

Foundation version: a ticker that checks ComfyUI answers and logs each change of state once.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from loguru import logger

from selfix.process import EXIT_OK, StopFlags, boot
from selfix.settings import Settings
from selfix.spool import Spool


def comfy_alive(settings: Settings, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(settings.comfy_url + "/system_stats", timeout=timeout) as resp:
            json.loads(resp.read())
            return bool(resp.status == 200)
    except (OSError, ValueError, urllib.error.URLError):
        return False


def main() -> int:
    settings = boot("watchdog")
    spool = Spool(settings.spool_dir).ensure()
    flags = StopFlags().install()
    was_up: bool | None = None
    while not flags.stopping.is_set():
        spool.beat("watchdog")
        up = comfy_alive(settings)
        if up != was_up:
            (logger.info if up else logger.warning)("ComfyUI is {}", "up" if up else "not answering")
            was_up = up
        flags.wait(settings.watchdog_interval_s)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
