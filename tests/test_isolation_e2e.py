"""Cross-tenant attempts on a shared node. First against the ComfyUI double alone (it resolves names like the real
folder_paths), to show each attempt WOULD read another task's file; then through a whole node, where every one is
refused with its specific code before ComfyUI runs anything, while legitimate tasks in the same run complete."""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from selfix.comfy import prompt_id_for
from tests.servers.node_plugin import Double, Node, t2i_workflow, task, wait_until, write_safetensors
from tests.test_e2e import assert_images

pytestmark = pytest.mark.e2e

VICTIM = "victim"  # u1's task whose files are on the node (its input photo, an output, a preview)
VICTIM_LORA = "users/u1/models/tiny_lora.safetensors"
RED = (200, 10, 10)


def png(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def plant_victim_files(input_dir: Path, output_dir: Path, temp_dir: Path) -> None:
    """What a task of u1 leaves on the node while it runs and until its result is uploaded."""
    for path in (input_dir / "selfix" / VICTIM / "pose.png", output_dir / "selfix" / VICTIM / "face_00001_.png",
                 temp_dir / "ComfyUI_temp_abcde_00001_.png", input_dir / "selfix" / VICTIM / "pose.latent"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(RED))


def save(source: dict[str, Any], out: int = 0) -> dict[str, Any]:
    return {**source, "9": {"class_type": "SaveImage", "inputs": {"images": ["1", out], "filename_prefix": "x"}}}


def load_image(value: str, cls: str = "LoadImage", name: str = "image") -> dict[str, Any]:
    return save({"1": {"class_type": cls, "inputs": {name: value}}})


def via_latent(value: str) -> dict[str, Any]:
    return save({"1": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["4", 2]}},
                 "2": {"class_type": "LoadLatent", "inputs": {"latent": value}},
                 "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}}})


def via_video(value: str) -> dict[str, Any]:
    return save({"1": {"class_type": "GetVideoComponents", "inputs": {"video": ["2", 0]}},
                 "2": {"class_type": "LoadVideo", "inputs": {"file": value}}})


def with_lora(value: str, **extra: Any) -> dict[str, Any]:
    return t2i_workflow(lora=value, **extra)


# --- 1. without selfix's check the double (like ComfyUI) reads the other task's files -------------------------

def post_and_wait(double: Double, workflow: dict[str, Any]) -> dict[str, Any]:
    prompt_id = str(uuid.uuid4())
    body = json.dumps({"prompt": workflow, "prompt_id": prompt_id}).encode()
    req = urllib.request.Request(double.url + "/prompt", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"refused: {exc.read()[:2000]!r}") from None

    def entry() -> dict[str, Any] | None:
        with urllib.request.urlopen(f"{double.url}/history/{prompt_id}", timeout=10) as resp:
            return json.loads(resp.read()).get(prompt_id)  # type: ignore[no-any-return]

    return dict(wait_until(entry, 30, f"prompt {prompt_id} done"))


def test_without_the_check_the_attacks_read_other_tasks_files(comfy_double: Double) -> None:
    d = comfy_double.dirs
    plant_victim_files(d["input"], d["output"], d["temp"] / "temp")  # ComfyUI's temp is <--temp-directory>/temp
    lora = write_safetensors(d["models"] / "loras" / VICTIM_LORA)  # the cache as it was: files named by key
    os.symlink(lora, d["models"] / "loras" / "planted.safetensors")
    attacks = {
        "plain": load_image(f"selfix/{VICTIM}/pose.png"),
        "annotated-input": load_image(f"selfix/{VICTIM}/pose.png [input]"),
        "annotated-output": load_image(f"selfix/{VICTIM}/face_00001_.png [output]"),
        "annotated-temp": load_image("ComfyUI_temp_abcde_00001_.png [temp]"),
        "absolute": load_image(str(d["input"] / "selfix" / VICTIM / "pose.png")),
        "dotdot": load_image(f"../output/selfix/{VICTIM}/face_00001_.png"),
        "load-image-output": load_image(f"selfix/{VICTIM}/face_00001_.png [output]", "LoadImageOutput"),
        "load-video": via_video(f"selfix/{VICTIM}/pose.png"),
    }
    for name, workflow in attacks.items():
        entry = post_and_wait(comfy_double, workflow)
        assert entry["status"]["status_str"] == "success", (name, entry["status"])
        image = entry["outputs"]["9"]["images"][0]
        saved = Image.open(d["output"] / image["subfolder"] / image["filename"]).convert("RGB")
        assert saved.getpixel((0, 0)) == RED, f"{name}: the output is not the victim's photo"
    for name, workflow in {"latent": via_latent(f"selfix/{VICTIM}/pose.latent"),
                           "lora-by-key": with_lora(VICTIM_LORA), "lora-symlink": with_lora("planted.safetensors")
                           }.items():
        assert post_and_wait(comfy_double, workflow)["status"]["status_str"] == "success", name


# --- 2. through the node: each refused with its code, nothing runs, legitimate tasks complete ------------------

def attacks(cached: str, node: Node) -> list[tuple[str, dict[str, Any], str]]:
    """(taskId, message, code): tasks of u2 (the attacker) unless said otherwise."""
    inp = Path(node.env["COMFY_INPUT_DIR"])
    wf_lora = with_lora
    own_lora = "users/u2/models/own.safetensors"
    two_loras = with_lora("own.safetensors")
    two_loras["11"] = {"class_type": "LoraLoader", "inputs": {"model": ["10", 0], "clip": ["10", 1],
                                                              "lora_name": VICTIM_LORA, "strength_model": 1.0,
                                                              "strength_clip": 1.0}}
    stacker = t2i_workflow()
    stacker["12"] = {"class_type": "LoRA Stacker", "inputs": {"input_mode": "simple", "lora_count": 1,
                                                              "lora_name_1": VICTIM_LORA, "lora_wt_1": 1.0}}
    tag = t2i_workflow()
    tag["6"]["inputs"]["text"] = "a portrait <lora:tiny_lora:1.0>"
    rows: list[tuple[str, dict[str, Any], str]] = [
        ("a-lora-key", {"workflow": wf_lora(VICTIM_LORA)}, "lora_forbidden"),
        ("a-lora-basename", {"workflow": wf_lora("tiny_lora.safetensors")}, "lora_forbidden"),
        ("a-lora-key-case", {"workflow": wf_lora(VICTIM_LORA.upper())}, "lora_forbidden"),
        ("a-lora-basename-case", {"workflow": wf_lora("Tiny_Lora.SafeTensors")}, "lora_forbidden"),
        ("a-lora-cached-name", {"workflow": wf_lora(cached)}, "lora_forbidden"),
        ("a-lora-cached-name-case", {"workflow": wf_lora(cached.upper())}, "lora_forbidden"),
        ("a-lora-second-loader", {"workflow": two_loras, "loraModel": own_lora}, "lora_forbidden"),
        ("a-lora-stacker", {"workflow": stacker}, "lora_forbidden"),
        ("a-lora-tag", {"workflow": tag}, "lora_forbidden"),
        ("a-lora-symlink", {"workflow": wf_lora("planted.safetensors")}, "lora_forbidden"),
        ("a-input-plain", {"workflow": load_image(f"selfix/{VICTIM}/pose.png")}, "input_forbidden"),
        ("a-input-annotated", {"workflow": load_image(f"selfix/{VICTIM}/pose.png [input]")}, "input_forbidden"),
        ("a-input-basename", {"workflow": load_image("pose.png")}, "input_forbidden"),
        ("a-input-case", {"workflow": load_image(f"SELFIX/{VICTIM.upper()}/pose.png")}, "input_forbidden"),
        ("a-input-absolute", {"workflow": load_image(str(inp / "selfix" / VICTIM / "pose.png"))}, "input_forbidden"),
        ("a-input-dotdot", {"workflow": load_image(f"selfix/a-input-dotdot/../{VICTIM}/pose.png"),
                            "images": {"me.png": "data:image/png;base64," + base64.b64encode(png((1, 2, 3))).decode()}},
         "input_forbidden"),
        ("a-input-mask", {"workflow": {"1": {"class_type": "LoadImageMask", "inputs": {
            "image": f"selfix/{VICTIM}/pose.png", "channel": "alpha"}}}}, "input_forbidden"),
        ("a-output-annotated", {"workflow": load_image(f"selfix/{VICTIM}/face_00001_.png [output]")},
         "input_forbidden"),
        ("a-output-dotdot", {"workflow": load_image(f"../output/selfix/{VICTIM}/face_00001_.png")},
         "input_forbidden"),
        ("a-temp-annotated", {"workflow": load_image("ComfyUI_temp_abcde_00001_.png [temp]")}, "input_forbidden"),
        ("a-load-image-output", {"workflow": load_image(f"selfix/{VICTIM}/face_00001_.png [output]",
                                                        "LoadImageOutput")}, "invalid_workflow"),
        ("a-load-latent", {"workflow": via_latent(f"selfix/{VICTIM}/pose.latent")}, "invalid_workflow"),
        ("a-load-video", {"workflow": via_video(f"selfix/{VICTIM}/pose.png")}, "invalid_workflow"),
        ("a-ckpt-dotdot", {"workflow": {**t2i_workflow(), "4": {"class_type": "CheckpointLoaderSimple", "inputs": {
            "ckpt_name": f"../../loras/{cached}"}}}}, "model_forbidden"),
        ("a-ckpt-absolute", {"workflow": {**t2i_workflow(), "4": {"class_type": "CheckpointLoaderSimple", "inputs": {
            "ckpt_name": str(Path(node.env["LORA_CACHE_DIR"]) / cached)}}}}, "model_forbidden"),
        ("a-ckpt-backslash", {"workflow": {**t2i_workflow(), "4": {"class_type": "CheckpointLoaderSimple",
                                                                   "inputs": {"ckpt_name": "..\\tiny.safetensors"}}}},
         "model_forbidden"),
        ("a-ckpt-cached-lora", {"workflow": {**t2i_workflow(), "4": {"class_type": "CheckpointLoaderSimple",
                                                                     "inputs": {"ckpt_name": cached}}}},
         "lora_forbidden"),
        ("a-own-user-unbound", {"workflow": wf_lora("users/u2/models/unbound.safetensors")}, "lora_forbidden"),
    ]
    return rows


def test_cross_tenant_attempts_are_refused_before_comfyui_and_legit_tasks_complete(make_node: Any) -> None:
    node: Node = make_node(seconds_per_step=0.01)
    store = node.store
    write_safetensors(store / VICTIM_LORA, b"\1" * 128)
    write_safetensors(store / "users/u2/models/own.safetensors", b"\2" * 128)
    node.start()
    node.drop("v-lora.json", task("v-lora", user="u1", lora=VICTIM_LORA))  # u1's LoRA is now in the cache
    assert_images(node, node.wait_results({"v-lora"}, timeout=60)["v-lora"])
    cache = Path(node.env["LORA_CACHE_DIR"])
    metas = [json.loads(p.read_bytes()) for p in (cache / ".selfix" / "meta").glob("*.json")]
    cached = next(m["file"] for m in metas if m["key"] == VICTIM_LORA)
    assert not (cache / VICTIM_LORA).exists(), "cached under a random name, not the key"
    os.symlink(cache / cached, cache / "planted.safetensors")  # somebody with access to the volume
    plant_victim_files(Path(node.env["COMFY_INPUT_DIR"]), Path(node.env["COMFY_OUTPUT_DIR"]),
                       Path(node.env["TEMP_DIR"]) / "temp")
    runs_before = len(node.executions())

    rows = attacks(cached, node)
    assert len(rows) >= 25
    for task_id, extra, _ in rows:
        node.drop(f"{task_id}.json", {"taskId": task_id, "userId": "u2", **extra})
    legit = {
        "l-u2-own-lora": task("l-u2-own-lora", user="u2", lora="users/u2/models/own.safetensors"),
        "l-u1-lora": task("l-u1-lora", user="u1", lora=VICTIM_LORA),
        "l-u2-image": {"taskId": "l-u2-image", "userId": "u2", "workflow": load_image("pose.png"),
                       "images": {"pose.png": "data:image/png;base64," + base64.b64encode(png((0, 0, 250))).decode()}},
        "l-demo": {"taskId": "l-demo", "userId": "u3", "template": "demo", "params": {"width": 32, "height": 32}},
    }
    started = time.monotonic()
    results = node.wait_results({t for t, _, _ in rows}, timeout=120)
    refused_in = time.monotonic() - started
    for task_id, msg in legit.items():  # after the attacks: u2's own download must not tidy the planted link first
        node.drop(f"{task_id}.json", msg)
    results = node.wait_results({t for t, _, _ in rows} | set(legit), timeout=120)
    got = {t: (results[t]["status"], results[t].get("error", {}).get("code")) for t, _, _ in rows}
    assert got == {t: ("failed", code) for t, _, code in rows}
    for task_id, _, _ in rows:
        message = results[task_id]["error"]["message"]
        assert message.startswith("node "), message  # names the node, its class and the input
        assert results[task_id]["error"]["retriable"] is False
    for task_id in legit:
        assert_images(node, results[task_id])
    blue = Image.open(node.store / results["l-u2-image"]["imagePath"]).convert("RGB").getpixel((0, 0))
    assert blue == (0, 0, 250), "u2's own photo, not u1's"

    attack_prompts = {prompt_id_for(t, 1) for t, _, _ in rows}
    ran = node.executions()[runs_before:]
    assert not attack_prompts & set(ran), "an attack reached ComfyUI's execution"
    assert len(ran) == len(legit), ran
    assert not (cache / "planted.safetensors").is_symlink(), "the cache scan removed the planted link"
    print(f"{len(rows)} cross-tenant attempts refused in {refused_in:.1f}s, then {len(legit)} legitimate tasks "
          f"completed ({time.monotonic() - started:.1f}s in all)")
