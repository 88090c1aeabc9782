"""Task messages in, results out: parsing, validation and error codes. Pure: no I/O here.

A task that fails validation becomes a failed result with a specific code when its taskId can be read; without a
readable taskId there is nobody to answer, so the caller quarantines the bytes (corrupt/ or the DLQ).

Tasks and job files are parsed by `strict_loads` (selfix/strictjson.py) only: RFC 8259 JSON in UTF-8. A message
that is not strict JSON is still answered when its taskId can be read some other way (`peek_ids`: a lenient parse,
then a byte scan).
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Any

from selfix.job import Job
from selfix.settings import DEFAULT_NODE_DENYLIST
from selfix.spool import PRIORITY_MAX, PRIORITY_MIN, has_control, valid_task_id
from selfix.strictjson import StrictJSONError as StrictJSONError  # re-exported: callers find them here
from selfix.strictjson import strict_loads as strict_loads

# Error codes a client can act on. retriable says whether sending the same task again could succeed.
INVALID_MESSAGE = "invalid_message"
MESSAGE_TOO_LARGE = "message_too_large"
INVALID_WORKFLOW = "invalid_workflow"
UNKNOWN_TEMPLATE = "unknown_template"
INVALID_PARAMS = "invalid_params"
LORA_NOT_FOUND = "lora_not_found"
LORA_FORBIDDEN = "lora_forbidden"
LORA_NOT_USED = "lora_not_used"
LORA_INVALID = "lora_invalid"
LORA_TOO_LARGE = "lora_too_large"
INPUT_NOT_FOUND = "input_not_found"
INPUT_FORBIDDEN = "input_forbidden"
INPUT_TOO_LARGE = "input_too_large"
MODEL_FORBIDDEN = "model_forbidden"
EXECUTION_ERROR = "execution_error"
OUT_OF_MEMORY = "out_of_memory"
TIMEOUT = "timeout"
INTERRUPTED = "interrupted"
COMFYUI_UNAVAILABLE = "comfyui_unavailable"
STORAGE_UNAVAILABLE = "storage_unavailable"
NO_OUTPUT = "no_output"
OUTPUT_TOO_LARGE = "output_too_large"
RETRIES_EXHAUSTED = "retries_exhausted"
OUTPUT_INVALID = "output_invalid"
OUTPUT_FORBIDDEN = "output_forbidden"

MAX_WORKFLOW_DEPTH = 32  # real graphs nest 3-4 levels; deep nesting only serves to crash recursive code
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".pkl")
# Used with fullmatch() only: `$` also matches before a final "\n".
IMAGE_NAME_RE = re.compile(r"(?!\.)[A-Za-z0-9._-]{1,128}\.(png|jpg|jpeg|webp)", re.IGNORECASE)
DATA_URL_RE = re.compile(r"data:image/(png|jpeg|jpg|webp);base64,(?P<payload>.*)", re.DOTALL)
# peek_ids' last resort on bytes no parser accepts: "taskId": "<id>" anywhere, used only when all agree.
_ID_SCAN = {name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*"([A-Za-z0-9._-]{1,128})"')
            for name in ("taskId", "userId")}


class TaskError(Exception):
    """A task cannot run: `code` and `message` go into the failed result as they are."""

    def __init__(self, code: str, message: str, *, retriable: bool = False, node_errors: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retriable = retriable
        self.node_errors = node_errors

    def as_error(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message, "retriable": self.retriable}
        if self.node_errors:
            err["nodeErrors"] = redact_node_errors(self.node_errors)
        return err


class InvalidTask(TaskError):
    """Validation failure at intake. task_id/user_id are set when they could be read, so a result can be sent."""

    def __init__(self, code: str, message: str, task_id: str | None = None, user_id: str | None = None) -> None:
        super().__init__(code, message)
        self.task_id = task_id
        self.user_id = user_id


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 1 << 20
    max_workflow_nodes: int = 500
    max_data_url_bytes: int = 10 << 20
    user_prefix: str = "users/{userId}/"
    node_deny: frozenset[str] = DEFAULT_NODE_DENYLIST  # NODE_DENYLIST
    node_allow: frozenset[str] = frozenset()  # empty: no allowlist
    max_timeout_s: float = 600.0  # JOB_TIMEOUT_S: the cap of a task's own timeoutS

    def prefix(self, user_id: str) -> str:
        return self.user_prefix.replace("{userId}", user_id)


@dataclass(frozen=True)
class Task:
    """A validated task; `workflow` is final (template rendered), ready for binding and patching."""

    task_id: str
    user_id: str
    workflow: dict[str, Any]
    lora_models: tuple[str, ...] = ()
    priority: int = 0
    images: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    output: dict[str, Any] | None = None
    control: dict[str, float] = field(default_factory=dict)  # timeoutS / expiresAt / ttlS as given

    def to_job(self, *, source: dict[str, Any] | None = None, now: float | None = None,
               sent_at: float | None = None) -> Job:
        """The job file's content: everything the runner needs; the runner adds its own bookkeeping fields."""
        stamp = time.time() if now is None else now
        control = job_control_fields(self.control, sent_at or stamp)  # sent_at: the Kafka message's timestamp
        return Job(task_id=self.task_id, user_id=self.user_id, priority=self.priority, workflow=self.workflow,
                   lora_models=self.lora_models, images=dict(self.images), template=self.template,
                   output=self.output, attempt=1, enqueued_at=stamp, not_before=0, source=source,
                   timeout_s=control.get("timeoutS"), expires_at=control.get("expiresAt"))


# --- tasks ---------------------------------------------------------------------------------------------

_AMBIGUOUS = object()


def peek_ids(raw: bytes) -> tuple[str | None, str | None]:
    """Best-effort taskId/userId from bytes that are not a valid task, to address a failed result.

    Lenient on purpose (this only picks whom to answer; the task itself was refused by strict_loads): Python's own
    parser (NaN allowed, UTF-16/32 detected), then with undecodable bytes replaced, then a byte scan that counts
    only when every "taskId" in the bytes names the same id. A key given twice with different values is unreadable.
    """
    obj: Any = None
    for attempt in (raw, raw.decode("utf-8", "replace")):
        try:
            obj = json.loads(attempt, object_pairs_hook=_ids_pairs)
            break
        except (ValueError, RecursionError):
            continue
    else:
        return _scan_id(raw, "taskId"), _scan_id(raw, "userId")
    if not isinstance(obj, dict):
        return None, None
    task_id, user_id = obj.get("taskId"), obj.get("userId")
    return (task_id if valid_task_id(task_id) else None), (user_id if valid_task_id(user_id) else None)


def _ids_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj and obj[key] != value:
            value = _AMBIGUOUS
        if obj.get(key) is not _AMBIGUOUS:
            obj[key] = value
    return obj


def _scan_id(raw: bytes, name: str) -> str | None:
    found = {m.decode() for m in _ID_SCAN[name].findall(raw)}
    value = found.pop() if len(found) == 1 else None
    return value if valid_task_id(value) else None


def parse_task(raw: bytes, limits: Limits, templates: Any) -> Task:
    """Validate one input message. `templates` is a selfix.templates.Catalog (render(name, params, loras))."""
    if len(raw) > limits.max_message_bytes:
        raise InvalidTask(MESSAGE_TOO_LARGE, f"message is {len(raw)} bytes; the limit is {limits.max_message_bytes}",
                          *peek_ids(raw))
    try:
        obj = strict_loads(raw)
    except StrictJSONError as exc:
        raise InvalidTask(INVALID_MESSAGE, f"message is not strict JSON (RFC 8259, UTF-8): {exc}",
                          *peek_ids(raw)) from None
    if not isinstance(obj, dict):
        raise InvalidTask(INVALID_MESSAGE, f"message must be a JSON object, got {type(obj).__name__}")
    task_id = obj["taskId"] if valid_task_id(obj.get("taskId")) else None
    user_id = obj["userId"] if valid_task_id(obj.get("userId")) else None
    if task_id is None:
        raise InvalidTask(INVALID_MESSAGE, _id_problem("taskId", obj.get("taskId")))
    if user_id is None:
        raise InvalidTask(INVALID_MESSAGE, _id_problem("userId", obj.get("userId")), task_id)
    try:
        return _build_task(obj, task_id, user_id, limits, templates)
    except InvalidTask:
        raise
    except TaskError as exc:
        raise InvalidTask(exc.code, exc.message, task_id, user_id) from exc


def _id_problem(name: str, value: object) -> str:
    if value is None:
        return f"{name} is missing"
    return f"{name} must match [A-Za-z0-9._-]{{1,128}} without a leading dot, got {str(value)[:60]!r}"


def _build_task(obj: dict[str, Any], task_id: str, user_id: str, limits: Limits, templates: Any) -> Task:
    priority = obj.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TaskError(INVALID_MESSAGE, f"priority must be an integer, got {type(priority).__name__}")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise TaskError(INVALID_MESSAGE, f"priority must be within {PRIORITY_MIN}..{PRIORITY_MAX}")
    loras = parse_lora_models(obj.get("loraModel"), user_id, limits)
    images = parse_images(obj.get("images"), user_id, limits)
    output = parse_output_spec(obj.get("output"))
    workflow, template = _workflow_of(obj, loras, templates)
    validate_workflow(workflow, limits.max_workflow_nodes)
    check_names(workflow, task_id, user_id, loras, images, limits)
    check_loras_used(workflow, loras)
    control = parse_control_fields(obj, limits.max_timeout_s)
    return Task(task_id, user_id, workflow, tuple(loras), priority, images, template, output, control)


def _workflow_of(obj: dict[str, Any], loras: list[str], templates: Any) -> tuple[dict[str, Any], str | None]:
    has_wf, has_tpl = "workflow" in obj, "template" in obj
    if has_wf == has_tpl:
        raise TaskError(INVALID_MESSAGE, "give exactly one of workflow or template (+ params)")
    if has_wf:
        return obj["workflow"], None
    name, params = obj["template"], obj.get("params", {})
    if not isinstance(name, str):
        raise TaskError(INVALID_MESSAGE, "template must be a string")
    if not isinstance(params, dict):
        raise TaskError(INVALID_MESSAGE, "params must be a JSON object")
    return templates.render(name, params, loras), name


def validate_workflow(workflow: Any, max_nodes: int) -> None:
    """Shape checks ComfyUI would otherwise answer with a less helpful 400 (or 500); node semantics are its job."""
    if not isinstance(workflow, dict) or not workflow:
        raise TaskError(INVALID_WORKFLOW, "workflow must be a non-empty object of nodes in ComfyUI API format")
    if len(workflow) > max_nodes:
        raise TaskError(INVALID_WORKFLOW, f"workflow has {len(workflow)} nodes; the limit is {max_nodes}")
    for node_id, node in workflow.items():
        if not isinstance(node, dict):
            raise TaskError(INVALID_WORKFLOW, f"node {node_id!r} must be an object")
        if not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise TaskError(INVALID_WORKFLOW, f"node {node_id!r} has no class_type (is this the UI format? "
                                              "export with 'Save (API)')")
        if not isinstance(node.get("inputs", {}), dict):
            raise TaskError(INVALID_WORKFLOW, f"node {node_id!r}: inputs must be an object")
        if _depth(node) > MAX_WORKFLOW_DEPTH:
            raise TaskError(INVALID_WORKFLOW, f"node {node_id!r} is nested deeper than {MAX_WORKFLOW_DEPTH} levels")


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (a recursive walk is what deep input would crash)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_WORKFLOW_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, level + 1) for child in children)
    return deepest


def parse_lora_models(value: Any, user_id: str, limits: Limits) -> list[str]:
    if value is None:
        return []
    keys = [value] if isinstance(value, str) else value
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TaskError(INVALID_MESSAGE, "loraModel must be a string or a list of strings")
    for key in keys:
        check_lora_key(key, user_id, limits)
    unique = list(dict.fromkeys(keys))
    names = [posixpath.basename(k) for k in unique]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise TaskError(INVALID_MESSAGE, f"loraModel keys share the file name(s) {clash}: a lora_name could not "
                                         "tell them apart; give the full keys different file names")
    return unique


def check_user_key(key: str, user_id: str, limits: Limits, code: str, what: str) -> None:
    """An object key a user may name: normalised, relative, under that user's prefix."""
    prefix = limits.prefix(user_id)
    bad = (not key or key.startswith("/") or "\\" in key or has_control(key)
           or posixpath.normpath(key) != key or ".." in key.split("/"))
    if bad:
        raise TaskError(code, f"{what} key {key[:200]!r} is not a plain relative object key")
    if not key.startswith(prefix):
        raise TaskError(code, f"{what} key {key[:200]!r} is outside the user's prefix {prefix!r}")


def check_lora_key(key: str, user_id: str, limits: Limits) -> None:
    check_user_key(key, user_id, limits, LORA_FORBIDDEN, "loraModel")
    lower = key.lower()
    if lower.endswith(PICKLE_EXTENSIONS):
        raise TaskError(LORA_FORBIDDEN, f"loraModel {key!r}: pickle formats can run code and are refused; "
                                        "convert it to .safetensors")
    if not lower.endswith(".safetensors"):
        raise TaskError(LORA_FORBIDDEN, f"loraModel {key!r} must be a .safetensors file")


def parse_images(value: Any, user_id: str, limits: Limits) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TaskError(INVALID_MESSAGE, "images must be an object of file name -> object key or data: URL")
    for name, ref in value.items():
        if not isinstance(name, str) or not IMAGE_NAME_RE.fullmatch(name):
            raise TaskError(INPUT_FORBIDDEN, f"image name {name[:80]!r} must be a plain .png/.jpg/.webp file name")
        if not isinstance(ref, str):
            raise TaskError(INVALID_MESSAGE, f"images[{name!r}] must be a string")
        if ref.startswith("data:"):
            decode_data_url(ref, limits.max_data_url_bytes, name)
        else:
            check_user_key(ref, user_id, limits, INPUT_FORBIDDEN, f"images[{name!r}]")
    return dict(value)


def decode_data_url(ref: str, max_bytes: int, name: str) -> bytes:
    match = DATA_URL_RE.fullmatch(ref)
    if not match:
        raise TaskError(INPUT_FORBIDDEN, f"images[{name!r}]: only data:image/(png|jpeg|webp);base64 URLs are accepted")
    payload = match["payload"]
    if len(payload) * 3 // 4 > max_bytes:
        raise TaskError(INPUT_TOO_LARGE, f"images[{name!r}] is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise TaskError(INPUT_FORBIDDEN, f"images[{name!r}]: invalid base64 payload") from None


def check_names(workflow: dict[str, Any], task_id: str, user_id: str, loras: list[str], images: dict[str, str],
                limits: Limits) -> None:
    """The file names the workflow hands to ComfyUI (selfix.isolation), without looking at the disk: what intake
    can refuse early. The runner checks again with the node's file listing before anything is queued."""
    from selfix import isolation  # isolation imports this module's codes

    policy = isolation.NodePolicy(limits.node_deny, limits.node_allow)
    grant = isolation.grant_for_task(task_id, user_id, loras, images)
    isolation.check_workflow(workflow, grant, isolation.Listing(), policy, limits.user_prefix,
                             skip_inputs=frozenset({"filename_prefix"}))


OUTPUT_FORMATS = {"png": "png", "webp": "webp", "jpeg": "jpeg", "jpg": "jpeg"}
OUTPUT_FIELDS = ("format", "quality", "stripMetadata")


def parse_output_spec(value: Any) -> dict[str, Any] | None:
    """The task's `output` field: how still images are encoded before upload. Normalised (jpg -> jpeg)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TaskError(INVALID_MESSAGE, 'output must be an object like {"format": "webp", "quality": 85, '
                                         '"stripMetadata": true}')
    unknown = sorted(set(value) - set(OUTPUT_FIELDS))
    if unknown:
        raise TaskError(INVALID_MESSAGE, f"output has unknown field(s) {unknown}; known: {list(OUTPUT_FIELDS)}")
    spec: dict[str, Any] = {}
    fmt = value.get("format")
    if fmt is not None:
        if not isinstance(fmt, str) or fmt.lower() not in OUTPUT_FORMATS:
            raise TaskError(INVALID_MESSAGE, f"output.format must be one of png, webp, jpeg; got {str(fmt)[:40]!r}")
        spec["format"] = OUTPUT_FORMATS[fmt.lower()]
    quality = value.get("quality")
    if quality is not None:
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise TaskError(INVALID_MESSAGE, f"output.quality must be an integer 1..100, got {str(quality)[:40]!r}")
        if spec.get("format") not in ("webp", "jpeg"):
            raise TaskError(INVALID_MESSAGE, 'output.quality needs output.format "webp" or "jpeg" (PNG is lossless)')
        spec["quality"] = quality
    strip = value.get("stripMetadata")
    if strip is not None:
        if not isinstance(strip, bool):
            raise TaskError(INVALID_MESSAGE, f"output.stripMetadata must be true or false, got {str(strip)[:40]!r}")
        spec["stripMetadata"] = strip
    return spec


def lora_inputs(workflow: dict[str, Any]) -> list[tuple[str, str]]:
    """(node id, value) of every literal string input (any name: LoRA Stacker has lora_name_1, lora_name_2, ...)."""
    return [
        (node_id, value)
        for node_id, node in workflow.items() if isinstance(node.get("inputs"), dict)
        for value in node["inputs"].values() if isinstance(value, str)
    ]


def lora_matches(value: str, key: str) -> bool:
    return value in (key, posixpath.basename(key))


def check_loras_used(workflow: dict[str, Any], loras: list[str]) -> None:
    used = lora_inputs(workflow)
    for key in loras:
        if not any(lora_matches(v, key) for _, v in used):
            raise TaskError(LORA_NOT_USED, f"loraModel {key!r} is not the lora_name of any node; set a LoraLoader's "
                                           f"lora_name to the key or to {posixpath.basename(key)!r}")


_NOT_IN_LIST_RE = re.compile(r"(?P<input>[^:]*): (?P<value>.*) not in .*", re.DOTALL)  # fullmatch() only


def redact_node_errors(node_errors: Any) -> Any:
    """ComfyUI's value_not_in_list errors carry the whole list of choices (for a short list, in details and
    extra_info.input_config): for a LoRA that is every cached file name on the node. A client gets the error without
    the list."""
    if not isinstance(node_errors, dict):
        return node_errors
    out: dict[str, Any] = {}
    for node_id, entry in node_errors.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("errors"), list):
            out[node_id] = entry
            continue
        errors = []
        for err in entry["errors"]:
            if isinstance(err, dict) and err.get("type") == "value_not_in_list":
                err = dict(err)
                match = _NOT_IN_LIST_RE.fullmatch(str(err.get("details", "")))
                if match:
                    err["details"] = f"{match['input']}: {match['value']} not in the list of choices"
                if isinstance(err.get("extra_info"), dict):
                    err["extra_info"] = {**err["extra_info"], "input_config": None}
            errors.append(err)
        out[node_id] = {**entry, "errors": errors}
    return out


# --- task control: per-task deadline and expiry (docs: README "Task control") ---------------------------------

def _positive_number(obj: dict[str, Any], name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e12:
        raise TaskError(INVALID_MESSAGE, f"{name} must be a positive number of seconds, got {str(value)[:40]!r}")
    return float(value)


def parse_control_fields(obj: dict[str, Any], max_timeout_s: float) -> dict[str, float]:
    """timeoutS (capped by JOB_TIMEOUT_S: a larger one is refused, not silently cut), expiresAt, ttlS."""
    fields = {name: v for name in ("timeoutS", "expiresAt", "ttlS") if (v := _positive_number(obj, name)) is not None}
    if fields.get("timeoutS", 0) > max_timeout_s:
        raise TaskError(INVALID_MESSAGE, f"timeoutS={fields['timeoutS']:g} is above the cap JOB_TIMEOUT_S="
                                         f"{max_timeout_s:g}; send at most {max_timeout_s:g}")
    return fields


def job_control_fields(control: dict[str, float], base_s: float) -> dict[str, float]:
    """What the job file carries: timeoutS, and one absolute expiresAt (ttlS counts from `base_s`: the Kafka
    message's timestamp, or the time of acceptance; with both, the earlier moment wins)."""
    out = {"timeoutS": control["timeoutS"]} if "timeoutS" in control else {}
    ends = [control["expiresAt"]] if "expiresAt" in control else []
    if "ttlS" in control:
        ends.append(float(base_s) + control["ttlS"])
    if ends:
        out["expiresAt"] = min(ends)
    return out


# --- results -------------------------------------------------------------------------------------------

def completed_result(job: Job, image_paths: list[str], metadata: dict[str, Any],
                     outputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """imagePath/imagePaths name the still images (the seed's contract); `outputs` lists every output."""
    return {
        "taskId": job.task_id, "userId": job.user_id, "status": "completed",
        "imagePath": image_paths[0] if image_paths else None, "imagePaths": image_paths,
        "outputs": outputs if outputs is not None else [], "metadata": metadata,
    }


def failed_result(task_id: str, user_id: str | None, error: TaskError,
                  metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "taskId": task_id, "userId": user_id, "status": "failed", "imagePath": None, "imagePaths": [], "outputs": [],
        "metadata": metadata or {}, "error": error.as_error(),
    }


def output_key(prefix: str, task_id: str, index: int, ext: str = "png") -> str:
    """Deterministic: a retry overwrites the same keys instead of adding new ones."""
    return f"{prefix}images/{task_id}-{index}.{ext}"


def media_key(prefix: str, task_id: str, index: int, ext: str) -> str:
    """Key of an output that is not a still image (video, animation, audio, mesh, large text, other files)."""
    return f"{prefix}outputs/{task_id}-{index}.{ext}"


def staged_name(key: str) -> str:
    """File name of an output inside outbox/<taskId>/: the key's last folder and name, so images/t-0.png and
    outputs/t-0.png do not collide."""
    folder, name = posixpath.split(key)
    return f"{posixpath.basename(folder)}.{name}" if folder else name


def output_entry(node: str, key: str, kind: str, *, object_key: str | None = None, content_type: str,
                 size: int, text: str | None = None, facts: dict[str, Any] | None = None,
                 hints: dict[str, Any] | None = None) -> dict[str, Any]:
    """One element of a result's `outputs`: where it came from, what it is, where it is (or the text itself)."""
    entry: dict[str, Any] = {"node": node, "key": key, "kind": kind}
    if object_key is not None:
        entry["objectKey"] = object_key
    if text is not None:
        entry["text"] = text
    entry.update(contentType=content_type, bytes=size)
    entry.update(facts or {})
    entry.update(hints or {})
    return entry
