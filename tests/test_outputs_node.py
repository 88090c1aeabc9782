"""Every kind of output through a whole node (real supervisord, ComfyUI double) into a real MinIO: video, animated
WebP, stills + video + a VideoHelperSuite `gifs` output, text (inline and stored), audio, chosen still encodings,
and an output over MAX_OUTPUT_BYTES. One node runs all tasks; each is checked against the bucket."""

from __future__ import annotations

import io
import json
import struct
import wave
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.servers.minio_plugin import S3Bucket
from tests.servers.node_plugin import Node

pytestmark = [pytest.mark.s3, pytest.mark.e2e]

BLUE = 0x3366FF
RGB = (0x33, 0x66, 0xFF)


def empty(width: int = 64, height: int = 48, batch: int = 1) -> dict[str, Any]:
    return {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": batch,
                                                     "color": BLUE}}


def video_nodes(size: tuple[int, int] = (64, 64), frames: int = 8) -> dict[str, Any]:
    """EmptyImage (1) -> CreateVideo (2) -> SaveVideo (3)."""
    return {
        "1": empty(*size, frames),
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
        "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "video/clip",
                                                    "format": "mp4", "codec": "h264"}},
    }


def save_image(source: str, prefix: str = "still") -> dict[str, Any]:
    return {"class_type": "SaveImage", "inputs": {"images": [source, 0], "filename_prefix": prefix}}


def tasks() -> dict[str, dict[str, Any]]:
    def t(task_id: str, workflow: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"taskId": task_id, "userId": "u1", "workflow": workflow, **extra}

    mixed = {**video_nodes(), "4": save_image("1"), "5": {"class_type": "VHS_VideoCombine", "inputs": {
        "images": ["1", 0], "frame_rate": 8.0, "loop_count": 0, "filename_prefix": "vhs", "format": "video/webm",
        "pingpong": False, "save_output": True}}}
    text = {"1": empty(64, 8), "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
            "4": empty(1000, 8), "5": {"class_type": "GetImageSize", "inputs": {"image": ["4", 0]}},
            "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}}
    audio = {"1": {"class_type": "LoadAudio", "inputs": {"audio": "selfix/audio/tone.wav"}},
             "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "audio/tone"}}}
    stills = {"1": empty(), "2": save_image("1")}
    return {
        "video": t("video", video_nodes()),
        "webp": t("webp", {"1": empty(64, 48, 3), "2": {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["1", 0], "filename_prefix": "anim", "fps": 6.0, "lossless": False, "quality": 80,
            "method": "default"}}}),
        "mixed": t("mixed", mixed),
        "text": t("text", text),
        "audio": t("audio", audio),
        "enc-webp": t("enc-webp", stills, output={"format": "webp", "quality": 90}),
        "enc-jpeg": t("enc-jpeg", stills, output={"format": "jpeg", "quality": 95, "stripMetadata": False}),
        "enc-keep": t("enc-keep", stills, output={"stripMetadata": False}),
        "enc-default": t("enc-default", stills),
        "too-large": t("too-large", video_nodes(size=(256, 256))),
        "bad-output": t("bad-output", stills, output={"format": "bmp"}),
    }


def write_wav(path: Path, seconds: float = 1.5, rate: int = 8000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(struct.pack("<h", 0) * int(seconds * rate))


def check_objects(bucket: S3Bucket, result: dict[str, Any]) -> dict[str, bytes]:
    """Every outputs entry with an objectKey is in the bucket with that content type and size."""
    assert result["status"] == "completed", result
    found = {}
    for entry in result["outputs"]:
        if "objectKey" not in entry:
            continue
        data, content_type = bucket.get(entry["objectKey"])
        assert (content_type, len(data)) == (entry["contentType"], entry["bytes"]), entry
        found[entry["objectKey"]] = data
    stills = [e["objectKey"] for e in result["outputs"] if e["kind"] == "image"]
    assert result["imagePaths"] == stills and result["imagePath"] == (stills[0] if stills else None)
    return found


@pytest.fixture
def results(make_node: Any, s3_bucket: S3Bucket) -> dict[str, dict[str, Any]]:
    # The audio task reads a file placed in its own input folder with LoadAudio, a node the default NODE_DENYLIST
    # refuses (tasks bring only images), so this node allows it.
    env = {**s3_bucket.env, "DISK_FREE_FLOOR_GB": "0", "MAX_TEXT_OUTPUT_BYTES": "2", "MAX_OUTPUT_BYTES": "1000000",
           "NODE_DENYLIST": "LoadLatent"}
    node: Node = make_node(env=env)
    (Path(node.env["COMFY_INPUT_DIR"]) / "selfix" / "audio").mkdir(parents=True)
    write_wav(Path(node.env["COMFY_INPUT_DIR"]) / "selfix" / "audio" / "tone.wav")
    node.start()
    for task_id, message in tasks().items():
        node.drop(f"{task_id}.json", message)
    return node.wait_results(set(tasks()), timeout=120)


def test_every_kind_of_output_reaches_the_bucket(results: dict[str, dict[str, Any]], s3_bucket: S3Bucket) -> None:
    check_video_only(results["video"], s3_bucket)
    check_animated_webp(results["webp"], s3_bucket)
    check_mixed(results["mixed"], s3_bucket)
    check_text(results["text"], s3_bucket)
    check_audio(results["audio"], s3_bucket)
    check_encodings(results, s3_bucket)
    too_large = results["too-large"]
    assert too_large["status"] == "failed" and too_large["error"]["code"] == "output_too_large", too_large
    assert "MAX_OUTPUT_BYTES=1000000" in too_large["error"]["message"]
    bad = results["bad-output"]
    assert bad["error"]["code"] == "invalid_message" and "output.format" in bad["error"]["message"]


def check_video_only(result: dict[str, Any], bucket: S3Bucket) -> None:
    objects = check_objects(bucket, result)
    assert result["imagePaths"] == [] and result["imagePath"] is None
    assert result["outputs"] == [{"node": "3", "key": "images", "kind": "video",
                                  "objectKey": "users/u1/outputs/video-0.mp4", "contentType": "video/mp4",
                                  "bytes": len(objects["users/u1/outputs/video-0.mp4"]), "width": 64,
                                  "height": 64, "duration": 1.0}]
    assert objects["users/u1/outputs/video-0.mp4"][4:8] == b"ftyp"


def check_animated_webp(result: dict[str, Any], bucket: S3Bucket) -> None:
    objects = check_objects(bucket, result)
    (entry,) = result["outputs"]
    assert (entry["node"], entry["key"], entry["kind"], entry["objectKey"], entry["contentType"]) == (
        "2", "images", "animation", "users/u1/outputs/webp-0.webp", "image/webp")
    assert (entry["width"], entry["height"]) == (64, 48) and result["imagePaths"] == []
    data = objects[entry["objectKey"]]
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert b"prompt:" not in data  # the double embeds it in EXIF as SaveAnimatedWEBP does; stripped by default


def check_mixed(result: dict[str, Any], bucket: S3Bucket) -> None:
    objects = check_objects(bucket, result)
    summary = [(e["node"], e["key"], e["kind"], e["objectKey"], e["contentType"]) for e in result["outputs"]]
    stills = [("4", "images", "image", f"users/u1/images/mixed-{i}.png", "image/png") for i in range(8)]
    assert summary == [("3", "images", "video", "users/u1/outputs/mixed-0.mp4", "video/mp4"), *stills,
                       ("5", "gifs", "video", "users/u1/outputs/mixed-1.webm", "video/webm")]
    vhs = result["outputs"][-1]
    assert vhs["format"] == "video/webm" and vhs["frameRate"] == 8.0 and "fullpath" not in vhs
    assert objects["users/u1/outputs/mixed-1.webm"][:4] == b"\x1a\x45\xdf\xa3"
    still = Image.open(io.BytesIO(objects["users/u1/images/mixed-0.png"]))
    assert still.size == (64, 64) and still.convert("RGB").getpixel((5, 5)) == RGB


def check_text(result: dict[str, Any], bucket: S3Bucket) -> None:
    objects = check_objects(bucket, result)
    inline, stored = result["outputs"]
    assert inline == {"node": "3", "key": "text", "kind": "text", "text": "64",
                      "contentType": "text/plain; charset=utf-8", "bytes": 2}
    assert stored == {"node": "6", "key": "text", "kind": "text", "objectKey": "users/u1/outputs/text-0.txt",
                      "contentType": "text/plain; charset=utf-8", "bytes": 4}  # over MAX_TEXT_OUTPUT_BYTES=2
    assert objects["users/u1/outputs/text-0.txt"] == b"1000"
    assert result["imagePaths"] == []


def check_audio(result: dict[str, Any], bucket: S3Bucket) -> None:
    objects = check_objects(bucket, result)
    (entry,) = result["outputs"]
    assert (entry["kind"], entry["key"], entry["objectKey"], entry["contentType"], entry["duration"]) == (
        "audio", "audio", "users/u1/outputs/audio-0.flac", "audio/flac", 1.5)
    assert objects[entry["objectKey"]][:4] == b"fLaC"


def check_encodings(results: dict[str, dict[str, Any]], bucket: S3Bucket) -> None:
    webp = check_objects(bucket, results["enc-webp"])["users/u1/images/enc-webp-0.webp"]
    img = Image.open(io.BytesIO(webp))
    assert img.format == "WEBP" and img.size == (64, 48) and "exif" not in img.info
    assert all(abs(a - b) <= 3 for a, b in zip(img.convert("RGB").getpixel((10, 10)), RGB, strict=True))

    jpeg = check_objects(bucket, results["enc-jpeg"])["users/u1/images/enc-jpeg-0.jpg"]
    img = Image.open(io.BytesIO(jpeg))
    assert img.format == "JPEG" and img.size == (64, 48)
    assert all(abs(a - b) <= 3 for a, b in zip(img.convert("RGB").getpixel((10, 10)), RGB, strict=True))
    exif = img.getexif()
    assert exif[0x0110].startswith("prompt:") and json.loads(exif[0x0110][7:])["2"]["class_type"] == "SaveImage"

    kept = Image.open(io.BytesIO(check_objects(bucket, results["enc-keep"])["users/u1/images/enc-keep-0.png"]))
    assert json.loads(kept.text["prompt"])["2"]["class_type"] == "SaveImage"  # kept as ComfyUI wrote it
    default = check_objects(bucket, results["enc-default"])["users/u1/images/enc-default-0.png"]
    stripped = Image.open(io.BytesIO(default))
    assert stripped.text == {} and b"tEXt" not in default  # OUTPUT_STRIP_METADATA=true by default
    assert stripped.tobytes() == kept.tobytes() and stripped.convert("RGB").getpixel((0, 0)) == RGB
    assert results["enc-default"]["outputs"][0]["contentType"] == "image/png"
