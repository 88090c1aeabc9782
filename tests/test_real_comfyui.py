"""The same node, unchanged, against a REAL ComfyUI instead of the double (weight-free workflows).

Runs only where a ComfyUI checkout and its Python are given: SELFIX_REAL_COMFYUI_DIR (the folder with main.py) and
SELFIX_REAL_COMFY_PYTHON (an interpreter with ComfyUI's requirements); extra flags in SELFIX_REAL_COMFY_ARGS
(default `--cpu`). Skipped otherwise: ComfyUI is not on PyPI, so CI cannot install it by itself.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.servers.node_plugin import Node, write_safetensors
from tests.test_e2e import assert_clean_spool, assert_images

COMFYUI_DIR = os.environ.get("SELFIX_REAL_COMFYUI_DIR", "")
COMFY_PYTHON = os.environ.get("SELFIX_REAL_COMFY_PYTHON", "")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (COMFYUI_DIR and Path(COMFYUI_DIR, "main.py").exists() and COMFY_PYTHON),
                       reason="no real ComfyUI: set SELFIX_REAL_COMFYUI_DIR and SELFIX_REAL_COMFY_PYTHON"),
]


def png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 128, 255)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


JOBS: dict[str, dict[str, Any]] = {
    "real-demo": {"taskId": "real-demo", "userId": "u1", "template": "demo",
                  "params": {"width": 128, "height": 128, "out_width": 160, "out_height": 96, "batch_size": 2}},
    "real-load": {"taskId": "real-load", "userId": "u1", "images": {"pose.png": png_data_url()}, "workflow": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "pose.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 64,
                                                     "height": 64, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "load"}}}},
    "real-badckpt": {"taskId": "real-badckpt", "userId": "u1", "workflow": {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nope.safetensors"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}}}},
    "real-junkckpt": {"taskId": "real-junkckpt", "userId": "u1", "workflow": {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "junk.safetensors"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}}}},
    "real-nonode": {"taskId": "real-nonode", "userId": "u1",
                    "workflow": {"1": {"class_type": "NoSuchNode", "inputs": {}}}},
}


def test_node_against_real_comfyui(make_node: Any, tmp_path: Path) -> None:
    node: Node = make_node("real", env={
        "COMFY_COMMAND": "", "COMFYUI_DIR": COMFYUI_DIR, "COMFY_PYTHON": COMFY_PYTHON,
        "COMFY_ARGS": os.environ.get("SELFIX_REAL_COMFY_ARGS", "--cpu") + " --database-url sqlite:///:memory:",
        "WS_SILENCE_S": "5"})
    (Path(node.env["MODELS_DIR"]) / "checkpoints" / "junk.safetensors").write_bytes(b"\xff" * 64)
    write_safetensors(Path(node.env["MODELS_DIR"]) / "checkpoints" / "tiny.safetensors")
    node.start()
    for task_id, job in JOBS.items():
        node.drop(f"{task_id}.json", job)
    results = node.wait_results(set(JOBS), timeout=180)
    print(json.dumps(results, indent=1)[:4000])

    assert_images(node, results["real-demo"])
    assert len(results["real-demo"]["imagePaths"]) == 2
    with Image.open(node.store / results["real-demo"]["imagePaths"][0]) as img:
        assert img.size == (160, 96)
    assert_images(node, results["real-load"])
    bad = results["real-badckpt"]["error"]
    assert bad["code"] == "invalid_workflow" and bad["nodeErrors"]["4"]["errors"][0]["type"] == "value_not_in_list"
    assert results["real-nonode"]["error"]["code"] == "invalid_workflow"
    assert "NoSuchNode" in results["real-nonode"]["error"]["message"]
    junk = results["real-junkckpt"]["error"]
    assert junk["code"] == "execution_error" and "node 4 (CheckpointLoaderSimple)" in junk["message"], junk
    assert results["real-demo"]["metadata"]["generationTime"] > 0
    assert_clean_spool(node)


def slow_job(task_id: str) -> dict[str, Any]:
    """Weight-free but slow on a CPU: a large blurred batch (a few seconds), long enough to kill the runner in."""
    return {"taskId": task_id, "userId": "u1", "workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 1536, "height": 1536, "batch_size": 4,
                                                     "color": int(task_id.encode().hex()[-6:], 16)}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 8.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "slow"}}}}


def test_runner_killed_mid_job_reattaches_to_the_real_comfyui(make_node: Any) -> None:
    from tests.servers.node_plugin import wait_until

    node: Node = make_node("real-kill", env={
        "COMFY_COMMAND": "", "COMFYUI_DIR": COMFYUI_DIR, "COMFY_PYTHON": COMFY_PYTHON,
        "COMFY_ARGS": os.environ.get("SELFIX_REAL_COMFY_ARGS", "--cpu") + " --database-url sqlite:///:memory:"})
    node.start()
    ids = ["slow-a", "slow-b"]
    for task_id in ids:
        node.drop(f"{task_id}.json", slow_job(task_id))
    wait_until(lambda: any(json.loads(p.read_bytes()).get("startedAt") for p in node.spool.processing_files()),
               60, "a job running inside the real ComfyUI")
    node.wait_restarted("runner", node.kill("runner"))
    results = node.wait_results(set(ids), timeout=180)
    for result in results.values():
        assert_images(node, result)
        assert result["metadata"]["attempts"] == 1, result
    log = (Path(node.env["COMFY_LOG_DIR"]) / "comfyui.log").read_text()
    assert log.count("Prompt executed in") == 2, "a prompt ran twice in the real ComfyUI"
    assert_clean_spool(node)


def test_real_comfyui_killed_mid_job_is_restarted_and_the_job_retried(make_node: Any) -> None:
    from tests.servers.node_plugin import wait_until

    node: Node = make_node("real-crash", env={
        "COMFY_COMMAND": "", "COMFYUI_DIR": COMFYUI_DIR, "COMFY_PYTHON": COMFY_PYTHON,
        "COMFY_ARGS": os.environ.get("SELFIX_REAL_COMFY_ARGS", "--cpu") + " --database-url sqlite:///:memory:"})
    node.start()
    node.drop("victim.json", slow_job("victim"))
    wait_until(lambda: any(json.loads(p.read_bytes()).get("startedAt") for p in node.spool.processing_files()),
               60, "the job running inside the real ComfyUI")
    node.wait_restarted("comfyui", node.kill("comfyui"), timeout=60)
    result = node.wait_results({"victim"}, timeout=180)["victim"]
    assert_images(node, result)
    assert result["metadata"]["attempts"] == 2, result
    assert_clean_spool(node)


def test_cross_tenant_attempts_never_reach_the_real_comfyui(make_node: Any) -> None:
    """The attempts of tests/test_isolation_e2e.py against a real ComfyUI: each refused with its code, none in
    ComfyUI's /history, while weight-free legitimate tasks complete."""
    import urllib.request

    from selfix.comfy import prompt_id_for
    from tests.test_isolation_e2e import VICTIM_LORA, attacks, load_image, plant_victim_files, png

    node: Node = make_node("real-isolation", env={
        "COMFY_COMMAND": "", "COMFYUI_DIR": COMFYUI_DIR, "COMFY_PYTHON": COMFY_PYTHON,
        "COMFY_ARGS": os.environ.get("SELFIX_REAL_COMFY_ARGS", "--cpu") + " --database-url sqlite:///:memory:"})
    write_safetensors(node.store / VICTIM_LORA, b"\1" * 128)
    write_safetensors(node.store / "users/u2/models/own.safetensors", b"\2" * 128)
    node.start()
    victim = {"taskId": "v-lora", "userId": "u1", "loraModel": VICTIM_LORA, "workflow": {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name":
               "tiny_lora.safetensors", "strength_model": 1.0, "strength_clip": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "v"}}}}
    node.drop("v-lora.json", victim)  # the LoRA is cached whatever the (weight-less) run does
    node.wait_results({"v-lora"}, timeout=120)
    cache = Path(node.env["LORA_CACHE_DIR"])
    cached = next(json.loads(p.read_bytes())["file"] for p in (cache / ".selfix" / "meta").glob("*.json"))
    os.symlink(cache / cached, cache / "planted.safetensors")
    plant_victim_files(Path(node.env["COMFY_INPUT_DIR"]), Path(node.env["COMFY_OUTPUT_DIR"]),
                       Path(node.env["TEMP_DIR"]) / "temp")
    rows = attacks(cached, node)
    for task_id, extra, _ in rows:
        node.drop(f"{task_id}.json", {"taskId": task_id, "userId": "u2", **extra})
    blue = "data:image/png;base64," + base64.b64encode(png((0, 0, 250))).decode()
    legit = {"l-demo": JOBS["real-demo"] | {"taskId": "l-demo"},
             "l-image": {"taskId": "l-image", "userId": "u2", "workflow": load_image("pose.png"),
                         "images": {"pose.png": blue}}}
    node.wait_results({t for t, _, _ in rows}, timeout=180)
    for task_id, msg in legit.items():
        node.drop(f"{task_id}.json", msg)
    results = node.wait_results({t for t, _, _ in rows} | set(legit), timeout=180)
    assert {t: results[t].get("error", {}).get("code") for t, _, _ in rows} == {t: code for t, _, code in rows}
    for task_id in legit:
        assert_images(node, results[task_id])
    for task_id, _, _ in rows:
        url = f"http://127.0.0.1:{node.env['COMFY_PORT']}/history/{prompt_id_for(task_id, 1)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert json.loads(resp.read()) == {}, f"{task_id} reached the real ComfyUI"


MEDIA_JOBS: dict[str, dict[str, Any]] = {
    "real-video": {"taskId": "real-video", "userId": "u1", "workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 8, "color": 3368703}},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
        "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "video/clip",
                                                    "format": "mp4", "codec": "h264"}}}},
    "real-webp": {"taskId": "real-webp", "userId": "u1", "workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 3, "color": 3368703}},
        "2": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "anim", "fps": 6.0,
                                                           "lossless": False, "quality": 80, "method": "default"}}}},
    "real-text": {"taskId": "real-text", "userId": "u1", "workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 3368703}},
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}},
}


def test_media_outputs_from_the_real_comfyui(make_node: Any) -> None:
    """CreateVideo + SaveVideo, SaveAnimatedWEBP and GetImageSize -> PreviewAny, as the double reproduces them."""
    node: Node = make_node("real-media", env={
        "COMFY_COMMAND": "", "COMFYUI_DIR": COMFYUI_DIR, "COMFY_PYTHON": COMFY_PYTHON,
        "COMFY_ARGS": os.environ.get("SELFIX_REAL_COMFY_ARGS", "--cpu") + " --database-url sqlite:///:memory:"})
    node.start()
    for task_id, job in MEDIA_JOBS.items():
        node.drop(f"{task_id}.json", job)
    results = node.wait_results(set(MEDIA_JOBS), timeout=180)
    print(json.dumps(results, indent=1)[:4000])

    video = results["real-video"]
    assert video["status"] == "completed" and video["imagePaths"] == [], video
    (entry,) = video["outputs"]
    assert (entry["node"], entry["key"], entry["kind"], entry["objectKey"], entry["contentType"]) == (
        "3", "images", "video", "users/u1/outputs/real-video-0.mp4", "video/mp4")
    assert (entry["width"], entry["height"]) == (64, 64) and entry["duration"] == pytest.approx(1.0, abs=0.2)
    data = (node.store / entry["objectKey"]).read_bytes()
    assert data[4:8] == b"ftyp" and len(data) == entry["bytes"]

    (anim,) = results["real-webp"]["outputs"]
    assert (anim["kind"], anim["objectKey"], anim["contentType"]) == (
        "animation", "users/u1/outputs/real-webp-0.webp", "image/webp")
    with Image.open(node.store / anim["objectKey"]) as img:
        assert img.format == "WEBP" and img.size == (64, 48)

    assert results["real-text"]["outputs"] == [{"node": "3", "key": "text", "kind": "text", "text": "64",
                                                "contentType": "text/plain; charset=utf-8", "bytes": 2}]
    assert_clean_spool(node)
