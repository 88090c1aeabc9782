"""A whole node (real supervisord, ComfyUI double) against a real MinIO: LoRA fetched and bound, input images from S3
and data: URLs, images uploaded in parallel, refusals with specific codes and no request, an S3 outage mid-run."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.servers.minio_plugin import S3Bucket
from tests.servers.node_plugin import Node, task, wait_until, write_safetensors

pytestmark = [pytest.mark.s3, pytest.mark.e2e]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def put_bytes(bucket: S3Bucket, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    bucket.client().put_object(bucket.bucket, key, io.BytesIO(data), len(data), content_type=content_type)


def node_env(bucket: S3Bucket, **extra: str) -> dict[str, str]:
    return {**bucket.env, "DISK_FREE_FLOOR_GB": "0", **extra}


def load_image_task(task_id: str, images: dict[str, str], user: str = "u1") -> dict[str, Any]:
    """LoadImage → SaveImage for each input: the outputs are the inputs, so the binding can be checked by pixels."""
    workflow: dict[str, Any] = {}
    for i, name in enumerate(sorted(images)):
        workflow[str(10 + 2 * i)] = {"class_type": "LoadImage", "inputs": {"image": name}}
        workflow[str(11 + 2 * i)] = {"class_type": "SaveImage",
                                     "inputs": {"images": [str(10 + 2 * i), 0], "filename_prefix": f"in{i}"}}
    return {"taskId": task_id, "userId": user, "workflow": workflow, "images": images}


def assert_uploaded(bucket: S3Bucket, result: dict[str, Any], count: int) -> list[Image.Image]:
    assert result["status"] == "completed", result
    keys = result["imagePaths"]
    assert keys == [f"users/{result['userId']}/images/{result['taskId']}-{i}.png" for i in range(count)]
    assert result["imagePath"] == keys[0]
    images = []
    for key in keys:
        data, content_type = bucket.get(key)
        assert data.startswith(PNG_MAGIC) and content_type == "image/png", (key, content_type)
        images.append(Image.open(io.BytesIO(data)))
    return images


def test_lora_from_s3_is_bound_and_images_land_in_the_bucket(make_node: Any, s3_bucket: S3Bucket,
                                                             tmp_path: Path) -> None:
    lora_key = "users/u1/models/x.safetensors"
    lora_file = write_safetensors(tmp_path / "x.safetensors", bytes(range(256)) * 64)
    lora = lora_file.read_bytes()
    s3_bucket.client().fput_object(s3_bucket.bucket, lora_key, str(lora_file))
    pose, hand = png(40, 24, (200, 10, 10)), png(16, 32, (10, 10, 200))
    put_bytes(s3_bucket, "users/u1/inputs/pose.png", pose, "image/png")
    data_url = "data:image/png;base64," + base64.b64encode(hand).decode()

    node: Node = make_node(env=node_env(s3_bucket)).start()
    # stripMetadata false: keep the prompt ComfyUI embeds (stripped by default), it shows the binding
    node.drop("lora-1.json", task("lora-1", lora=lora_key, batch=3, output={"stripMetadata": False}))
    node.drop("img-1.json", load_image_task("img-1", {"pose.png": "users/u1/inputs/pose.png", "hand.png": data_url}))
    results = node.wait_results({"lora-1", "img-1"}, timeout=60)

    images = assert_uploaded(s3_bucket, results["lora-1"], 3)
    prompt = json.loads(images[0].text["prompt"])  # the double embeds the prompt it ran, as ComfyUI does
    bound = prompt["10"]["inputs"]["lora_name"]
    assert re.fullmatch(r"[0-9a-f]{32}\.safetensors", bound), "the workflow names the random file ComfyUI lists"
    cached = Path(node.env["LORA_CACHE_DIR"]) / bound
    assert cached.read_bytes() == lora
    assert not (Path(node.env["LORA_CACHE_DIR"]) / lora_key).exists(), "no file is named after its object key"

    hand_out, pose_out = assert_uploaded(s3_bucket, results["img-1"], 2)  # sorted names: hand.png, pose.png
    assert (hand_out.size, pose_out.size) == ((16, 32), (40, 24))
    assert hand_out.convert("RGB").getpixel((0, 0)) == (10, 10, 200)
    assert pose_out.convert("RGB").getpixel((0, 0)) == (200, 10, 10)
    assert not (Path(node.env["COMFY_INPUT_DIR"]) / "selfix" / "img-1").exists(), "input files not cleaned up"
    assert not list(Path(node.env["LORA_CACHE_DIR"]).rglob("*.part"))


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("dotdot", {"lora": "users/u1/../u2/models/x.safetensors"}, "lora_forbidden"),
    ("absolute", {"lora": "/users/u1/models/x.safetensors"}, "lora_forbidden"),
    ("other-user", {"lora": "users/u2/models/x.safetensors"}, "lora_forbidden"),
    ("ckpt", {"lora": "users/u1/models/x.ckpt"}, "lora_forbidden"),
    ("pt", {"lora": "users/u1/models/x.pt"}, "lora_forbidden"),
    ("bin", {"lora": "users/u1/models/x.bin"}, "lora_forbidden"),
    ("not-safetensors", {"lora": "users/u1/models/fake.safetensors"}, "lora_invalid"),
    ("missing", {"lora": "users/u1/models/none.safetensors"}, "lora_not_found"),
]


def test_refusals_have_specific_codes_and_forbidden_keys_cost_no_request(make_node: Any, s3_bucket: S3Bucket,
                                                                         tmp_path: Path) -> None:
    # Every forbidden object exists: a request for one would succeed, so only the checks can refuse them.
    valid = write_safetensors(tmp_path / "v.safetensors").read_bytes()
    for key in ("users/u2/models/x.safetensors", "users/u1/models/x.ckpt", "users/u1/models/x.pt",
                "users/u1/models/x.bin", "users/u1/models/x.safetensors"):
        put_bytes(s3_bucket, key, valid)
    put_bytes(s3_bucket, "users/u1/models/fake.safetensors", b"PK\x03\x04" + b"\0" * 4000)  # a zip (torch) file
    put_bytes(s3_bucket, "users/u2/inputs/pose.png", png(8, 8, (0, 0, 0)), "image/png")
    put_bytes(s3_bucket, "users/u1/inputs/notes.png", b"#!/bin/sh\necho this is no image\n", "image/png")

    node: Node = make_node(env=node_env(s3_bucket, MAX_DATA_URL_BYTES="2000")).start()
    requests = s3_bucket.server.requests()
    expected: dict[str, str] = {}
    for name, kw, code in REFUSED:
        node.drop(f"{name}.json", task(name, **kw))
        expected[name] = code
    big = "data:image/png;base64," + base64.b64encode(png(300, 300, (1, 2, 3)) + b"\0" * 3000).decode()
    node.drop("big-data-url.json", load_image_task("big-data-url", {"a.png": big}))
    expected["big-data-url"] = "input_too_large"
    node.drop("input-other-user.json", load_image_task("input-other-user", {"a.png": "users/u2/inputs/pose.png"}))
    expected["input-other-user"] = "input_forbidden"
    node.drop("input-not-image.json", load_image_task("input-not-image", {"a.png": "users/u1/inputs/notes.png"}))
    expected["input-not-image"] = "input_forbidden"

    results = node.wait_results(set(expected), timeout=60)
    got = {t: (r["status"], r.get("error", {}).get("code")) for t, r in results.items() if t in expected}
    assert got == {t: ("failed", code) for t, code in expected.items()}
    after = s3_bucket.server.requests()
    delta = {k: after.get(k, 0) - requests.get(k, 0) for k in ("HeadObject", "GetObject", "PutObject")}
    # Only the three allowed keys were asked for: fake.safetensors (HEAD + GET), none.safetensors (HEAD) and
    # notes.png (GET). Nothing was uploaded: no job produced an image.
    assert delta == {"HeadObject": 2, "GetObject": 2, "PutObject": 0}, delta
    assert not (Path(node.env["LORA_CACHE_DIR"]) / "users/u1/models/fake.safetensors").exists()


def test_s3_outage_mid_run_loses_and_fails_nothing(make_node: Any, s3_private_bucket: S3Bucket,
                                                   tmp_path: Path) -> None:
    """S3 stops while jobs run and comes back 20 s later: every task completes, on its first attempt."""
    server = s3_private_bucket.server
    keys = [f"users/u{i}/models/style.safetensors" for i in range(5)]
    for i, key in enumerate(keys):
        put_bytes(s3_private_bucket, key, write_safetensors(tmp_path / f"{i}.safetensors", bytes([i]) * 2048)
                  .read_bytes())
    node: Node = make_node(env=node_env(s3_private_bucket, LORA_HEAD_TTL_S="1")).start()
    ids = [f"o-{i:02d}" for i in range(12)]
    for n, task_id in enumerate(ids):
        user = n % 4 if n < 10 else 4  # u4's LoRA is first needed after the outage began: fetched once S3 is back
        node.drop(f"{task_id}.json", task(task_id, user=f"u{user}", lora=keys[user], steps=6, batch=2))
    wait_until(lambda: len(node.results()) >= 2, 60, "the first results")
    server.stop()
    stopped = time.monotonic()
    time.sleep(20)
    server.start()
    results = node.wait_results(set(ids), timeout=90)
    outage_to_done = time.monotonic() - stopped

    done_during = [t for t in ids if results[t]["metadata"].get("finishedAt", 0) < stopped]
    assert len(done_during) < len(ids), "the outage hit no job"
    for task_id in ids:
        result = results[task_id]
        assert result["status"] == "completed", result
        assert result["metadata"]["attempts"] == 1, result
        assert_uploaded(s3_private_bucket, result, 2)
    assert outage_to_done < 80, outage_to_done
    log = node.log_path.read_text(errors="replace")
    assert "deferred" in log, "no job waited for S3 (runner)"
    assert "store failed" in log, "no upload waited for S3 (uploader)"
