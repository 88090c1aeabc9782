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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from selfix import process
from selfix.job import JobState
from selfix.process import EXIT_CONFIG, EXIT_IN_USE, EXIT_TEMPFAIL, SpoolInUse
from selfix.settings import (
    CONTAINER_HOME,
    SPECS,
    Settings,
    SettingsError,
    default_of,
    implicit_home_paths,
    known_variables,
    load,
)
from selfix.spool import Spool

PROCESSES = ("consumer", "runner", "uploader", "watchdog")
NODE_RECORD = "node.json"  # run/node.json: the variables `selfix up` was started with, secrets masked
MASK = "***"
LOCATORS = ("SPOOL_DIR", "SELFIX_HOME")  # the variables that say which node a command acts on
SECRETS = frozenset(spec.env for spec in SPECS if spec.secret)


def _settings() -> Settings:
    try:
        return load()
    except SettingsError as exc:
        print(f"selfix: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _node_settings(command: str, only: frozenset[str] | None = None) -> Settings:
    """Settings of a command that IS the node (up, comfyui, a program). Outside the container, a node started
    without SELFIX_HOME would create /app/...: refuse and name the variable instead. A program checks `only` its
    spool: under `selfix up` it inherits settings that up has checked whole."""
    settings = _settings()
    implicit = [name for name in implicit_home_paths(os.environ) if only is None or name in only]
    if implicit and not (settings.selfix_home / "spool").is_dir():
        print(f"selfix {command}: SELFIX_HOME is not set and {settings.selfix_home} holds no node here (it is the "
              f"container's home), so {', '.join(implicit)} would be created under it.\n"
              "  Set SELFIX_HOME to the node's directory (./scripts/run sets the checkout's var/), "
              "or set each of those variables.", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    return settings


# --- which node: the commands run beside a node (submit, status, doctor, ctl, settings) -----------------

def find_checkout(start: Path) -> Path | None:
    """The selfix checkout `start` lies in (scripts/run beside the package), found the way git finds .git."""
    for d in (start, *start.parents):
        if (d / "scripts" / "run").is_file() and (d / "selfix" / "settings.py").is_file():
            return d
    return None


def node_record(environ: Mapping[str, str], now: float | None = None) -> bytes:
    """run/node.json as `selfix up` writes it: the selfix variables the node runs with, secrets masked."""
    env = {k: (MASK if k in SECRETS and v else v) for k, v in sorted(environ.items()) if k in known_variables()}
    started = time.time() if now is None else now
    return json.dumps({"pid": os.getpid(), "startedAt": started, "env": env}, indent=1).encode()


@dataclass(frozen=True)
class NodeView:
    """The node a command run beside it acts on: its settings (from its run/node.json where it has one), how its
    spool was found, and what this shell sets that the node does not run with."""

    settings: Settings
    found_by: str
    record: dict[str, Any] | None
    ignored: dict[str, str]
    given: frozenset[str]  # the variables set (by the node's record, or this shell), not left to their default
    missing_secrets: tuple[str, ...] = ()  # set on the node, masked in its record, and not set in this shell

    @property
    def spool(self) -> Spool:
        return Spool(self.settings.spool_dir)

    @property
    def exists(self) -> bool:
        return (self.settings.spool_dir / "inbox").is_dir()

    @property
    def running(self) -> bool | None:
        """Whether the process that wrote the record (`selfix up`, then supervisord: one pid) is alive."""
        pid = (self.record or {}).get("pid")
        return _alive(pid) if isinstance(pid, int) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


def locate(environ: Mapping[str, str], cwd: Path, spool_flag: Path | None) -> tuple[dict[str, str], str]:
    """This shell's selfix variables plus where the node is: --spool, SPOOL_DIR, SELFIX_HOME, the checkout's
    var/ (./scripts/run's home) when run inside a checkout, else the container's /app."""
    env = {k: v for k, v in environ.items() if k in known_variables()}
    if spool_flag is not None:
        env["SPOOL_DIR"] = str(spool_flag.resolve())
        return env, "from --spool"
    if "SPOOL_DIR" in env:
        return env, "from SPOOL_DIR"
    if "SELFIX_HOME" in env:
        return env, "from SELFIX_HOME"
    checkout = find_checkout(cwd)
    if checkout is not None:
        env["SELFIX_HOME"] = str(checkout / "var")
        return env, "the checkout's var/, SELFIX_HOME not set"
    return env, f"SELFIX_HOME not set: the container's {CONTAINER_HOME}"


def merge_record(shell: dict[str, str], node: Mapping[str, str], spool_dir: Path) -> tuple[dict[str, str],
                                                                                           dict[str, str], list[str]]:
    """The node's variables win (the command acts on the running node); secrets, which the record masks, come
    from this shell. Returns (environment to load, this shell's values the node does not use, secrets missing)."""
    env = {k: v for k, v in node.items() if k in known_variables() and v != MASK}
    missing = []
    for name in sorted(SECRETS):
        if node.get(name) == MASK:
            if name in shell:
                env[name] = shell[name]
            else:
                missing.append(name)
    env["SPOOL_DIR"] = str(spool_dir)
    home = env.get("SELFIX_HOME", CONTAINER_HOME)
    specs = {spec.env: spec for spec in SPECS}
    ignored = {k: v for k, v in shell.items()
               if k not in LOCATORS and k not in SECRETS and env.get(k, default_of(specs[k], home)) != v}
    return env, ignored, missing


def read_record(spool_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((spool_dir / "run" / NODE_RECORD).read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("env"), dict) else None


def view_node(spool_flag: Path | None = None, environ: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> NodeView:
    """The node this command acts on; a bad setting exits 78 with the variable named, never a traceback."""
    shell, found_by = locate(os.environ if environ is None else environ, cwd or Path.cwd(), spool_flag)
    try:
        spool_dir = load(shell).spool_dir
        record = read_record(spool_dir)
        if record is None:
            return NodeView(load(shell), found_by, None, {}, frozenset(shell))
        env, ignored, missing = merge_record(shell, record["env"], spool_dir)
        # submit, status and ctl need no secret; a stand-in keeps the cross-checks of load() content, and doctor
        # says that its Kafka/S3 checks could not use the real one.
        env.update({name: MASK for name in missing})
        return NodeView(load(env), found_by, record, ignored, frozenset(record["env"]), tuple(missing))
    except SettingsError as exc:
        print(f"selfix: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def missing_spool_message(view: NodeView, command: str) -> str:
    return (f"selfix {command}: no node spool at {view.settings.spool_dir} ({view.found_by}).\n"
            "  Start a node first (./scripts/run in a checkout; the container starts its own), or name the node's "
            "spool: --spool DIR, SPOOL_DIR=DIR, or SELFIX_HOME=DIR (whose spool is DIR/spool).")


def require_spool(view: NodeView, command: str) -> None:
    """A command never creates a spool: without one there is no node to act on, so say what to set."""
    if not view.exists:
        print(missing_spool_message(view, command), file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)


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
            "or run scripts/install-comfyui; or set COMFY_COMMAND (`./scripts/run --double` starts the test double)")
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
    """supervisord's `comfyui` program. It execs ComfyUI (supervisord's signals must reach ComfyUI itself) after the
    lifecycle's parent-death signal is armed (it survives the exec), the spool's program lock is held across the
    exec, and a guard watches for ComfyUI's own children."""
    process.die_with_parent()
    settings = _node_settings("comfyui")
    try:
        argv = comfy_argv(settings)
    except SettingsError as exc:
        print(f"selfix comfyui: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    process.hold_programs_lock(Spool(settings.spool_dir).ensure(), inheritable=True)
    print(f"selfix comfyui: exec {shlex.join(argv)}", flush=True)
    process.guard_process_group()
    os.execvp(argv[0], argv)


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
    spool.write_run_file(NODE_RECORD, node_record(os.environ))  # what `selfix status/doctor/...` beside it read
    return spool


def _exec_supervisor_tool(tool: str, settings: Settings, args: list[str]) -> NoReturn:
    """exec supervisord/supervisorctl with what conf/supervisord.conf expands (SPOOL_DIR, COMFY_LOG_DIR, resolved
    from the settings) and this Python's scripts first on PATH, so the programs' `selfix ...` commands resolve."""
    env = dict(os.environ, SPOOL_DIR=str(settings.spool_dir), COMFY_LOG_DIR=str(settings.comfy_log_dir))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    argv = [shutil.which(tool, path=env["PATH"]) or tool, *args]
    os.execvpe(argv[0], argv, env)


def cmd_up(args: argparse.Namespace) -> int:
    settings = _node_settings("up")
    try:
        comfy_argv(settings)
    except SettingsError as exc:
        print(f"selfix up: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    spool = Spool(settings.spool_dir).ensure()
    try:
        lock = process.lock_node(spool)  # two sets of programs never work on one spool
    except SpoolInUse as exc:
        print(f"selfix up: {exc}", file=sys.stderr)
        return EXIT_IN_USE
    spool.clean_tmp(0)  # no program runs on this spool now (we hold both locks): what tmp/ holds is a dead writer's
    if lock > 4:  # supervisord closes fds 5 and up when it reloads (supervisorctl reload); keep the lock below
        os.dup2(lock, 3)  # inheritable; what was on 3 is not (Python's default), so the exec would close it anyway
        os.close(lock)
    prepare_node(settings)
    print(f"selfix up: supervisord -n -c {args.conf} (spool {settings.spool_dir})", flush=True)
    _exec_supervisor_tool("supervisord", settings, ["-n", "-c", str(args.conf)])


def cmd_ctl(args: argparse.Namespace) -> int:
    view = view_node(args.spool)
    require_spool(view, "ctl")
    _exec_supervisor_tool("supervisorctl", view.settings, ["-c", str(args.conf), *args.rest])


# --- submit --------------------------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    from loguru import logger

    from selfix.admission import accept, limits_of
    from selfix.files import is_disk_full
    from selfix.templates import Catalog

    logger.remove()  # admission's log lines say what this command prints anyway; keep only real errors
    logger.add(sys.stderr, level="ERROR", format="selfix submit: {message}")
    view = view_node(args.spool)
    require_spool(view, "submit")
    settings, spool = view.settings, view.spool
    catalog, limits = Catalog.load(settings.templates_dir), limits_of(settings)
    worst = 0
    waiting: list[str] = []
    for name in args.files:
        try:
            raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        except OSError as exc:
            print(f"{name}: cannot read: {exc.strerror or exc}", file=sys.stderr)
            worst = 2
            continue
        try:
            outcome = accept(spool, raw, limits, catalog, source={"file": Path(name).name})
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            print(f"{name}: not submitted, the spool's disk is full ({exc.strerror}); nothing was written, "
                  f"try again when there is room", file=sys.stderr)
            return EXIT_TEMPFAIL
        if outcome.kind == "unaddressable":
            where = spool.quarantine_bytes(raw, Path(name).name, outcome.detail)
            print(f"{name}: rejected, no usable taskId ({outcome.detail}); kept in {where}")
            worst = 2
        elif outcome.kind == "failed":
            print(f"{outcome.task_id}: rejected: {outcome.detail}")
            worst = 2
        elif outcome.kind == "duplicate":
            print(f"{outcome.task_id}: duplicate, {outcome.detail}")
            waiting.append(str(outcome.task_id))
        else:
            print(outcome.task_id, flush=True)
            waiting.append(str(outcome.task_id))
    if args.wait and waiting:
        try:
            worst = max(worst, wait_for_results(settings, waiting, args.timeout))
        except KeyboardInterrupt:
            print("\nstopped waiting; the node goes on with the task (`selfix status` shows it)", file=sys.stderr)
            return 130
    return worst


def progress_line(spool: Spool, task_id: str) -> str:
    """One line on where a task is: queued, running in ComfyUI with its progress bar, or being published."""
    state = spool.state_of(task_id)
    if state == "processing":
        job = spool.processing_job(task_id)
        if job is None:
            return f"{task_id}: running"
        bar = _bar(job.progress.to_dict() if job.progress else None)
        doing = "running" if bar else ("preparing (LoRAs, input images)" if job.state == JobState.CLAIMED
                                       else "in ComfyUI")
        return f"{task_id}: {doing} {bar}".rstrip()
    if state == "outbox":
        return f"{task_id}: publishing the result"
    return f"{task_id}: {'queued in inbox/' if state == 'inbox' else state or 'unknown'}"


def image_locations(settings: Settings, result: dict[str, Any]) -> list[str]:
    """Where a result's images are: files of the local store, or s3:// URLs of the bucket."""
    keys = [k for k in result.get("imagePaths") or [] if isinstance(k, str)]
    if settings.s3_enabled:
        return [f"s3://{settings.s3_bucket}/{key}" for key in keys]
    return [str(settings.store_dir / key) for key in keys]


def other_outputs(settings: Settings, result: dict[str, Any]) -> list[tuple[str, str]]:
    """(kind, where) of a result's stored outputs that are not still images: videos, animations, audio, ..."""
    found = []
    for entry in result.get("outputs") or []:
        key = entry.get("objectKey") if isinstance(entry, dict) else None
        if isinstance(key, str) and entry.get("kind") != "image":
            where = f"s3://{settings.s3_bucket}/{key}" if settings.s3_enabled else str(settings.store_dir / key)
            found.append((str(entry.get("kind")), where))
    return found


def wait_for_results(settings: Settings, task_ids: list[str], timeout: float, out: TextIO | None = None,
                     poll_s: float = 0.2) -> int:
    """Follow the tasks until their results are published (done/): progress on one line (redrawn on a terminal,
    one line per change otherwise), then each result and its images. 0 all completed, 1 one failed, 3 timed out."""
    stream = out or sys.stdout
    tty = stream.isatty()
    spool = Spool(settings.spool_dir)
    deadline = time.monotonic() + timeout if timeout > 0 else None
    pending, shown, code, warned = list(task_ids), "", 0, False
    while pending:
        result = spool.read_done(pending[0])
        if result is not None:
            if tty and shown:
                stream.write("\r\033[K")
            shown = ""
            code = max(code, _print_result(settings, result, stream))
            pending.pop(0)
            continue
        line = progress_line(spool, pending[0])
        if line != shown:
            stream.write(f"\r\033[K{line}" if tty else f"{line}\n")
            stream.flush()
            shown = line
        age = spool.heartbeat_age("runner")
        if not warned and (age is None or age > settings.heartbeat_stale_s):
            print(f"selfix submit: no runner is working on {settings.spool_dir} (no recent heartbeat); the task "
                  "waits in inbox/ until the node runs (./scripts/run). Ctrl-C stops waiting.", file=sys.stderr)
            warned = True
        if deadline is not None and time.monotonic() > deadline:
            print(f"\nselfix submit: no result after {timeout:g}s for {', '.join(pending)}; the node goes on "
                  "with them (`selfix status`)", file=sys.stderr)
            return 3
        time.sleep(poll_s)
    return code


def _print_result(settings: Settings, result: dict[str, Any], stream: TextIO) -> int:
    stream.write(json.dumps(result, indent=2) + "\n")
    for where in image_locations(settings, result):
        stream.write(f"image: {where}\n")
    for kind, where in other_outputs(settings, result):
        stream.write(f"{kind}: {where}\n")
    if result.get("status") != "completed":
        error = result.get("error") or {}
        stream.write(f"{result.get('taskId')}: failed: {error.get('code')}: {error.get('message', '')}\n")
        stream.flush()
        return 1
    stream.flush()
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Offline cancel: a tombstone per taskId in the spool; the runner applies it (selfix/control.py)."""
    from selfix.control import request_cancel
    from selfix.spool import valid_task_id

    spool = Spool(_settings().spool_dir).ensure()
    worst = 0
    for task_id in args.task_ids:
        if not valid_task_id(task_id):
            print(f"{task_id[:80]!r}: not a taskId ([A-Za-z0-9._-]{{1,128}})")
            worst = 2
            continue
        state = spool.state_of(task_id) or "not on this node (remembered for CANCEL_RETENTION_H)"
        fresh = request_cancel(spool, task_id, args.user_id, "cli")
        print(f"{task_id}: {'cancel requested' if fresh else 'already requested'}; now {state}")
    return worst


# --- status --------------------------------------------------------------------------------------------

def status_snapshot(settings: Settings) -> dict[str, Any]:
    """What `selfix status` shows, as JSON: spool counts, running jobs with progress, programs, ComfyUI and GPU
    (from the watchdog's run/watchdog.json), heartbeats, recent failures and watchdog actions."""
    from selfix.supervisor import Supervisor, SupervisorError

    spool = Spool(settings.spool_dir)
    now = time.time()
    running = []
    for job in spool.processing_jobs():
        started = job.started_at
        running.append({"taskId": job.task_id, "state": job.state and job.state.value, "attempt": job.attempt,
                        "progress": job.progress and job.progress.to_dict(), "startedAt": started,
                        "elapsedS": round(now - started, 1) if started is not None else None})
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
    unresolved = spool.unresolved(settings.unresolved_after_s, now)
    return {"counts": spool.counts(), "running": running, "recentFailures": failures[:5], "programs": programs,
            "unresolved": {"count": len(unresolved), "afterS": settings.unresolved_after_s,
                           "oldest": [{"taskId": t, "ageS": round(age)} for t, age in unresolved[:5]]},
            "watchdog": watchdog, "cancelRequests": _cancel_requests(spool),
            "heartbeatAgeS": {k: (round(v, 1) if v is not None else None) for k, v in heartbeats.items()}}


def _cancel_requests(spool: Spool) -> dict[str, int]:
    """Tombstones kept in cancel/: still waiting for their task (pending) or applied (handled)."""
    pending = handled = 0
    for task_id in spool.cancel_ids():
        record = spool.read_cancel(task_id) or {}
        handled += bool(record.get("handled"))
        pending += not record.get("handled")
    return {"pending": pending, "handled": handled}


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
    unresolved = snap.get("unresolved") or {}
    if unresolved.get("count"):
        oldest = ", ".join(f"{u['taskId']} ({_ago(u['ageS'])})" for u in unresolved["oldest"])
        lines.append(f"UNRESOLVED: {unresolved['count']} task(s) accepted over {_ago(unresolved['afterS'])} ago "
                     f"without a result: {oldest}")
    else:
        lines.append(f"unresolved: 0 (no task older than {_ago(unresolved.get('afterS'))} without a result)")
    for row in snap["running"]:
        elapsed = f" {_ago(row.get('elapsedS'))}" if row.get("elapsedS") is not None else ""
        node = (row.get("progress") or {}).get("node")
        where = f" node {node}" if node else ""
        lines.append(f"  {row['state'] or '-':<10} {row['taskId']} attempt {row['attempt']}{elapsed} "
                     f"{_bar(row['progress'])}{where}".rstrip())
    cancels = snap.get("cancelRequests")
    if cancels and (cancels["pending"] or cancels["handled"]):
        lines.append(f"cancel requests: {cancels['pending']} waiting for their task, {cancels['handled']} applied")
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
    view = view_node(args.spool)
    try:
        if args.wait_ready:
            return wait_ready(view.settings, args.wait_ready, args.while_pid)
        require_spool(view, "status")
        return _status_loop(view.settings, args, describe_node(view))
    except KeyboardInterrupt:
        return 0


def readiness(settings: Settings) -> tuple[bool, str]:
    """The watchdog's /readyz: (True, "") when the node takes work (ComfyUI answers, the spool is writable, disk
    and GPU are fine), else (False, what fails)."""
    import urllib.error
    import urllib.request

    host = "127.0.0.1" if settings.metrics_host in ("", "0.0.0.0", "::") else settings.metrics_host
    url = f"http://{host}:{settings.metrics_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status) == 200, ""
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError, OSError):
            return False, "failing: " + ", ".join(map(str, json.loads(exc.read()).get("failing") or ["?"]))
        return False, f"{url} answers {exc.code}"
    except OSError:
        return False, f"the watchdog does not answer on {url}"


def wait_ready(settings: Settings, timeout: float, while_pid: int | None = None) -> int:
    """`status --wait-ready S`: 0 once the node takes work; 1 after S seconds (saying what fails), or once
    `while_pid` is gone (./scripts/run passes its own pid, so the wait ends with the node)."""
    deadline = time.monotonic() + timeout
    detail = ""
    while time.monotonic() < deadline:
        ready, detail = readiness(settings)
        if ready:
            return 0
        if while_pid is not None and not _alive(while_pid):
            return 1
        time.sleep(0.5)
    print(f"selfix status: the node on {settings.spool_dir} is not ready after {timeout:g}s ({detail})",
          file=sys.stderr)
    return 1


def _status_loop(settings: Settings, args: argparse.Namespace, header: str = "") -> int:
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
            if header:
                print(header)
            print(render_status(snap), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


# --- doctor --------------------------------------------------------------------------------------------

Check = tuple[str, bool, str]


def doctor_checks(settings: Settings) -> list[Check]:
    from selfix.watchdog import comfy_alive

    spool = Spool(settings.spool_dir)
    if (settings.spool_dir / "inbox").is_dir():
        writable = spool.writable()
        checks: list[Check] = [("spool", writable, f"{settings.spool_dir} {'' if writable else 'NOT '}writable")]
    else:
        checks = [("spool", False, f"{settings.spool_dir} does not exist: no node has run there (start one with "
                   "./scripts/run, or name its spool with --spool DIR, SPOOL_DIR or SELFIX_HOME)")]
    try:
        argv = comfy_argv(settings)
        checks.append(("comfyui command", True, shlex.join(argv)))
        if settings.console_previews:
            checks.append(_previews_check(argv))
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


def preview_method(argv: list[str]) -> str:
    """ComfyUI's --preview-method in its command line; `none`, ComfyUI's default, where it is not given."""
    for i, arg in enumerate(argv):
        if arg == "--preview-method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--preview-method="):
            return arg.partition("=")[2]
    return "none"


def _previews_check(argv: list[str]) -> Check:
    """Informational: CONSOLE_PREVIEWS shows nothing unless ComfyUI makes previews."""
    method = preview_method(argv)
    hint = ": ComfyUI sends none (add --preview-method latent2rgb to COMFY_ARGS)" if method == "none" else ""
    return ("console previews", True, f"on, ComfyUI's --preview-method is {method}{hint}")


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


def describe_node(view: NodeView) -> str:
    """Which node a command acts on, and whether it is running: the first line of doctor and settings."""
    spool = view.settings.spool_dir
    if view.record is None:
        how = "no run/node.json there (no node has started on it), so the settings are this shell's"
        return f"node: spool {spool} ({view.found_by}); {how}"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(view.record.get("startedAt") or 0)))
    state = {True: "running", False: "not running", None: "state unknown"}[view.running]
    return (f"node: spool {spool} ({view.found_by}); started {started} as pid {view.record.get('pid')}, "
            f"{state}; settings from its run/{NODE_RECORD}")


def _ignored_lines(view: NodeView) -> list[str]:
    lines = [f"note: this shell sets {k}={v}, which the node does not run with; shown: the node's"
             for k, v in sorted(view.ignored.items())]
    lines += [f"note: the node runs with {name} set, which its run/{NODE_RECORD} masks and this shell does not "
              "set: export it here for the checks that log in" for name in view.missing_secrets]
    return lines


def cmd_doctor(args: argparse.Namespace) -> int:
    view = view_node(args.spool)
    settings = view.settings
    print(describe_node(view))
    for line in _ignored_lines(view):
        print(line)
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


def cmd_settings(args: argparse.Namespace) -> int:
    """Every setting of the node this command finds, and where its value comes from; --markdown: the README table."""
    if args.markdown:
        print(settings_table())
        return 0
    view = view_node(args.spool)
    print(describe_node(view))
    if not view.exists:
        print(missing_spool_message(view, "settings"), file=sys.stderr)
    for line in _ignored_lines(view):
        print(line)
    origin = "the node's" if view.record else "set"
    for name, value in view.settings.redacted().items():
        print(f"{name}={value}  ({origin if name in view.given else 'default'})")
    return 0


# --- dispatch ------------------------------------------------------------------------------------------

def _process(name: str) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        _node_settings(name, only=frozenset({"SPOOL_DIR"}))
        module = __import__(f"selfix.{name}", fromlist=["main"])
        return int(module.main())

    return run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfix", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="prepare the node and run supervisord in the foreground")
    up.add_argument("--conf", type=Path, default=default_conf())
    up.set_defaults(func=cmd_up)
    spool_help = ("the node's spool (default: SPOOL_DIR, else $SELFIX_HOME/spool, else the checkout's var/spool "
                  "when run inside a checkout, else /app/spool)")
    ctl = sub.add_parser("ctl", help="supervisorctl with this node's settings")
    ctl.add_argument("--conf", type=Path, default=default_conf())
    ctl.add_argument("--spool", type=Path, help=spool_help)
    ctl.add_argument("rest", nargs=argparse.REMAINDER)
    ctl.set_defaults(func=cmd_ctl)
    submit = sub.add_parser("submit", help="drop task files into the inbox atomically; prints taskIds")
    submit.add_argument("files", nargs="+", help="JSON task files, or - for stdin")
    submit.add_argument("--wait", action="store_true",
                        help="wait for each result: progress while ComfyUI runs it, then the result and its images; "
                             "exit 1 when one failed")
    submit.add_argument("--timeout", type=float, default=0.0, help="with --wait: give up after S seconds (exit 3)")
    submit.add_argument("--spool", type=Path, help=spool_help)
    submit.set_defaults(func=cmd_submit)
    cancel = sub.add_parser("cancel", help="cancel tasks by taskId (queued, running, or not arrived yet)")
    cancel.add_argument("task_ids", nargs="+", metavar="TASKID")
    cancel.add_argument("--user-id", help="only if the task is this user's (default: any, as the operator)")
    cancel.set_defaults(func=cmd_cancel)
    status = sub.add_parser("status", help="spool counts, the running job and its progress, recent failures")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", type=float, nargs="?", const=1.0, default=0.0, help="refresh every N s")
    status.add_argument("--wait-ready", type=float, default=0.0, metavar="S",
                        help="wait up to S seconds until the node can take work (/readyz), exit 0 or 1")
    status.add_argument("--while-pid", type=int, help=argparse.SUPPRESS)
    status.add_argument("--spool", type=Path, help=spool_help)
    status.set_defaults(func=cmd_status)
    settings = sub.add_parser("settings", help="every setting of this node and where its value comes from")
    settings.add_argument("--markdown", action="store_true", help="the README's table of every setting and default")
    settings.add_argument("--spool", type=Path, help=spool_help)
    settings.set_defaults(func=cmd_settings)
    doctor = sub.add_parser("doctor", help="check this node's settings, spool, ComfyUI, store, Kafka")
    doctor.add_argument("--spool", type=Path, help=spool_help)
    doctor.set_defaults(func=cmd_doctor)
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
