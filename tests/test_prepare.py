"""prepare(): LoRAs and input images against a real MinIO, checked again after intake, placed per task, removed
exactly."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from selfix import messages as m
from selfix.job import Job
from selfix.loras import LoraCache
from selfix.prepare import input_dir_of, place_images, prepare, remove_task_files
from selfix.storage import S3Store
from tests.servers.minio_plugin import S3Bucket
from tests.servers.node_plugin import t2i_workflow, write_safetensors

pytestmark = pytest.mark.s3


def png(size: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


def put(bucket: S3Bucket, key: str, data: bytes) -> None:
    bucket.client().put_object(bucket.bucket, key, io.BytesIO(data), len(data))


def job(task_id: str = "t1", **extra: Any) -> Job:
    return Job.from_dict({"taskId": task_id, "userId": "u1", "workflow": t2i_workflow(), "loraModels": [], "images": {},
                          **extra})


def test_prepare_binds_lora_and_images_and_cleanup_is_exact(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    put(s3_bucket, "users/u1/models/x.safetensors", write_safetensors(tmp_path / "x.safetensors").read_bytes())
    put(s3_bucket, "users/u1/inputs/pose.png", png())
    store = S3Store(s3_bucket.settings())
    loras = LoraCache(tmp_path / "loras", store)
    workflow = t2i_workflow(lora="x.safetensors")
    workflow["20"] = {"class_type": "LoadImage", "inputs": {"image": "pose.png"}}
    workflow["21"] = {"class_type": "LoadImage", "inputs": {"image": "hand.png"}}
    the_job = job(workflow=workflow, loraModels=["users/u1/models/x.safetensors"],
                  images={"pose.png": "users/u1/inputs/pose.png",
                          "hand.png": "data:image/png;base64," + base64.b64encode(png(4)).decode()})
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for _ in range(2):  # idempotent: a restarted runner prepares again
        patched = prepare(the_job, store, loras, inputs, 10_000)
    cached = loras.comfy_name("users/u1/models/x.safetensors")
    assert patched["10"]["inputs"]["lora_name"] == cached and re.fullmatch(r"[0-9a-f]{32}\.safetensors", cached), \
        "the name ComfyUI lists is random, not the key"
    assert patched["20"]["inputs"]["image"] == "selfix/t1/pose.png"
    assert patched["21"]["inputs"]["image"] == "selfix/t1/hand.png"
    assert sorted(p.name for p in input_dir_of(inputs, "t1").iterdir()) == ["hand.png", "pose.png"]

    (input_dir_of(inputs, "t2")).mkdir(parents=True)
    (outputs / "selfix" / "t1").mkdir(parents=True)
    (outputs / "selfix" / "t10").mkdir(parents=True)
    remove_task_files(outputs, inputs, "t1")
    assert not input_dir_of(inputs, "t1").exists() and not (outputs / "selfix" / "t1").exists()
    assert input_dir_of(inputs, "t2").exists() and (outputs / "selfix" / "t10").exists()


@pytest.mark.parametrize(("images", "code", "requests"), [
    ({"a.png": "users/u2/inputs/a.png"}, m.INPUT_FORBIDDEN, 0),
    ({"a.png": "users/u1/../u2/inputs/a.png"}, m.INPUT_FORBIDDEN, 0),
    ({"../a.png": "users/u1/inputs/a.png"}, m.INPUT_FORBIDDEN, 0),
    ({"a.png": "data:image/png;base64," + "A" * 20_000}, m.INPUT_TOO_LARGE, 0),
    ({"a.png": "data:text/html;base64,PGgxPg=="}, m.INPUT_FORBIDDEN, 0),
    ({"a.png": "users/u1/inputs/big.png"}, m.INPUT_TOO_LARGE, 1),
    ({"a.png": "users/u1/inputs/script.png"}, m.INPUT_FORBIDDEN, 1),
    ({"a.png": "users/u1/inputs/none.png"}, m.INPUT_NOT_FOUND, 1),
])
def test_input_images_are_refused_specifically(s3_bucket: S3Bucket, tmp_path: Path, images: dict[str, str],
                                                code: str, requests: int) -> None:
    put(s3_bucket, "users/u2/inputs/a.png", png())
    put(s3_bucket, "users/u1/inputs/big.png", png() + b"\0" * 20_000)
    put(s3_bucket, "users/u1/inputs/script.png", b"<script>alert(1)</script>")
    store = S3Store(s3_bucket.settings())
    before = s3_bucket.server.requests().get("GetObject", 0)
    with pytest.raises(m.TaskError) as err:
        place_images(job(images=images), store, tmp_path / "in", 10_000)
    assert err.value.code == code
    assert s3_bucket.server.requests().get("GetObject", 0) - before == requests
    assert not list((tmp_path / "in").rglob("*.png")), "nothing refused may stay in ComfyUI's input folder"
