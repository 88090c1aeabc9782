"""A faithful test double of a ComfyUI 0.3.64 server: HTTP API, WebSocket events, queue, history, caching.

Command line and process lifecycle: the real main.py's flags (most change nothing here), the Config they make, and
serve(): the slow start, signals, the worker and publisher tasks, the temp folder's cleanup. (The first line above
is the --help description.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile

from aiohttp import web

from selfix.testing.fake_comfyui.core import COMFYUI_VERSION, system_memory
from selfix.testing.fake_comfyui.routes import make_app
from selfix.testing.fake_comfyui.server import Config, FakeComfy

log = logging.getLogger("comfyui")

STARTUP_DELAY_ENV = "FAKE_COMFYUI_STARTUP_DELAY"


def _existing_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"Invalid directory path: {path}")
    return path


def _add_accepted_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the real main.py that the double accepts; most of them change nothing here."""
    for flag in ("--disable-auto-launch", "--auto-launch", "--log-stdout", "--dont-print-server",
                 "--quick-test-for-ci", "--disable-smart-memory", "--deterministic", "--force-fp32", "--fp32-vae",
                 "--multi-user", "--disable-api-nodes", "--disable-xformers", "--windows-standalone-build"):
        parser.add_argument(flag, action="store_true")
    vram = parser.add_mutually_exclusive_group()
    for flag in ("--cpu", "--gpu-only", "--highvram", "--normalvram", "--lowvram", "--novram"):
        vram.add_argument(flag, action="store_true")
    for flag in ("--database-url", "--reserve-vram", "--front-end-root", "--front-end-version", "--tls-keyfile",
                 "--tls-certfile", "--cuda-device", "--default-device"):
        parser.add_argument(flag)
    parser.add_argument("--user-directory", type=_existing_dir)
    parser.add_argument("--whitelist-custom-nodes", nargs="*", default=[])
    parser.add_argument("--fast", nargs="*")
    parser.add_argument("--verbose", nargs="?", const="DEBUG", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fake_comfyui", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--listen", nargs="?", const="0.0.0.0,::", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--output-dir", "--output-directory", dest="output_dir", required=True)
    p.add_argument("--input-dir", "--input-directory", dest="input_dir", required=True)
    p.add_argument("--temp-dir", "--temp-directory", dest="temp_dir", help="the temp files go to <dir>/temp")
    p.add_argument("--models-dir", dest="models_dir", help="holds checkpoints/, loras/, ... (default <base>/models)")
    p.add_argument("--base-directory", dest="base_directory")
    p.add_argument("--extra-model-paths-config", nargs="+", action="append", default=[])
    p.add_argument("--seconds-per-step", type=float, default=0.0)
    p.add_argument("--startup-delay", type=float, default=float(os.environ.get(STARTUP_DELAY_ENV, "0") or 0))
    p.add_argument("--exec-log")
    p.add_argument("--preview-method", default="none", choices=["none", "auto", "latent2rgb", "taesd"])
    p.add_argument("--preview-size", type=int, default=512)
    p.add_argument("--max-upload-size", type=float, default=100)
    p.add_argument("--enable-cors-header", nargs="?", const="*", default=None)
    p.add_argument("--disable-metadata", action="store_true")
    p.add_argument("--disable-all-custom-nodes", action="store_true")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache-classic", action="store_true")
    cache.add_argument("--cache-lru", type=int, default=0)
    cache.add_argument("--cache-none", action="store_true")
    _add_accepted_flags(p)
    return p


def config_from_args(args: argparse.Namespace, argv: list[str]) -> Config:
    base = os.path.abspath(args.base_directory or os.getcwd())
    temp_root = args.temp_dir or tempfile.mkdtemp(prefix="fake_comfyui_")
    return Config(
        port=args.port, listen=args.listen,
        output_dir=os.path.abspath(args.output_dir), input_dir=os.path.abspath(args.input_dir),
        temp_dir=os.path.join(os.path.abspath(temp_root), "temp"),
        models_dir=os.path.abspath(args.models_dir or os.path.join(base, "models")),
        extra_model_paths=[p for group in args.extra_model_paths_config for p in group],
        seconds_per_step=args.seconds_per_step, startup_delay=args.startup_delay, exec_log=args.exec_log,
        preview_method=args.preview_method, preview_size=args.preview_size,
        max_upload_size=round(args.max_upload_size * 1024 * 1024), cors_origin=args.enable_cors_header,
        disable_metadata=args.disable_metadata, custom_nodes=not args.disable_all_custom_nodes,
        cache_none=args.cache_none, argv=["main.py", *argv], temp_root_owned=args.temp_dir is None,
    )


def _log_banner(cfg: Config) -> None:
    ram_total, _ = system_memory()
    log.info("Total VRAM %d MB, total RAM %d MB", ram_total // 2**20, ram_total // 2**20)
    log.info("pytorch version: 2.13.0+cpu")
    log.info("Device: cpu")
    log.info("Python version: %s", sys.version)
    log.info("ComfyUI version: %s (test double)", COMFYUI_VERSION)
    log.info("Setting output directory to: %s", cfg.output_dir)
    log.info("Setting input directory to: %s", cfg.input_dir)
    log.info("Setting temp directory to: %s", cfg.temp_dir)


async def _start_sites(runner: web.AppRunner, cfg: Config) -> None:
    for address in cfg.listen.split(","):
        site = web.TCPSite(runner, address, cfg.port)
        await site.start()
        port = runner.addresses[-1][1] if cfg.port == 0 else cfg.port
        shown = f"[{address}]" if ":" in address else address
        log.info("Starting server\n")
        log.info("To see the GUI go to: http://%s:%s", shown, port)


async def serve(cfg: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _log_banner(cfg)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=cfg.startup_delay)  # mimic the slow start of the real server
    if stop.is_set():
        return
    for directory in (cfg.output_dir, cfg.input_dir):
        os.makedirs(directory, exist_ok=True)
    shutil.rmtree(cfg.temp_dir, ignore_errors=True)  # real: cleanup_temp() at start and exit
    server = FakeComfy(cfg)
    runner = web.AppRunner(make_app(server), access_log=None)
    await runner.setup()
    tasks = [asyncio.create_task(server.worker()), asyncio.create_task(server.publish_loop())]
    try:
        await _start_sites(runner, cfg)
        await stop.wait()
        log.info("Stopped server")
    finally:
        for task in tasks:
            task.cancel()
        await runner.cleanup()
        shutil.rmtree(os.path.dirname(cfg.temp_dir) if cfg.temp_root_owned else cfg.temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=args.verbose, format="%(message)s", force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    asyncio.run(serve(config_from_args(args, argv)))
    return 0
