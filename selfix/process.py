"""One lifecycle for every selfix program: boot, stop flags, heartbeat, exit codes, parent death, the spool lock.

Every program (consumer, runner, uploader, watchdog) starts through `run()` or `run_async()`:

- boot: die with the parent (PR_SET_PDEATHSIG, so nothing outlives a SIGKILLed supervisord), settings (a bad value
  exits with EXIT_CONFIG and a line naming the variable), logging, the spool's directories, a shared hold on the
  spool's program lock (so `selfix up` can tell that orphans still work on this spool), stats;
- signals: the handlers only set flags. The first SIGTERM/SIGINT asks to drain, the second to leave at once. The
  transition is logged later, by the heartbeat that each loop calls (loguru is not re-entrant);
- exit: one map from exception to exit code, every code defined here (the README's exit-code table lists them).

`selfix up` holds the spool's node lock for supervisord's lifetime (see `lock_node`), and `selfix comfyui` arms the
same parent-death signal before it execs ComfyUI, plus a guard for ComfyUI's own children (`guard_process_group`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from selfix import log, stats
from selfix.settings import Settings, SettingsError, load
from selfix.spool import Spool

if TYPE_CHECKING:
    from types import FrameType

EXIT_OK = 0
EXIT_ERROR = 1  # anything else: supervisord restarts the program
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: a dependency (Kafka credentials, ...) refused us; retrying won't help
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: try again later (the spool is held by another node, or its disk is full)
EXIT_IN_USE = EXIT_TEMPFAIL  # `selfix up` or a program found the spool held by a live node, its orphans or a twin
EXIT_CONFIG = 78  # EX_CONFIG: a bad setting; supervisord must not hammer-restart a misconfigured program
EXIT_ABORTED = 130  # second SIGTERM/SIGINT: leave now, recovery at the next start picks up the pieces

# (code, name, when): the README's exit-code table lists exactly these (tests/test_lifecycle.py checks it).
EXIT_CODES = (
    (EXIT_OK, "ok", "stopped by SIGTERM/SIGINT after draining"),
    (EXIT_ERROR, "error", "an unexpected error (logged with its traceback); supervisord restarts the program"),
    (EXIT_UNAVAILABLE, "unavailable", "a dependency refuses us for good (e.g. wrong `KAFKA_SASL_*`); FATAL"),
    (EXIT_TEMPFAIL, "tempfail", "try again later: another node or its orphans hold the spool (`selfix up`), another "
                                "instance of the program does, or the spool's disk is full (`selfix submit`)"),
    (EXIT_CONFIG, "config", "a bad setting (the message names the variable); FATAL"),
    (EXIT_ABORTED, "aborted", "a second SIGTERM/SIGINT before the drain finished"),
)

HEARTBEAT_EVERY_S = 1.0  # the heartbeat file's mtime is touched at most this often, however often loops beat
NODE_LOCK = "node.lock"  # in run/: held exclusively by `selfix up`, then by the supervisord it execs
PROGRAMS_LOCK = "programs.lock"  # in run/: held shared by every program (ComfyUI included) while it runs
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Unavailable(Exception):  # noqa: N818 - the name is the exit code's
    """A dependency refuses this program for good; it exits with EXIT_UNAVAILABLE. Not retriable."""

    retriable = False


class SpoolInUse(Exception):  # noqa: N818 - it is a state, not an error of ours
    """Another node or its orphans work on this spool; `selfix up` exits with EXIT_IN_USE."""


def exit_code_for(exc: BaseException) -> int:
    """The one map from an exception that ends a program to its exit code."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_ABORTED
    if isinstance(exc, SettingsError):
        return EXIT_CONFIG
    if isinstance(exc, Unavailable):
        return EXIT_UNAVAILABLE
    if isinstance(exc, SpoolInUse):
        return EXIT_IN_USE
    return EXIT_ERROR


# --- parent death -----------------------------------------------------------------------------------------

def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux PR_SET_PDEATHSIG). It is set in
    the child itself, survives execve of non-setuid binaries (so `selfix comfyui` passes it on to ComfyUI) and is
    cleared in forked children. SIGKILL: a node without supervisord has no logs and no restarts, and every program
    recovers from the spool after kill -9. False where the call is not available (then only the parent watch in
    the heartbeat is left)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def guard_process_group() -> None:
    """Fork a guard that SIGKILLs this process group when this process dies, for whatever reason. Called by
    `selfix comfyui` right before it execs ComfyUI: ComfyUI's own children (helpers, compile workers) are in its
    group but get no parent-death signal of their own. A stop by supervisord (SIGTERM to the group) ends the guard
    quietly, so ComfyUI's own graceful stop is left alone."""
    parent = os.getpid()
    if os.fork() != 0:
        return
    code = 0
    try:
        wanted = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
        signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
        die_with_parent(signal.SIGUSR1)
        if os.getppid() == parent and signal.sigwait(wanted) != signal.SIGUSR1:
            return  # supervisord stops the group: ComfyUI shuts down by itself
        os.killpg(0, signal.SIGKILL)  # the parent is gone: nothing in its group may outlive it (this guard neither)
    except BaseException:  # noqa: BLE001 - a guard must never return into the code of the process it forked from
        code = 1
    finally:
        os._exit(code)


# --- spool locks -------------------------------------------------------------------------------------------

def lock_holders(path: Path) -> list[int]:
    """Pids holding a flock/POSIX lock on `path`, from /proc/locks (Linux); [] where it cannot be read."""
    try:
        st = path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in table.splitlines():
        fields = line.split()
        if "->" in fields:
            continue  # a waiter, not a holder
        if len(fields) >= 6 and fields[5] == dev and fields[4].isdigit():
            pids.append(int(fields[4]))
    return sorted(set(pids))


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def hold_programs_lock(spool: Spool, *, inheritable: bool = False) -> int:
    """Take the shared program lock of this spool for the life of the process (the fd is never closed). Shared:
    the programs of one node hold it together; `selfix up` takes it exclusively for a moment, so it sees orphans of
    a dead node still at work. `inheritable`: ComfyUI keeps it across exec."""
    fd = _open_lock(spool.run / PROGRAMS_LOCK)
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a `selfix up` checks for orphans (a moment)
    os.set_inheritable(fd, inheritable)
    return fd


def hold_program_lock(spool: Spool, process: str) -> int:
    """Take run/<process>.lock exclusively for the life of the process, or raise SpoolInUse naming the pid that
    holds it: one runner, one uploader, one consumer, one watchdog per spool, however they were started (a second
    uploader would publish the same outbox/ twice)."""
    path = spool.run / f"{process}.lock"
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolInUse(f"another {process} works on spool {spool.root}: pid {_show_pids(lock_holders(path))} "
                         f"holds {path}") from None
    return fd


def lock_node(spool: Spool) -> int:
    """`selfix up`: take this spool for one node, or raise SpoolInUse naming who holds it.

    The node lock is exclusive and is held by the returned fd, which is inheritable and meant to survive the exec of
    supervisord (supervisord holds it for its lifetime; it closes fds 3 and up in the programs it starts, so they do
    not hold it). Orphans of a SIGKILLed supervisord do not hold the node lock, but they hold the program lock
    shared: an exclusive try on it tells whether any is alive. They should have died with their supervisord
    (parent-death signal); if some did not, they are named and nothing is started beside them."""
    path = spool.run / NODE_LOCK
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pids = lock_holders(path) or _pid_in(path)
        raise SpoolInUse(f"spool {spool.root} is in use by a running node: supervisord pid "
                         f"{_show_pids(pids)} holds {path}; stop that node first") from None
    programs = _open_lock(spool.run / PROGRAMS_LOCK)
    try:
        fcntl.flock(programs, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pids = lock_holders(spool.run / PROGRAMS_LOCK)
        os.close(programs)
        os.close(fd)
        raise SpoolInUse(f"spool {spool.root}: programs of an earlier node still run without their supervisord: "
                         f"pid {_show_pids(pids)} (they hold {spool.run / PROGRAMS_LOCK}); stop them "
                         f"(kill {' '.join(map(str, pids)) or '<pid>'}) and run selfix up again") from None
    os.close(programs)  # released: the programs of this node take it shared as they start
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # the same pid as the supervisord about to be exec'd
    os.set_inheritable(fd, True)
    return fd


def _pid_in(path: Path) -> list[int]:
    with contextlib.suppress(OSError, ValueError):
        return [int(path.read_text().split()[0])]
    return []


def _show_pids(pids: list[int]) -> str:
    return ", ".join(map(str, pids)) if pids else "(unknown)"


# --- heartbeat and stop flags ------------------------------------------------------------------------------

class Heartbeat:
    """Touches run/heartbeat.<process> at most once per `every` seconds, however often it is called. Also the
    parent watch: a process whose parent changed (supervisord died and the parent-death signal was not delivered)
    kills itself, as the signal would have."""

    def __init__(self, spool: Spool, process: str, every: float = HEARTBEAT_EVERY_S,
                 parent: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.process = process
        self.every = every
        self.parent = parent
        self.clock = clock
        self.last = -every

    def __call__(self) -> None:
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        if self.parent is not None and os.getppid() != self.parent:
            logger.error("parent pid {} is gone (supervisord died?): exiting as the parent-death signal would",
                         self.parent)
            os.kill(os.getpid(), signal.SIGKILL)
        self.spool.beat(self.process)


class StopFlags:
    """Signal handlers only set flags: the first SIGTERM/SIGINT asks to drain (`stopping`), the second to leave at
    once (`abort`). `beat()`, which every loop calls, writes the heartbeat and logs the transitions."""

    def __init__(self, heartbeat: Callable[[], None] | None = None) -> None:
        self.stopping = threading.Event()
        self.abort = threading.Event()
        self.heartbeat = heartbeat
        self.received: list[int] = []  # stop signals in order: appended by the handler (a list append, no lock)
        self._woken = 0  # stop signals the wakeup-fd thread has seen
        self._logged = 0

    @property
    def aborted(self) -> bool:
        """A second stop signal arrived, whichever path (handler or wakeup thread) counted it first."""
        return self.abort.is_set() or len(self.received) >= 2

    def install(self) -> StopFlags:
        """For threaded programs. The handler only appends the signal number; the C-level part of it also writes
        the number to a pipe (set_wakeup_fd), and a thread turns that into the Events. An Event.set() inside the
        handler could deadlock on the lock of the Event.wait() it interrupted; and the thread sets the Events at
        once even while the main thread sits in C code (a Kafka poll), where the handler itself runs later."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._read_signals, args=(r,), name="signals", daemon=True).start()
        return self

    def install_async(self) -> StopFlags:
        """For asyncio programs: loop.add_signal_handler runs on_signal as an ordinary callback of the loop."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.on_signal, int(sig))
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)

    def _read_signals(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            self._woken += sum(1 for signum in data if signum in STOP_SIGNALS)
            self._set(self._woken)

    def on_signal(self, signum: int) -> None:
        """A stop signal, from the event loop (never from inside a signal handler)."""
        self.received.append(signum)
        self._set(len(self.received))

    def _set(self, count: int) -> None:
        if count >= 1:
            self.stopping.set()
        if count >= 2:
            self.abort.set()

    def beat(self) -> None:
        """Called by every loop: the debounced heartbeat, and a log line for each stop signal since the last."""
        while self._logged < len(self.received):
            signum = self.received[self._logged]
            self._logged += 1
            logger.info("signal {}: {}", signal.Signals(signum).name,
                        "draining" if self._logged == 1 else "aborting")
        if self.heartbeat is not None:
            self.heartbeat()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early on a stop request; True when stopping."""
        return self.stopping.wait(seconds)


# --- boot and run -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Program:
    """What a booted program gets: its settings, the spool (directories ensured) and its stop flags."""

    name: str
    settings: Settings
    spool: Spool
    flags: StopFlags


def load_settings(process: str) -> Settings:
    """Settings, or exit with EXIT_CONFIG and a message naming the variable (before logging is set up)."""
    try:
        return load()
    except SettingsError as exc:
        print(f"selfix {process}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG) from None


def boot(process: str) -> Settings:
    """Settings and logging only (for commands that are not long-running programs)."""
    settings = load_settings(process)
    log.setup(process, settings)
    return settings


def start(process: str) -> Program:
    """Boot a long-running program; its stop flags are installed by run()/run_async()."""
    armed = die_with_parent()
    parent = os.getppid()
    settings = boot(process)
    spool = Spool(settings.spool_dir).ensure()
    hold_programs_lock(spool)
    hold_program_lock(spool, process)
    stats.configure(spool, process)
    if not armed:
        logger.warning("no parent-death signal on this platform; watching the parent pid {} instead", parent)
    return Program(process, settings, spool, StopFlags(Heartbeat(spool, process, parent=parent)))


def _finish(program: Program, code: int) -> int:
    if code == EXIT_OK and program.flags.aborted:
        code = EXIT_ABORTED  # the same for every program: a second signal is an abort, whatever the loop said
    program.flags.beat()  # logs a signal that came in after the loop's last beat
    logger.info("{} exits with {}", program.name, code)
    return code


def _failed(name: str, exc: BaseException) -> int:
    code = exit_code_for(exc)
    if code == EXIT_ERROR:
        logger.opt(exception=exc).error("{} failed", name)
    elif not isinstance(exc, SystemExit):
        logger.error("{}: {}; exiting with {}", name, exc, code)
    return code


def run(process: str, body: Callable[[Program], int]) -> int:
    """Boot `process`, install the stop flags, run `body` and map how it ended to the exit code."""
    try:
        program = start(process)
    except Exception as exc:  # noqa: BLE001 - e.g. SpoolInUse: the same map of exceptions to exit codes
        return _failed(process, exc)
    program.flags.install()
    try:
        code = body(program)
    except BaseException as exc:  # noqa: BLE001 - the one place an exception becomes an exit code
        return _failed(program.name, exc)
    return _finish(program, code)


def run_async(process: str, body: Callable[[Program], Awaitable[int]]) -> int:
    """run() for asyncio programs: the stop flags are set from the loop (add_signal_handler)."""
    try:
        program = start(process)
    except Exception as exc:  # noqa: BLE001 - e.g. SpoolInUse: the same map of exceptions to exit codes
        return _failed(process, exc)

    async def main() -> int:
        program.flags.install_async()
        return await body(program)

    try:
        code = asyncio.run(main())
    except BaseException as exc:  # noqa: BLE001 - the one place an exception becomes an exit code
        return _failed(program.name, exc)
    return _finish(program, code)
