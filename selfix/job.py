"""The job file: one typed record for what inbox/ and processing/ hold (README: "The spool").

Intake writes a job (`Task.to_job`), the runner claims it and rewrites it as it moves through ComfyUI, and the
uploader, the CLI, the console, the LoRA cache and the consumer read it. All of them go through `Job`, and only
selfix/spool.py turns it into bytes and back: a misspelled key is a mypy error instead of a KeyError in the runner.

Lenient where the code always was: a missing attempt is 1, a missing priority 0, a null is the same as no key, and
progress (only ever shown) reads what it can. Strict on the rest: a known key holding the wrong type makes the file
unreadable (`JobFormatError`), and the runner quarantines it like any other file it cannot parse. Keys this version
does not know are kept in `extra` and written back, so a file written by another version keeps them through the
runner's rewrites.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from selfix.strictjson import strict_loads

# Every pattern here is used with fullmatch(): `$` would also match before a final "\n" ("x\n" passing as an id).
TASK_ID_RE = re.compile(r"(?!\.)[A-Za-z0-9._-]{1,128}")


def valid_task_id(value: object) -> bool:
    """taskId and userId become file names and object keys: [A-Za-z0-9._-]{1,128}, no leading dot."""
    return isinstance(value, str) and TASK_ID_RE.fullmatch(value) is not None


class JobFormatError(ValueError):
    """Not a job file this version can read; the message names the key."""


class JobState(StrEnum):
    """What the runner last did with a job. No state at all: waiting in inbox/ as intake wrote it."""

    QUEUED = "queued"  # back in inbox/: a retry, a deferral, or handed back while draining
    CLAIMED = "claimed"  # in processing/: LoRAs and input images being prepared
    SUBMITTING = "submitting"  # POST /prompt under way: it may or may not be in ComfyUI (reconcile() finds out)
    SUBMITTED = "submitted"  # in ComfyUI's queue; running once started_at is set
    CANCELLING = "cancelling"  # ComfyUI queued it in part: being removed from ComfyUI before the task fails


@dataclass(frozen=True, slots=True)
class Progress:
    """ComfyUI's last `progress` event for the job (value of max steps in node `node`)."""

    value: float | None = None
    max: float | None = None
    node: str | None = None

    @staticmethod
    def of(obj: object) -> Progress | None:
        """From a progress event's data or a job file, leniently: it is only shown, and what ComfyUI sent must not
        make a running job's file unreadable. An odd value reads as unknown."""
        if not isinstance(obj, dict):
            return None
        value, top, node = obj.get("value"), obj.get("max"), obj.get("node")
        return Progress(value if _is_number(value) else None, top if _is_number(top) else None,
                        None if node is None else str(node))

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "max": self.max, "node": self.node}  # all three, as the status events show it


# camelCase on disk for each field that is not `extra`; the order is the order of keys in a written file.
_KEYS = {
    "task_id": "taskId", "user_id": "userId", "priority": "priority", "workflow": "workflow",
    "lora_models": "loraModels", "images": "images", "template": "template", "output": "output",
    "attempt": "attempt", "enqueued_at": "enqueuedAt", "not_before": "notBefore", "source": "source",
    "timeout_s": "timeoutS", "expires_at": "expiresAt", "state": "state", "prompt_id": "promptId",
    "claimed_at": "claimedAt", "submitted_at": "submittedAt", "started_at": "startedAt", "progress": "progress",
    "deferrals": "deferrals", "last_error": "lastError", "rejection": "rejection",
}
_ALWAYS = frozenset({"taskId", "priority", "loraModels", "images", "attempt", "notBefore"})  # written even at default


@dataclass(frozen=True, slots=True)
class Job:
    """One job file. Task fields come from intake; the runner's bookkeeping fields change by the copies below."""

    task_id: str
    user_id: str | None = None
    priority: int = 0
    workflow: dict[str, Any] | None = None
    lora_models: tuple[str, ...] = ()
    images: Mapping[str, str] = field(default_factory=dict)  # file name -> object key or data: URL
    template: str | None = None
    output: dict[str, Any] | None = None
    attempt: int = 1
    enqueued_at: float | None = None
    not_before: float = 0
    source: dict[str, Any] | None = None  # where intake got it: a Kafka topic/partition/offset, or a file name
    timeout_s: float | None = None
    expires_at: float | None = None
    state: JobState | None = None
    prompt_id: str | None = None
    claimed_at: float | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    progress: Progress | None = None
    deferrals: int = 0  # waits for an outage outside the job (store down, a full disk); not attempts
    last_error: dict[str, Any] | None = None
    rejection: dict[str, Any] | None = None  # the error a partly queued prompt ends with (state CANCELLING)
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys this version does not know, written back as read

    # --- reading and writing (selfix/spool.py is the only caller) ----------------------------------------------
    @staticmethod
    def from_bytes(raw: bytes) -> Job:
        """Raises ValueError (StrictJSONError, JobFormatError) saying what is wrong."""
        obj = strict_loads(raw)
        if not isinstance(obj, dict):
            raise JobFormatError(f"a job file holds a JSON object, this one a {type(obj).__name__}")
        return Job.from_dict(obj)

    @staticmethod
    def from_dict(obj: Mapping[str, Any]) -> Job:
        task_id = obj.get("taskId")
        if not valid_task_id(task_id):
            raise JobFormatError(f"taskId missing or not [A-Za-z0-9._-]{{1,128}}: {str(task_id)[:60]!r}")
        assert isinstance(task_id, str)
        state = _optional(obj, "state", str)
        return Job(
            task_id=task_id, user_id=_optional(obj, "userId", str), priority=_int(obj, "priority", 0),
            workflow=_optional(obj, "workflow", dict), lora_models=_strings(obj.get("loraModels")),
            images=_images(obj.get("images")), template=_optional(obj, "template", str),
            output=_optional(obj, "output", dict), attempt=_int(obj, "attempt", 1),
            enqueued_at=_number(obj, "enqueuedAt"), not_before=_number(obj, "notBefore") or 0,
            source=_optional(obj, "source", dict), timeout_s=_number(obj, "timeoutS"),
            expires_at=_number(obj, "expiresAt"), state=_state(state), prompt_id=_optional(obj, "promptId", str),
            claimed_at=_number(obj, "claimedAt"), submitted_at=_number(obj, "submittedAt"),
            started_at=_number(obj, "startedAt"),
            progress=Progress.of(obj.get("progress")),
            deferrals=_int(obj, "deferrals", 0), last_error=_optional(obj, "lastError", dict),
            rejection=_optional(obj, "rejection", dict),
            extra={k: v for k, v in obj.items() if k not in _KNOWN},
        )

    def to_dict(self) -> dict[str, Any]:
        """The file's content: the unknown keys first, then every field that is set (the task's own always)."""
        out: dict[str, Any] = dict(self.extra)
        for name, key in _KEYS.items():
            value = getattr(self, name)
            if key in _ALWAYS or value != _DEFAULTS[name]:
                out[key] = _plain(value)
        return out

    # --- the runner's steps: each one a new record, written to processing/ (or inbox/) by the spool -----------
    def claimed(self, prompt_id: str, now: float) -> Job:
        return dataclasses.replace(self, state=JobState.CLAIMED, prompt_id=prompt_id, claimed_at=now,
                                   started_at=None)

    def submitting(self) -> Job:
        return dataclasses.replace(self, state=JobState.SUBMITTING)

    def submitted(self, now: float) -> Job:
        return dataclasses.replace(self, state=JobState.SUBMITTED, submitted_at=now)

    def started(self, at: float) -> Job:
        return dataclasses.replace(self, started_at=at)

    def with_progress(self, progress: Progress) -> Job:
        return dataclasses.replace(self, progress=progress)

    def cancelling(self, rejection: dict[str, Any]) -> Job:
        return dataclasses.replace(self, state=JobState.CANCELLING, rejection=rejection)

    def retried(self, not_before: float, error: dict[str, Any]) -> Job:
        """The next attempt, waiting in inbox/ until `not_before`: a new prompt id, nothing of this run kept."""
        return dataclasses.replace(self, attempt=self.attempt + 1, not_before=not_before, last_error=error,
                                   state=JobState.QUEUED, prompt_id=None, started_at=None, progress=None)

    def deferred(self, not_before: float) -> Job:
        """The same attempt again after an outage outside the job (`deferrals` already counted by the caller)."""
        return dataclasses.replace(self, not_before=not_before, state=JobState.QUEUED, prompt_id=None)

    def handed_back(self) -> Job:
        """Back to inbox/ unstarted while draining: same attempt, same not-before."""
        return dataclasses.replace(self, state=JobState.QUEUED, prompt_id=None)


_KNOWN = frozenset(_KEYS.values())
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Job)}  # None for most; 0 deferrals is not written either


def _plain(value: Any) -> Any:
    if isinstance(value, JobState):
        return value.value
    if isinstance(value, Progress):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _optional(obj: Mapping[str, Any], key: str, kind: type[Any]) -> Any:
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise JobFormatError(f"{key} must be {_KIND[kind]}, got {type(value).__name__}")
    return value


_KIND: dict[type[Any], str] = {str: "a string", dict: "an object"}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not _is_number(value):
        raise JobFormatError(f"{key} must be a number, got {type(value).__name__}")
    assert isinstance(value, int | float)
    return value  # an int stays an int: a rewritten file says 3, not 3.0


def _int(obj: Mapping[str, Any], key: str, default: int) -> int:
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobFormatError(f"{key} must be an integer, got {type(value).__name__}")
    return value


def _strings(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise JobFormatError("loraModels must be a list of strings")
    return tuple(value)


def _images(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise JobFormatError("images must be an object of file name -> object key or data: URL")
    return dict(value)


def _state(value: str | None) -> JobState | None:
    if value is None:
        return None
    try:
        return JobState(value)
    except ValueError:
        raise JobFormatError(f"state {value[:40]!r} is not one of {', '.join(s.value for s in JobState)}") from None
