"""selfix.workflow: binding LoRAs and input images, scoping outputs per task, reading /history outputs."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from selfix.messages import InvalidTask, Limits, parse_task
from selfix.templates import Catalog
from selfix.workflow import output_images, patch, task_subfolder

KEY = "users/alice/models/style.safetensors"
CACHED = "selfix-cache/ab12cd-style.safetensors"
TASK = "task-7"


def graph() -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
        "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "lora_name": KEY, "strength_model": 1}},
        "11": {"class_type": "LoraLoader", "inputs": {"model": ["10", 0], "lora_name": "style.safetensors"}},
        "12": {"class_type": "LoraLoader", "inputs": {"model": ["11", 0], "lora_name": "base-detail.safetensors"}},
        "20": {"class_type": "LoadImage", "inputs": {"image": "pose.png", "upload": "image"}},
        "21": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "30": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "portraits/2024/face"}},
        "31": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": ""}},
        "32": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "plain"}},
        "33": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "trailing/"}},
        "40": {"class_type": "Note"},
        "41": {"class_type": "Weird", "inputs": "not-a-dict"},
    }


@pytest.fixture
def patched() -> dict[str, Any]:
    return patch(graph(), TASK, {KEY: CACHED}, {"pose.png": f"selfix/{TASK}/pose.png"})


def test_lora_bound_by_key(patched: dict[str, Any]) -> None:
    assert patched["10"]["inputs"]["lora_name"] == CACHED


def test_lora_bound_by_basename(patched: dict[str, Any]) -> None:
    assert patched["11"]["inputs"]["lora_name"] == CACHED


def test_other_lora_names_are_left_alone(patched: dict[str, Any]) -> None:
    assert patched["12"]["inputs"]["lora_name"] == "base-detail.safetensors"


def test_several_loras_bind_to_their_own_cached_names() -> None:
    wf = {"1": {"class_type": "LoraLoader", "inputs": {"lora_name": "a.safetensors"}},
          "2": {"class_type": "LoraLoader", "inputs": {"lora_name": "users/u/x/b.safetensors"}}}
    out = patch(wf, "t", {"users/u/x/a.safetensors": "c/a1.safetensors", "users/u/x/b.safetensors": "c/b1.safetensors"},
                {})
    assert out["1"]["inputs"]["lora_name"] == "c/a1.safetensors"
    assert out["2"]["inputs"]["lora_name"] == "c/b1.safetensors"


def test_load_image_inputs_are_bound(patched: dict[str, Any]) -> None:
    assert patched["20"]["inputs"]["image"] == f"selfix/{TASK}/pose.png"
    assert patched["20"]["inputs"]["upload"] == "image"
    assert patched["21"]["inputs"]["image"] == "example.png"  # not one of the task's images


def test_filename_prefix_with_subfolders_keeps_only_the_basename(patched: dict[str, Any]) -> None:
    assert patched["30"]["inputs"]["filename_prefix"] == f"selfix/{TASK}/face"


def test_empty_filename_prefix_gets_a_default_name(patched: dict[str, Any]) -> None:
    assert patched["31"]["inputs"]["filename_prefix"] == f"selfix/{TASK}/ComfyUI"
    assert patched["33"]["inputs"]["filename_prefix"] == f"selfix/{TASK}/ComfyUI"


def test_every_filename_prefix_is_scoped_to_the_task(patched: dict[str, Any]) -> None:
    prefixes = [n["inputs"]["filename_prefix"] for n in patched.values()
                if isinstance(n.get("inputs"), dict) and "filename_prefix" in n["inputs"]]
    assert len(prefixes) == 4
    assert all(p.startswith(task_subfolder(TASK) + "/") and p.count("/") == 2 for p in prefixes)
    assert patched["32"]["inputs"]["filename_prefix"] == f"selfix/{TASK}/plain"


def test_a_linked_filename_prefix_is_scoped_too() -> None:
    out = patch({"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": ["5", 0]}}}, "t", {}, {})
    assert out["1"]["inputs"]["filename_prefix"] == "selfix/t/ComfyUI"


def test_nodes_without_inputs_pass_through(patched: dict[str, Any]) -> None:
    assert patched["40"] == {"class_type": "Note"}
    assert patched["41"] == {"class_type": "Weird", "inputs": "not-a-dict"}


def test_patch_never_mutates_its_input() -> None:
    original = graph()
    snapshot = copy.deepcopy(original)
    out = patch(original, TASK, {KEY: CACHED}, {"pose.png": "selfix/x/pose.png"})
    assert original == snapshot
    out["10"]["inputs"]["model"].append("changed")  # nested values are copies, not shared
    assert original["10"]["inputs"]["model"] == ["4", 0]


def test_task_subfolder() -> None:
    assert task_subfolder("abc") == "selfix/abc"


def test_patch_handles_every_workflow_that_intake_accepts() -> None:
    deep = "[" * 500 + "]" * 500
    raw = ('{"taskId":"t","userId":"u","workflow":{"1":{"class_type":"X","inputs":{"a":' + deep + "}}}}").encode()
    try:
        task = parse_task(raw, Limits(), Catalog.load())
    except InvalidTask:
        return  # refused at intake: fine
    out = patch(task.workflow, task.task_id, {}, {})
    assert json.dumps(out) == json.dumps(task.workflow)


# --- output_images ------------------------------------------------------------------------------------


def img(name: str, kind: str = "output") -> dict[str, str]:
    return {"filename": name, "subfolder": f"selfix/{TASK}", "type": kind}


def test_output_images_keeps_only_type_output_in_node_then_image_order() -> None:
    entry = {
        "outputs": {
            "10": {"images": [img("c-1.png"), img("c-2.png")]},
            "9": {"images": [img("b-1.png"), img("preview.png", "temp")]},
            "100": {"images": [img("d-1.png")]},
            "2": {"images": [img("a-1.png"), img("a-2.png"), img("in.png", "input")]},
            "15": {"text": ["not images"]},
            "16": {"images": None},
        },
    }
    names = [i["filename"] for i in output_images(entry)]
    assert names == ["a-1.png", "a-2.png", "b-1.png", "c-1.png", "c-2.png", "d-1.png"]
    assert all(i["type"] == "output" for i in output_images(entry))


def test_output_images_non_numeric_node_ids_come_after_numeric_ones() -> None:
    entry = {"outputs": {"save_b": {"images": [img("y.png")]}, "save_a": {"images": [img("x.png")]},
                         "3": {"images": [img("w.png")]}}}
    assert [i["filename"] for i in output_images(entry)] == ["w.png", "x.png", "y.png"]


def test_output_images_of_an_entry_without_outputs() -> None:
    assert output_images({}) == []
    assert output_images({"outputs": {"1": {"images": [img("p.png", "temp")]}}}) == []
