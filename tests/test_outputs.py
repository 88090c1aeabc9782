"""selfix.outputs: file types from magic bytes, cheap facts (dimensions, frames, duration), still encodings."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from selfix.job import Job
from selfix.outputs import Encoding, Plan, encode_still, extension, kind_of, png_text, probe, sniff, stage_outputs
from selfix.testing.fake_comfyui.nodes.media import write_fake_flac, write_fake_mp4, write_fake_webm
from selfix.workflow import OutputItem

CAPTURES = Path(__file__).parent / "data" / "comfyui-captures"


def test_sniff_recognises_every_recorded_view_by_its_magic() -> None:
    media = json.loads((CAPTURES / "media_outputs.json").read_text())
    for case in media.values():
        for view in case["views"]:
            if view["key"] == "latents":
                continue  # safetensors under .latent: no magic, application/octet-stream as ComfyUI says
            assert sniff(bytes.fromhex(view["magic_hex"])) == view["content_type"], view


@pytest.mark.parametrize(("head", "content_type"), [
    (b"RIFF\0\0\0\0WAVEfmt ", "audio/wav"), (b"fLaC\0", "audio/flac"), (b"OggS\0", "audio/ogg"),
    (b"ID3\x04", "audio/mpeg"), (b"glTF\x02\0\0\0", "model/gltf-binary"), (b"GIF89a", "image/gif"),
    (b"\xff\xd8\xff\xe0", "image/jpeg"), (b"\0\0\0\x14ftypqt  ", "video/quicktime"),
    (b"\x1a\x45\xdf\xa3\x9f\x42\x82\x88matroska", "video/x-matroska"), (b"hello", "application/octet-stream"),
    (b"", "application/octet-stream"),
])
def test_sniff_other_types(head: bytes, content_type: str) -> None:
    assert sniff(head) == content_type


def test_kinds_and_extensions() -> None:
    assert [kind_of(t, False) for t in ("image/png", "video/mp4", "audio/flac", "model/gltf-binary", "x/y")] == [
        "image", "video", "audio", "mesh", "file"]
    assert kind_of("image/webp", True) == "animation"
    assert extension("video/mp4", "clip.bin") == "mp4"  # the bytes decide, not the name
    assert extension("application/octet-stream", "latent_00001_.latent") == "latent"
    assert extension("application/octet-stream", "weird.t@r") == "bin"


def frames(n: int = 8, size: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    return [Image.new("RGB", size, (i * 20, 40, 200)) for i in range(n)]


def test_probe_reads_cheap_facts(tmp_path: Path) -> None:
    write_fake_mp4(str(tmp_path / "v.mp4"), frames(), 8.0)
    write_fake_webm(str(tmp_path / "v.webm"), frames())
    write_fake_flac(str(tmp_path / "a.flac"), {"sample_rate": 44100, "channels": 2, "samples": 66150})
    frames()[0].save(tmp_path / "a.png", save_all=True, append_images=frames()[1:3], duration=100)
    frames()[0].save(tmp_path / "still.jpg")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    facts = {name: probe(tmp_path / name) for name in ("v.mp4", "v.webm", "a.flac", "a.png", "still.jpg", "junk.png")}
    assert facts["v.mp4"].facts() == {"width": 64, "height": 48, "duration": 1.0}
    assert facts["v.webm"].content_type == "video/webm" and facts["v.webm"].facts() == {}
    assert facts["a.flac"].facts() == {"duration": 1.5}
    assert facts["a.png"].facts() == {"width": 64, "height": 48, "frames": 3, "duration": 0.3}
    assert facts["still.jpg"].content_type == "image/jpeg" and facts["still.jpg"].facts() == {"width": 64,
                                                                                               "height": 48}
    assert facts["junk.png"].content_type == "image/png" and facts["junk.png"].facts() == {}
    assert facts["v.mp4"].size == (tmp_path / "v.mp4").stat().st_size


def comfy_png(path: Path) -> None:
    info = PngInfo()
    info.add_text("prompt", json.dumps({"10": {"inputs": {"lora_name": "users/u1/models/x.safetensors"}}}))
    info.add_text("workflow", json.dumps({"note": "x"}))
    Image.new("RGBA", (32, 16), (10, 20, 30, 255)).save(path, pnginfo=info)


def test_png_metadata_is_stripped_without_touching_the_pixels(tmp_path: Path) -> None:
    comfy_png(tmp_path / "in.png")
    assert encode_still(tmp_path / "in.png", tmp_path / "out.png", "image/png", Encoding()) == "image/png"
    assert png_text(tmp_path / "out.png") == {} and b"lora_name" not in (tmp_path / "out.png").read_bytes()
    with Image.open(tmp_path / "in.png") as a, Image.open(tmp_path / "out.png") as b:
        assert a.tobytes() == b.tobytes() and a.mode == b.mode
    encode_still(tmp_path / "in.png", tmp_path / "kept.png", "image/png", Encoding(strip_metadata=False))
    assert (tmp_path / "kept.png").read_bytes() == (tmp_path / "in.png").read_bytes()


@pytest.mark.parametrize(("fmt", "strip"), [("webp", True), ("webp", False), ("jpeg", True), ("jpeg", False),
                                            ("png", False)])
def test_re_encoding(tmp_path: Path, fmt: str, strip: bool) -> None:
    comfy_png(tmp_path / "in.png")
    got = encode_still(tmp_path / "in.png", tmp_path / "out", "image/png", Encoding(fmt, 90 if fmt != "png" else None,
                                                                                   strip))
    assert got == f"image/{fmt}" and sniff((tmp_path / "out").read_bytes()[:64]) == got
    with Image.open(tmp_path / "out") as img:
        assert img.size == (32, 16)
        assert all(abs(a - b) <= 3 for a, b in zip(img.convert("RGB").getpixel((3, 3)), (10, 20, 30), strict=True))
        has_prompt = "lora_name" in (img.getexif().get(0x0110, "") + str(img.info.get("prompt", "")))
    assert has_prompt is not strip


def test_stage_outputs_numbers_stills_and_others_apart(tmp_path: Path) -> None:
    source = tmp_path / "comfy"
    source.mkdir()
    comfy_png(source / "a.png")
    write_fake_mp4(str(source / "v.mp4"), frames(), 4.0)
    (source / "v.latent").write_bytes(b"\x10\0\0\0\0\0\0\0{}")
    items = [OutputItem("2", "images", file={"filename": "a.png", "subfolder": "", "type": "output"}),
             OutputItem("3", "images", file={"filename": "v.mp4", "subfolder": "", "type": "output"}, animated=True),
             OutputItem("4", "latents", file={"filename": "v.latent", "subfolder": "", "type": "output"}),
             OutputItem("5", "text", text="x" * 10)]

    async def download(item: dict[str, str], target: Path, max_bytes: int | None) -> int:
        data = (source / item["filename"]).read_bytes()
        target.write_bytes(data)
        return len(data)

    staged = tmp_path / "staged"
    staged.mkdir()
    plan = Plan("users/u/", "t", Encoding(), 1 << 20, 4)
    done = asyncio.run(stage_outputs(items, download, staged, plan))
    assert done.image_paths == ["users/u/images/t-0.png"]
    assert [(o["kind"], o.get("objectKey")) for o in done.outputs] == [
        ("image", "users/u/images/t-0.png"), ("video", "users/u/outputs/t-0.mp4"),
        ("file", "users/u/outputs/t-1.latent"), ("text", "users/u/outputs/t-2.txt")]
    assert sorted(p.name for p in staged.iterdir()) == ["images.t-0.png", "outputs.t-0.mp4", "outputs.t-1.latent",
                                                        "outputs.t-2.txt"]
    sizes: dict[str, Any] = {o["objectKey"]: o["bytes"] for o in done.outputs}
    assert sizes["users/u/outputs/t-0.mp4"] == (source / "v.mp4").stat().st_size
    assert io.BytesIO((staged / "outputs.t-2.txt").read_bytes()).read() == b"x" * 10


def test_animations_lose_their_metadata_but_keep_every_frame(tmp_path: Path) -> None:
    from selfix.outputs import strip_animation

    anim = frames(4)
    exif = Image.Exif()
    exif[0x0110] = 'prompt:{"10": {"inputs": {"lora_name": "users/u1/models/x.safetensors"}}}'
    anim[0].save(tmp_path / "a.webp", save_all=True, append_images=anim[1:], duration=100, exif=exif, lossless=True)
    info = PngInfo()
    info.add_text("prompt", '{"lora_name": "users/u1/models/x.safetensors"}')
    anim[0].save(tmp_path / "a.png", save_all=True, append_images=anim[1:], duration=100, pnginfo=info)
    for name, content_type in (("a.webp", "image/webp"), ("a.png", "image/png")):
        assert strip_animation(tmp_path / name, tmp_path / f"out-{name}", content_type)
        data = (tmp_path / f"out-{name}").read_bytes()
        assert b"lora_name" in (tmp_path / name).read_bytes() and b"lora_name" not in data
        with Image.open(tmp_path / name) as before, Image.open(tmp_path / f"out-{name}") as after:
            assert after.n_frames == before.n_frames == 4
            for index in range(4):
                before.seek(index)
                after.seek(index)
                assert before.convert("RGB").tobytes() == after.convert("RGB").tobytes()
    assert not strip_animation(tmp_path / "a.png", tmp_path / "x", "image/gif")


def test_uploader_puts_every_output_and_results_staged_before_outputs_existed(tmp_path: Path) -> None:
    from selfix import messages as m
    from selfix.process import StopFlags
    from selfix.settings import load
    from selfix.spool import Spool
    from selfix.storage import LocalStore
    from selfix.uploader import NoPublisher, Uploader, upload_list

    settings = load({"SPOOL_DIR": str(tmp_path / "spool"), "STORE_DIR": str(tmp_path / "store"),
                     "COMFY_OUTPUT_DIR": str(tmp_path / "out"), "COMFY_INPUT_DIR": str(tmp_path / "in")})
    spool = Spool(settings.spool_dir).ensure()
    uploader = Uploader(settings, spool, LocalStore(settings.store_dir), NoPublisher(), StopFlags())
    new = m.completed_result(Job("new", "u1"), ["users/u1/images/new-0.png"], {}, [
        m.output_entry("2", "images", "image", object_key="users/u1/images/new-0.png", content_type="image/png",
                       size=3),
        m.output_entry("3", "images", "video", object_key="users/u1/outputs/new-0.png", content_type="image/png",
                       size=5),
        m.output_entry("4", "text", "text", text="hi", content_type="text/plain; charset=utf-8", size=2)])
    assert upload_list(new) == [("users/u1/images/new-0.png", "image/png"), ("users/u1/outputs/new-0.png",
                                                                             "image/png")]
    staged = spool.stage_result("new")
    (staged / "images.new-0.png").write_bytes(b"img")
    (staged / "outputs.new-0.png").write_bytes(b"video")
    spool.publish_result(staged, new)
    old = {"taskId": "old", "userId": "u1", "status": "completed", "imagePath": "users/u1/images/old-0.png",
           "imagePaths": ["users/u1/images/old-0.png"], "metadata": {}}  # written by a runner before `outputs`
    staged = spool.stage_result("old")
    (staged / "old-0.png").write_bytes(b"old")
    spool.publish_result(staged, old)
    uploader.deliver("new")
    uploader.deliver("old")
    store = settings.store_dir / "users" / "u1"
    assert (store / "images" / "new-0.png").read_bytes() == b"img"
    assert (store / "outputs" / "new-0.png").read_bytes() == b"video"
    assert (store / "images" / "old-0.png").read_bytes() == b"old"
    assert spool.read_done("new") == new and spool.read_done("old") == old


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_same_format_stills_lose_exif_and_keep_their_bytes_of_pixels(tmp_path: Path, fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0110] = 'prompt:{"lora_name": "users/u1/models/x.safetensors"}'
    Image.new("RGB", (40, 30), (200, 100, 50)).save(tmp_path / "in", format=fmt, exif=exif.tobytes(), quality=90)
    content_type = sniff((tmp_path / "in").read_bytes()[:64])
    assert encode_still(tmp_path / "in", tmp_path / "out", content_type, Encoding()) == content_type
    data = (tmp_path / "out").read_bytes()
    assert b"lora_name" in (tmp_path / "in").read_bytes() and b"lora_name" not in data
    with Image.open(tmp_path / "in") as a, Image.open(tmp_path / "out") as b:
        assert a.tobytes() == b.tobytes() and not b.getexif()  # same compressed data, so the same pixels


def test_inline_text_is_bounded_for_the_whole_result(tmp_path: Path) -> None:
    async def download(item: dict[str, str], target: Path, max_bytes: int | None) -> int:
        raise AssertionError("no files here")

    items = [OutputItem(str(i), "text", text="abcd") for i in range(4)]
    done = asyncio.run(stage_outputs(items, download, tmp_path, Plan("users/u/", "t", Encoding(), 1 << 20, 10)))
    assert [("text" in o, o.get("objectKey")) for o in done.outputs] == [
        (True, None), (True, None), (False, "users/u/outputs/t-0.txt"), (False, "users/u/outputs/t-1.txt")]


def test_submit_wait_names_where_videos_and_other_outputs_are(tmp_path: Path) -> None:
    from selfix.cli import other_outputs
    from selfix.settings import load

    result = {"outputs": [{"kind": "image", "objectKey": "users/u/images/t-0.png"},
                          {"kind": "video", "objectKey": "users/u/outputs/t-0.mp4"}, {"kind": "text", "text": "x"}]}
    local = load({"STORE_DIR": str(tmp_path)})
    assert other_outputs(local, result) == [("video", str(tmp_path / "users/u/outputs/t-0.mp4"))]
    s3 = load({"S3_ENDPOINT": "127.0.0.1:9", "S3_ACCESS_KEY": "a", "S3_SECRET_KEY": "b", "S3_BUCKET": "bk"})
    assert other_outputs(s3, result) == [("video", "s3://bk/users/u/outputs/t-0.mp4")]
