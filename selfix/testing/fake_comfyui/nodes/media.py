"""Media output nodes: animations, video, audio, text (real: comfy_extras nodes_images / nodes_video /
nodes_audio / nodes_preview_any, and VideoHelperSuite's VHS_VideoCombine), plus SaveLatent.

Files are real containers with the right magic bytes and headers (PNG/WebP animations through Pillow; MP4
ftyp/moov/mvhd/tkhd + raw frames in mdat; WebM EBML header; FLAC STREAMINFO) but the video/audio payload is not
encoded: no decoder can play it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from PIL import Image

from selfix.testing.fake_comfyui.folder_paths import annotated_file_check, list_input_audio, save_image_path
from selfix.testing.fake_comfyui.nodes.base import (
    HIDDEN_PROMPT,
    NodeCall,
    NodeDef,
    NodeOutput,
    int_input,
    static_inputs,
)
from selfix.testing.fake_comfyui.nodes.image import png_info

HIDDEN_PROMPT_ID = {**HIDDEN_PROMPT, "unique_id": "UNIQUE_ID"}


@dataclass(frozen=True)
class FakeVideo:
    """Stands in for comfy_api's VideoFromComponents (CreateVideo's VIDEO output)."""

    frames: tuple[Image.Image, ...]
    fps: float
    audio: Any = None


def _animation_exif(call: NodeCall) -> Image.Exif:
    # real: SaveAnimatedWEBP puts the prompt into EXIF 0x0110 and each extra_pnginfo key downwards from 0x010F
    exif = Image.Exif()
    if call.env.disable_metadata:
        return exif
    if call.args.get("prompt") is not None:
        exif[0x0110] = f"prompt:{json.dumps(call.args['prompt'])}"
    for offset, (key, value) in enumerate((call.args.get("extra_pnginfo") or {}).items()):
        exif[0x010F - offset] = f"{key}:{json.dumps(value)}"
    return exif


def _media_path(call: NodeCall, prefix: str, frames: list[Image.Image], ext: str,
                underscore: bool = True) -> tuple[str, dict[str, str]]:
    width, height = frames[0].size
    folder, filename, counter, subfolder = save_image_path(prefix, call.env.folders.output_dir, width, height)
    name = f"{filename}_{counter:05}{'_' if underscore else ''}.{ext}"
    return os.path.join(folder, name), {"filename": name, "subfolder": subfolder, "type": "output"}


async def run_save_animated_webp(call: NodeCall) -> NodeOutput:
    a = call.args
    frames: list[Image.Image] = a["images"]
    path, item = _media_path(call, a["filename_prefix"], frames, "webp")
    method = {"default": 4, "fastest": 0, "slowest": 6}[a["method"]]
    frames[0].save(path, format="WEBP", save_all=True, append_images=frames[1:], duration=int(1000.0 / a["fps"]),
                   exif=_animation_exif(call), lossless=a["lossless"], quality=a["quality"], method=method)
    return NodeOutput((), {"images": [item], "animated": (len(frames) != 1,)})


async def run_save_animated_png(call: NodeCall) -> NodeOutput:
    a = call.args
    frames: list[Image.Image] = a["images"]
    path, item = _media_path(call, a["filename_prefix"], frames, "png")
    frames[0].save(path, format="PNG", save_all=True, append_images=frames[1:], duration=int(1000.0 / a["fps"]),
                   pnginfo=png_info(call), compress_level=a["compress_level"])
    return NodeOutput((), {"images": [item], "animated": (True,)})


async def run_create_video(call: NodeCall) -> NodeOutput:
    return NodeOutput((FakeVideo(tuple(call.args["images"]), float(call.args["fps"]), call.args.get("audio")),))


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def write_fake_mp4(path: str, frames: list[Image.Image], fps: float) -> None:
    """ftyp, mdat (raw RGB frames, written one at a time), then moov with mvhd + one video trak/tkhd."""
    timescale, width, height = 1000, frames[0].width, frames[0].height
    duration = round(len(frames) * timescale / fps)
    with open(path, "wb") as f:
        f.write(_box(b"ftyp", b"isom" + struct.pack(">I", 0x200) + b"isomiso2avc1mp41"))
        payload = width * height * 3 * len(frames)
        if payload + 8 < 1 << 32:
            f.write(struct.pack(">I4s", 8 + payload, b"mdat"))
        else:  # a 64-bit "largesize" box, as for real multi-GB videos
            f.write(struct.pack(">I4sQ", 1, b"mdat", 16 + payload))
        for frame in frames:
            f.write(frame.convert("RGB").resize((width, height)).tobytes())
        mvhd = struct.pack(">IIIII", 0, 0, 0, timescale, duration) + struct.pack(">IH10x", 0x10000, 0x100)
        mvhd += MATRIX + bytes(24) + struct.pack(">I", 2)
        tkhd = struct.pack(">IIII4xI8x", 3, 0, 0, 1, duration) + struct.pack(">HHH2x", 0, 0, 0)
        tkhd += MATRIX + struct.pack(">II", width << 16, height << 16)
        f.write(_box(b"moov", _box(b"mvhd", mvhd) + _box(b"trak", _box(b"tkhd", tkhd))))


def write_fake_webm(path: str, frames: list[Image.Image]) -> None:
    """The EBML header of a WebM file (DocType webm), then a Segment holding the raw frames in a Void element."""
    ebml = bytes.fromhex("4286810142f7810142f2810442f381084282847765626d4287810442858102")
    payload = b"".join(frame.convert("RGB").tobytes() for frame in frames)
    with open(path, "wb") as f:
        f.write(b"\x1a\x45\xdf\xa3" + bytes([0x80 | len(ebml)]) + ebml)
        f.write(b"\x18\x53\x80\x67" + b"\x01" + (len(payload) + 9).to_bytes(7, "big"))
        f.write(b"\xec" + b"\x01" + len(payload).to_bytes(7, "big") + payload)


async def run_save_video(call: NodeCall) -> NodeOutput:
    a = call.args
    video: FakeVideo = a["video"]
    path, item = _media_path(call, a["filename_prefix"], list(video.frames), "mp4")
    write_fake_mp4(path, list(video.frames), video.fps)
    return NodeOutput((), {"images": [item], "animated": (True,)})


async def run_save_webm(call: NodeCall) -> NodeOutput:
    a = call.args
    path, item = _media_path(call, a["filename_prefix"], a["images"], "webm")
    write_fake_webm(path, a["images"])
    return NodeOutput((), {"images": [item], "animated": (True,)})


async def run_get_image_size(call: NodeCall) -> NodeOutput:
    images: list[Image.Image] = call.args["image"]
    width, height = images[0].size
    if call.args.get("unique_id"):
        call.send_text(f"width: {width}, height: {height}\n batch size: {len(images)}")
    return NodeOutput((width, height, len(images)))


def preview_any_text(source: Any) -> str:
    # real: comfy_extras/nodes_preview_any.PreviewAny.main
    if isinstance(source, str):
        return source
    if isinstance(source, (int, float, bool)):
        return str(source)
    if source is None:
        return "None"
    try:
        return json.dumps(source)
    except (TypeError, ValueError):
        return str(source)


async def run_preview_any(call: NodeCall) -> NodeOutput:
    return NodeOutput((), {"text": (preview_any_text(call.args.get("source")),)})


def _wav_facts(path: str) -> dict[str, Any]:
    import wave

    with wave.open(path, "rb") as w:
        return {"sample_rate": w.getframerate(), "samples": w.getnframes(), "channels": w.getnchannels()}


validate_load_audio = annotated_file_check("audio", "audio")


async def run_load_audio(call: NodeCall) -> NodeOutput:
    # The double reads WAV only (real: av decodes anything); the AUDIO value is its facts, not a waveform.
    return NodeOutput((_wav_facts(call.env.folders.annotated_filepath(call.args["audio"])),))


def write_fake_flac(path: str, audio: dict[str, Any]) -> None:
    """fLaC + one STREAMINFO block (rate, channels, 16 bit, total samples); no audio frames."""
    rate, channels, samples = int(audio["sample_rate"]), int(audio["channels"]), int(audio["samples"])
    packed = (rate << 44) | ((channels - 1) << 41) | (15 << 36) | samples
    info = struct.pack(">HH", 4096, 4096) + bytes(6) + packed.to_bytes(8, "big") + bytes(16)
    with open(path, "wb") as f:
        f.write(b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info)


async def run_save_audio(call: NodeCall) -> NodeOutput:
    # real: comfy_extras/nodes_audio.SaveAudio (flac, "{filename}_{counter:05}_.flac")
    folders = call.env.folders
    folder, filename, counter, subfolder = save_image_path(call.args["filename_prefix"], folders.output_dir, 0, 0)
    name = f"{filename}_{counter:05}_.flac"
    write_fake_flac(os.path.join(folder, name), call.args["audio"])
    return NodeOutput((), {"audio": [{"filename": name, "subfolder": subfolder, "type": "output"}]})


VHS_FORMATS = ["image/gif", "image/webp", "video/h264-mp4", "video/webm"]


async def run_vhs_video_combine(call: NodeCall) -> NodeOutput:
    # real: ComfyUI-VideoHelperSuite videohelpersuite/nodes.py VideoCombine.combine_video: a PNG of the first
    # frame carries the workflow; names have no trailing underscore; the ui key is "gifs".
    a = call.args
    frames: list[Image.Image] = a["images"]
    kind = "output" if a["save_output"] else "temp"
    base = call.env.folders.output_dir if a["save_output"] else call.env.folders.temp_dir
    folder, filename, counter, subfolder = save_image_path(a["filename_prefix"], base, *frames[0].size)
    first = f"{filename}_{counter:05}.png"
    frames[0].save(os.path.join(folder, first), pnginfo=png_info(call), compress_level=4)
    fmt = a["format"]
    ext = {"image/gif": "gif", "image/webp": "webp", "video/h264-mp4": "mp4", "video/webm": "webm"}[fmt]
    name = f"{filename}_{counter:05}.{ext}"
    path = os.path.join(folder, name)
    duration = int(1000.0 / a["frame_rate"])
    if ext == "mp4":
        write_fake_mp4(path, frames, a["frame_rate"])
    elif ext == "webm":
        write_fake_webm(path, frames)
    else:
        frames[0].save(path, format=ext.upper(), save_all=True, append_images=frames[1:], duration=duration,
                       loop=a["loop_count"])
    item = {"filename": name, "subfolder": subfolder, "type": kind, "format": fmt, "frame_rate": a["frame_rate"],
            "workflow": first, "fullpath": path}
    return NodeOutput(((a["save_output"], [os.path.join(folder, first), path]),), {"gifs": [item]})


async def run_save_latent(call: NodeCall) -> NodeOutput:
    # real: nodes.SaveLatent - a safetensors file named .latent (zeros here), prompt/workflow in __metadata__
    latent = call.args["samples"]
    folder, filename, counter, subfolder = save_image_path(call.args["filename_prefix"],
                                                           call.env.folders.output_dir, 0, 0)
    name = f"{filename}_{counter:05}_.latent"
    shape = [latent["batch_size"], 4, latent["height"] // 8, latent["width"] // 8]
    size = 4 * shape[0] * shape[1] * shape[2] * shape[3]
    header: dict[str, Any] = {
        "latent_tensor": {"dtype": "F32", "shape": shape, "data_offsets": [0, size]},
        "latent_format_version_0": {"dtype": "F32", "shape": [0], "data_offsets": [size, size]},
    }
    if not call.env.disable_metadata and call.args.get("prompt") is not None:
        header["__metadata__"] = {"prompt": json.dumps(call.args["prompt"])}
    blob = json.dumps(header).encode()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + bytes(size))
    return NodeOutput((), {"latents": [{"filename": name, "subfolder": subfolder, "type": "output"}]})


def _fps(default: float, lo: float = 0.01, hi: float = 1000.0) -> tuple[str, dict[str, Any]]:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": 0.01})


def media_nodes() -> list[NodeDef]:
    prefix = ("STRING", {"default": "ComfyUI"})
    extras = "comfy_extras.nodes_images"
    return [
        NodeDef("SaveAnimatedWEBP", "SaveAnimatedWEBP", "image/animation", static_inputs({
            "required": {"images": ("IMAGE",), "filename_prefix": prefix, "fps": _fps(6.0),
                         "lossless": ("BOOLEAN", {"default": True}), "quality": int_input(80, 0, 100),
                         "method": (["default", "fastest", "slowest"],)},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_animated_webp, output_node=True, python_module=extras),
        NodeDef("SaveAnimatedPNG", "SaveAnimatedPNG", "image/animation", static_inputs({
            "required": {"images": ("IMAGE",), "filename_prefix": prefix, "fps": _fps(6.0),
                         "compress_level": int_input(4, 0, 9)},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_animated_png, output_node=True, python_module=extras),
        NodeDef("CreateVideo", "Create Video", "image/video", static_inputs({
            "required": {"images": ("IMAGE",), "fps": _fps(30.0, 1.0, 120.0)}, "optional": {"audio": ("AUDIO",)},
        }), ("VIDEO",), run_create_video, python_module="comfy_extras.nodes_video"),
        NodeDef("SaveVideo", "Save Video", "image/video", static_inputs({
            "required": {"video": ("VIDEO",), "filename_prefix": ("STRING", {"default": "video/ComfyUI"}),
                         "format": (["auto", "mp4"], {"default": "auto"}),
                         "codec": (["auto", "h264"], {"default": "auto"})},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_video, output_node=True, python_module="comfy_extras.nodes_video"),
        NodeDef("SaveWEBM", "SaveWEBM", "image/video", static_inputs({
            "required": {"images": ("IMAGE",), "filename_prefix": prefix, "codec": (["vp9", "av1"],),
                         "fps": _fps(24.0), "crf": ("FLOAT", {"default": 32.0, "min": 0, "max": 63.0, "step": 1})},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_webm, output_node=True, python_module="comfy_extras.nodes_video"),
        NodeDef("SaveLatent", "SaveLatent", "_for_testing", static_inputs({
            "required": {"samples": ("LATENT",), "filename_prefix": ("STRING", {"default": "latents/ComfyUI"})},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_latent, output_node=True),
        NodeDef("GetImageSize", "Get Image Size", "image", static_inputs({
            "required": {"image": ("IMAGE",)}, "hidden": {"unique_id": "UNIQUE_ID"},
        }), ("INT", "INT", "INT"), run_get_image_size, python_module=extras),
        NodeDef("PreviewAny", "Preview Any", "utils", static_inputs({"required": {"source": ("*", {})}}), (),
                run_preview_any, output_node=True, python_module="comfy_extras.nodes_preview_any"),
        NodeDef("LoadAudio", "Load Audio", "audio", lambda folders: {"required": {
            "audio": (list_input_audio(folders), {"audio_upload": True})}}, ("AUDIO",), run_load_audio,
            python_module="comfy_extras.nodes_audio", validate=validate_load_audio, validate_args=("audio",)),
        NodeDef("SaveAudio", "Save Audio (FLAC)", "audio", static_inputs({
            "required": {"audio": ("AUDIO",), "filename_prefix": ("STRING", {"default": "audio/ComfyUI"})},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_audio, output_node=True, python_module="comfy_extras.nodes_audio"),
    ]


VHS_VIDEO_COMBINE = NodeDef(
    "VHS_VideoCombine", "Video Combine 🎥🅥🅗🅢", "Video Helper Suite 🎥🅥🅗🅢", static_inputs({
        "required": {"images": ("IMAGE",), "frame_rate": ("FLOAT", {"default": 8, "min": 1, "step": 1}),
                     "loop_count": int_input(0, 0, 100), "filename_prefix": ("STRING", {"default": "AnimateDiff"}),
                     "format": (VHS_FORMATS,), "pingpong": ("BOOLEAN", {"default": False}),
                     "save_output": ("BOOLEAN", {"default": True})},
        "hidden": HIDDEN_PROMPT_ID,
    }), ("VHS_FILENAMES",), run_vhs_video_combine, output_node=True,
    python_module="custom_nodes.ComfyUI-VideoHelperSuite",
)
