"""selfix.workflow: binding LoRAs and input images, scoping outputs per task, reading /history outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from selfix.messages import InvalidTask, Limits, parse_task
from selfix.templates import Catalog
from selfix.workflow import OutputItem, collect_outputs, output_images, patch, task_subfolder

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


# --- collect_outputs ----------------------------------------------------------------------------------

MEDIA = json.loads((Path(__file__).parent / "data" / "comfyui-captures" / "media_outputs.json").read_text())


def media_entry(case: str) -> dict[str, Any]:
    entry: dict[str, Any] = next(iter(MEDIA[case]["history"]["json"].values()))
    return entry


def test_collect_outputs_of_every_recorded_media_case() -> None:
    def summary(case: str) -> list[tuple[str, str, str | None, str | None, bool]]:
        return [(o.node, o.key, o.file["filename"] if o.file else None, o.text, o.animated)
                for o in collect_outputs(media_entry(case))]

    assert summary("save_animated_webp") == [("2", "images", "anim_00001_.webp", None, True)]
    assert summary("save_animated_png") == [("2", "images", "apng_00001_.png", None, True)]
    assert summary("save_video_mp4") == [("3", "images", "video_00001_.mp4", None, True)]
    assert summary("save_webm") == [("2", "images", "webm_00001_.webm", None, True)]
    assert summary("save_latent") == [("2", "latents", "latent_00001_.latent", None, False)]
    assert summary("preview_any_text") == [("3", "text", None, "64", False)]
    # /history lists node 4 (the video) before node 2 (the stills): the order is by node id, not by history
    mixed = summary("mixed_image_and_video")
    assert [m[2] for m in mixed] == [f"still_0000{i}_.png" for i in range(1, 5)] + ["mixvid_00001_.mp4"]
    assert [m[4] for m in mixed] == [False] * 4 + [True]


def test_collect_outputs_of_custom_node_shapes() -> None:
    def item(name: str, kind: str = "output", **extra: Any) -> dict[str, Any]:
        return {"filename": name, "subfolder": "selfix/t", "type": kind, **extra}

    entry = {"outputs": {
        # VideoHelperSuite VHS_VideoCombine: `gifs`, with format/frame_rate/workflow/fullpath
        "12": {"gifs": [item("vhs_00001.mp4", format="video/h264-mp4", frame_rate=8.0,
                             workflow="vhs_00001.png", fullpath="/srv/comfy/output/selfix/t/vhs_00001.mp4")]},
        "3": {"audio": [item("audio_00001_.flac")]},                 # core SaveAudio
        "4": {"audio": [item("prev.flac", "temp")]},                 # PreviewAudio: a preview, skipped
        "5": {"3d": [item("mesh_00001_.glb")]},                      # core SaveGLB
        "6": {"text": ["hello", 7, None]},                           # PreviewAny: strings only
        "7": {"images": [item("a.png"), {"filename": "../x.png", "subfolder": "", "type": "output"}]},
        "8": {"result": ["mesh.glb", None]},                         # Preview3D: bare strings, not files
        "9": "garbage",
    }}
    got = collect_outputs(entry)
    assert [(o.node, o.key) for o in got] == [("3", "audio"), ("5", "3d"), ("6", "text"), ("7", "images"),
                                              ("12", "gifs")]
    vhs = got[-1]
    assert vhs.file == {"filename": "vhs_00001.mp4", "subfolder": "selfix/t", "type": "output"}
    assert vhs.hints == {"format": "video/h264-mp4", "frameRate": 8.0}  # fullpath never reaches a client
    assert got[2] == OutputItem("6", "text", text="hello")
    assert collect_outputs({"outputs": []}) == [] and collect_outputs({"outputs": {"1": None}}) == []
