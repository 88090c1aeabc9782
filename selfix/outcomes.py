"""The runner's decisions as pure functions: what ComfyUI said (a /history entry, /queue, the clock) -> what to do.

Nothing here does I/O or reads a clock; `selfix.runner` gathers the facts, calls these and carries out the answer:
- `judge`: a prompt that left ComfyUI's queue -> complete, fail or retry (before counting attempts);
- `after_failure`: a retriable error -> retry with attempt + 1, or `retries_exhausted` past MAX_ATTEMPTS;
- `on_lost`: a prompt that vanished from ComfyUI -> retry (it had started) or submit it again (it had not);
- `deadline_step`: the head job's deadline -> interrupt it, give up after the grace, or nothing;
- `hand_back`: draining -> which prompts go back to inbox/ (queued in ComfyUI, not started);
- `cancel_step`: a prompt ComfyUI accepted in part (a 200 with node_errors) -> delete, interrupt, or clean up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from selfix import messages as m
from selfix.comfy import QueueState
from selfix.workflow import collect_outputs

INTERRUPT_GRACE_S = 30.0  # after the interrupt, how long ComfyUI gets to stop the job before the runner gives up

VerdictKind = Literal["complete", "fail", "retry", "resubmit"]
DeadlineStep = Literal["interrupt", "give_up"]
CancelStep = Literal["delete", "interrupt", "clean"]


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    error: m.TaskError | None = None


@dataclass(frozen=True)
class Slot:
    """What `hand_back` needs to know of one prompt the runner has in ComfyUI, in queue order."""

    prompt_id: str
    started: bool
    cancelling: bool = False


def judge(entry: dict[str, Any], timed_out: bool, timeout_s: float, label: str | None = None) -> Verdict:
    """A finished prompt's /history entry -> complete / fail / retry. `timed_out`: the runner interrupted it;
    `label` names the deadline in the message (a task's own timeoutS; default JOB_TIMEOUT_S)."""
    status = entry.get("status", {})
    if status.get("status_str") == "success" and status.get("completed", True):
        if not collect_outputs(entry):
            return Verdict("fail", m.TaskError(m.NO_OUTPUT, "the workflow produced no output (no file of type output "
                                                            "under any key of /history, no text)"))
        return Verdict("complete")
    kind, data = terminal_message(status)
    if kind == "execution_interrupted" and timed_out:
        limit = label or f"JOB_TIMEOUT_S={timeout_s:g}s"
        return Verdict("fail", m.TaskError(m.TIMEOUT, f"job exceeded {limit} in node "
                                                      f"{data.get('node_id')} ({data.get('node_type')})"))
    if kind == "execution_interrupted":
        return Verdict("retry", m.TaskError(m.INTERRUPTED, "ComfyUI interrupted the job", retriable=True))
    error = execution_error(data)
    return Verdict("retry" if error.retriable else "fail", error)


def after_failure(error: m.TaskError, attempt: int, max_attempts: int) -> Verdict:
    """A retriable error gets another attempt while attempts are left; past MAX_ATTEMPTS it is final."""
    if not error.retriable:
        return Verdict("fail", error)
    if attempt >= max_attempts:
        return Verdict("fail", m.TaskError(m.RETRIES_EXHAUSTED, f"gave up after {attempt} attempt(s); last error "
                                                                f"{error.code}: {error.message}"))
    return Verdict("retry", error)


def on_lost(started: bool) -> Verdict:
    """Neither in /queue nor in /history: ComfyUI restarted. A job that had started is retried (attempt + 1); one
    that never ran is simply submitted again (same attempt, same prompt id)."""
    if started:
        return Verdict("retry", m.TaskError(m.COMFYUI_UNAVAILABLE, "ComfyUI stopped while running the job",
                                            retriable=True))
    return Verdict("resubmit")


def deadline_step(since: float | None, timed_out_at: float | None, now: float, timeout_s: float,
                  grace_s: float = INTERRUPT_GRACE_S) -> DeadlineStep | None:
    """The head job runs from `since` (its start, or since it became the head): interrupt it at the deadline, and
    give up on it `grace_s` after the interrupt if ComfyUI has not ended it by then."""
    if since is None or now - since < timeout_s:
        return None
    if timed_out_at is None:
        return "interrupt"
    if now - timed_out_at > grace_s:
        return "give_up"
    return None


def hand_back(slots: Sequence[Slot]) -> list[str]:
    """Draining: every prompt behind the head that ComfyUI has not started goes back to inbox/ (same attempt)."""
    return [s.prompt_id for s in slots[1:] if not s.started and not s.cancelling]


def cancel_step(queue: QueueState, prompt_id: str) -> CancelStep:
    """Removing a prompt: delete it while it waits, interrupt it while it runs, clean up once it left the queue
    (it writes no file after that, so what the cleanup removes stays removed)."""
    if prompt_id in queue.pending:
        return "delete"
    if prompt_id in queue.running:
        return "interrupt"
    return "clean"


def terminal_message(status: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    for kind, data in reversed(status.get("messages", [])):
        if kind in ("execution_error", "execution_interrupted"):
            return kind, data
    return "unknown", {}


def execution_error(data: dict[str, Any]) -> m.TaskError:
    exc_type, exc_msg = str(data.get("exception_type", "")), str(data.get("exception_message", "")).strip()
    where = f"node {data.get('node_id')} ({data.get('node_type')})"
    if "OutOfMemory" in exc_type or "out of memory" in exc_msg.lower():
        return m.TaskError(m.OUT_OF_MEMORY, f"{where}: {exc_type}: {exc_msg}", retriable=True)
    if not data:
        return m.TaskError(m.EXECUTION_ERROR, "ComfyUI reported the job as failed without details")
    return m.TaskError(m.EXECUTION_ERROR, f"{where}: {exc_type}: {exc_msg}")


def error_from(record: dict[str, Any]) -> m.TaskError:
    """A TaskError back from its `as_error()` form (kept in the processing/ file across restarts)."""
    return m.TaskError(str(record.get("code", m.EXECUTION_ERROR)), str(record.get("message", "")),
                       retriable=bool(record.get("retriable", False)), node_errors=record.get("nodeErrors"))
