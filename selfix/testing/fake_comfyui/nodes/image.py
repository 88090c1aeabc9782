"""Image nodes (real: nodes.py, comfy_extras.nodes_post_processing): empty/scale/blur, SaveImage and PreviewImage,
the file loaders LoadImage, LoadImageOutput, LoadLatent, LoadVideo (+ GetVideoComponents), and SaveImageWebsocket
(real: custom_nodes/websocket_image_save.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from typing import Any

from PIL import Image, ImageFilter, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from selfix.testing.fake_comfyui.core import InputTypes
from selfix.testing.fake_comfyui.folder_paths import (
    FolderPaths,
    annotated_file_check,
    list_input_files,
    list_input_images,
    save_image_path,
)
from selfix.testing.fake_comfyui.nodes.base import (
    HIDDEN_PROMPT,
    MAX_RESOLUTION,
    NodeCall,
    NodeDef,
    NodeOutput,
    int_input,
    static_inputs,
)

IMAGE_TOOLTIP_SAVE = {"tooltip": "The images to save."}
PREFIX_TOOLTIP = (
    "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% "
    "or %Empty Latent Image.width% to include values from nodes."
)

TEMP_PREFIX_LETTERS = "abcdefghijklmnopqrstupvxyz"  # sic: the real PreviewImage alphabet ('p' twice, no 'w')


def _rgb_batch(width: int, height: int, batch: int, color: int) -> list[Image.Image]:
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    return [Image.new("RGB", (width, height), rgb) for _ in range(batch)]


async def run_empty_image(call: NodeCall) -> NodeOutput:
    a = call.args
    return NodeOutput((_rgb_batch(a["width"], a["height"], a["batch_size"], a["color"]),))


UPSCALE_METHODS = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _center_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    # real: comfy.utils.common_upscale with crop="center"
    old_w, old_h = img.size
    old_aspect, new_aspect = old_w / old_h, width / height
    x = round((old_w - old_w * (new_aspect / old_aspect)) / 2) if old_aspect > new_aspect else 0
    y = round((old_h - old_h * (old_aspect / new_aspect)) / 2) if old_aspect < new_aspect else 0
    return img.crop((x, y, old_w - x, old_h - y))


async def run_image_scale(call: NodeCall) -> NodeOutput:
    a = call.args
    images: list[Image.Image] = a["image"]
    width, height = a["width"], a["height"]
    if width == 0 and height == 0:
        return NodeOutput((images,))
    src_w, src_h = images[0].size
    width = width or max(1, round(src_w * height / src_h))
    height = height or max(1, round(src_h * width / src_w))
    method = UPSCALE_METHODS[a["upscale_method"]]
    out = [(_center_crop(i, width, height) if a["crop"] == "center" else i) for i in images]
    return NodeOutput(([i.resize((width, height), method) for i in out],))


async def run_image_blur(call: NodeCall) -> NodeOutput:
    a = call.args
    if a["blur_radius"] == 0:
        return NodeOutput((a["image"],))
    # One long, uninterruptible op (real: a torch conv): it costs one "step" of time and checks no interrupt.
    await asyncio.sleep(call.env.seconds_per_step)
    blurred = [i.filter(ImageFilter.GaussianBlur(radius=a["sigma"])) for i in a["image"]]
    return NodeOutput((blurred,))


def png_info(call: NodeCall) -> PngInfo | None:
    if call.env.disable_metadata:
        return None
    info = PngInfo()
    if call.args.get("prompt") is not None:
        info.add_text("prompt", json.dumps(call.args["prompt"]))
    for key, value in (call.args.get("extra_pnginfo") or {}).items():
        info.add_text(key, json.dumps(value))
    return info


def save_images(call: NodeCall, prefix: str, output_dir: str, kind: str, compress: int) -> NodeOutput:
    # real: nodes.SaveImage.save_images
    images: list[Image.Image] = call.args["images"]
    width, height = images[0].size
    folder, filename, counter, subfolder = save_image_path(prefix, output_dir, width, height)
    results = []
    for batch_number, image in enumerate(images):
        name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        image.save(os.path.join(folder, name), pnginfo=png_info(call), compress_level=compress)
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    return NodeOutput((), {"images": results})


async def run_save_image(call: NodeCall) -> NodeOutput:
    return save_images(call, call.args["filename_prefix"], call.env.folders.output_dir, "output", 4)


async def run_preview_image(call: NodeCall) -> NodeOutput:
    # The random suffix lives on the node object, so it is kept while the object cache keeps the node.
    append = call.state.setdefault("prefix_append", "_temp_" + "".join(random.choices(TEMP_PREFIX_LETTERS, k=5)))
    return save_images(call, "ComfyUI" + append, call.env.folders.temp_dir, "temp", 1)


async def run_save_image_websocket(call: NodeCall) -> NodeOutput:
    # real: custom_nodes/websocket_image_save.py; images travel as preview frames, nothing is written.
    images: list[Image.Image] = call.args["images"]
    for step, image in enumerate(images):
        call.progress(step, len(images), ("PNG", image, None))
    return NodeOutput()


validate_load_image = annotated_file_check("image", "image")
validate_load_latent = annotated_file_check("latent", "latent")
validate_load_video = annotated_file_check("file", "video")


def load_image_is_changed(folders: FolderPaths, args: dict[str, Any]) -> Any:
    with open(folders.annotated_filepath(args["image"]), "rb") as f:
        return hashlib.sha256(f.read()).digest().hex()


async def run_load_image(call: NodeCall) -> NodeOutput:
    # real: nodes.LoadImage.load_image (Image.open raises PIL.UnidentifiedImageError for a non-image)
    img = Image.open(call.env.folders.annotated_filepath(call.args["image"]))
    images: list[Image.Image] = []
    masks: list[Image.Image] = []
    for frame in ImageSequence.Iterator(img):
        frame = ImageOps.exif_transpose(frame) or frame
        rgb = frame.convert("RGB")
        if images and rgb.size != images[0].size:
            continue
        images.append(rgb)
        has_alpha = "A" in frame.getbands() or (frame.mode == "P" and "transparency" in frame.info)
        alpha = frame.convert("RGBA").getchannel("A") if has_alpha else None
        masks.append(ImageOps.invert(alpha) if alpha is not None else Image.new("L", (64, 64), 0))
        if img.format == "MPO":
            break
    return NodeOutput((images, masks))


def load_image_output_inputs(_folders: FolderPaths) -> InputTypes:
    # real: nodes.LoadImageOutput (EXPERIMENTAL): a COMBO filled by the UI from /internal/files/output; the value
    # is "name [output]", resolved by the inherited load_image through get_annotated_filepath
    return {"required": {"image": ("COMBO", {"image_upload": True, "image_folder": "output", "remote": {
        "route": "/internal/files/output", "refresh_button": True, "control_after_refresh": "first"}})}}


def load_latent_inputs(folders: FolderPaths) -> InputTypes:
    return {"required": {"latent": [list_input_files(folders, ".latent")]}}


async def run_load_latent(call: NodeCall) -> NodeOutput:
    # real: nodes.LoadLatent.load (safetensors.torch.load_file of the annotated path); here the file's bytes
    # become the latent's seed, so whatever was read shows in the decoded picture
    with open(call.env.folders.annotated_filepath(call.args["latent"]), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return NodeOutput(({"width": 64, "height": 64, "batch_size": 1, "seed": digest},))


def load_video_inputs(folders: FolderPaths) -> InputTypes:
    # real: comfy_extras.nodes_video.LoadVideo (input "file", a COMBO of the input folder's videos, with upload)
    names = sorted(f for f in os.listdir(folders.input_dir) if os.path.isfile(os.path.join(folders.input_dir, f)))
    return {"required": {"file": (names, {"video_upload": True})}}


async def run_load_video(call: NodeCall) -> NodeOutput:
    return NodeOutput((call.env.folders.annotated_filepath(call.args["file"]),))  # real: VideoFromFile(path)


async def run_get_video_components(call: NodeCall) -> NodeOutput:
    # real: comfy_extras.nodes_video.GetVideoComponents; the double decodes what PIL can (PNG, GIF, WebP)
    img = Image.open(call.args["video"])
    frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(img)]
    return NodeOutput((frames, None, 24.0))


def load_image_inputs(folders: FolderPaths) -> InputTypes:
    return {"required": {"image": (list_input_images(folders), {"image_upload": True})}}


def image_nodes() -> list[NodeDef]:
    return [
        NodeDef("EmptyImage", "EmptyImage", "image", static_inputs({"required": {
            "width": int_input(512, 1, MAX_RESOLUTION), "height": int_input(512, 1, MAX_RESOLUTION),
            "batch_size": int_input(1, 1, 4096, None), "color": int_input(0, 0, 0xFFFFFF, 1, display="color"),
        }}), ("IMAGE",), run_empty_image),
        NodeDef("ImageScale", "Upscale Image", "image/upscaling", static_inputs({"required": {
            "image": ("IMAGE",), "upscale_method": (list(UPSCALE_METHODS),),
            "width": int_input(512, 0, MAX_RESOLUTION), "height": int_input(512, 0, MAX_RESOLUTION),
            "crop": (["disabled", "center"],),
        }}), ("IMAGE",), run_image_scale),
        NodeDef("ImageBlur", "Image Blur", "image/postprocessing", static_inputs({"required": {
            "image": ("IMAGE",), "blur_radius": int_input(1, 1, 31),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
        }}), ("IMAGE",), run_image_blur, python_module="comfy_extras.nodes_post_processing"),
        NodeDef("SaveImage", "Save Image", "image", static_inputs({
            "required": {"images": ("IMAGE", IMAGE_TOOLTIP_SAVE),
                         "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": PREFIX_TOOLTIP})},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_image, "Saves the input images to your ComfyUI output directory.", output_node=True),
        NodeDef("PreviewImage", "Preview Image", "image", static_inputs({
            "required": {"images": ("IMAGE",)}, "hidden": HIDDEN_PROMPT,
        }), (), run_preview_image, "Saves the input images to your ComfyUI output directory.", output_node=True),
        NodeDef("LoadImage", "Load Image", "image", load_image_inputs, ("IMAGE", "MASK"), run_load_image,
                validate=validate_load_image, validate_args=("image",), is_changed=load_image_is_changed),
        NodeDef("LoadImageOutput", "Load Image (from Outputs)", "image", load_image_output_inputs, ("IMAGE", "MASK"),
                run_load_image, "Load an image from the output folder.", validate=validate_load_image,
                validate_args=("image",), is_changed=load_image_is_changed),
        NodeDef("LoadLatent", "LoadLatent", "_for_testing", load_latent_inputs, ("LATENT",), run_load_latent,
                validate=validate_load_latent, validate_args=("latent",)),
        NodeDef("LoadVideo", "Load Video", "image/video", load_video_inputs, ("VIDEO",), run_load_video,
                validate=validate_load_video, validate_args=("file",), python_module="comfy_extras.nodes_video"),
        NodeDef("GetVideoComponents", "Get Video Components", "image/video", static_inputs({"required": {
            "video": ("VIDEO",)}}), ("IMAGE", "AUDIO", "FLOAT"), run_get_video_components,
            python_module="comfy_extras.nodes_video"),
    ]


def always_changed(_folders: FolderPaths, _args: dict[str, Any]) -> Any:
    return time.time()  # real: SaveImageWebsocket.IS_CHANGED, so it is never served from cache


SAVE_IMAGE_WEBSOCKET = NodeDef(
    "SaveImageWebsocket", "SaveImageWebsocket", "api node/image/ui",
    static_inputs({"required": {"images": ("IMAGE",)}}), (), run_save_image_websocket, output_node=True,
    python_module="custom_nodes.websocket_image_save", is_changed=always_changed,
)
