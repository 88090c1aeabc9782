"""The whole node under real supervisord (all five programs), ComfyUI = the double, offline (files + local store)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.servers.node_plugin import PROGRAMS, Node, task, wait_until

pytestmark = pytest.mark.e2e

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def submit(node: Node, messages: list[dict[str, Any]], tmp: Path) -> subprocess.CompletedProcess[str]:
    files = []
    for msg in messages:
        path = tmp / f"{msg.get('taskId', 'x')}.json"
        path.write_text(json.dumps(msg))
        files.append(str(path))
    node.spool.ensure()  # the node's spool, as `selfix up` (or an operator) makes it: submit never creates one
    return subprocess.run([sys.executable, "-m", "selfix", "submit", *files], env=node.env, capture_output=True,
                          text=True, timeout=60)


def assert_clean_spool(node: Node) -> None:
    spool = node.spool
    # done/ is written before outbox/<taskId> is removed: the last result's removal may lag its done/ file.
    wait_until(lambda: all(spool.counts()[s] == 0 for s in ("processing", "outbox", "inbox")), 10,
               lambda: f"inbox/, processing/ and outbox/ empty: {spool.counts()}")
    assert spool.corrupt_entries() == []
    states: dict[str, list[str]] = {}
    for state, task_id in spool.iter_all_task_files():
        states.setdefault(task_id, []).append(state)
    assert all(v == ["done"] for v in states.values()), {k: v for k, v in states.items() if v != ["done"]}


def assert_images(node: Node, result: dict[str, Any]) -> None:
    assert result["status"] == "completed", result
    assert result["imagePaths"] and result["imagePath"] == result["imagePaths"][0]
    for key in result["imagePaths"]:
        assert key.startswith(f"users/{result['userId']}/images/{result['taskId']}-")
        assert (node.store / key).read_bytes()[:8] == PNG_MAGIC


def test_twenty_jobs_in_priority_order_and_two_specific_failures(make_node: Any, tmp_path: Path) -> None:
    node: Node = make_node(seconds_per_step=0.05)
    good = [task(f"job-{i:02d}", priority=(i * 7) % 5 - 1, steps=2) for i in range(18)]
    unknown_template = {"taskId": "bad-template", "userId": "u1", "template": "no-such-template"}
    bad_ckpt = task("bad-ckpt")
    bad_ckpt["workflow"]["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
    out = submit(node, [*good, unknown_template, bad_ckpt], tmp_path)
    assert "bad-template: rejected: unknown_template" in out.stdout, out

    node.start()
    results = node.wait_results({m["taskId"] for m in good} | {"bad-template", "bad-ckpt"}, timeout=120)

    for msg in good:
        assert_images(node, results[msg["taskId"]])
    assert results["bad-template"]["error"]["code"] == "unknown_template"
    failed = results["bad-ckpt"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_workflow"
    assert failed["error"]["nodeErrors"]["4"]["errors"][0]["type"] == "value_not_in_list"
    assert failed["error"]["retriable"] is False

    by_prompt = {r["metadata"]["promptId"]: r["taskId"] for r in results.values() if r["status"] == "completed"}
    started = [by_prompt[p] for p in node.executions() if p in by_prompt]
    priorities = {m["taskId"]: m["priority"] for m in good}
    order = [priorities[t] for t in started]
    assert len(started) == 18 and order == sorted(order, reverse=True), list(zip(started, order, strict=True))
    assert_clean_spool(node)
    assert not list((Path(node.env["COMFY_OUTPUT_DIR"]) / "selfix").glob("*")), "ComfyUI outputs not cleaned"


@pytest.mark.chaos
def test_runner_killed_while_job_inside_comfyui_reattaches(make_node: Any) -> None:
    node: Node = make_node(seconds_per_step=0.05).start()
    for i in range(3):
        node.drop(f"long-{i}.json", task(f"long-{i}", steps=30))
    wait_until(lambda: any(json.loads(p.read_bytes()).get("startedAt") for p in node.spool.processing_files()),
               30, "a job running inside ComfyUI")
    old = node.kill("runner")
    node.wait_restarted("runner", old)
    results = node.wait_results({f"long-{i}" for i in range(3)}, timeout=60)
    assert all(r["status"] == "completed" and r["metadata"]["attempts"] == 1 for r in results.values()), results
    executions = node.executions()
    assert len(executions) == len(set(executions)) == 3, f"a prompt ran twice: {executions}"
    assert_clean_spool(node)


@pytest.mark.chaos
@pytest.mark.parametrize("point", ["runner.after_start", "runner.after_outbox", "uploader.mid_upload",
                                   "uploader.before_done"])
def test_crash_points_lose_nothing_and_run_nothing_twice(make_node: Any, point: str) -> None:
    node: Node = make_node(seconds_per_step=0.02, env={"CRASHPOINTS": point}).start()
    ids = [f"cp-{i}" for i in range(4)]
    for task_id in ids:
        node.drop(f"{task_id}.json", task(task_id, steps=5, batch=2))
    results = node.wait_results(set(ids), timeout=60)
    assert (node.spool.run / f"crashpoint.{point}.fired").exists(), f"{point} never fired"
    for result in results.values():
        assert_images(node, result)
        assert len(result["imagePaths"]) == 2
    executions = node.executions()
    assert len(executions) == len(set(executions)) == 4, f"a prompt ran twice: {executions}"
    assert_clean_spool(node)


@pytest.mark.chaos
def test_comfyui_killed_mid_job_is_restarted_and_job_retried(make_node: Any) -> None:
    node: Node = make_node(seconds_per_step=0.05).start()
    node.drop("victim.json", task("victim", steps=40))
    wait_until(lambda: any(json.loads(p.read_bytes()).get("startedAt") for p in node.spool.processing_files()),
               30, "the job running inside ComfyUI")
    old = node.kill("comfyui")
    node.wait_restarted("comfyui", old)
    result = node.wait_results({"victim"}, timeout=90)["victim"]
    assert_images(node, result)
    assert result["metadata"]["attempts"] == 2
    assert_clean_spool(node)


MALFORMED: list[tuple[str, bytes | dict[str, Any], str]] = [
    ("not-json.json", b"{this is not json", "corrupt"),
    ("binary.json", bytes(range(256)) * 4, "corrupt"),
    ("array.json", b"[1, 2, 3]", "corrupt"),
    ("no-task-id.json", {"userId": "u1", "workflow": {}}, "corrupt"),
    ("slash-id.json", {"taskId": "a/b", "userId": "u1", "workflow": {}}, "corrupt"),
    ("dotdot-id.json", {"taskId": "..", "userId": "u1", "workflow": {}}, "corrupt"),
    ("long-id.json", {"taskId": "x" * 200, "userId": "u1", "workflow": {}}, "corrupt"),
    ("m-no-user.json", {"taskId": "m-no-user", "workflow": {"1": {}}}, "invalid_message"),
    ("m-no-workflow.json", {"taskId": "m-no-workflow", "userId": "u1"}, "invalid_message"),
    ("m-workflow-list.json", {"taskId": "m-workflow-list", "userId": "u1", "workflow": [1]}, "invalid_workflow"),
    ("m-no-class.json", {"taskId": "m-no-class", "userId": "u1", "workflow": {"1": {"inputs": {}}}},
     "invalid_workflow"),
    ("m-huge.json", {"taskId": "m-huge", "userId": "u1",
                     "workflow": {str(i): {"class_type": "EmptyImage", "inputs": {}} for i in range(10_000)}},
     "invalid_workflow"),
    ("m-oversized.json", {**task("m-oversized"), "pad": "x" * (2 << 20)}, "message_too_large"),
    ("m-template.json", {"taskId": "m-template", "userId": "u1", "template": "nope"}, "unknown_template"),
    ("m-priority.json", {**task("m-priority"), "priority": "high"}, "invalid_message"),
    ("m-lora-outside.json", task("m-lora-outside", lora="users/u2/models/x.safetensors"), "lora_forbidden"),
    ("m-lora-ckpt.json", task("m-lora-ckpt", lora="users/u1/models/x.ckpt"), "lora_forbidden"),
    ("m-lora-dotdot.json", task("m-lora-dotdot", lora="users/u1/../u2/x.safetensors"), "lora_forbidden"),
    ("m-lora-missing.json", task("m-lora-missing", lora="users/u1/models/none.safetensors"), "lora_not_found"),
    ("m-lora-unused.json", {**task("m-lora-unused"), "loraModel": "users/u1/models/a.safetensors"},
     "lora_not_used"),
    ("m-bad-ckpt.json", {**task("m-bad-ckpt"), "workflow": {
        **task("x")["workflow"], "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nope"}}}},
     "invalid_workflow"),
    ("m-unknown-node.json", {"taskId": "m-unknown-node", "userId": "u1",
                             "workflow": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}, "invalid_workflow"),
]


def test_malformed_job_files_get_specific_errors_and_others_complete(make_node: Any) -> None:
    node: Node = make_node(seconds_per_step=0.01).start()
    node.drop("good-1.json", task("good-1"))
    for name, payload, _ in MALFORMED:
        node.drop(name, payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    node.drop("good-2.json", task("good-2"))
    expected = {name[:-5]: code for name, _, code in MALFORMED if code != "corrupt"}
    results = node.wait_results(set(expected) | {"good-1", "good-2"}, timeout=90)
    for task_id, code in expected.items():
        assert results[task_id]["status"] == "failed" and results[task_id]["error"]["code"] == code, \
            (task_id, results[task_id])
        assert results[task_id]["error"]["message"]
    assert_images(node, results["good-1"])
    assert_images(node, results["good-2"])
    corrupt = wait_until(lambda: node.spool.corrupt_entries() if len(node.spool.corrupt_entries()) == 7 else None,
                         10, "7 corrupt/ entries")
    assert all(reason for _, reason in corrupt), corrupt
    assert {n.split(".", 2)[2] for n, _ in corrupt} == {n for n, _, c in MALFORMED if c == "corrupt"}
    assert all(info["statename"] == "RUNNING" for info in node.info().values())
    ctl = subprocess.run([sys.executable, "-m", "selfix", "ctl", "status"], env=node.env, capture_output=True,
                         text=True, timeout=30)
    assert [line.split()[:2] for line in ctl.stdout.splitlines()] == [[p, "RUNNING"] for p in sorted(PROGRAMS)], ctl


def _png_data_url(color: tuple[int, int, int] = (200, 10, 10)) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _load_and_save(task_id: str, image_ref: str) -> dict[str, Any]:
    return {"taskId": task_id, "userId": "u1", "images": {"pose.png": image_ref}, "workflow": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "pose.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "in"}}}}


def test_deadline_interrupts_and_fails_with_timeout_then_next_job_runs(make_node: Any) -> None:
    node: Node = make_node(seconds_per_step=0.05, env={"JOB_TIMEOUT_S": "1"}).start()
    node.drop("slow.json", task("slow", steps=200))
    node.drop("quick.json", task("quick", steps=2))
    results = node.wait_results({"slow", "quick"}, timeout=60)
    assert results["slow"]["status"] == "failed" and results["slow"]["error"]["code"] == "timeout", results["slow"]
    assert "KSampler" in results["slow"]["error"]["message"]
    assert_images(node, results["quick"])
    assert_clean_spool(node)


def test_input_images_are_bound_and_bad_ones_refused(make_node: Any) -> None:
    node: Node = make_node(seconds_per_step=0.01).start()
    node.drop("img-ok.json", _load_and_save("img-ok", _png_data_url()))
    not_png = "data:image/png;base64," + __import__("base64").b64encode(b"definitely not a png").decode()
    node.drop("img-bad.json", _load_and_save("img-bad", not_png))
    results = node.wait_results({"img-ok", "img-bad"}, timeout=60)
    assert_images(node, results["img-ok"])
    assert results["img-bad"]["error"]["code"] == "input_forbidden", results["img-bad"]
    assert not list((Path(node.env["COMFY_INPUT_DIR"]) / "selfix").glob("*")), "input files not cleaned up"
    assert_clean_spool(node)


def test_execution_error_names_node_type_and_exception(make_node: Any) -> None:
    node: Node = make_node(seconds_per_step=0.01)
    (Path(node.env["MODELS_DIR"]) / "checkpoints" / "junk.safetensors").write_bytes(b"\xff" * 64)
    node.start()
    broken = task("broken")
    broken["workflow"]["4"]["inputs"]["ckpt_name"] = "junk.safetensors"
    node.drop("broken.json", broken)
    node.drop("fine.json", task("fine"))
    results = node.wait_results({"broken", "fine"}, timeout=60)
    error = results["broken"]["error"]
    assert error["code"] == "execution_error" and error["retriable"] is False, error
    assert "node 4 (CheckpointLoaderSimple)" in error["message"], error
    assert_images(node, results["fine"])
    assert_clean_spool(node)


def test_sigterm_drains_the_runner_hands_back_queued_jobs_and_loses_nothing(make_node: Any) -> None:
    node: Node = make_node(seconds_per_step=0.05).start()
    ids = [f"drain-{i}" for i in range(3)]
    for task_id in ids:
        node.drop(f"{task_id}.json", task(task_id, steps=30))
    wait_until(lambda: len(node.spool.processing_files()) == 2 and any(
        json.loads(p.read_bytes()).get("startedAt") for p in node.spool.processing_files()), 30,
        "one job running and one queued ahead in ComfyUI")
    node.rpc().supervisor.stopProcess("runner")  # SIGTERM; returns once the runner has exited
    assert node.spool.processing_files() == [], "drained runner left claimed jobs behind"
    assert len(node.spool.inbox_entries()) == 2, "the queued-ahead job was not handed back"
    assert len(node.results()) + len(node.spool.outbox_tasks()) == 1, "the running job did not finish"
    node.rpc().supervisor.startProcess("runner")
    results = node.wait_results(set(ids), timeout=60)
    assert all(r["status"] == "completed" and r["metadata"]["attempts"] == 1 for r in results.values())
    executions = node.executions()
    assert len(executions) == len(set(executions)) == 3, f"a prompt ran twice: {executions}"
    assert_clean_spool(node)
