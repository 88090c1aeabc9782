"""The watchdog's policies as pure functions: readings + state in, actions out. No servers, no clock."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from selfix import policies as pol
from selfix.policies import Action, Limits, PolicyState, Program, Readings

pytestmark = pytest.mark.watchdog

T0 = 1_000_000.0
LIM = Limits(soft_mark=0.85, hard_mark=0.97, unresponsive_s=60, heartbeat_stale_s=60, restart_min_interval_s=120,
             restart_grace_s=30)
RUNNING = {name: Program("RUNNING", pid=100 + i, started=T0 - 3600)
           for i, name in enumerate(("comfyui", "runner", "uploader", "consumer", "watchdog"))}


def readings(now: float = T0, **kw: Any) -> Readings:
    base: dict[str, Any] = {
        "now": now, "comfy_up": True, "running_prompts": frozenset(), "pending_prompts": 0, "processing": 0,
        "mem_fraction": 0.10, "comfy_rss": 1 << 30, "jobs_ran": 0, "programs": RUNNING,
        "heartbeats": {p: now - 1 for p in pol.WATCHED},
    }
    base.update(kw)
    return Readings(**base)


def run(r: Readings, st: PolicyState | None = None, lim: Limits = LIM) -> tuple[PolicyState, list[Action]]:
    return pol.decide(r, st or PolicyState(last_free_at=T0 - 10), lim)


def kinds(actions: list[Action]) -> list[tuple[str, str, str]]:
    return [(a.kind, a.program, a.reason) for a in actions]


# --- soft mark and periodic frees ------------------------------------------------------------------------------

def test_soft_mark_while_idle_frees_once_per_idle_spell() -> None:
    st, actions = run(readings(mem_fraction=0.90))
    assert kinds(actions) == [("free", "comfyui", "gpu_soft_mark")]
    st = pol.after_free(st, readings(mem_fraction=0.90))
    st, actions = run(readings(T0 + 5, mem_fraction=0.90), st)
    assert actions == [], "freeing again without a job in between cannot help"
    st, actions = run(readings(T0 + 10, mem_fraction=0.90, jobs_ran=1), st)
    assert kinds(actions) == [("free", "comfyui", "gpu_soft_mark")], "another job ran: free again"
    st = pol.after_free(st, readings(T0 + 10, jobs_ran=1))
    _, actions = run(readings(T0 + 10 + pol.SOFT_FREE_REPEAT_S, mem_fraction=0.90, jobs_ran=1), st)
    assert kinds(actions) == [("free", "comfyui", "gpu_soft_mark")], "and after the repeat interval"


@pytest.mark.parametrize("busy", [{"running_prompts": frozenset({"p1"})}, {"pending_prompts": 1},
                                  {"processing": 1}, {"comfy_up": False}])
def test_soft_mark_never_frees_a_busy_or_absent_comfyui(busy: dict[str, Any]) -> None:
    _, actions = run(readings(mem_fraction=0.90, **busy))
    assert not [a for a in actions if a.kind == "free"]


def test_below_soft_mark_or_without_gpu_reading_nothing_happens() -> None:
    assert run(readings(mem_fraction=0.84))[1] == []
    assert run(readings(mem_fraction=None))[1] == []


def test_free_every_n_jobs_even_while_busy() -> None:
    lim = replace(LIM, free_every_jobs=3)
    st = PolicyState(last_free_at=T0, jobs_at_last_free=10)
    assert run(readings(jobs_ran=12, running_prompts=frozenset({"p"})), st, lim)[1] == []
    st, actions = run(readings(jobs_ran=13, running_prompts=frozenset({"p"})), st, lim)
    assert kinds(actions) == [("free", "comfyui", "every_jobs")]
    st = pol.after_free(st, readings(jobs_ran=13))
    assert run(readings(T0 + 1, jobs_ran=14), st, lim)[1] == []


def test_free_every_m_minutes_only_after_work() -> None:
    lim = replace(LIM, free_every_s=600)
    st = PolicyState(last_free_at=T0, jobs_at_last_free=5)
    assert run(readings(T0 + 599, jobs_ran=6), st, lim)[1] == []
    assert run(readings(T0 + 601, jobs_ran=5), st, lim)[1] == [], "nothing ran since the last free"
    assert kinds(run(readings(T0 + 601, jobs_ran=6), st, lim)[1]) == [("free", "comfyui", "every_min")]


# --- hard mark and RSS: restart between jobs, or hand the running job back ---------------------------------------

def test_hard_mark_while_idle_restarts_at_once() -> None:
    _, actions = run(readings(mem_fraction=0.98))
    assert kinds(actions) == [("restart", "comfyui", "gpu_hard_mark")]
    assert "between jobs" in actions[0].detail


def test_hard_mark_waits_for_the_running_prompt_then_restarts_between_jobs() -> None:
    st, actions = run(readings(mem_fraction=0.98, running_prompts=frozenset({"a"}), pending_prompts=1))
    assert kinds(actions) == [("wait", "comfyui", "gpu_hard_mark")]
    st, actions = run(readings(T0 + 10, mem_fraction=0.98, running_prompts=frozenset({"a"})), st)
    assert kinds(actions) == [("wait", "comfyui", "gpu_hard_mark")]
    # "a" finished; "b" (queued ahead) just started: it is handed back having lost seconds, not minutes
    _, actions = run(readings(T0 + 12, mem_fraction=0.98, running_prompts=frozenset({"b"})), st)
    assert kinds(actions) == [("restart", "comfyui", "gpu_hard_mark")]
    assert "'b'" in actions[0].detail and "handing back" in actions[0].detail


def test_hard_mark_hands_the_running_job_back_after_the_grace() -> None:
    st, _ = run(readings(mem_fraction=0.98, running_prompts=frozenset({"a"})))
    st, actions = run(readings(T0 + 29, mem_fraction=0.98, running_prompts=frozenset({"a"})), st)
    assert kinds(actions) == [("wait", "comfyui", "gpu_hard_mark")]
    _, actions = run(readings(T0 + 30, mem_fraction=0.98, running_prompts=frozenset({"a"})), st)
    assert kinds(actions) == [("restart", "comfyui", "gpu_hard_mark")]
    assert "handing back" in actions[0].detail


def test_hard_mark_with_zero_grace_restarts_mid_job() -> None:
    _, actions = run(readings(mem_fraction=0.99, running_prompts=frozenset({"a"})),
                     lim=replace(LIM, restart_grace_s=0))
    assert kinds(actions) == [("restart", "comfyui", "gpu_hard_mark")]


def test_due_restart_is_forgotten_when_memory_drops() -> None:
    st, _ = run(readings(mem_fraction=0.98, running_prompts=frozenset({"a"})))
    assert st.due is not None
    st, actions = run(readings(T0 + 5, mem_fraction=0.50, running_prompts=frozenset({"a"})), st)
    assert st.due is None and actions == []


def test_rss_limit_restarts_between_jobs() -> None:
    lim = replace(LIM, rss_limit_bytes=8 << 30)
    assert run(readings(comfy_rss=7 << 30), lim=lim)[1] == []
    _, actions = run(readings(comfy_rss=9 << 30), lim=lim)
    assert kinds(actions) == [("restart", "comfyui", "rss_limit")]
    assert run(readings(comfy_rss=64 << 30), lim=LIM)[1] == [], "0 = off"


def test_restarts_are_rate_limited() -> None:
    st = PolicyState(last_restart={"comfyui": T0 - 60})
    _, actions = run(readings(mem_fraction=0.99), st)
    assert kinds(actions) == [("wait", "comfyui", "gpu_hard_mark")] and "rate limited" in actions[0].detail
    _, actions = run(readings(T0 + 61, mem_fraction=0.99), st)
    assert kinds(actions) == [("restart", "comfyui", "gpu_hard_mark")]


def test_after_restart_resets_the_comfy_timers() -> None:
    st, _ = run(readings(mem_fraction=0.99))
    st = pol.after_restart(st, readings(jobs_ran=7), "comfyui")
    assert st.due is None and st.last_restart["comfyui"] == T0 and st.jobs_at_last_free == 7


# --- ComfyUI not answering -----------------------------------------------------------------------------------------

def test_unresponsive_comfyui_is_restarted_after_the_limit() -> None:
    st, _ = run(readings(T0 - 1))  # it answered once
    st, actions = run(readings(comfy_up=False, running_prompts=None, mem_fraction=None), st)
    assert actions == [] and st.unanswered_since == T0
    st, actions = run(readings(T0 + 59, comfy_up=False), st)
    assert actions == []
    st, actions = run(readings(T0 + 60, comfy_up=False), st)
    assert kinds(actions) == [("restart", "comfyui", "unresponsive")]
    st, _ = run(readings(T0 + 61), st)
    assert st.unanswered_since is None


def test_a_comfyui_that_never_answered_gets_a_startup_grace() -> None:
    st, _ = run(readings(T0 - 1))
    fresh = {**RUNNING, "comfyui": Program("RUNNING", 555, T0 - 10)}  # restarted; loading custom nodes
    st, _ = run(readings(comfy_up=False, programs=fresh), st)
    assert run(readings(T0 + 200, comfy_up=False, programs=fresh), st)[1] == []
    _, actions = run(readings(T0 + 60 + pol.COMFY_STARTUP_GRACE_S, comfy_up=False, programs=fresh), st)
    assert kinds(actions) == [("restart", "comfyui", "unresponsive")]


def test_a_starting_or_young_comfyui_is_left_to_supervisord() -> None:
    starting = {**RUNNING, "comfyui": Program("STARTING", 0, T0)}
    st, _ = run(readings(comfy_up=False, programs=starting))
    assert run(readings(T0 + 300, comfy_up=False, programs=starting), st)[1] == []
    young = {**RUNNING, "comfyui": Program("RUNNING", 555, T0 + 290)}  # restarted 10 s ago: loading models
    assert run(readings(T0 + 300, comfy_up=False, programs=young), st)[1] == []
    assert run(readings(T0 + 300, comfy_up=False, programs=None), st)[1] == [], "supervisord unreachable"


# --- stuck processes -------------------------------------------------------------------------------------------------

def test_silent_running_process_is_restarted() -> None:
    beats = {"runner": T0 - 61, "uploader": T0 - 1, "consumer": T0 - 59}
    _, actions = run(readings(heartbeats=beats))
    assert kinds(actions) == [("restart", "runner", "heartbeat_stale")]
    assert "silent for 61s" in actions[0].detail


def test_fresh_process_gets_a_startup_grace_and_stopped_ones_are_left_alone() -> None:
    fresh = {**RUNNING, "runner": Program("RUNNING", 999, T0 - 70)}
    beats = {"runner": T0 - 500, "uploader": T0, "consumer": T0}  # the beat is the dead predecessor's
    assert run(readings(programs=fresh, heartbeats=beats))[1] == []
    late = {**RUNNING, "runner": Program("RUNNING", 999, T0 - 60 - pol.STARTUP_GRACE_S - 1)}
    assert kinds(run(readings(programs=late, heartbeats=beats))[1]) == [("restart", "runner", "heartbeat_stale")]
    stopped = {**RUNNING, "runner": Program("STOPPED", 0, T0 - 1000)}
    assert run(readings(programs=stopped, heartbeats=beats))[1] == []


def test_stuck_restarts_are_rate_limited_per_program() -> None:
    beats = {"runner": T0 - 100, "uploader": T0 - 100, "consumer": T0}
    st = PolicyState(last_restart={"runner": T0 - 10})
    _, actions = run(readings(heartbeats=beats), st)
    assert kinds(actions) == [("wait", "runner", "heartbeat_stale"), ("restart", "uploader", "heartbeat_stale")]


# --- FATAL programs --------------------------------------------------------------------------------------------------

def fatal(*names: str, at: float = T0 - 5) -> dict[str, Program]:
    return {**RUNNING, **{n: Program("FATAL", 0, at) for n in names}}


def test_a_fatal_program_is_started_again_after_the_backoff() -> None:
    lim = replace(LIM, fatal_restart_s=10)
    st, actions = run(readings(programs=fatal("runner")), lim=lim)
    assert kinds(actions) == [("wait", "runner", "fatal")], "not at once: whatever made it exit may last"
    assert st.fatal_since == {"runner": T0}
    st, actions = run(readings(T0 + 9.9, programs=fatal("runner")), st, lim)
    assert kinds(actions) == [("wait", "runner", "fatal")]
    st, actions = run(readings(T0 + 10, programs=fatal("runner")), st, lim)
    assert kinds(actions) == [("restart", "runner", "fatal")]
    st = pol.after_fatal_start(st, readings(T0 + 10), "runner")
    assert st.fatal_since == {} and st.fatal_row == {"runner": 1}


def test_fatal_again_and_again_doubles_the_wait_up_to_the_cap() -> None:
    lim = replace(LIM, fatal_restart_s=10)
    assert [pol.fatal_delay(lim, row) for row in range(8)] == [10, 20, 40, 80, 160, 320, 320, 320]
    st = PolicyState(fatal_row={"consumer": 2})
    st, _ = run(readings(programs=fatal("consumer")), st, lim)
    assert kinds(run(readings(T0 + 39, programs=fatal("consumer")), st, lim)[1]) == [("wait", "consumer", "fatal")]
    assert kinds(run(readings(T0 + 40, programs=fatal("consumer")), st, lim)[1]) == [("restart", "consumer",
                                                                                           "fatal")]


def test_the_row_ends_once_the_program_stays_up() -> None:
    st = PolicyState(fatal_row={"uploader": 3, "runner": 2})
    young = {**RUNNING, "uploader": Program("RUNNING", 7, T0 - 5), "runner": Program("STARTING", 8, T0 - 100)}
    st, _ = run(readings(programs=young), st)
    assert st.fatal_row == {"uploader": 3, "runner": 2}, "5 s up, or not RUNNING, proves nothing"
    stable = {**young, "uploader": Program("RUNNING", 7, T0 - pol.FATAL_STABLE_S)}
    st, _ = run(readings(programs=stable), st)
    assert st.fatal_row == {"runner": 2}


def test_fatal_comfyui_too_and_unknown_states_change_nothing() -> None:
    st, actions = run(readings(comfy_up=False, programs=fatal("comfyui", "runner")))
    assert sorted(kinds(actions)) == [("wait", "comfyui", "fatal"), ("wait", "runner", "fatal")]
    st2, actions = run(readings(T0 + 5, comfy_up=False, programs=None), st)
    assert st2.fatal_since == st.fatal_since, "supervisord unreachable: the timers stand"
    st3, _ = run(readings(T0 + 6, programs=RUNNING), st2)
    assert st3.fatal_since == {}, "started by someone else: nothing left to do"
    assert run(readings(programs=fatal("watchdog")))[1] == [], "the watchdog cannot start itself"
