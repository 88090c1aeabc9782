"""Poison values, as a class: control characters in ids, user ids, image names and keys; JSON that is not strict
RFC 8259 UTF-8; results that can never be delivered as they are; tasks left unresolved.

The node-level proofs (real supervisord, real Kafka, the double) are in tests/test_kafka_poison.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from selfix import messages as m
from selfix.admission import accept, ingest_dropped_files
from selfix.cli import render_status, status_snapshot
from selfix.job import Job
from selfix.messages import InvalidTask, Limits, StrictJSONError, parse_task, peek_ids, strict_loads
from selfix.metrics import NodeView, make_registry, render
from selfix.process import StopFlags
from selfix.settings import load
from selfix.spool import RESULT_FILE, InboxEntry, Spool, valid_task_id
from selfix.storage import InvalidKey, LocalStore, validate_key
from selfix.templates import Catalog
from selfix.uploader import NoPublisher, Uploader, classify
from tests.servers.node import SAMPLE_LORA, SAMPLE_TASK, SAMPLE_USER, sample_message, sample_workflow

TASK, USER, LORA = SAMPLE_TASK, SAMPLE_USER, SAMPLE_LORA

# Every character class a pattern ending in `$` or a plain `in` check let through somewhere.
CONTROLS = {
    "newline": "\n", "cr": "\r", "tab": "\t", "nul": "\x00", "del": "\x7f", "nel": "\x85", "c1": "\x9b",
    "line-sep": "\u2028", "para-sep": "\u2029", "bidi-override": "\u202e", "zero-width": "\u200b", "bom": "\ufeff",
    "escape": "\x1b", "vt": "\x0b", "ff": "\x0c",
}
PLACES = ("trailing", "leading", "inside")


def put(value: str, char: str, place: str) -> str:
    if place == "trailing":
        return value + char
    if place == "leading":
        return char + value
    return value[:2] + char + value[2:]


def workflow(lora_name: str | None = LORA, image: str | None = None) -> dict[str, Any]:
    # An escaped newline in a prompt is legal: each refusal below is for the poisoned field alone.
    return sample_workflow(lora_name, image, text="a cat\nin a hat")


def message(**changes: Any) -> dict[str, Any]:
    return sample_message(**{"workflow": workflow(), **changes})


def enc(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def refused(raw: bytes, catalog: Catalog) -> InvalidTask:
    with pytest.raises(InvalidTask) as info:
        parse_task(raw, Limits(), catalog)
    return info.value


# --- 1. control characters: every place a name or key is checked -----------------------------------------

@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("char", CONTROLS.values(), ids=CONTROLS.keys())
def test_control_characters_are_refused_everywhere(catalog: Catalog, char: str, place: str) -> None:
    assert not valid_task_id(put("task-1", char, place))

    err = refused(enc(message(taskId=put(TASK, char, place))), catalog)
    assert (err.code, err.task_id) == (m.INVALID_MESSAGE, None)  # no usable taskId: nobody to answer (DLQ)

    err = refused(enc(message(userId=put(USER, char, place))), catalog)
    assert (err.code, err.task_id, err.user_id) == (m.INVALID_MESSAGE, TASK, None)

    err = refused(enc(message(workflow=workflow(image="pose.png"),
                              images={put("pose.png", char, place): "users/alice/inputs/pose.png"})), catalog)
    assert (err.code, err.task_id) == (m.INPUT_FORBIDDEN, TASK), err.message

    err = refused(enc(message(workflow=workflow(image="pose.png"),
                              images={"pose.png": put("users/alice/inputs/pose.png", char, place)})), catalog)
    assert (err.code, err.task_id) == (m.INPUT_FORBIDDEN, TASK), err.message

    key = put(LORA, char, place) if place != "leading" else "users/alice/models/" + char + "style.safetensors"
    err = refused(enc(message(loraModel=key, workflow=workflow(lora_name=key))), catalog)
    assert (err.code, err.task_id) == (m.LORA_FORBIDDEN, TASK), err.message

    with pytest.raises(InvalidKey):
        validate_key(put("users/alice/images/t-0.png", char, place))
    err = refused(enc({"taskId": TASK, "userId": USER, "template": put("demo", char, place)}), catalog)
    assert err.code == m.UNKNOWN_TEMPLATE


@pytest.mark.parametrize("char", CONTROLS.values(), ids=CONTROLS.keys())
def test_inbox_names_parse_only_in_full(char: str) -> None:
    name = InboxEntry.make_name("t1", 0, 1_700_000_000_000)
    assert InboxEntry.parse(name) is not None
    for bad in (name + char, name.replace(".t1.", f".t1{char}."), char + name):
        assert InboxEntry.parse(bad) is None
    with pytest.raises(ValueError):
        InboxEntry.make_name("t1" + char, 0, 1)


def test_a_trailing_newline_task_id_never_reaches_the_inbox(tmp_path: Path, catalog: Catalog) -> None:
    """Seen: taskId "x\\n" was accepted; the consumer then could not parse its own inbox name and answered its own
    file with a misleading invalid_message. Now it is refused at intake, and a hand-dropped file goes to corrupt/."""
    spool = Spool(tmp_path / "spool").ensure()
    good = {"taskId": "t-ok", "userId": USER, "template": "demo"}
    for task_id in ("x\n", "x\r\n", "x\u2028", "x\x00"):
        assert accept(spool, enc({**good, "taskId": task_id}), Limits(), catalog).kind == "unaddressable"
    out = accept(spool, enc({**good, "taskId": "t-user", "userId": "u1\n"}), Limits(), catalog)
    assert out.kind == "failed" and "userId" in out.detail
    assert accept(spool, enc(good), Limits(), catalog).kind == "accepted"
    assert [e.task_id for e in spool.inbox_entries()] == ["t-ok"]
    assert spool.foreign_inbox_files() == [] and spool.outbox_tasks() == ["t-user"]
    (spool.inbox / "dropped.json").write_bytes(enc({**good, "taskId": "y\n"}))
    outcomes = ingest_dropped_files(spool, Limits(), catalog)
    assert [o.kind for o in outcomes] == ["unaddressable"]
    assert len(spool.corrupt_entries()) == 1 and [e.task_id for e in spool.inbox_entries()] == ["t-ok"]


def test_a_dropped_file_with_an_undecodable_name_is_answered(tmp_path: Path, catalog: Catalog) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    name = os.fsdecode(b"task-\xff\xfe.json")  # what os.listdir gives for a name that is not UTF-8
    (spool.inbox / name).write_bytes(b'{"taskId": "t-raw", "userId": "alice", "workflow": {"1": {}}}')
    outcomes = ingest_dropped_files(spool, Limits(), catalog)
    assert [(o.kind, o.task_id) for o in outcomes] == [("failed", "t-raw")]
    result = spool.read_result("t-raw")
    assert result["error"]["code"] == m.INVALID_WORKFLOW and "\ufffd" in result["metadata"]["source"]["file"]


# --- 2. strict JSON ------------------------------------------------------------------------------------------

BASE = enc(message())
STRICT_CASES = {
    "nan": BASE.replace(b'"strength_model": 1.0', b'"strength_model": NaN'),
    "infinity": BASE.replace(b'"strength_model": 1.0', b'"strength_model": Infinity'),
    "minus-infinity": BASE.replace(b'"strength_model": 1.0', b'"strength_model": -Infinity'),
    "float-overflow": BASE.replace(b'"strength_model": 1.0', b'"strength_model": 1e400'),
    "huge-int": BASE.replace(b'"strength_model": 1.0', b'"strength_model": ' + b"9" * 5000),
    "utf16-bom": json.dumps(message()).encode("utf-16"),
    "utf16-le": json.dumps(message()).encode("utf-16-le"),
    "utf16-be": json.dumps(message()).encode("utf-16-be"),
    "utf32": json.dumps(message()).encode("utf-32"),
    "utf8-bom": b"\xef\xbb\xbf" + BASE,
    "invalid-utf8": BASE.replace(b"a cat", b"a \xff\xfe cat"),
    "overlong-utf8": BASE.replace(b"a cat", b"a \xc0\xaf cat"),
    "encoded-surrogate-utf8": BASE.replace(b"a cat", b"a \xed\xa0\x80 cat"),
    "lone-high-surrogate": BASE.replace(b"a cat", b"a \\ud800 cat"),
    "lone-low-surrogate": BASE.replace(b"a cat", b"a \\udc00 cat"),
    "reversed-pair": BASE.replace(b"a cat", b"\\ude00\\ud83d"),
    "surrogate-in-key": BASE.replace(b'"text"', b'"te\\ud800xt"'),
    "duplicate-top-key": BASE[:-1] + b', "userId": "bob"}',
    "duplicate-nested-key": BASE.replace(b'"text": "a cat', b'"text": "x", "text": "a cat'),
    "raw-control-in-string": BASE.replace(b"a cat", b"a\x01cat"),
    "trailing-garbage": BASE + b" x",
    "single-quotes": BASE.replace(b'"text"', b"'text'"),
}


@pytest.mark.parametrize("raw", STRICT_CASES.values(), ids=STRICT_CASES.keys())
def test_not_strict_json_is_refused_and_still_answered(catalog: Catalog, tmp_path: Path, raw: bytes) -> None:
    with pytest.raises(StrictJSONError):
        strict_loads(raw)
    err = refused(raw, catalog)
    assert err.code == m.INVALID_MESSAGE and "strict JSON" in err.message, err.message
    assert err.task_id == TASK, "the taskId can be read: the client must get a failed result, not the DLQ"
    assert err.user_id == (None if b'"userId": "bob"' in raw else USER)  # a userId given twice is unreadable
    spool = Spool(tmp_path / "spool").ensure()
    out = accept(spool, raw, Limits(), catalog)
    assert (out.kind, out.task_id) == ("failed", TASK)
    result = spool.read_result(TASK)
    assert result["error"]["code"] == m.INVALID_MESSAGE
    json.dumps(result).encode("utf-8")  # the answer itself is clean UTF-8


def test_strict_json_keeps_what_rfc_8259_allows() -> None:
    assert strict_loads(b'{"a": "\\ud83d\\ude00", "b": "\\u0000", "c": 1e308, "d": -0.0, "e": 12345678901234567890}') \
        == {"a": "\U0001f600", "b": "\x00", "c": 1e308, "d": -0.0, "e": 12345678901234567890}
    assert strict_loads(b'{"x": "' + "é😀".encode() + b'"}') == {"x": "é😀"}
    assert strict_loads(b"[1, 2]") == [1, 2]
    with pytest.raises(StrictJSONError, match="nested too deeply"):
        strict_loads(b"[" * 100_000)


def test_peek_reads_the_task_id_only_when_unambiguous() -> None:
    huge = b"9" * 5000
    assert peek_ids(b'{"taskId": "t1", "userId": "u1", "n": ' + huge + b"}") == ("t1", "u1")  # byte scan
    assert peek_ids(b'{"taskId": "t1", "w": {"taskId": "t2"}, "n": ' + huge + b"}") == (None, None)
    assert peek_ids(b'{"taskId": "t1", "taskId": "t2", "userId": "u1"}') == (None, "u1")
    assert peek_ids(b'{"taskId": "t1", "taskId": "t1", "userId": "u1"}') == ("t1", "u1")
    assert peek_ids(b'{"taskId": "t1\\n", "userId": "u1"}') == (None, "u1")
    assert peek_ids(b"\xff\xfe garbage") == (None, None)


def test_job_files_are_parsed_strictly(tmp_path: Path) -> None:
    """A job file selfix did not write strictly (NaN) is not run with a guessed meaning: runner quarantines it."""
    from selfix.runner import Runner

    spool = Spool(tmp_path / "spool").ensure()
    path = spool.processing_path("t-nan")
    path.write_bytes(b'{"taskId": "t-nan", "userId": "u1", "workflow": {"1": {"inputs": {"x": NaN}}}}')
    loaded = Runner.load_job(_RunnerShell(spool), path)  # type: ignore[arg-type]
    assert loaded is None and len(spool.corrupt_entries()) == 1
    assert "NaN" in spool.corrupt_entries()[0][1]


class _RunnerShell:
    def __init__(self, spool: Spool) -> None:
        self.spool = spool


# --- 1b. no accepted task without a result: the uploader's classification --------------------------------

def test_classify_every_kind_of_error() -> None:
    from selfix.kafka import MessageRejected, PublishError, PublishRefused
    from selfix.storage import ObjectForbidden, ObjectTooLarge, StorageUnavailable

    assert classify("publish", PublishRefused("wrong password")) == "refused"
    assert classify("publish", MessageRejected("too large")) == "rejected"
    assert classify("publish", PublishError("broker down")) == "wait"
    assert classify("publish", UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogate")) == "rejected"
    assert classify("store", InvalidKey("control character")) == "rejected"
    assert classify("store", ObjectTooLarge("5 TB")) == "rejected"
    assert classify("store", FileNotFoundError("image gone")) == "rejected"
    assert classify("store", StorageUnavailable("S3 down")) == "bounded"
    assert classify("store", ObjectForbidden("policy")) == "bounded"
    assert classify("store", NotADirectoryError("store path")) == "bounded"
    assert classify("store", KeyError("imagePaths")) == "rejected"


def uploader_for(tmp_path: Path, **env: str) -> tuple[Uploader, Spool]:
    settings = load({"SPOOL_DIR": str(tmp_path / "spool"), "STORE_DIR": str(tmp_path / "store"),
                     "COMFY_OUTPUT_DIR": str(tmp_path / "out"), "COMFY_INPUT_DIR": str(tmp_path / "in"), **env})
    spool = Spool(settings.spool_dir).ensure()
    return Uploader(settings, spool, LocalStore(settings.store_dir), NoPublisher(), StopFlags()), spool


def completed(spool: Spool, task_id: str, keys: list[str], files: list[str] | None = None) -> None:
    staged = spool.stage_result(task_id)
    for name in files if files is not None else [Path(k).name for k in keys]:
        (staged / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    spool.publish_result(staged, m.completed_result(Job(task_id, "u1"), keys,
                                                    {"attempts": 1, "totalTime": 1.0}))


@pytest.mark.parametrize(("keys", "files", "why"), [
    (["users/u1\n/images/t-0.png"], ["t-0.png"], "control character"),   # the seen endless loop
    (["users/u1/images/t-0.png\r"], ["t-0.png\r"], "control character"),
    (["users/u1/images/../../t-0.png"], ["t-0.png"], "'..'"),
    (["users/u1/images/t-0.png"], [], "No such file"),                    # an image the result names is missing
])
def test_a_result_that_cannot_be_stored_becomes_a_failed_result_at_once(tmp_path: Path, keys: list[str],
                                                                         files: list[str], why: str) -> None:
    uploader, spool = uploader_for(tmp_path)
    completed(spool, "t", keys, files)
    uploader.deliver("t")
    done = spool.read_done("t")
    assert done is not None, "published at the first try, not retried"
    assert done["status"] == "failed" and done["error"]["code"] == m.OUTPUT_INVALID and why in done["error"]["message"]
    assert done["metadata"]["attempts"] == 1 and done["imagePaths"] == []
    assert spool.outbox_tasks() == [] and spool.corrupt_entries() == [] and os.listdir(spool.tmp) == []


def test_a_store_that_keeps_failing_is_retried_within_the_bound_then_answered(tmp_path: Path) -> None:
    uploader, spool = uploader_for(tmp_path, RESULT_RETRY_S="60")
    (tmp_path / "store" / "users" / "u1").mkdir(parents=True)
    (tmp_path / "store" / "users" / "u1" / "images").write_text("a file where a directory must be")
    completed(spool, "t", ["users/u1/images/t-0.png"])
    uploader.deliver("t")
    assert spool.read_done("t") is None and spool.outbox_tasks() == ["t"], "retried within RESULT_RETRY_S"
    assert uploader.failures["t"] == 1 and uploader.not_before["t"] > time.monotonic()
    old = time.time() - 61
    os.utime(spool.outbox_dir("t") / RESULT_FILE, (old, old))
    uploader.deliver("t")
    done = spool.read_done("t")
    assert done is not None and done["status"] == "failed" and done["error"]["code"] == m.OUTPUT_INVALID
    assert spool.outbox_tasks() == []


class _Rejecting(NoPublisher):
    """Refuses results whose status is in `refuse`, the way the broker refuses a message too large for the topic."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse, self.published, self.dead = refuse, [], []  # type: ignore[var-annotated]

    def publish(self, result: dict[str, Any]) -> None:
        from selfix.kafka import MessageRejected

        if result["status"] in self.refuse:
            raise MessageRejected("message larger than the broker or topic accepts")
        self.published.append(result)

    def dead_letter(self, result: dict[str, Any], reason: str) -> None:
        self.dead.append((result, reason))


def test_a_result_the_broker_refuses_is_replaced_then_dead_lettered(tmp_path: Path) -> None:
    uploader, spool = uploader_for(tmp_path)
    uploader.publisher = publisher = _Rejecting({"completed"})
    completed(spool, "big", ["users/u1/images/big-0.png"])
    uploader.deliver("big")
    assert [(r["taskId"], r["error"]["code"]) for r in publisher.published] == [("big", m.OUTPUT_INVALID)]
    assert spool.read_done("big")["error"]["code"] == m.OUTPUT_INVALID  # type: ignore[index]

    publisher.refuse = {"completed", "failed"}  # even the failed result is refused: corrupt/ + DLQ + done/
    completed(spool, "worse", ["users/u1/images/worse-0.png"])
    uploader.deliver("worse")
    assert [r["taskId"] for r, _ in publisher.dead] == ["worse"]
    assert spool.read_done("worse")["error"]["code"] == m.OUTPUT_INVALID  # type: ignore[index]
    assert len(spool.corrupt_entries()) == 1 and "failed result too" in spool.corrupt_entries()[0][1]
    assert spool.outbox_tasks() == [] and uploader.refused is None


# --- 1c. unresolved tasks: metric and status line ----------------------------------------------------------

def test_unresolved_tasks_metric_and_status_line(tmp_path: Path) -> None:
    settings = load({"SPOOL_DIR": str(tmp_path / "spool"), "UNRESOLVED_AFTER_S": "600",
                     "SUPERVISOR_URL": "unix:///nonexistent/supervisor.sock"})
    spool = Spool(settings.spool_dir).ensure()
    now = time.time()
    spool.enqueue(Job("old-inbox", enqueued_at=now - 700, workflow={}))
    spool.enqueue(Job("new-inbox", enqueued_at=now - 5, workflow={}))
    spool.write_processing(Job("old-run", enqueued_at=now - 3600, workflow={}))
    spool.write_result({"taskId": "old-out", "status": "completed", "metadata": {"totalTime": 900.0}})
    assert [t for t, _ in spool.unresolved(600, now)] == ["old-run", "old-out", "old-inbox"]

    text = render(make_registry(lambda: NodeView(unresolved=len(spool.unresolved(600, now))))).decode()
    assert "selfix_unresolved_tasks 3.0" in text
    line = next(x for x in render_status(status_snapshot(settings)).splitlines() if "unresolved" in x.lower())
    assert line.startswith("UNRESOLVED: 3 task(s)") and "old-run" in line
    spool.finish({"taskId": "old-out"})
    spool.drop_processing("old-run")
    assert [t for t, _ in spool.unresolved(600)] == ["old-inbox"]


def test_a_lone_surrogate_in_a_result_never_stops_a_writer_or_the_answer(tmp_path: Path) -> None:
    """ComfyUI may echo text selfix did not parse itself: the result is still written, and if the broker side cannot
    encode it, the replacement failed result is clean UTF-8."""
    from selfix.uploader import replacement

    spool = Spool(tmp_path / "spool").ensure()
    result = {"taskId": "s", "userId": "u1", "status": "failed", "metadata": {},
              "error": {"code": "execution_error", "message": "node 3: bad \ud800 text", "retriable": False}}
    assert spool.write_result(result)
    assert spool.read_result("s")["error"]["message"] == "node 3: bad \ud800 text"
    with pytest.raises(UnicodeEncodeError) as info:
        json.dumps(result, ensure_ascii=False).encode()
    assert classify("publish", info.value) == "rejected"
    failed = replacement("s", result, info.value, "rejected")
    assert failed["error"]["code"] == m.OUTPUT_INVALID
    json.dumps(failed, ensure_ascii=False).encode()


def test_every_module_pattern_is_anchored_for_fullmatch_only() -> None:
    """The class, not the case: no compiled pattern in selfix ends in `$` (which matches before a final newline);
    anchoring is fullmatch()'s job."""
    import importlib
    import pkgutil
    import re

    import selfix

    offenders = []
    for info in pkgutil.iter_modules(selfix.__path__):
        if info.name == "__main__":
            continue
        module = importlib.import_module(f"selfix.{info.name}")
        for name, value in vars(module).items():
            pattern = value.pattern if isinstance(value, re.Pattern) else None
            if isinstance(pattern, str) and pattern.endswith("$") and not pattern.endswith("\\$"):
                offenders.append(f"selfix.{info.name}.{name}")
    assert offenders == []


def test_the_failed_result_after_the_bound_names_the_store_error() -> None:
    from selfix.storage import ObjectForbidden, StorageUnavailable
    from selfix.uploader import replacement

    result = {"taskId": "t", "userId": "u1", "status": "completed", "metadata": {"attempts": 2}}
    down = replacement("t", result, StorageUnavailable("s3 PUT: connection refused"), "bounded")
    assert down["error"] == {"code": m.STORAGE_UNAVAILABLE, "retriable": True,
                             "message": "the images could not be stored: s3 PUT: connection refused"}
    refused = replacement("t", result, ObjectForbidden("s3 PUT: AccessDenied"), "bounded")
    assert refused["error"]["code"] == m.OUTPUT_FORBIDDEN and refused["error"]["retriable"] is False
    assert refused["metadata"] == {"attempts": 2} and refused["userId"] == "u1" and refused["status"] == "failed"


@pytest.mark.s3
def test_results_against_real_minio_invalid_and_refused_keys_are_answered(s3_bucket: Any, tmp_path: Path) -> None:
    """The seen case with the real store: `users/u1\\n/images/...` was retried without end. An invalid key is now
    answered at once; a key the server itself refuses (a path segment over MinIO's 255 bytes) is retried until
    RESULT_RETRY_S, then answered; a good result beside them is stored and published."""
    from selfix.storage import open_store

    settings = s3_bucket.settings(SPOOL_DIR=str(tmp_path / "spool"), COMFY_OUTPUT_DIR=str(tmp_path / "out"),
                                  COMFY_INPUT_DIR=str(tmp_path / "in"), RESULT_RETRY_S="30")
    spool = Spool(settings.spool_dir).ensure()
    uploader = Uploader(settings, spool, open_store(settings), NoPublisher(), StopFlags())
    completed(spool, "nl", ["users/u1\n/images/nl-0.png"], ["nl-0.png"])
    completed(spool, "long", ["users/u1/images/" + "x" * 300 + "/long-0.png"])
    completed(spool, "good", ["users/u1/images/good-0.png"])
    for task_id in ("nl", "long", "good"):
        uploader.deliver(task_id)
    assert spool.read_done("nl")["error"]["code"] == m.OUTPUT_INVALID  # type: ignore[index]
    assert spool.read_done("good")["status"] == "completed"  # type: ignore[index]
    assert s3_bucket.client().stat_object(s3_bucket.bucket, "users/u1/images/good-0.png").size == 8
    assert spool.read_done("long") is None and uploader.failures["long"] == 1, "the server's refusal is retried"
    old = time.time() - 31
    os.utime(spool.outbox_dir("long") / RESULT_FILE, (old, old))
    uploader.deliver("long")
    done = spool.read_done("long")
    assert done is not None and done["status"] == "failed", done
    assert done["error"]["code"] == m.OUTPUT_INVALID and "XMinioInvalidObjectName" in done["error"]["message"]
    assert spool.outbox_tasks() == []
