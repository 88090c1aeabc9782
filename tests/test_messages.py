"""selfix.messages + selfix.templates: task validation, error codes, template rendering, result shapes."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from selfix import messages as m
from selfix.job import Job
from selfix.messages import InvalidTask, Limits, Task, TaskError, completed_result, failed_result, parse_task
from selfix.templates import Catalog
from tests.servers.node import DROP, SAMPLE_LORA, SAMPLE_TASK, SAMPLE_USER, sample_message, sample_workflow

USER, TASK, LORA = SAMPLE_USER, SAMPLE_TASK, SAMPLE_LORA
workflow, message = sample_workflow, sample_message


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def enc(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def data_url(payload: bytes, mime: str = "png") -> str:
    return f"data:image/{mime};base64,{base64.b64encode(payload).decode()}"


# --- valid messages -------------------------------------------------------------------------------------


def test_a_valid_workflow_message(catalog: Catalog) -> None:
    images = {"pose.png": "users/alice/inputs/pose.png", "mask.webp": data_url(b"RIFF....WEBP")}
    raw = enc(message(priority=7, images=images, workflow=workflow(image="pose.png")))
    task = parse_task(raw, Limits(), catalog)
    assert isinstance(task, Task)
    assert (task.task_id, task.user_id, task.priority, task.template) == (TASK, USER, 7, None)
    assert task.lora_models == (LORA,)
    assert task.images == images
    assert task.workflow == workflow(image="pose.png")
    job = task.to_job(source={"file": "x.json"}, now=1234.5).to_dict()
    assert job["taskId"] == TASK and job["attempt"] == 1 and job["enqueuedAt"] == 1234.5
    assert job["loraModels"] == [LORA] and job["notBefore"] == 0 and job["source"] == {"file": "x.json"}
    assert json.loads(json.dumps(job)) == job  # the job file content is plain JSON


def test_minimal_message_without_lora_defaults_priority_to_zero(catalog: Catalog) -> None:
    task = parse_task(enc({"taskId": TASK, "userId": USER, "workflow": workflow(lora_name=None)}), Limits(), catalog)
    assert task.priority == 0 and task.lora_models == () and task.images == {}


def test_lora_model_matched_by_its_basename_is_accepted(catalog: Catalog) -> None:
    task = parse_task(enc(message(workflow=workflow(lora_name="style.safetensors"))), Limits(), catalog)
    assert task.lora_models == (LORA,)


def test_lora_model_list_is_deduplicated_and_each_must_be_used(catalog: Catalog) -> None:
    other = "users/alice/models/sub/detail.safetensors"
    wf = workflow()
    wf["12"] = {"class_type": "LoraLoader", "inputs": {"lora_name": "detail.safetensors"}}
    task = parse_task(enc(message(workflow=wf, loraModel=[LORA, other, LORA])), Limits(), catalog)
    assert task.lora_models == (LORA, other)


def test_negative_priority_is_accepted(catalog: Catalog) -> None:
    assert parse_task(enc(message(priority=-20)), Limits(), catalog).priority == -20


def test_configured_user_prefix_is_enforced(catalog: Catalog) -> None:
    limits = Limits(user_prefix="tenants/{userId}/loras/")
    key = "tenants/alice/loras/a.safetensors"
    task = parse_task(enc(message(loraModel=key, workflow=workflow(lora_name=key))), limits, catalog)
    assert task.lora_models == (key,)
    with pytest.raises(InvalidTask) as info:
        parse_task(enc(message()), limits, catalog)
    assert info.value.code == m.LORA_FORBIDDEN


# --- templates ------------------------------------------------------------------------------------------


def test_builtin_templates_are_present(catalog: Catalog) -> None:
    assert {"demo", "sd15-lora-txt2img", "flux-lora-txt2img"} <= set(catalog.names())


def test_demo_template_renders_with_types_kept(catalog: Catalog) -> None:
    raw = enc({"taskId": TASK, "userId": USER, "template": "demo", "params": {"width": 64, "prefix": "mine"}})
    task = parse_task(raw, Limits(), catalog)
    assert task.template == "demo"
    inputs = task.workflow["1"]["inputs"]
    assert inputs["width"] == 64 and isinstance(inputs["width"], int)
    assert inputs["height"] == 512 and isinstance(inputs["height"], int)  # default
    assert task.workflow["3"]["inputs"]["filename_prefix"] == "mine"
    assert "{{" not in json.dumps(task.workflow)


@pytest.mark.parametrize(("name", "lora_node", "sampler"), [("sd15-lora-txt2img", "10", "3"),
                                                              ("flux-lora-txt2img", "4", "9")])
def test_lora_templates_render(catalog: Catalog, name: str, lora_node: str, sampler: str) -> None:
    raw = enc({"taskId": TASK, "userId": USER, "template": name, "loraModel": LORA,
               "params": {"prompt": "a red fox", "seed": 42, "steps": 4, "lora_strength": 0.5}})
    task = parse_task(raw, Limits(), catalog)
    wf = task.workflow
    assert wf[lora_node]["inputs"]["lora_name"] == LORA  # `lora` defaults to the first loraModel
    seed = wf[sampler]["inputs"]["seed"]
    assert seed == 42 and type(seed) is int
    assert wf[sampler]["inputs"]["steps"] == 4
    assert wf[lora_node]["inputs"]["strength_model"] == 0.5
    assert any(node["inputs"].get("text") == "a red fox" for node in wf.values())
    assert "{{" not in json.dumps(wf)
    assert catalog.templates[name]["workflow"][sampler]["inputs"]["seed"] == "{{seed}}"  # template not mutated


def test_explicit_lora_param_wins_over_the_default(catalog: Catalog) -> None:
    other = "users/alice/models/other.safetensors"
    raw = enc({"taskId": TASK, "userId": USER, "template": "sd15-lora-txt2img", "loraModel": [LORA, other],
               "params": {"prompt": "p", "lora": "other.safetensors"}})
    with pytest.raises(InvalidTask) as info:  # the first loraModel is then used by no node
        parse_task(raw, Limits(), catalog)
    assert info.value.code == m.LORA_NOT_USED and LORA in info.value.message


@pytest.mark.parametrize("name", sorted(Catalog.load().names()))
def test_every_builtin_template_renders_a_valid_workflow(catalog: Catalog, name: str) -> None:
    declared = catalog.templates[name].get("params", {})
    params = {k: "a prompt" for k, spec in declared.items() if "default" not in spec and k != "lora"}
    msg: dict[str, Any] = {"taskId": TASK, "userId": USER, "template": name, "params": params}
    if "lora" in declared:
        msg["loraModel"] = LORA
    task = parse_task(enc(msg), Limits(), catalog)
    m.validate_workflow(task.workflow, 500)
    assert not re.search(r"\{\{.*\}\}", json.dumps(task.workflow))


def test_partial_placeholders_are_substituted_as_text() -> None:
    cat = Catalog({"t": {"params": {"n": {"type": "integer"}},
                         "workflow": {"1": {"class_type": "X", "inputs": {"a": "{{n}}", "b": "img-{{ n }}-x"}}}}})
    wf = cat.render("t", {"n": 3}, [])
    assert wf["1"]["inputs"] == {"a": 3, "b": "img-3-x"}


# --- malformed messages ---------------------------------------------------------------------------------

WIDE = {str(i): {"class_type": "Noop", "inputs": {}} for i in range(10_000)}

MALFORMED = [
    # (raw bytes, error code, task id expected on the error)
    pytest.param(b"{this is not json", m.INVALID_MESSAGE, None, id="not-json"),
    pytest.param(b'{"taskId": "t\xff\xfe", "userId": "alice"}', m.INVALID_MESSAGE, None, id="not-utf8"),
    pytest.param(b"[1, 2, 3]", m.INVALID_MESSAGE, None, id="json-array"),
    pytest.param(b'"just a string"', m.INVALID_MESSAGE, None, id="json-string"),
    pytest.param(b"", m.INVALID_MESSAGE, None, id="empty"),
    pytest.param(enc(message(taskId=DROP)), m.INVALID_MESSAGE, None, id="missing-taskId"),
    pytest.param(enc(message(taskId="a/b")), m.INVALID_MESSAGE, None, id="taskId-slash"),
    pytest.param(enc(message(taskId="..")), m.INVALID_MESSAGE, None, id="taskId-dotdot"),
    pytest.param(enc(message(taskId=".hidden")), m.INVALID_MESSAGE, None, id="taskId-leading-dot"),
    pytest.param(enc(message(taskId="x" * 200)), m.INVALID_MESSAGE, None, id="taskId-200-chars"),
    pytest.param(enc(message(taskId=12345)), m.INVALID_MESSAGE, None, id="taskId-number"),
    pytest.param(enc(message(userId=DROP)), m.INVALID_MESSAGE, TASK, id="missing-userId"),
    pytest.param(enc(message(userId="a/b")), m.INVALID_MESSAGE, TASK, id="userId-slash"),
    pytest.param(enc(message(template="demo", params={})), m.INVALID_MESSAGE, TASK, id="workflow-and-template"),
    pytest.param(enc(message(workflow=DROP, loraModel=DROP)), m.INVALID_MESSAGE, TASK, id="neither"),
    pytest.param(enc(message(workflow=[{"class_type": "X"}], loraModel=DROP)), m.INVALID_WORKFLOW, TASK,
                 id="workflow-list"),
    pytest.param(enc(message(workflow={}, loraModel=DROP)), m.INVALID_WORKFLOW, TASK, id="workflow-empty"),
    pytest.param(enc(message(workflow={"1": {"inputs": {}}}, loraModel=DROP)), m.INVALID_WORKFLOW, TASK,
                 id="node-without-class_type"),
    pytest.param(enc(message(workflow={"1": "KSampler"}, loraModel=DROP)), m.INVALID_WORKFLOW, TASK,
                 id="node-not-object"),
    pytest.param(enc(message(workflow={"1": {"class_type": "X", "inputs": [1]}}, loraModel=DROP)),
                 m.INVALID_WORKFLOW, TASK, id="inputs-not-object"),
    pytest.param(enc(message(workflow=WIDE, loraModel=DROP)), m.INVALID_WORKFLOW, TASK, id="10000-nodes"),
    pytest.param(enc(message(workflow=DROP, loraModel=DROP, template="no-such-template")), m.UNKNOWN_TEMPLATE,
                 TASK, id="unknown-template"),
    pytest.param(enc(message(workflow=DROP, loraModel=DROP, template="../demo")), m.UNKNOWN_TEMPLATE,
                 TASK, id="template-path"),
    pytest.param(enc(message(workflow=DROP, loraModel=DROP, template=["demo"])), m.INVALID_MESSAGE,
                 TASK, id="template-not-string"),
    pytest.param(enc(message(workflow=DROP, loraModel=DROP, template="demo", params=[1])), m.INVALID_MESSAGE,
                 TASK, id="params-not-object"),
    pytest.param(enc(message(workflow=DROP, loraModel=DROP, template="demo", params={"width": "wide"})),
                 m.INVALID_PARAMS, TASK, id="param-wrong-type"),
    pytest.param(enc(message(workflow=DROP, loraModel=DROP, template="demo", params={"width": True})),
                 m.INVALID_PARAMS, TASK, id="param-bool-for-integer"),
    pytest.param(enc(message(workflow=DROP, template="sd15-lora-txt2img", params={})),
                 m.INVALID_PARAMS, TASK, id="param-missing"),
    pytest.param(enc(message(workflow=DROP, loraModel=DROP, template="demo", params={"colour": 1})),
                 m.INVALID_PARAMS, TASK, id="param-unknown"),
    pytest.param(enc(message(priority="high")), m.INVALID_MESSAGE, TASK, id="priority-string"),
    pytest.param(enc(message(priority=True)), m.INVALID_MESSAGE, TASK, id="priority-bool"),
    pytest.param(enc(message(priority=10**9)), m.INVALID_MESSAGE, TASK, id="priority-huge"),
    pytest.param(enc(message(priority=1.5)), m.INVALID_MESSAGE, TASK, id="priority-float"),
    pytest.param(enc(message(loraModel="models/style.safetensors")), m.LORA_FORBIDDEN, TASK,
                 id="lora-outside-prefix"),
    pytest.param(enc(message(loraModel="users/bob/models/style.safetensors")), m.LORA_FORBIDDEN, TASK,
                 id="lora-other-user"),
    pytest.param(enc(message(loraModel="users/alice2/style.safetensors")), m.LORA_FORBIDDEN, TASK,
                 id="lora-user-prefix-lookalike"),
    pytest.param(enc(message(loraModel="users/alice/../bob/style.safetensors")), m.LORA_FORBIDDEN, TASK,
                 id="lora-dotdot"),
    pytest.param(enc(message(loraModel="/users/alice/style.safetensors")), m.LORA_FORBIDDEN, TASK,
                 id="lora-absolute"),
    pytest.param(enc(message(loraModel="users/alice//style.safetensors")), m.LORA_FORBIDDEN, TASK,
                 id="lora-double-slash"),
    pytest.param(enc(message(loraModel="users/alice/style.ckpt")), m.LORA_FORBIDDEN, TASK, id="lora-ckpt"),
    pytest.param(enc(message(loraModel="users/alice/style.pt")), m.LORA_FORBIDDEN, TASK, id="lora-pt"),
    pytest.param(enc(message(loraModel="users/alice/style.bin")), m.LORA_FORBIDDEN, TASK, id="lora-bin"),
    pytest.param(enc(message(loraModel="users/alice/style.PTH")), m.LORA_FORBIDDEN, TASK, id="lora-pth"),
    pytest.param(enc(message(loraModel="users/alice/style.gguf")), m.LORA_FORBIDDEN, TASK,
                 id="lora-not-safetensors"),
    pytest.param(enc(message(loraModel=[LORA, "users/alice/evil.pt"])), m.LORA_FORBIDDEN, TASK,
                 id="lora-list-one-bad"),
    pytest.param(enc(message(loraModel=42)), m.INVALID_MESSAGE, TASK, id="lora-number"),
    pytest.param(enc(message(loraModel=[LORA, 42])), m.INVALID_MESSAGE, TASK, id="lora-list-number"),
    pytest.param(enc(message(workflow=workflow(lora_name="something-else.safetensors"))), m.LORA_NOT_USED, TASK,
                 id="lora-not-used"),
    pytest.param(enc(message(workflow=workflow(lora_name=None))), m.LORA_NOT_USED, TASK, id="lora-no-loader"),
    pytest.param(enc(message(images={"../pose.png": "users/alice/inputs/pose.png"})), m.INPUT_FORBIDDEN, TASK,
                 id="image-name-traversal"),
    pytest.param(enc(message(images={"pose.gif": "users/alice/inputs/pose.gif"})), m.INPUT_FORBIDDEN, TASK,
                 id="image-name-extension"),
    pytest.param(enc(message(images={"pose.png": "users/bob/inputs/pose.png"})), m.INPUT_FORBIDDEN, TASK,
                 id="image-key-outside-prefix"),
    pytest.param(enc(message(images={"pose.png": "users/alice/../bob/pose.png"})), m.INPUT_FORBIDDEN, TASK,
                 id="image-key-dotdot"),
    pytest.param(enc(message(images={"pose.png": 7})), m.INVALID_MESSAGE, TASK, id="image-ref-number"),
    pytest.param(enc(message(images=["pose.png"])), m.INVALID_MESSAGE, TASK, id="images-list"),
    pytest.param(enc(message(images={"pose.png": "data:image/png;base64,@@not-base64@@"})), m.INPUT_FORBIDDEN,
                 TASK, id="data-url-bad-base64"),
    pytest.param(enc(message(images={"pose.png": "data:image/svg+xml;base64,PHN2Zz4="})), m.INPUT_FORBIDDEN,
                 TASK, id="data-url-svg"),
    pytest.param(b"[" * 10_000 + b"]" * 10_000, m.INVALID_MESSAGE, None, id="nested-10000"),
    pytest.param(b'{"taskId": "task-001", "userId": "alice", "workflow": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
                 m.INVALID_MESSAGE, TASK, id="nested-10000-in-object"),  # the taskId is read by a byte scan
]


@pytest.mark.parametrize(("raw", "code", "task_id"), MALFORMED)
def test_malformed_messages(catalog: Catalog, raw: bytes, code: str, task_id: str | None) -> None:
    with pytest.raises(InvalidTask) as info:
        parse_task(raw, Limits(), catalog)
    err = info.value
    assert err.code == code, err.message
    assert err.task_id == task_id
    # a failed result is addressed to the user whenever both ids could be read
    if task_id is not None:
        assert err.user_id == (USER if b'"userId": "alice"' in raw else None)
    assert err.message and not err.retriable


def test_there_are_at_least_twenty_malformed_cases() -> None:
    assert len(MALFORMED) >= 20


def test_oversized_data_url_is_input_too_large(catalog: Catalog) -> None:
    limits = Limits(max_data_url_bytes=1000)
    raw = enc(message(images={"pose.png": data_url(b"\x89PNG" + b"\0" * 2000)}))
    with pytest.raises(InvalidTask) as info:
        parse_task(raw, limits, catalog)
    assert info.value.code == m.INPUT_TOO_LARGE and info.value.task_id == TASK
    small = enc(message(images={"pose.png": data_url(b"\x89PNG" + b"\0" * 500)}))
    assert parse_task(small, limits, catalog).images  # under the limit it passes


def test_oversized_data_url_with_default_limits(catalog: Catalog) -> None:
    limits = Limits(max_message_bytes=32 << 20)
    raw = enc(message(images={"pose.png": "data:image/png;base64," + "A" * (14 << 20)}))
    with pytest.raises(InvalidTask) as info:
        parse_task(raw, limits, catalog)
    assert info.value.code == m.INPUT_TOO_LARGE


def test_message_larger_than_the_limit_keeps_its_task_id(catalog: Catalog) -> None:
    raw = enc(message(padding="x" * (Limits().max_message_bytes + 1)))
    with pytest.raises(InvalidTask) as info:
        parse_task(raw, Limits(), catalog)
    assert info.value.code == m.MESSAGE_TOO_LARGE
    assert (info.value.task_id, info.value.user_id) == (TASK, USER)
    assert str(len(raw)) in info.value.message


def test_node_limit_is_configurable(catalog: Catalog) -> None:
    wf = {str(i): {"class_type": "Noop"} for i in range(11)}
    with pytest.raises(InvalidTask) as info:
        parse_task(enc(message(workflow=wf, loraModel=DROP)), Limits(max_workflow_nodes=10), catalog)
    assert info.value.code == m.INVALID_WORKFLOW and "11" in info.value.message
    assert parse_task(enc(message(workflow=wf, loraModel=DROP)), Limits(max_workflow_nodes=11), catalog)


def test_peek_ids_never_raises() -> None:
    assert m.peek_ids(b"\xff") == (None, None)
    assert m.peek_ids(b"[" * 50_000) == (None, None)
    assert m.peek_ids(enc({"taskId": "ok", "userId": "../x"})) == ("ok", None)


def test_two_loras_with_the_same_basename_are_ambiguous(catalog: Catalog) -> None:
    a, b = "users/alice/a/style.safetensors", "users/alice/b/style.safetensors"
    with pytest.raises(InvalidTask) as info:
        parse_task(enc(message(loraModel=[a, b], workflow=workflow(lora_name="style.safetensors"))),
                   Limits(), catalog)
    assert info.value.code in (m.LORA_NOT_USED, m.INVALID_MESSAGE)


def test_template_with_an_undeclared_placeholder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps(
        {"params": {}, "workflow": {"1": {"class_type": "X", "inputs": {"seed": "{{seed}}"}}}}))
    try:
        cat = Catalog.load(tmp_path)
    except ValueError:
        return  # refused at start-up: fine
    with pytest.raises(TaskError):
        cat.render("bad", {}, [])


def test_template_with_an_unknown_param_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps(
        {"params": {"cfg": {"type": "float", "default": 7.0}},
         "workflow": {"1": {"class_type": "X", "inputs": {"cfg": "{{cfg}}"}}}}))
    try:
        cat = Catalog.load(tmp_path)
    except ValueError:
        return
    with pytest.raises(TaskError):
        cat.render("bad", {}, [])


def test_templates_dir_overrides_builtin_by_name(tmp_path: Path) -> None:
    (tmp_path / "demo.json").write_text(json.dumps({"params": {}, "workflow": {"1": {"class_type": "Mine"}}}))
    (tmp_path / "extra.json").write_text(json.dumps({"params": {}, "workflow": {"1": {"class_type": "Extra"}}}))
    cat = Catalog.load(tmp_path)
    assert cat.render("demo", {}, [])["1"]["class_type"] == "Mine"
    assert "extra" in cat.names() and "sd15-lora-txt2img" in cat.names()


# --- results --------------------------------------------------------------------------------------------

RESULT_KEYS = {"taskId", "userId", "status", "imagePath", "imagePaths", "outputs", "metadata"}


def _camel(keys: Any) -> bool:
    return all(re.fullmatch(r"[a-z][A-Za-z0-9]*", k) for k in keys)


def test_failed_result_shape() -> None:
    err = TaskError(m.INVALID_WORKFLOW, "node 3 is wrong", node_errors={"3": {"errors": ["x"]}})
    res = failed_result(TASK, USER, err, {"attempts": 1, "promptId": "p"})
    assert set(res) == RESULT_KEYS | {"error"}
    assert res["status"] == "failed" and res["imagePath"] is None and res["imagePaths"] == []
    assert res["error"] == {"code": m.INVALID_WORKFLOW, "message": "node 3 is wrong", "retriable": False,
                            "nodeErrors": {"3": {"errors": ["x"]}}}
    assert res["metadata"] == {"attempts": 1, "promptId": "p"}
    assert _camel(res) and _camel(res["error"]) and _camel(res["metadata"])
    json.dumps(res)


def test_failed_result_without_node_errors_and_retriable() -> None:
    res = failed_result(TASK, None, TaskError(m.TIMEOUT, "too slow", retriable=True))
    assert res["error"] == {"code": m.TIMEOUT, "message": "too slow", "retriable": True}
    assert res["userId"] is None and res["metadata"] == {}


def test_failed_result_from_an_invalid_task() -> None:
    exc = InvalidTask(m.LORA_FORBIDDEN, "nope", TASK, USER)
    res = failed_result(exc.task_id, exc.user_id, exc)  # type: ignore[arg-type]
    assert res["error"]["code"] == m.LORA_FORBIDDEN and res["error"]["retriable"] is False


def test_completed_result_shape() -> None:
    paths = [m.output_key("users/alice/", TASK, i) for i in range(2)]
    meta = {"generationTime": 1.5, "queueTime": 0.1, "totalTime": 2.0, "attempts": 1, "promptId": "p"}
    res = completed_result(Job(TASK, USER), paths, meta)
    assert set(res) == RESULT_KEYS and "error" not in res
    assert res["status"] == "completed"
    assert res["imagePath"] == "users/alice/images/task-001-0.png"
    assert res["imagePaths"] == ["users/alice/images/task-001-0.png", "users/alice/images/task-001-1.png"]
    assert res["metadata"] == meta and _camel(res) and _camel(res["metadata"])


def test_output_keys_are_deterministic() -> None:
    assert m.output_key("users/a/", "t", 3) == m.output_key("users/a/", "t", 3) == "users/a/images/t-3.png"
    assert m.output_key("users/a/", "t", 0, "webp") == "users/a/images/t-0.webp"


# --- output encodings and output keys ------------------------------------------------------------------


def test_output_field_is_normalised_and_reaches_the_job(catalog: Catalog) -> None:
    spec = {"format": "JPG", "quality": 85, "stripMetadata": False}
    task = parse_task(enc(message(output=spec)), Limits(), catalog)
    assert task.output == {"format": "jpeg", "quality": 85, "stripMetadata": False}
    assert task.to_job().output == task.output
    assert parse_task(enc(message()), Limits(), catalog).to_job().output is None
    assert parse_task(enc(message(output={})), Limits(), catalog).output == {}


@pytest.mark.parametrize(("spec", "words"), [
    ("webp", "must be an object"),
    ({"format": "gif"}, "png, webp, jpeg"),
    ({"format": 3}, "png, webp, jpeg"),
    ({"format": "webp", "quality": 0}, "1..100"),
    ({"format": "webp", "quality": 101}, "1..100"),
    ({"format": "jpeg", "quality": True}, "1..100"),
    ({"format": "webp", "quality": 80.5}, "1..100"),
    ({"quality": 80}, "needs output.format"),
    ({"format": "png", "quality": 80}, "needs output.format"),
    ({"stripMetadata": "yes"}, "true or false"),
    ({"format": "webp", "lossy": True}, "unknown field(s) ['lossy']"),
])
def test_a_bad_output_field_is_invalid_message(catalog: Catalog, spec: Any, words: str) -> None:
    with pytest.raises(InvalidTask) as info:
        parse_task(enc(message(output=spec)), Limits(), catalog)
    assert info.value.code == m.INVALID_MESSAGE and words in info.value.message
    assert info.value.task_id == TASK  # addressable: the client gets the failed result


def test_media_keys_and_staged_names_do_not_collide() -> None:
    still, clip = m.output_key("users/a/", "t", 0, "png"), m.media_key("users/a/", "t", 0, "png")
    assert (still, clip) == ("users/a/images/t-0.png", "users/a/outputs/t-0.png")
    assert m.staged_name(still) == "images.t-0.png" and m.staged_name(clip) == "outputs.t-0.png"
    assert m.staged_name("plain.png") == "plain.png"


def test_output_entry_shape() -> None:
    entry = m.output_entry("3", "images", "video", object_key="users/a/outputs/t-0.mp4", content_type="video/mp4",
                           size=2148, facts={"width": 64, "height": 64, "duration": 1.0}, hints={"frameRate": 8.0})
    assert entry == {"node": "3", "key": "images", "kind": "video", "objectKey": "users/a/outputs/t-0.mp4",
                     "contentType": "video/mp4", "bytes": 2148, "width": 64, "height": 64, "duration": 1.0,
                     "frameRate": 8.0}
    assert _camel(entry)
