"""selfix.job: the typed job record; what it reads leniently, what it refuses, what it keeps; and the rule that
only the spool reads a job file (enforced here by reading the source)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from selfix.job import Job, JobFormatError, JobState, Progress
from selfix.spool import Spool

PACKAGE = Path(__file__).resolve().parent.parent / "selfix"
WORKFLOW = {"1": {"class_type": "X", "inputs": {}}}


def written(job: Job) -> dict[str, Any]:
    """What the file holds after a rewrite, through JSON as the spool writes it."""
    return dict(json.loads(json.dumps(job.to_dict())))


# --- reading: defaults, types, unknown keys ------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    ({"taskId": "t"}, Job("t")),
    ({"taskId": "t", "attempt": None, "priority": None, "template": None, "source": None}, Job("t")),
    ({"taskId": "t", "userId": "u", "priority": -3, "attempt": 2, "enqueuedAt": 10, "notBefore": 12.5},
     Job("t", "u", priority=-3, attempt=2, enqueued_at=10, not_before=12.5)),
    ({"taskId": "t", "loraModels": ["a", "b"], "images": {"p.png": "k"}},
     Job("t", lora_models=("a", "b"), images={"p.png": "k"})),
    ({"taskId": "t", "state": "submitted", "promptId": "p", "startedAt": 5.0,
      "progress": {"value": 3, "max": 10, "node": "4"}},
     Job("t", state=JobState.SUBMITTED, prompt_id="p", started_at=5.0, progress=Progress(3, 10, "4"))),
    ({"taskId": "t", "timeoutS": 30, "expiresAt": 99.5, "deferrals": 2, "rejection": {"code": "x"}},
     Job("t", timeout_s=30, expires_at=99.5, deferrals=2, rejection={"code": "x"})),
    ({"taskId": "t", "progress": [3, 10]}, Job("t")),
    ({"taskId": "t", "progress": {"value": "3", "max": 10, "node": 4, "eta": 2}},
     Job("t", progress=Progress(None, 10, "4"))),
    ({"taskId": "t", "fromTheFuture": [1, 2], "loraModel": "old/key.safetensors"},
     Job("t", extra={"fromTheFuture": [1, 2], "loraModel": "old/key.safetensors"})),
])
def test_from_dict_reads_what_the_code_always_accepted(raw: dict[str, Any], expected: Job) -> None:
    assert Job.from_dict(raw) == expected


@pytest.mark.parametrize(("raw", "named"), [
    ({}, "taskId"),
    ({"taskId": "../etc"}, "taskId"),
    ({"taskId": "t\n"}, "taskId"),
    ({"taskId": "t", "attempt": "2"}, "attempt"),
    ({"taskId": "t", "attempt": True}, "attempt"),
    ({"taskId": "t", "priority": 1.5}, "priority"),
    ({"taskId": "t", "enqueuedAt": "yesterday"}, "enqueuedAt"),
    ({"taskId": "t", "workflow": [1]}, "workflow"),
    ({"taskId": "t", "loraModels": "a.safetensors"}, "loraModels"),
    ({"taskId": "t", "loraModels": ["a", 1]}, "loraModels"),
    ({"taskId": "t", "images": {"a.png": 3}}, "images"),
    ({"taskId": "t", "userId": 7}, "userId"),
    ({"taskId": "t", "state": "running"}, "state"),
])
def test_a_known_key_of_the_wrong_type_makes_the_file_unreadable(raw: dict[str, Any], named: str) -> None:
    with pytest.raises(JobFormatError, match=re.escape(named)):
        Job.from_dict(raw)


def test_from_bytes_is_strict_json_and_wants_an_object() -> None:
    with pytest.raises(ValueError, match="NaN"):
        Job.from_bytes(b'{"taskId": "t", "workflow": {"1": NaN}}')
    with pytest.raises(JobFormatError, match="list"):
        Job.from_bytes(b'[{"taskId": "t"}]')
    assert Job.from_bytes(b'{"taskId": "t", "attempt": 3}').attempt == 3


# --- writing: round trips ------------------------------------------------------------------------------------

FULL = {"taskId": "t", "userId": "u", "priority": 2, "workflow": WORKFLOW, "loraModels": ["k"],
        "images": {"a.png": "users/u/inputs/a.png"}, "template": "demo", "output": {"format": "png"},
        "attempt": 2, "enqueuedAt": 100.5, "notBefore": 0, "source": {"file": "x.json"}, "timeoutS": 30.0,
        "expiresAt": 500.0, "state": "cancelling", "promptId": "p", "claimedAt": 101.0, "submittedAt": 102.0,
        "startedAt": 103.0, "progress": {"value": 1, "max": 2, "node": "3"}, "deferrals": 1,
        "lastError": {"code": "timeout"}, "rejection": {"code": "invalid_workflow"}, "someday": {"nested": [1]}}


@pytest.mark.parametrize("raw", [
    FULL,
    {"taskId": "t", "priority": 0, "loraModels": [], "images": {}, "attempt": 1, "notBefore": 0},
    {"taskId": "t", "priority": 0, "loraModels": [], "images": {}, "attempt": 1, "notBefore": 0, "x-old": None},
])
def test_to_dict_gives_back_what_from_dict_read(raw: dict[str, Any]) -> None:
    job = Job.from_dict(raw)
    assert written(job) == raw
    assert Job.from_dict(written(job)) == job


def test_defaults_are_written_out_and_nulls_are_not() -> None:
    assert written(Job.from_dict({"taskId": "t", "template": None, "startedAt": None})) == {
        "taskId": "t", "priority": 0, "loraModels": [], "images": {}, "attempt": 1, "notBefore": 0}


def test_an_old_spool_file_rewritten_by_the_runner_keeps_its_unknown_keys(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    old = {"taskId": "t", "userId": "u", "workflow": WORKFLOW, "enqueuedAt": 1.0, "loraModel": "legacy",
           "tenant": {"id": 7}}
    spool.enqueue(Job.from_dict(old))
    path = spool.claim(spool.inbox_entries()[0])
    assert path is not None
    job = spool.load_job(path).claimed("p1", 2.0).submitting().submitted(3.0).started(4.0)
    spool.write_processing(job.with_progress(Progress(1, 2, "3")))
    on_disk = json.loads(path.read_bytes())
    assert on_disk["loraModel"] == "legacy" and on_disk["tenant"] == {"id": 7}
    assert on_disk["state"] == "submitted" and on_disk["progress"] == {"value": 1, "max": 2, "node": "3"}
    back = spool.requeue(spool.load_job(path).retried(9.0, {"code": "timeout"}))
    again = json.loads(back.read_bytes())
    assert again["tenant"] == {"id": 7} and again["attempt"] == 2 and again["state"] == "queued"
    assert "promptId" not in again and "startedAt" not in again and "progress" not in again


# --- the runner's steps ---------------------------------------------------------------------------------------

def test_each_step_is_a_new_record_and_the_old_one_stays() -> None:
    waiting = Job("t", attempt=2, enqueued_at=1.0)
    claimed = waiting.claimed("p", 5.0)
    assert waiting.state is None and waiting.prompt_id is None, "frozen: a step never changes its input"
    assert (claimed.state, claimed.prompt_id, claimed.claimed_at) == (JobState.CLAIMED, "p", 5.0)
    running = claimed.submitting().submitted(6.0).started(7.0).with_progress(Progress(1, 4, "3"))
    assert (running.state, running.submitted_at, running.started_at) == (JobState.SUBMITTED, 6.0, 7.0)
    assert running.claimed("p", 8.0).started_at is None, "claimed again (resubmitted): not started yet"
    retry = running.retried(20.0, {"code": "execution_error"})
    assert (retry.attempt, retry.not_before, retry.state, retry.prompt_id, retry.started_at, retry.progress) == (
        3, 20.0, JobState.QUEUED, None, None, None)
    deferred = running.deferred(30.0)
    assert (deferred.attempt, deferred.state, deferred.prompt_id, deferred.started_at) == (2, JobState.QUEUED,
                                                                                          None, 7.0)
    back = claimed.submitting().submitted(6.0).handed_back()
    assert (back.state, back.prompt_id, back.attempt, back.not_before) == (JobState.QUEUED, None, 2, 0)
    cancelling = claimed.cancelling({"code": "invalid_workflow"})
    assert cancelling.state == JobState.CANCELLING and cancelling.rejection == {"code": "invalid_workflow"}


def test_every_state_the_runner_writes_is_named() -> None:
    runner = (PACKAGE / "runner.py").read_text()
    assert not re.search(r'state\s*=\s*"', runner), "a state as a string literal in runner.py"
    assert {s.value for s in JobState} == {"queued", "claimed", "submitting", "submitted", "cancelling"}


# --- only the spool reads a job file (issue #15: "grep proves it") --------------------------------------------

# A job as a bare dict: indexed or .get() on a name `job` (or `.job`), the inbox's raw bytes, a processing/ path read.
BARE_DICT = [
    re.compile(r"\bjob\s*\[\s*[\"']"),
    re.compile(r"\bjob\.get\("),
    re.compile(r"\.read_inbox\("),
    re.compile(r"processing_path\([^)]*\)\s*\.\s*(read_bytes|read_text|open)\("),
    re.compile(r"\bjob\s*:\s*(dict|Mapping|Any)\b"),
]
OWNERS = {"spool.py", "job.py"}  # the spool reads and writes job files; job.py is the record itself


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name not in OWNERS or p.parent != PACKAGE)


def test_no_module_outside_the_spool_reads_a_job_file_as_a_bare_dict() -> None:
    found = [f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
             for path in _modules() for n, line in enumerate(path.read_text().splitlines(), 1)
             if any(rx.search(line) for rx in BARE_DICT)]
    assert found == [], "read job files through Spool (load_job/read_job/processing_jobs/read_inbox_job):\n" + \
        "\n".join(found)


def _reads_in_processing_loops(source: str) -> list[str]:
    """Calls that read a file inside a `for ... in ....processing_files()` loop."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.For) and "processing_files" in ast.unparse(node.iter)):
            continue
        for inner in ast.walk(ast.Module(body=node.body, type_ignores=[])):
            if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute | ast.Name) and (
                    getattr(inner.func, "attr", None) or getattr(inner.func, "id", None)) in (
                    "read_bytes", "read_text", "open", "loads", "strict_loads"):
                found.append(f"{inner.lineno}: {ast.unparse(inner)}")
    return found


def test_no_loop_over_processing_files_reads_them_itself() -> None:
    """Looping over processing_files() is fine (names, mtimes); reading one is the spool's job."""
    found = [f"{path.relative_to(PACKAGE.parent)}:{hit}" for path in _modules()
             for hit in _reads_in_processing_loops(path.read_text())]
    assert found == []


def test_the_guards_above_would_catch_the_old_code() -> None:
    """The patterns match what the modules held before the Job record (so the two tests above can fail)."""
    old = ['    source = job.get("source") if isinstance(job, dict) else None',
           '        return str(self.job["taskId"])', "            raw = self.spool.read_inbox(entry)",
           "            job = strict_loads(spool.processing_path(task_id).read_bytes())",
           "def deadline_s(job: dict[str, Any], default_s: float) -> float:"]
    assert [line for line in old if not any(rx.search(line) for rx in BARE_DICT)] == []
    loop = "for path in spool.processing_files():\n    try:\n        job = strict_loads(path.read_bytes())\n" \
           "    except ValueError:\n        continue\n"
    assert _reads_in_processing_loops(loop) == ["3: strict_loads(path.read_bytes())", "3: path.read_bytes()"]


# --- what the runner does with a file it cannot run ---------------------------------------------------------

class _RunnerShell:
    def __init__(self, spool: Spool) -> None:
        self.spool = spool


@pytest.mark.parametrize(("raw", "reason"), [
    ({"taskId": "t", "userId": "u", "enqueuedAt": 1.0}, "no workflow"),
    ({"taskId": "t", "workflow": WORKFLOW, "enqueuedAt": 1.0}, "no userId"),
    ({"taskId": "t", "userId": "u", "workflow": WORKFLOW}, "no enqueuedAt"),
    ({"taskId": "t", "userId": "u", "workflow": WORKFLOW, "enqueuedAt": 1.0, "attempt": "2"}, "attempt"),
])
def test_the_runner_quarantines_a_job_it_could_never_finish(tmp_path: Path, raw: dict[str, Any],
                                                            reason: str) -> None:
    from selfix.runner import Runner

    spool = Spool(tmp_path / "spool").ensure()
    path = spool.processing_path("t")
    path.write_text(json.dumps(raw))
    assert Runner.load_job(_RunnerShell(spool), path) is None  # type: ignore[arg-type]
    [(_, why)] = spool.corrupt_entries()
    assert reason in why and not path.exists()
    assert spool.read_job(path) is None and spool.processing_jobs() == []
