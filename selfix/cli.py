"""`selfix` command line: up | submit | status | doctor | ctl | consumer | runner | uploader | watchdog | comfyui."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from selfix.settings import EXIT_CONFIG, Settings, SettingsError, load
from selfix.spool import Spool

PROCESSES = ("consumer", "runner", "uploader", "watchdog")


def _settings() -> Settings:
    try:
        return load()
    except SettingsError as exc:
        print(f"selfix: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def default_conf() -> Path:
    repo_conf = Path(__file__).resolve().parent.parent / "conf" / "supervisord.conf"
    return repo_conf if repo_conf.exists() else Path("/app/conf/supervisord.conf")


# --- ComfyUI command -----------------------------------------------------------------------------------

def extra_model_paths(settings: Settings) -> str:
    """ComfyUI's extra_model_paths.yaml: the read-only base models first, then the LoRA cache."""
    models = settings.models_dir
    folders = ("checkpoints", "clip", "clip_vision", "configs", "controlnet", "diffusion_models", "embeddings",
               "loras", "text_encoders", "unet", "upscale_models", "vae")
    lines = ["selfix_models:", f"    base_path: {models}", "    is_default: true"]
    lines += [f"    {name}: {name}/" for name in folders]
    lines += ["selfix_lora_cache:", f"    loras: {settings.lora_cache_dir}", ""]
    return "\n".join(lines)


def comfy_argv(settings: Settings) -> list[str]:
    """The command supervisord runs as `comfyui`. COMFY_COMMAND may use {port}, {host}, {output_dir}, {input_dir},
    {temp_dir}, {models_dir}, {extra_model_paths}, {lora_dir} placeholders."""
    spool = Spool(settings.spool_dir)
    fields = {
        "port": settings.comfy_port, "host": settings.comfy_host, "output_dir": settings.comfy_output_dir,
        "input_dir": settings.comfy_input_dir, "temp_dir": settings.temp_dir, "models_dir": settings.models_dir,
        "extra_model_paths": spool.run / "extra_model_paths.yaml", "lora_dir": settings.lora_cache_dir,
    }
    if settings.comfy_command:
        return [part.format(**fields) for part in shlex.split(settings.comfy_command)]
    if settings.comfyui_dir is None:
        raise SettingsError(
            "no ComfyUI configured: set COMFYUI_DIR to a ComfyUI checkout (the folder with main.py), e.g. "
            "`git clone https://github.com/comfyanonymous/ComfyUI && COMFYUI_DIR=$PWD/ComfyUI ./scripts/run`, "
            "or run scripts/install-comfyui; or set COMFY_COMMAND")
    main_py = settings.comfyui_dir / "main.py"
    if not main_py.exists():
        raise SettingsError(f"COMFYUI_DIR={settings.comfyui_dir}: no main.py there; point it at a ComfyUI checkout")
    return [
        settings.comfy_python, str(main_py), "--listen", "127.0.0.1", "--port", str(settings.comfy_port),
        "--output-directory", str(settings.comfy_output_dir), "--input-directory", str(settings.comfy_input_dir),
        "--temp-directory", str(settings.temp_dir), "--extra-model-paths-config", str(fields["extra_model_paths"]),
        "--disable-auto-launch", "--log-stdout", *shlex.split(settings.comfy_args),
    ]


def cmd_comfyui(_args: argparse.Namespace) -> int:
    settings = _settings()
    try:
        argv = comfy_argv(settings)
    except SettingsError as exc:
        print(f"selfix comfyui: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"selfix comfyui: exec {shlex.join(argv)}", flush=True)
    os.execvp(argv[0], argv)  # exec: supervisord's signals must reach ComfyUI itself


# --- up ------------------------------------------------------------------------------------------------

def prepare_node(settings: Settings) -> Spool:
    """Directories and generated config that the programs expect before supervisord starts them."""
    spool = Spool(settings.spool_dir).ensure()
    for d in (settings.comfy_output_dir, settings.comfy_input_dir, settings.comfy_log_dir, settings.lora_cache_dir,
              settings.temp_dir):
        d.mkdir(parents=True, exist_ok=True)
    if not settings.s3_enabled:
        settings.store_dir.mkdir(parents=True, exist_ok=True)
    spool.write_run_file("extra_model_paths.yaml", extra_model_paths(settings).encode())
    return spool


def _exec_supervisor_tool(tool: str, settings: Settings, args: list[str]) -> NoReturn:
    """exec supervisord/supervisorctl with what conf/supervisord.conf expands (SPOOL_DIR, COMFY_LOG_DIR, resolved
    from the settings) and this Python's scripts first on PATH, so the programs' `selfix ...` commands resolve."""
    env = dict(os.environ, SPOOL_DIR=str(settings.spool_dir), COMFY_LOG_DIR=str(settings.comfy_log_dir))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    argv = [shutil.which(tool, path=env["PATH"]) or tool, *args]
    os.execvpe(argv[0], argv, env)


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings()
    try:
        comfy_argv(settings)
    except SettingsError as exc:
        print(f"selfix up: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    prepare_node(settings)
    print(f"selfix up: supervisord -n -c {args.conf} (spool {settings.spool_dir})", flush=True)
    _exec_supervisor_tool("supervisord", settings, ["-n", "-c", str(args.conf)])


def cmd_ctl(args: argparse.Namespace) -> int:
    _exec_supervisor_tool("supervisorctl", _settings(), ["-c", str(args.conf), *args.rest])


# --- submit --------------------------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    from selfix.intake import accept, limits_of
    from selfix.templates import Catalog

    settings = _settings()
    spool = Spool(settings.spool_dir).ensure()
    catalog, limits = Catalog.load(settings.templates_dir), limits_of(settings)
    worst = 0
    for name in args.files:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        outcome = accept(spool, raw, limits, catalog, source={"file": Path(name).name})
        if outcome.kind == "unaddressable":
            where = spool.quarantine_bytes(raw, Path(name).name, outcome.detail)
            print(f"{name}: rejected, no usable taskId ({outcome.detail}); kept in {where}")
            worst = 2
        elif outcome.kind == "failed":
            print(f"{outcome.task_id}: rejected: {outcome.detail}")
            worst = 2
        elif outcome.kind == "duplicate":
            print(f"{outcome.task_id}: duplicate, {outcome.detail}")
        else:
            print(outcome.task_id)
    return worst


# --- status --------------------------------------------------------------------------------------------

def status_snapshot(settings: Settings) -> dict[str, Any]:
    """What `selfix status` shows, as JSON: spool counts, running jobs with progress, programs, ComfyUI and GPU
    (from the watchdog's run/watchdog.json), heartbeats, recent failures and watchdog actions."""
    from selfix.supervisor import Supervisor, SupervisorError

    spool = Spool(settings.spool_dir)
    now = time.time()
    running = []
    for path in spool.processing_files():
        try:
            job = json.loads(path.read_bytes())
        except (ValueError, OSError):
            continue
        started = job.get("startedAt")
        running.append({"taskId": job.get("taskId"), "state": job.get("state"), "attempt": job.get("attempt"),
                        "progress": job.get("progress"), "startedAt": started,
                        "elapsedS": round(now - started, 1) if isinstance(started, int | float) else None})
    failures = []
    names = os.listdir(spool.done) if spool.done.exists() else []
    mtimes = {}
    for name in names:
        with contextlib.suppress(OSError):
            mtimes[name] = (spool.done / name).stat().st_mtime
    for name in sorted(mtimes, key=lambda n: -mtimes[n])[:200]:
        result = spool.read_done(name[:-5]) if name.endswith(".json") else None
        if result and result.get("status") == "failed":
            error = result.get("error") or {}
            failures.append({"taskId": result["taskId"], "code": error.get("code"),
                             "message": str(error.get("message", ""))[:200], "ageS": round(now - mtimes[name])})
    heartbeats = {p: spool.heartbeat_age(p) for p in PROCESSES}
    try:
        programs: dict[str, str] | None = {
            n: p.state for n, p in Supervisor(settings.supervisor_rpc_url, timeout=2).programs().items()}
    except SupervisorError:
        programs = None
    watchdog: dict[str, Any] | None = None
    with contextlib.suppress(OSError, ValueError):
        watchdog = json.loads((spool.run / "watchdog.json").read_bytes())
        watchdog["ageS"] = round(now - float(watchdog.get("at", 0)), 1)
    return {"counts": spool.counts(), "running": running, "recentFailures": failures[:5], "programs": programs,
            "watchdog": watchdog,
            "heartbeatAgeS": {k: (round(v, 1) if v is not None else None) for k, v in heartbeats.items()}}


def _bar(progress: dict[str, Any] | None, width: int = 30) -> str:
    if not progress or not progress.get("max"):
        return ""
    frac = min(1.0, float(progress.get("value") or 0) / float(progress["max"]))
    return f"[{'#' * int(frac * width):<{width}}] {progress.get('value')}/{progress.get('max')} {frac:4.0%}"


def _gib(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.0f}h"


def _watchdog_lines(wd: dict[str, Any] | None) -> list[str]:
    if wd is None:
        return ["watchdog: no report yet (run/watchdog.json missing)"]
    stale = wd["ageS"] > max(3 * float(wd.get("intervalS", 5)), 15)
    comfy = wd.get("comfyui") or {}
    up = "up" if comfy.get("up") else "NOT ANSWERING"
    lines = [f"comfyui: {up}  pid {comfy.get('pid') or '-'}  rss {_gib(comfy.get('rssBytes'))}  "
             f"queue {comfy.get('running', 0)} running {comfy.get('pending', 0)} pending  "
             f"ready {'yes' if wd.get('ready') else 'NO'}"
             + (f"  (watchdog silent {wd['ageS']:.0f}s)" if stale else "")]
    gpus = wd.get("gpus") or []
    if not gpus:
        lines.append(f"gpu: none seen ({wd.get('mode', 'cpu')} mode)")
    for g in gpus:
        total = g.get("memory_total") or 0
        frac = (g.get("memory_used") or 0) / total if total else 0.0
        bar = "#" * int(frac * 20)
        extra = []
        if g.get("utilization") is not None:
            extra.append(f"util {g['utilization']:.0%}")
        if g.get("temperature_c") is not None:
            extra.append(f"{g['temperature_c']:.0f}C")
        if g.get("power_w") is not None:
            extra.append(f"{g['power_w']:.0f} W")
        if g.get("xid_errors"):
            extra.append(f"XID x{g['xid_errors']} (last {g.get('last_xid')})")
        if g.get("ecc_uncorrected"):
            extra.append(f"ECC uncorrected {g['ecc_uncorrected']}")
        lines.append(f"gpu {g.get('index')} {g.get('name', '')}: [{bar:<20}] {_gib(g.get('memory_used'))} / "
                     f"{_gib(total)} ({frac:.0%}) {' '.join(extra)}  [{g.get('source')}]")
    restarts = {**(wd.get("comfyRestarts") or {})}
    if restarts or wd.get("frees"):
        lines.append("comfyui restarts: " + (", ".join(f"{k} {v}" for k, v in restarts.items()) or "0")
                     + "  frees: " + (", ".join(f"{k} {v}" for k, v in (wd.get("frees") or {}).items()) or "0"))
    for message in wd.get("waiting") or []:
        lines.append(f"pending: {message}")
    now = time.time()
    for ev in (wd.get("events") or [])[:5]:
        lines.append(f"  {_ago(now - float(ev.get('at', now)))} ago: {ev.get('kind')} {ev.get('program')} "
                     f"({ev.get('reason')}) {ev.get('detail', '')}".rstrip())
    return lines


def render_status(snap: dict[str, Any]) -> str:
    counts = snap["counts"]
    programs = snap.get("programs")
    lines = []
    if programs is None:
        lines.append("programs: supervisord not reachable")
    else:
        lines.append("programs: " + "  ".join(f"{k} {v}" for k, v in sorted(programs.items())))
    lines.extend(_watchdog_lines(snap.get("watchdog")))
    lines.append("spool: " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    for job in snap["running"]:
        elapsed = f" {_ago(job.get('elapsedS'))}" if job.get("elapsedS") is not None else ""
        node = (job.get("progress") or {}).get("node")
        where = f" node {node}" if node else ""
        lines.append(f"  {job['state'] or '-':<10} {job['taskId']} attempt {job['attempt']}{elapsed} "
                     f"{_bar(job['progress'])}{where}".rstrip())
    beats = "  ".join(f"{k} {'-' if v is None else f'{v:.0f}s'}" for k, v in snap["heartbeatAgeS"].items())
    lines.append(f"heartbeats: {beats}")
    if snap["recentFailures"]:
        lines.append("recent failures:")
    for fail in snap["recentFailures"]:
        age = f" {_ago(fail.get('ageS'))} ago" if fail.get("ageS") is not None else ""
        message = f": {fail['message']}" if fail.get("message") else ""
        lines.append(f"  {fail['taskId']}: {fail['code']}{age}{message}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings()
    try:
        return _status_loop(settings, args)
    except KeyboardInterrupt:
        return 0


def _status_loop(settings: Settings, args: argparse.Namespace) -> int:
    from selfix.console import fetch_status

    while True:
        # --json prints the watchdog's /api/status (what the web page shows); the spool is read where it is down.
        snap = (fetch_status(settings) if args.json else None) or {"source": "spool", **status_snapshot(settings)}
        if args.json:
            print(json.dumps(snap), flush=True)
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
                print(time.strftime("selfix status  %H:%M:%S  (Ctrl-C to leave)"))
            print(render_status(snap), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


# --- doctor --------------------------------------------------------------------------------------------

Check = tuple[str, bool, str]


def doctor_checks(settings: Settings) -> list[Check]:
    from selfix.watchdog import comfy_alive

    spool = Spool(settings.spool_dir)
    checks: list[Check] = [("spool", spool.ensure().writable(), f"{settings.spool_dir} writable")]
    try:
        checks.append(("comfyui command", True, shlex.join(comfy_argv(settings))))
    except SettingsError as exc:
        checks.append(("comfyui command", False, str(exc)))
    up = comfy_alive(settings)
    checks.append(("comfyui", up, f"{settings.comfy_url} {'answers' if up else 'does not answer'}"))
    checks.append(_gpu_check())
    checks.extend(_store_checks(settings))
    if settings.kafka_enabled:
        from selfix.kafka import check_kafka

        checks.extend(check_kafka(settings))
    return checks


def _gpu_check() -> Check:
    """Informational: no GPU is a valid CPU-mode node (a laptop demo), so it never fails the doctor."""
    from selfix.gpu import Nvml

    nvml, description = Nvml.open()
    if nvml is None:
        return ("gpu", True, f"CPU mode: {description}")
    nvml.close()
    return ("gpu", True, description)


def _store_checks(settings: Settings) -> list[Check]:
    if settings.s3_enabled:
        from selfix.storage import check_s3

        return list(check_s3(settings))
    ok = os.access(settings.store_dir, os.W_OK)
    return [("store", ok, f"local store {settings.store_dir} {'writable' if ok else 'missing or not writable'}")]


def cmd_doctor(_args: argparse.Namespace) -> int:
    settings = _settings()
    print("settings:")
    for name, value in settings.redacted().items():
        print(f"  {name}={value}")
    failed = 0
    for name, ok, message in doctor_checks(settings):
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {message}")
        failed += not ok
    return 1 if failed else 0


# --- settings ------------------------------------------------------------------------------------------

def settings_table() -> str:
    """The README's settings table, generated from SPECS so the docs cannot drift from the code."""
    from selfix.settings import SPECS

    rows = ["| variable | default | what it does |", "|---|---|---|"]
    for spec in SPECS:
        default = f"`{spec.default}`" if spec.default else "(empty)"
        rows.append(f"| `{spec.env}` | {default} | {spec.doc.replace('|', '/')} |")
    return "\n".join(rows)


def cmd_settings(_args: argparse.Namespace) -> int:
    print(settings_table())
    return 0


# --- dispatch ------------------------------------------------------------------------------------------

def _process(name: str) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        module = __import__(f"selfix.{name}", fromlist=["main"])
        return int(module.main())

    return run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfix", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="prepare the node and run supervisord in the foreground")
    up.add_argument("--conf", type=Path, default=default_conf())
    up.set_defaults(func=cmd_up)
    ctl = sub.add_parser("ctl", help="supervisorctl with this node's settings")
    ctl.add_argument("--conf", type=Path, default=default_conf())
    ctl.add_argument("rest", nargs=argparse.REMAINDER)
    ctl.set_defaults(func=cmd_ctl)
    submit = sub.add_parser("submit", help="drop task files into the inbox atomically; prints taskIds")
    submit.add_argument("files", nargs="+", help="JSON task files, or - for stdin")
    submit.set_defaults(func=cmd_submit)
    status = sub.add_parser("status", help="spool counts, the running job and its progress, recent failures")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", type=float, nargs="?", const=1.0, default=0.0, help="refresh every N s")
    status.set_defaults(func=cmd_status)
    sub.add_parser("settings", help="print every setting with its default (Markdown)").set_defaults(
        func=cmd_settings)
    sub.add_parser("doctor", help="check settings, spool, ComfyUI, store, Kafka").set_defaults(func=cmd_doctor)
    sub.add_parser("comfyui", help="exec ComfyUI as configured (supervisord runs this)").set_defaults(
        func=cmd_comfyui)
    for name in PROCESSES:
        sub.add_parser(name, help=f"run the {name} process").set_defaults(func=_process(name))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
