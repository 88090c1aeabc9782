"""The watchdog's decisions as pure functions: (readings of one tick, state) -> (new state, actions).

Nothing here does I/O or reads a clock: `Readings.now` is the tick's wall-clock time (heartbeat mtimes and
supervisord start times are wall-clock too). The watchdog process gathers the readings, calls `decide`, carries out
the actions and reports each outcome back through `after_free` / `after_restart`.

ComfyUI
- unresponsive: supervisord says RUNNING but /system_stats has not answered for COMFY_UNRESPONSIVE_S (counted from
  the later of the first failed probe and the process's start; COMFY_STARTUP_GRACE_S more for a process that has
  not answered once yet, as ComfyUI loads its custom nodes before it listens) -> restart now; the watchdog carries
  this one out as a SIGKILL of ComfyUI's process group (a hung ComfyUI cannot drain, and a stopped one ignores
  SIGTERM), after which supervisord's autorestart starts it again.
- GPU memory >= GPU_HARD_MARK, or ComfyUI's RSS >= COMFY_RSS_LIMIT_GB -> a restart becomes due. It happens as soon
  as the prompts that were running when it became due have left ComfyUI (between jobs: a prompt that started
  after that point has barely begun), or after RESTART_GRACE_S at the latest; restarting mid-job is the hand-back:
  the runner sees the prompt vanish and retries the job with attempt + 1.
- GPU memory >= GPU_SOFT_MARK while ComfyUI is idle (nothing running or queued, nothing in processing/) -> /free,
  once per idle spell (again only after another job has run, or after SOFT_FREE_REPEAT_S).
- FREE_EVERY_JOBS / FREE_EVERY_MIN -> /free (ComfyUI applies it between prompts, so a busy node is not disturbed;
  the minutes timer only fires after at least one job ran since the last free or restart).
- Every restart of one program is at least RESTART_MIN_INTERVAL_S after the previous one.

selfix processes (runner, uploader, consumer): RUNNING per supervisord but no heartbeat for HEARTBEAT_STALE_S (a
fresh process gets STARTUP_GRACE_S more for its first beat) -> restart (SIGKILL; supervisord's autorestart brings
it back, and the spool makes the kill harmless).

FATAL (supervisord gave up after startretries) -> start it again after FATAL_RESTART_S, doubled for every FATAL in
a row up to FATAL_RESTART_MAX_FACTOR times (the row ends once the program has stayed RUNNING for FATAL_STABLE_S).
Whatever made it exit (a full disk, a broker or a store gone for a while) may have passed; a node must not stay
down until a person types `supervisorctl start`. Applies to ComfyUI and the three selfix processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from selfix.supervisor import RUNNING

if TYPE_CHECKING:
    from selfix.settings import Settings

COMFYUI = "comfyui"
WATCHED = ("runner", "uploader", "consumer")
SOFT_FREE_REPEAT_S = 300.0
STARTUP_GRACE_S = 30.0
COMFY_STARTUP_GRACE_S = 300.0  # a ComfyUI that has not answered once yet may still be loading custom nodes
GB = 1 << 30

FREE_REASONS = ("gpu_soft_mark", "every_jobs", "every_min")
COMFY_RESTART_REASONS = ("gpu_hard_mark", "rss_limit", "unresponsive", "exited")
PROCESS_RESTART_REASONS = ("heartbeat_stale", "fatal")
FATAL = "FATAL"
FATAL_WATCHED = (COMFYUI, *WATCHED)
FATAL_RESTART_MAX_FACTOR = 32
FATAL_STABLE_S = 60.0


@dataclass(frozen=True)
class Limits:
    soft_mark: float = 0.85
    hard_mark: float = 0.97
    free_every_jobs: int = 0
    free_every_s: float = 0.0
    unresponsive_s: float = 15.0
    rss_limit_bytes: int = 0
    heartbeat_stale_s: float = 60.0
    restart_min_interval_s: float = 120.0
    restart_grace_s: float = 30.0
    fatal_restart_s: float = 10.0

    @staticmethod
    def from_settings(s: Settings) -> Limits:
        return Limits(
            soft_mark=s.gpu_soft_mark, hard_mark=s.gpu_hard_mark, free_every_jobs=s.free_every_jobs,
            free_every_s=s.free_every_min * 60.0, unresponsive_s=s.comfy_unresponsive_s,
            rss_limit_bytes=int(s.comfy_rss_limit_gb * GB), heartbeat_stale_s=s.heartbeat_stale_s,
            restart_min_interval_s=s.restart_min_interval_s, restart_grace_s=s.restart_grace_s,
            fatal_restart_s=s.fatal_restart_s,
        )


@dataclass(frozen=True)
class Program:
    state: str  # supervisord statename
    pid: int = 0
    started: float = 0.0  # epoch seconds

    @property
    def running(self) -> bool:
        return self.state == RUNNING


@dataclass(frozen=True)
class Readings:
    now: float
    comfy_up: bool
    running_prompts: frozenset[str] | None = frozenset()  # ComfyUI's /queue running; None: unknown
    pending_prompts: int = 0
    processing: int = 0  # jobs in processing/
    mem_fraction: float | None = None  # fullest GPU's used/total; None: no GPU reading
    comfy_rss: int | None = None
    jobs_ran: int = 0  # monotonic: results of jobs that ran inside ComfyUI
    programs: Mapping[str, Program] | None = None  # None: supervisord not reachable
    heartbeats: Mapping[str, float | None] = field(default_factory=dict)  # program -> last beat (epoch) or None

    @property
    def idle(self) -> bool:
        return (self.comfy_up and self.running_prompts == frozenset() and self.pending_prompts == 0
                and self.processing == 0)

    def program(self, name: str) -> Program | None:
        return None if self.programs is None else self.programs.get(name)


@dataclass(frozen=True)
class Due:
    """A ComfyUI restart that waits for the prompts running when it became due."""

    reason: str
    since: float
    prompts: frozenset[str]
    detail: str = ""


@dataclass(frozen=True)
class PolicyState:
    comfy_pid: int = 0
    answered_pid: int = 0  # the ComfyUI process that has answered at least once
    unanswered_since: float | None = None
    due: Due | None = None
    last_free_at: float = 0.0
    jobs_at_last_free: int = 0
    soft_freed_at: float | None = None
    soft_freed_jobs: int = -1
    last_restart: Mapping[str, float] = field(default_factory=dict)
    fatal_since: Mapping[str, float] = field(default_factory=dict)  # program -> first tick seen FATAL (this spell)
    fatal_row: Mapping[str, int] = field(default_factory=dict)  # program -> FATAL starts in a row


Kind = Literal["free", "restart", "wait"]


@dataclass(frozen=True)
class Action:
    kind: Kind
    program: str
    reason: str
    detail: str = ""


def observe(r: Readings, st: PolicyState, lim: Limits) -> PolicyState:
    """Advance the timers with one tick's readings (no decisions)."""
    comfy = r.program(COMFYUI)
    pid = comfy.pid if comfy is not None else st.comfy_pid
    unanswered, answered = st.unanswered_since, st.answered_pid
    if r.comfy_up:
        unanswered, answered = None, pid or answered
    elif unanswered is None or (pid and pid != st.comfy_pid):
        unanswered = r.now
    since, row = _fatal_timers(r, st)
    return replace(st, comfy_pid=pid, answered_pid=answered, unanswered_since=unanswered, due=_due(r, st, lim),
                   fatal_since=since, fatal_row=row)


def _fatal_timers(r: Readings, st: PolicyState) -> tuple[Mapping[str, float], Mapping[str, int]]:
    if r.programs is None:
        return st.fatal_since, st.fatal_row  # supervisord not reachable: nothing new is known
    since, row = dict(st.fatal_since), dict(st.fatal_row)
    for name in FATAL_WATCHED:
        prog = r.program(name)
        if prog is not None and prog.state == FATAL:
            since.setdefault(name, r.now)
            continue
        since.pop(name, None)
        if prog is not None and prog.running and r.now - prog.started >= FATAL_STABLE_S:
            row.pop(name, None)  # it stayed up: the next FATAL starts a new row with the first delay
    return since, row


def fatal_delay(lim: Limits, row: int) -> float:
    """Seconds a FATAL program waits before the watchdog starts it, after `row` such starts in a row."""
    return float(lim.fatal_restart_s * min(FATAL_RESTART_MAX_FACTOR, 2 ** min(row, 16)))


def _due(r: Readings, st: PolicyState, lim: Limits) -> Due | None:
    if not r.comfy_up:
        return st.due  # no fresh readings: keep waiting as before
    reason, detail = None, ""
    if r.mem_fraction is not None and r.mem_fraction >= lim.hard_mark:
        reason, detail = "gpu_hard_mark", f"GPU memory at {r.mem_fraction:.0%}"
    elif r.comfy_rss is not None and lim.rss_limit_bytes and r.comfy_rss >= lim.rss_limit_bytes:
        reason, detail = "rss_limit", f"ComfyUI RSS {r.comfy_rss / GB:.1f} GiB"
    if reason is None:
        return None
    if st.due is not None and st.due.reason == reason:
        return replace(st.due, detail=detail)
    return Due(reason, r.now, r.running_prompts or frozenset(), detail)


def decide(r: Readings, st: PolicyState, lim: Limits) -> tuple[PolicyState, list[Action]]:
    st = observe(r, st, lim)
    actions = [a for a in (comfy_action(r, st, lim),) if a is not None]
    actions.extend(stuck_actions(r, st, lim))
    actions.extend(fatal_actions(r, st, lim))
    return st, actions


def fatal_actions(r: Readings, st: PolicyState, lim: Limits) -> list[Action]:
    out = []
    for name, since in st.fatal_since.items():
        delay = fatal_delay(lim, st.fatal_row.get(name, 0))
        left = since + delay - r.now
        if left > 0:
            out.append(Action("wait", name, "fatal", f"FATAL per supervisord; starting it again in {delay:.0f}s"))
        else:
            out.append(Action("restart", name, "fatal", f"FATAL per supervisord for {r.now - since:.0f}s"))
    return out


def rate_limited(st: PolicyState, program: str, now: float, lim: Limits) -> float:
    """Seconds until `program` may be restarted again (0: now)."""
    last = st.last_restart.get(program)
    return 0.0 if last is None else max(0.0, last + lim.restart_min_interval_s - now)


def comfy_action(r: Readings, st: PolicyState, lim: Limits) -> Action | None:
    comfy = r.program(COMFYUI)
    if not r.comfy_up:
        if comfy is None or not comfy.running or st.unanswered_since is None:
            return None  # supervisord is starting/stopping it, or cannot be asked: its business
        silent = r.now - max(st.unanswered_since, comfy.started)
        limit = lim.unresponsive_s + (0.0 if st.answered_pid == comfy.pid else COMFY_STARTUP_GRACE_S)
        if silent < limit:
            return None
        return _restart(r, st, lim, "unresponsive", f"not answering for {silent:.0f}s")
    if st.due is not None:
        if comfy is None or not comfy.running:
            return Action("wait", COMFYUI, st.due.reason, "ComfyUI is not RUNNING per supervisord")
        running = r.running_prompts if r.running_prompts is not None else st.due.prompts
        blocking = running & st.due.prompts
        waited = r.now - st.due.since
        if blocking and waited < lim.restart_grace_s:
            return Action("wait", COMFYUI, st.due.reason,
                          f"{st.due.detail}: waiting up to {lim.restart_grace_s:g}s for the running job to end")
        detail = st.due.detail + (f"; handing back prompt(s) {sorted(running)} for retry" if running else
                                  "; between jobs")
        return _restart(r, st, lim, st.due.reason, detail)
    return free_action(r, st, lim)


def _restart(r: Readings, st: PolicyState, lim: Limits, reason: str, detail: str) -> Action:
    wait = rate_limited(st, COMFYUI, r.now, lim)
    if wait > 0:
        return Action("wait", COMFYUI, reason, f"{detail}; rate limited for {wait:.0f}s more")
    return Action("restart", COMFYUI, reason, detail)


def free_action(r: Readings, st: PolicyState, lim: Limits) -> Action | None:
    if not r.comfy_up:
        return None
    mem = r.mem_fraction
    if mem is not None and mem >= lim.soft_mark and r.idle:
        again = (st.soft_freed_jobs != r.jobs_ran or st.soft_freed_at is None
                 or r.now - st.soft_freed_at >= SOFT_FREE_REPEAT_S)
        if again:
            return Action("free", COMFYUI, "gpu_soft_mark", f"GPU memory at {mem:.0%} while idle")
    ran = r.jobs_ran - st.jobs_at_last_free
    if lim.free_every_jobs and ran >= lim.free_every_jobs:
        return Action("free", COMFYUI, "every_jobs", f"{ran} jobs since the last free")
    if lim.free_every_s and ran > 0 and r.now - st.last_free_at >= lim.free_every_s:
        return Action("free", COMFYUI, "every_min", f"{(r.now - st.last_free_at) / 60:.0f} min since the last free")
    return None


def stuck_actions(r: Readings, st: PolicyState, lim: Limits) -> list[Action]:
    out = []
    for name in WATCHED:
        prog = r.program(name)
        if prog is None or not prog.running:
            continue
        beat = r.heartbeats.get(name)
        if beat is not None and beat >= prog.started:
            silent, allowed = r.now - beat, lim.heartbeat_stale_s
        else:  # this instance has not beaten yet
            silent, allowed = r.now - prog.started, lim.heartbeat_stale_s + STARTUP_GRACE_S
        if silent <= allowed:
            continue
        detail = f"RUNNING (pid {prog.pid}) but silent for {silent:.0f}s"
        wait = rate_limited(st, name, r.now, lim)
        if wait > 0:
            out.append(Action("wait", name, "heartbeat_stale", f"{detail}; rate limited for {wait:.0f}s more"))
        else:
            out.append(Action("restart", name, "heartbeat_stale", detail))
    return out


def after_free(st: PolicyState, r: Readings) -> PolicyState:
    return replace(st, last_free_at=r.now, jobs_at_last_free=r.jobs_ran, soft_freed_at=r.now,
                   soft_freed_jobs=r.jobs_ran)


def after_fatal_start(st: PolicyState, r: Readings, program: str) -> PolicyState:
    since = {k: v for k, v in st.fatal_since.items() if k != program}
    return replace(st, fatal_since=since, fatal_row={**st.fatal_row, program: st.fatal_row.get(program, 0) + 1})


def after_restart(st: PolicyState, r: Readings, program: str) -> PolicyState:
    last = {**st.last_restart, program: r.now}
    if program != COMFYUI:
        return replace(st, last_restart=last)
    return replace(st, last_restart=last, due=None, unanswered_since=None, last_free_at=r.now,
                   jobs_at_last_free=r.jobs_ran)
