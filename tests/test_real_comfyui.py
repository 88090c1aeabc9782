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
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.servers.node_plugin import Node, t2i_workflow, wait_until, write_safetensors
from tests.servers.tiny_checkpoint import TinyModels, ensure_models
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


# --- a real sampler: random SD1.5 weights built from ComfyUI's own classes (tests/servers/tiny_checkpoint.py) ---

LORA_KEY = "users/u1/models/style.safetensors"


@pytest.fixture(scope="module")
def tiny_models() -> TinyModels:
    return ensure_models(COMFYUI_DIR, COMFY_PYTHON)  # cached; a first build takes well under a minute


def sd15_node(make_node: Any, name: str, models: TinyModels, comfy_args: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> Node:
    """A node on the real ComfyUI with the random checkpoint among the operator's models and u1's LoRA in the
    store (fetched by the runner like any user's LoRA)."""
    args = [os.environ.get("SELFIX_REAL_COMFY_ARGS", "--cpu"), "--database-url sqlite:///:memory:", *comfy_args]
    node: Node = make_node(name, env={"COMFY_COMMAND": "", "COMFYUI_DIR": COMFYUI_DIR, "COMFY_PYTHON": COMFY_PYTHON,
                                      "COMFY_ARGS": " ".join(args), **(env or {})})
    os.symlink(models.checkpoint, Path(node.env["MODELS_DIR"]) / "checkpoints" / models.checkpoint.name)
    (node.store / LORA_KEY).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(models.lora, node.store / LORA_KEY)
    return node.start()


def sd15_task(task_id: str, models: TinyModels, *, steps: int, lora: bool = True, priority: int = 0
              ) -> dict[str, Any]:
    """checkpoint → LoraLoader (the user's LoRA, strength 0.8) → CLIPTextEncode ×2 → 64×64 latent → KSampler →
    VAEDecode → SaveImage; one seed for every task, so two runs differ only by what the graph changes."""
    workflow = t2i_workflow(steps, lora=LORA_KEY.rsplit("/", 1)[-1] if lora else None, prefix=task_id, seed=7)
    workflow["4"]["inputs"]["ckpt_name"] = models.checkpoint.name
    msg: dict[str, Any] = {"taskId": task_id, "userId": "u1", "priority": priority, "workflow": workflow}
    if lora:
        msg["loraModel"] = LORA_KEY
    return msg


def pixels(node: Node, result: dict[str, Any]) -> bytes:
    with Image.open(node.store / result["imagePath"]) as img:
        assert img.size == (64, 64)
        return img.convert("RGB").tobytes()


def comfy_log(node: Node) -> str:
    return (Path(node.env["COMFY_LOG_DIR"]) / "comfyui.log").read_text(errors="replace")


def test_txt2img_with_the_users_lora_through_the_real_lora_loader(make_node: Any, tiny_models: TinyModels) -> None:
    """ComfyUI logs nothing when a LoRA applies, only its misses ("lora key not loaded: …" per unmapped key,
    "NOT LOADED …" per unpatched weight): none of those, and the LoRA changes the picture, while the same graph
    without it, run again after it (so not from ComfyUI's cache), gives the same picture twice."""
    node = sd15_node(make_node, "real-sd15", tiny_models)
    jobs = [sd15_task("plain-1", tiny_models, steps=3, lora=False, priority=3),
            sd15_task("styled", tiny_models, steps=3, priority=2),
            sd15_task("plain-2", tiny_models, steps=3, lora=False, priority=1)]
    for job in jobs:
        node.drop(f"{job['taskId']}.json", job)
    results = node.wait_results({j["taskId"] for j in jobs}, timeout=240)
    for result in results.values():
        assert_images(node, result)
    log = comfy_log(node)
    print("\n".join(line for line in log.splitlines() if "lora" in line.casefold() or "load" in line.casefold()))
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log
    assert log.count("Prompt executed in") == 3 and log.count(" 0/3 [") == 3, "three prompts, each sampled"
    assert pixels(node, results["plain-1"]) == pixels(node, results["plain-2"]), "the CPU sampler is not repeatable"
    assert pixels(node, results["styled"]) != pixels(node, results["plain-1"]), "the LoRA changed nothing"
    cached = [p for p in Path(node.env["LORA_CACHE_DIR"]).iterdir() if p.suffix == ".safetensors"]
    assert [p.read_bytes() for p in cached] == [tiny_models.lora.read_bytes()], cached
    assert_clean_spool(node)


def test_console_serves_the_real_latent_previews_while_the_task_runs(make_node: Any,
                                                                     tiny_models: TinyModels) -> None:
    """CONSOLE_PREVIEWS=true and `--preview-method latent2rgb`: ComfyUI takes the runner's feature_flags handshake
    (it logs that at DEBUG only), so it sends event 4 frames (a 512 px JPEG a step) and no legacy event 1;
    /api/preview/<taskId> serves the latest while the task runs, and nothing once it is done."""
    from tests.test_console import get, preview_files

    node = sd15_node(make_node, "real-previews", tiny_models, ("--preview-method", "latent2rgb", "--verbose", "DEBUG"),
                     {"CONSOLE_PREVIEWS": "true"})
    node.drop("pv.json", sd15_task("pv", tiny_models, steps=16))  # 4 s on an idle CPU, ~30 s on a loaded one
    served: dict[bytes, str] = {}  # each distinct preview body → its Content-Type

    def watch() -> bool:
        status, headers, body = get(node, "/api/preview/pv")
        if status == 200:
            served.setdefault(body, headers["Content-Type"])
        return "pv" in node.results()

    wait_until(watch, 240, lambda: f"pv done\n{node.log_tail()}", interval=0.1)
    sizes = []
    for body, content_type in served.items():
        with Image.open(io.BytesIO(body)) as img:
            assert (content_type, img.format) == ("image/jpeg", "JPEG"), (content_type, img.format)
            img.load()  # a whole JPEG, not a file cut short
            sizes.append((img.size, len(body)))
    print(f"{len(served)} distinct previews served: {sizes}")
    assert served, "no preview served while pv ran"
    assert re.search(r"Feature flags negotiated for client selfix-runner-\S+: \{'supports_preview_metadata': True\}",
                     comfy_log(node)), "ComfyUI never took the runner's feature_flags handshake"
    assert_images(node, node.results()["pv"])
    assert preview_files(node) == [] and get(node, "/api/preview/pv")[0] == 404
    assert_clean_spool(node)
