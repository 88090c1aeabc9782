"""A partly valid workflow (ComfyUI answers 200 with node_errors and queues the valid outputs) in a whole node:
the task fails with invalid_workflow, and nothing of its prompt survives: not in ComfyUI's queue or history, no
file in ComfyUI's output folder, also long after the uploader's cleanup."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from selfix.comfy import prompt_id_for
from selfix.workflow import task_subfolder
from tests.servers.node_plugin import Node, task, wait_until
from tests.test_chaos_hang import check_total_queue
from tests.test_runner import partial_workflow

pytestmark = pytest.mark.e2e


def comfy(node: Node, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.env['COMFY_PORT']}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def test_partly_valid_workflows_fail_and_leave_nothing_behind(make_node: Any) -> None:
    node: Node = make_node(seconds_per_step=0.05).start()
    ids = ["ok-0", "partial-0", "ok-1", "partial-1", "ok-2"]
    for task_id in ids:
        msg = task(task_id, steps=10)
        if task_id.startswith("partial"):
            msg["workflow"] = partial_workflow()
        node.drop(f"{task_id}.json", msg)
    node.wait_results(set(ids), timeout=90)
    results = check_total_queue(node, ids)
    for task_id in ids:
        if task_id.startswith("partial"):
            error = results[task_id]["error"]
            assert error["code"] == "invalid_workflow" and "21" in error["nodeErrors"], error
        else:
            assert results[task_id]["status"] == "completed", results[task_id]
    wait_until(lambda: comfy(node, "/queue") == {"queue_running": [], "queue_pending": []}, 10, "ComfyUI idle")
    output = Path(node.env["COMFY_OUTPUT_DIR"])
    for task_id in ("partial-0", "partial-1"):
        assert comfy(node, f"/history/{prompt_id_for(task_id, 1)}") == {}
        assert not (output / task_subfolder(task_id)).exists(), f"{task_id}'s outputs survived"
    assert not any(output.rglob("*.png")), sorted(output.rglob("*.png"))
