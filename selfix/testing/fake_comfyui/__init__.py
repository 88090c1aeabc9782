"""A faithful test double of a ComfyUI 0.3.64 server: HTTP API, WebSocket events, queue, history, caching.

Run it like the real server:
    python -m selfix.testing.fake_comfyui --port P --output-dir D --input-dir I --models-dir M

Behaviour mirrors the real server as documented in comfyui-api.md and as recorded in the capture transcripts:
the same routes (also under /api), status codes, JSON bodies, WebSocket frame types and their order, the
validation errors, the execution order of nodes and ComfyUI's "classic" output cache. Nodes do cheap Pillow
work instead of running models. Comments starting with "real:" name the ComfyUI code path being mirrored.

Hooks the real server does not have live under /fake/ so they can never be mistaken for real routes:
GET /fake/stats, POST /fake/vram and POST /fake/oom. `--exec-log FILE` and `--startup-delay S` are test aids as well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import heapq
import io
import ipaddress
import json
import logging
import mimetypes
import os
import random
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yaml
from aiohttp import WSMsgType, web
from PIL import Image, ImageDraw, ImageFilter, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

log = logging.getLogger("comfyui")

COMFYUI_VERSION = "0.3.64"
MAX_RESOLUTION = 16384
MODEL_EXTENSIONS: frozenset[str] = frozenset(
    {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
)
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
MAX_HISTORY = 10000
LEGACY_FOLDER_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}
TEMP_PREFIX_LETTERS = "abcdefghijklmnopqrstupvxyz"  # sic: the real PreviewImage alphabet ('p' twice, no 'w')
BIN_PREVIEW_IMAGE = 1
BIN_PREVIEW_IMAGE_WITH_METADATA = 4
STARTUP_DELAY_ENV = "FAKE_COMFYUI_STARTUP_DELAY"

SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]
SCHEDULERS = [
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
]

InputTypes = dict[str, dict[str, Any]]
Preview = tuple[str, Image.Image, int | None]  # (PNG|JPEG, image, max size) like comfy's preview tuples
NodeValidation = tuple[bool, list[dict[str, Any]], str]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InterruptProcessingError(Exception):
    """real: comfy.model_management.InterruptProcessingException."""


class OutOfMemoryError(RuntimeError):
    """What POST /fake/oom makes the next KSampler raise; named like torch's, so exception_type reads the same."""


OutOfMemoryError.__module__ = "torch"


class SafetensorError(Exception):
    """Same name and module as the real safetensors error, so exception_type reads the same."""


SafetensorError.__module__ = "safetensors_rust"


def full_type_name(klass: type) -> str:
    # real: execution.full_type_name
    module = klass.__module__
    return klass.__qualname__ if module == "builtins" else f"{module}.{klass.__qualname__}"


def is_link(value: Any) -> bool:
    # real: comfy_execution.graph_utils.is_link
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], (int, float))
    )


def _err(kind: str, message: str, details: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


# --------------------------------------------------------------------------------------------------
# Folders and model files (real: folder_paths.py)
# --------------------------------------------------------------------------------------------------

FolderTable = dict[str, tuple[list[str], frozenset[str]]]


def default_folder_table(models_dir: str, custom_nodes_dir: str) -> FolderTable:
    pt = MODEL_EXTENSIONS

    def under(*names: str) -> list[str]:
        return [os.path.join(models_dir, name) for name in names]

    # Order matters: GET /models lists these keys in this order.
    return {
        "checkpoints": (under("checkpoints"), pt),
        "configs": (under("configs"), frozenset({".yaml"})),
        "loras": (under("loras"), pt),
        "vae": (under("vae"), pt),
        "text_encoders": (under("text_encoders", "clip"), pt),
        "diffusion_models": (under("unet", "diffusion_models"), pt),
        "clip_vision": (under("clip_vision"), pt),
        "style_models": (under("style_models"), pt),
        "embeddings": (under("embeddings"), pt),
        "diffusers": (under("diffusers"), frozenset({"folder"})),
        "vae_approx": (under("vae_approx"), pt),
        "controlnet": (under("controlnet", "t2i_adapter"), pt),
        "gligen": (under("gligen"), pt),
        "upscale_models": (under("upscale_models"), pt),
        "custom_nodes": ([custom_nodes_dir], frozenset()),
        "hypernetworks": (under("hypernetworks"), pt),
        "photomaker": (under("photomaker"), pt),
        "classifiers": (under("classifiers"), frozenset({""})),
        "model_patches": (under("model_patches"), pt),
        "audio_encoders": (under("audio_encoders"), pt),
    }


def walk_files(directory: str, hidden: bool = True) -> Iterable[tuple[str, str]]:
    """(relative path with '/', full path) of every file below directory, skipping .git like the real scan."""
    if not os.path.isdir(directory):
        return
    for dirpath, subdirs, filenames in os.walk(directory, followlinks=True, topdown=True):
        subdirs[:] = [d for d in subdirs if d != ".git" and (hidden or not d.startswith("."))]
        for name in filenames:
            if hidden or not name.startswith("."):
                full = os.path.join(dirpath, name)
                yield os.path.relpath(full, directory), full


def has_extension(name: str, extensions: frozenset[str]) -> bool:
    return not extensions or os.path.splitext(name)[-1].lower() in extensions


class FolderPaths:
    """Input/output/temp directories and the model search paths; file lists are rescanned on every call."""

    def __init__(self, output_dir: str, input_dir: str, temp_dir: str, models_dir: str) -> None:
        self.output_dir = output_dir
        self.input_dir = input_dir
        self.temp_dir = temp_dir
        self.table = default_folder_table(models_dir, os.path.join(os.path.dirname(models_dir), "custom_nodes"))

    def add_model_folder(self, name: str, path: str, is_default: bool = False) -> None:
        # real: folder_paths.add_model_folder_path
        name = LEGACY_FOLDER_NAMES.get(name, name)
        if name not in self.table:
            self.table[name] = ([path], frozenset())
            return
        paths = self.table[name][0]
        if path in paths:
            if is_default and paths[0] != path:
                paths.remove(path)
                paths.insert(0, path)
        elif is_default:
            paths.insert(0, path)
        else:
            paths.append(path)

    def folder_paths(self, name: str) -> list[str]:
        return list(self.table[LEGACY_FOLDER_NAMES.get(name, name)][0])

    def has_folder(self, name: str) -> bool:
        return LEGACY_FOLDER_NAMES.get(name, name) in self.table

    def filename_list(self, name: str) -> list[str]:
        paths, extensions = self.table[LEGACY_FOLDER_NAMES.get(name, name)]
        found = {rel for path in paths for rel, _ in walk_files(path) if has_extension(rel, extensions)}
        return sorted(found)

    def full_path(self, name: str, filename: str) -> str | None:
        # real: folder_paths.get_full_path (first folder holding the name wins)
        name = LEGACY_FOLDER_NAMES.get(name, name)
        if name not in self.table:
            return None
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for path in self.table[name][0]:
            candidate = os.path.join(path, filename)
            if os.path.isfile(candidate):
                return candidate
        return None

    def full_path_or_raise(self, name: str, filename: str) -> str:
        path = self.full_path(name, filename)
        if path is None:
            raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
        return path

    def directory_by_type(self, kind: str | None) -> str | None:
        return {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}.get(kind or "")

    def annotated(self, name: str) -> tuple[str, str | None]:
        # real: folder_paths.annotated_filepath ("x.png [temp]" picks the folder)
        for suffix, base in (("[output]", self.output_dir), ("[input]", self.input_dir), ("[temp]", self.temp_dir)):
            if name.endswith(suffix):
                return name[: -len(suffix) - 1], base
        return name, None

    def annotated_filepath(self, name: str) -> str:
        name, base = self.annotated(name)
        return os.path.join(base or self.input_dir, name)


def load_extra_model_paths(folders: FolderPaths, yaml_path: str) -> None:
    # real: utils/extra_config.load_extra_path_config
    with open(yaml_path, encoding="utf-8") as stream:
        config = yaml.safe_load(stream) or {}
    yaml_dir = os.path.dirname(os.path.abspath(yaml_path))
    for conf in config.values():
        if conf is None:
            continue
        conf = dict(conf)
        base_path = conf.pop("base_path", None)
        if base_path:
            base_path = os.path.expandvars(os.path.expanduser(base_path))
            if not os.path.isabs(base_path):
                base_path = os.path.abspath(os.path.join(yaml_dir, base_path))
        is_default = bool(conf.pop("is_default", False))
        for key, value in conf.items():
            for line in str(value).split("\n"):
                if line:
                    _add_extra_path(folders, key, line.strip(), base_path, yaml_dir, is_default)


def _add_extra_path(
    folders: FolderPaths, key: str, path: str, base_path: str | None, yaml_dir: str, is_default: bool
) -> None:
    if base_path:
        path = os.path.join(base_path, path)
    elif not os.path.isabs(path):
        path = os.path.abspath(os.path.join(yaml_dir, path))
    path = os.path.normpath(path)
    log.info("Adding extra search path %s %s", key, path)
    folders.add_model_folder(key, path, is_default)


def check_model_file(path: str) -> None:
    """Fail like comfy.utils.load_torch_file does for a file that is not a readable safetensors file."""
    if not path.lower().endswith((".safetensors", ".sft")):
        return
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = f.read(length) if 0 <= length <= min(size - 8, 100_000_000) else b""
    problem = _safetensors_problem(size, length, header)
    if problem is None:
        return
    message = f"Error while deserializing header: {problem}"
    if problem in ("HeaderTooLarge", "MetadataIncompleteBuffer"):
        # real: load_torch_file rewraps these two as ValueError with advice
        raise ValueError(f"{message}\n\nFile path: {path}\n\nThe safetensors file is corrupt or invalid.")
    raise SafetensorError(message)


def _safetensors_problem(size: int, length: int, header: bytes) -> str | None:
    if length < 0:
        return "HeaderTooSmall"
    if length > 100_000_000:
        return "HeaderTooLarge"
    if 8 + length > size:
        return "InvalidHeaderLength"
    if not header.startswith(b"{"):
        return "InvalidHeaderStart"
    try:
        parsed = json.loads(header)
    except ValueError:
        return "InvalidHeaderDeserialization"
    ends = [t["data_offsets"][1] for k, t in parsed.items() if k != "__metadata__" and isinstance(t, dict)]
    return None if max(ends, default=0) == size - 8 - length else "MetadataIncompleteBuffer"


# --------------------------------------------------------------------------------------------------
# Nodes: INPUT_TYPES-like specs (used for validation and /object_info) and cheap Pillow implementations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """Stands in for MODEL / CLIP / VAE objects: which checkpoint and which LoRAs were applied."""

    kind: str
    ckpt: str
    loras: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class NodeOutput:
    result: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None


@dataclass(frozen=True)
class ExecEnv:
    folders: FolderPaths
    seconds_per_step: float
    preview_method: str
    preview_size: int
    disable_metadata: bool


@dataclass
class NodeCall:
    args: dict[str, Any]
    node_id: str
    state: dict[str, Any]  # per node object (real: attributes of the cached node instance)
    env: ExecEnv
    progress: Callable[[int, int, Preview | None], None]
    check_interrupt: Callable[[], None]
    send_text: Callable[[str], None] = lambda _text: None  # real: PromptServer.send_progress_text


@dataclass(frozen=True)
class NodeDef:
    name: str
    display_name: str
    category: str
    inputs: Callable[[FolderPaths], InputTypes]
    returns: tuple[str, ...]
    run: Callable[[NodeCall], Awaitable[NodeOutput]]
    description: str = ""
    output_node: bool = False
    output_tooltips: tuple[str, ...] | None = None
    python_module: str = "nodes"
    validate: Callable[[FolderPaths, dict[str, Any]], bool | str] | None = None
    validate_args: tuple[str, ...] = ()
    is_changed: Callable[[FolderPaths, dict[str, Any]], Any] | None = None


def _static(spec: InputTypes) -> Callable[[FolderPaths], InputTypes]:
    return lambda _folders: copy.deepcopy(spec)


def get_input_info(class_inputs: InputTypes, name: str) -> tuple[Any, str | None, dict[str, Any]]:
    # real: comfy_execution.graph.get_input_info
    for category in ("required", "optional", "hidden"):
        if name in class_inputs.get(category, {}):
            info = class_inputs[category][name]
            if isinstance(info, str):
                return info, category, {}
            return info[0], category, (info[1] if len(info) > 1 else {})
    return None, None, {}


IMAGE_TOOLTIP_SAVE = {"tooltip": "The images to save."}
PREFIX_TOOLTIP = (
    "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% "
    "or %Empty Latent Image.width% to include values from nodes."
)
HIDDEN_PROMPT = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


def _int(default: int, lo: int, hi: int, step: int | None = 1, **extra: Any) -> tuple[str, dict[str, Any]]:
    spec: dict[str, Any] = {"default": default, "min": lo, "max": hi}
    if step is not None:
        spec["step"] = step
    spec.update(extra)
    return ("INT", spec)


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


def _compute_vars(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    for key, value in (
        ("%width%", str(width)), ("%height%", str(height)), ("%year%", str(now.tm_year)),
        ("%month%", f"{now.tm_mon:02}"), ("%day%", f"{now.tm_mday:02}"), ("%hour%", f"{now.tm_hour:02}"),
        ("%minute%", f"{now.tm_min:02}"), ("%second%", f"{now.tm_sec:02}"),
    ):
        prefix = prefix.replace(key, value)
    return prefix


def save_image_path(prefix: str, output_dir: str, width: int, height: int) -> tuple[str, str, int, str]:
    """real: folder_paths.get_save_image_path -> (folder, filename, counter, subfolder)."""
    if "%" in prefix:
        prefix = _compute_vars(prefix, width, height)
    subfolder = os.path.dirname(os.path.normpath(prefix))
    filename = os.path.basename(os.path.normpath(prefix))
    folder = os.path.join(output_dir, subfolder)
    if os.path.commonpath((output_dir, os.path.abspath(folder))) != output_dir:
        raise Exception(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {os.path.abspath(folder)}\n         output_dir: {output_dir}"
        )
    os.makedirs(folder, exist_ok=True)
    return folder, filename, _next_counter(folder, filename), subfolder


def _next_counter(folder: str, filename: str) -> int:
    counters = [0]
    for name in os.listdir(folder):
        head, rest = name[: len(filename) + 1], name[len(filename) + 1 :]
        if os.path.normcase(head[:-1]) == os.path.normcase(filename) and head[-1:] == "_":
            with contextlib.suppress(ValueError):
                counters.append(int(rest.split("_")[0]))
    return max(counters) + 1


def _png_info(call: NodeCall) -> PngInfo | None:
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
        image.save(os.path.join(folder, name), pnginfo=_png_info(call), compress_level=compress)
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


def list_input_images(folders: FolderPaths) -> list[str]:
    names = [f for f in os.listdir(folders.input_dir) if os.path.isfile(os.path.join(folders.input_dir, f))]
    return sorted(f for f in names if (mimetypes.guess_type(f)[0] or "").startswith("image/"))


def annotated_file_check(arg: str, kind: str) -> Callable[[FolderPaths, dict[str, Any]], bool | str]:
    """VALIDATE_INPUTS of the file loaders (real: LoadImage, LoadLatent, LoadVideo, LoadAudio): the annotated path
    must exist, so a sub-folder name such as selfix/<taskId>/x passes though the choice list omits it."""
    def check(folders: FolderPaths, args: dict[str, Any]) -> bool | str:
        value = args.get(arg)
        if value is None or not os.path.exists(folders.annotated_filepath(str(value))):
            return f"Invalid {kind} file: {value}"
        return True
    return check


validate_load_image = annotated_file_check("image", "image")
validate_load_latent = annotated_file_check("latent", "latent")
validate_load_video = annotated_file_check("file", "video")
validate_load_audio = annotated_file_check("audio", "audio")


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


def list_input_files(folders: FolderPaths, ext: str) -> list[str]:
    names = [f for f in os.listdir(folders.input_dir) if os.path.isfile(os.path.join(folders.input_dir, f))]
    return sorted(f for f in names if f.endswith(ext))


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


async def run_checkpoint_loader(call: NodeCall) -> NodeOutput:
    name = call.args["ckpt_name"]
    check_model_file(call.env.folders.full_path_or_raise("checkpoints", name))
    return NodeOutput((ModelRef("MODEL", name), ModelRef("CLIP", name), ModelRef("VAE", name)))


def _with_lora(ref: ModelRef, name: str, strength: float) -> ModelRef:
    return ModelRef(ref.kind, ref.ckpt, ref.loras + ((name, strength),))


async def run_lora_loader(call: NodeCall) -> NodeOutput:
    a = call.args
    if a["strength_model"] == 0 and a["strength_clip"] == 0:
        return NodeOutput((a["model"], a["clip"]))
    check_model_file(call.env.folders.full_path_or_raise("loras", a["lora_name"]))
    model = _with_lora(a["model"], a["lora_name"], a["strength_model"])
    return NodeOutput((model, _with_lora(a["clip"], a["lora_name"], a["strength_clip"])))


async def run_lora_loader_model_only(call: NodeCall) -> NodeOutput:
    a = call.args
    if a["strength_model"] == 0:
        return NodeOutput((a["model"],))
    check_model_file(call.env.folders.full_path_or_raise("loras", a["lora_name"]))
    return NodeOutput((_with_lora(a["model"], a["lora_name"], a["strength_model"]),))


async def run_clip_text_encode(call: NodeCall) -> NodeOutput:
    clip = call.args["clip"]
    if clip is None:
        raise RuntimeError(
            "ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node your checkpoint "
            "does not contain a valid clip or text encoder model."
        )
    return NodeOutput(({"text": call.args["text"], "clip": clip},))


async def run_empty_latent(call: NodeCall) -> NodeOutput:
    a = call.args
    return NodeOutput(({"width": a["width"], "height": a["height"], "batch_size": a["batch_size"]},))


def latent_preview(env: ExecEnv, latent: dict[str, Any], seed: int, step: int) -> Preview | None:
    if env.preview_method == "none":
        return None
    size = (max(1, latent["width"] // 8), max(1, latent["height"] // 8))
    shade = (seed * 37 + step * 23) % 256
    return ("JPEG", Image.new("RGB", size, (shade, 255 - shade, (shade * 7) % 256)), env.preview_size)


async def run_ksampler(call: NodeCall) -> NodeOutput:
    a = call.args
    steps = int(a["steps"])
    latent = dict(a["latent_image"])
    for step in range(steps):
        call.check_interrupt()
        await asyncio.sleep(call.env.seconds_per_step)  # also yields, so HTTP requests are served meanwhile
        call.progress(step + 1, steps, latent_preview(call.env, latent, int(a["seed"]), step))
    latent.update(seed=a["seed"], steps=steps, model=a["model"], positive=a["positive"], negative=a["negative"])
    return NodeOutput((latent,))


def render_latent(latent: dict[str, Any]) -> Image.Image:
    """A cheap deterministic picture: background and shapes depend on seed, prompt text and LoRAs."""
    key = json.dumps([latent.get("seed"), str(latent.get("positive")), str(latent.get("model"))])
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    width, height = latent["width"], latent["height"]
    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, x0 + rng.randrange(1, width + 1), y0 + rng.randrange(1, height + 1))
        draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


async def run_vae_decode(call: NodeCall) -> NodeOutput:
    latent = call.args["samples"]
    return NodeOutput(([render_latent(latent) for _ in range(latent["batch_size"])],))


LORA_LOADER_INPUTS = {
    "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
    "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
    "strength_model": ("FLOAT", {
        "default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
        "tooltip": "How strongly to modify the diffusion model. This value can be negative.",
    }),
    "strength_clip": ("FLOAT", {
        "default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
        "tooltip": "How strongly to modify the CLIP model. This value can be negative.",
    }),
}


def lora_loader_inputs(folders: FolderPaths) -> InputTypes:
    # real: INPUT_TYPES() is called for every validation, so the list reflects the disk right now
    s = copy.deepcopy(LORA_LOADER_INPUTS)
    lora_name = (folders.filename_list("loras"), {"tooltip": "The name of the LoRA."})
    required = {"model": s["model"], "clip": s["clip"], "lora_name": lora_name}
    return {"required": {**required, "strength_model": s["strength_model"], "strength_clip": s["strength_clip"]}}


def lora_model_only_inputs(folders: FolderPaths) -> InputTypes:
    strength = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})
    lora_name = (folders.filename_list("loras"),)
    return {"required": {"model": ("MODEL",), "lora_name": lora_name, "strength_model": strength}}


def checkpoint_inputs(folders: FolderPaths) -> InputTypes:
    tooltip = {"tooltip": "The name of the checkpoint (model) to load."}
    return {"required": {"ckpt_name": (folders.filename_list("checkpoints"), tooltip)}}


def load_image_inputs(folders: FolderPaths) -> InputTypes:
    return {"required": {"image": (list_input_images(folders), {"image_upload": True})}}


KSAMPLER_INPUTS: InputTypes = {"required": {
    "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
    "seed": _int(0, 0, 0xFFFFFFFFFFFFFFFF, None, control_after_generate=True,
                 tooltip="The random seed used for creating the noise."),
    "steps": _int(20, 1, 10000, None, tooltip="The number of steps used in the denoising process."),
    "cfg": ("FLOAT", {
        "default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
        "tooltip": "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. Higher "
        "values allow more flexibility in the generated image, but too high values can negatively impact prompt "
        "adherence.",
    }),
    "sampler_name": (SAMPLERS, {"tooltip": "The algorithm used when sampling, this can affect the quality, "
                                "speed, and style of the generated output."}),
    "scheduler": (SCHEDULERS, {"tooltip": "The scheduler controls how noise is gradually removed to form the "
                               "image."}),
    "positive": ("CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to include "
                                  "in the image."}),
    "negative": ("CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to exclude "
                                  "from the image."}),
    "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
    "denoise": ("FLOAT", {
        "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
        "tooltip": "The amount of denoising applied, lower values will maintain the structure of the initial "
        "image allowing for image to image sampling.",
    }),
}}


def _image_nodes() -> list[NodeDef]:
    return [
        NodeDef("EmptyImage", "EmptyImage", "image", _static({"required": {
            "width": _int(512, 1, MAX_RESOLUTION), "height": _int(512, 1, MAX_RESOLUTION),
            "batch_size": _int(1, 1, 4096, None), "color": _int(0, 0, 0xFFFFFF, 1, display="color"),
        }}), ("IMAGE",), run_empty_image),
        NodeDef("ImageScale", "Upscale Image", "image/upscaling", _static({"required": {
            "image": ("IMAGE",), "upscale_method": (list(UPSCALE_METHODS),),
            "width": _int(512, 0, MAX_RESOLUTION), "height": _int(512, 0, MAX_RESOLUTION),
            "crop": (["disabled", "center"],),
        }}), ("IMAGE",), run_image_scale),
        NodeDef("ImageBlur", "Image Blur", "image/postprocessing", _static({"required": {
            "image": ("IMAGE",), "blur_radius": _int(1, 1, 31),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
        }}), ("IMAGE",), run_image_blur, python_module="comfy_extras.nodes_post_processing"),
        NodeDef("SaveImage", "Save Image", "image", _static({
            "required": {"images": ("IMAGE", IMAGE_TOOLTIP_SAVE),
                         "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": PREFIX_TOOLTIP})},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_image, "Saves the input images to your ComfyUI output directory.", output_node=True),
        NodeDef("PreviewImage", "Preview Image", "image", _static({
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
        NodeDef("GetVideoComponents", "Get Video Components", "image/video", _static({"required": {
            "video": ("VIDEO",)}}), ("IMAGE", "AUDIO", "FLOAT"), run_get_video_components,
            python_module="comfy_extras.nodes_video"),
    ]


def _model_nodes() -> list[NodeDef]:
    lora_tooltips = ("The modified diffusion model.", "The modified CLIP model.")
    lora_description = (
        "LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are denoised such "
        "as applying styles. Multiple LoRA nodes can be linked together."
    )
    return [
        NodeDef("CheckpointLoaderSimple", "Load Checkpoint", "loaders", checkpoint_inputs,
                ("MODEL", "CLIP", "VAE"), run_checkpoint_loader,
                "Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
                output_tooltips=("The model used for denoising latents.",
                                 "The CLIP model used for encoding text prompts.",
                                 "The VAE model used for encoding and decoding images to and from latent space.")),
        NodeDef("LoraLoader", "Load LoRA", "loaders", lora_loader_inputs, ("MODEL", "CLIP"), run_lora_loader,
                lora_description, output_tooltips=lora_tooltips),
        NodeDef("LoraLoaderModelOnly", "LoraLoaderModelOnly", "loaders", lora_model_only_inputs, ("MODEL",),
                run_lora_loader_model_only, lora_description, output_tooltips=lora_tooltips),
    ]


def _sampling_nodes() -> list[NodeDef]:
    return [
        NodeDef("CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning", _static({"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."}),
        }}), ("CONDITIONING",), run_clip_text_encode,
            "Encodes a text prompt using a CLIP model into an embedding that can be used to guide the diffusion "
            "model towards generating specific images.",
            output_tooltips=("A conditioning containing the embedded text used to guide the diffusion model.",)),
        NodeDef("EmptyLatentImage", "Empty Latent Image", "latent", _static({"required": {
            "width": _int(512, 16, MAX_RESOLUTION, 8, tooltip="The width of the latent images in pixels."),
            "height": _int(512, 16, MAX_RESOLUTION, 8, tooltip="The height of the latent images in pixels."),
            "batch_size": _int(1, 1, 4096, None, tooltip="The number of latent images in the batch."),
        }}), ("LATENT",), run_empty_latent, "Create a new batch of empty latent images to be denoised via sampling.",
            output_tooltips=("The empty latent image batch.",)),
        NodeDef("KSampler", "KSampler", "sampling", _static(KSAMPLER_INPUTS), ("LATENT",), run_ksampler,
                "Uses the provided model, positive and negative conditioning to denoise the latent image.",
                output_tooltips=("The denoised latent.",)),
        NodeDef("VAEDecode", "VAE Decode", "latent", _static({"required": {
            "samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
            "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."}),
        }}), ("IMAGE",), run_vae_decode, "Decodes latent images back into pixel space images.",
            output_tooltips=("The decoded image.",)),
    ]


def always_changed(_folders: FolderPaths, _args: dict[str, Any]) -> Any:
    return time.time()  # real: SaveImageWebsocket.IS_CHANGED, so it is never served from cache


SAVE_IMAGE_WEBSOCKET = NodeDef(
    "SaveImageWebsocket", "SaveImageWebsocket", "api node/image/ui", _static({"required": {"images": ("IMAGE",)}}),
    (), run_save_image_websocket, output_node=True, python_module="custom_nodes.websocket_image_save",
    is_changed=always_changed,
)


# --------------------------------------------------------------------------------------------------
# Media output nodes: animations, video, audio, text (real: comfy_extras nodes_images / nodes_video /
# nodes_audio / nodes_preview_any, and VideoHelperSuite's VHS_VideoCombine). Files are real containers with
# the right magic bytes and headers (PNG/WebP animations through Pillow; MP4 ftyp/moov/mvhd/tkhd + raw frames in
# mdat; WebM EBML header; FLAC STREAMINFO) but the video/audio payload is not encoded: no decoder can play it.
# --------------------------------------------------------------------------------------------------

BIN_TEXT = 3  # real: server.BinaryEventTypes.TEXT (send_progress_text)
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
                   pnginfo=_png_info(call), compress_level=a["compress_level"])
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


def list_input_audio(folders: FolderPaths) -> list[str]:
    names = [f for f in os.listdir(folders.input_dir) if os.path.isfile(os.path.join(folders.input_dir, f))]
    return sorted(f for f in names if (mimetypes.guess_type(f)[0] or "").startswith(("audio/", "video/")))


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
    frames[0].save(os.path.join(folder, first), pnginfo=_png_info(call), compress_level=4)
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


def _media_nodes() -> list[NodeDef]:
    prefix = ("STRING", {"default": "ComfyUI"})
    extras = "comfy_extras.nodes_images"
    return [
        NodeDef("SaveAnimatedWEBP", "SaveAnimatedWEBP", "image/animation", _static({
            "required": {"images": ("IMAGE",), "filename_prefix": prefix, "fps": _fps(6.0),
                         "lossless": ("BOOLEAN", {"default": True}), "quality": _int(80, 0, 100),
                         "method": (["default", "fastest", "slowest"],)},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_animated_webp, output_node=True, python_module=extras),
        NodeDef("SaveAnimatedPNG", "SaveAnimatedPNG", "image/animation", _static({
            "required": {"images": ("IMAGE",), "filename_prefix": prefix, "fps": _fps(6.0),
                         "compress_level": _int(4, 0, 9)},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_animated_png, output_node=True, python_module=extras),
        NodeDef("CreateVideo", "Create Video", "image/video", _static({
            "required": {"images": ("IMAGE",), "fps": _fps(30.0, 1.0, 120.0)}, "optional": {"audio": ("AUDIO",)},
        }), ("VIDEO",), run_create_video, python_module="comfy_extras.nodes_video"),
        NodeDef("SaveVideo", "Save Video", "image/video", _static({
            "required": {"video": ("VIDEO",), "filename_prefix": ("STRING", {"default": "video/ComfyUI"}),
                         "format": (["auto", "mp4"], {"default": "auto"}),
                         "codec": (["auto", "h264"], {"default": "auto"})},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_video, output_node=True, python_module="comfy_extras.nodes_video"),
        NodeDef("SaveWEBM", "SaveWEBM", "image/video", _static({
            "required": {"images": ("IMAGE",), "filename_prefix": prefix, "codec": (["vp9", "av1"],),
                         "fps": _fps(24.0), "crf": ("FLOAT", {"default": 32.0, "min": 0, "max": 63.0, "step": 1})},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_webm, output_node=True, python_module="comfy_extras.nodes_video"),
        NodeDef("SaveLatent", "SaveLatent", "_for_testing", _static({
            "required": {"samples": ("LATENT",), "filename_prefix": ("STRING", {"default": "latents/ComfyUI"})},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_latent, output_node=True),
        NodeDef("GetImageSize", "Get Image Size", "image", _static({
            "required": {"image": ("IMAGE",)}, "hidden": {"unique_id": "UNIQUE_ID"},
        }), ("INT", "INT", "INT"), run_get_image_size, python_module=extras),
        NodeDef("PreviewAny", "Preview Any", "utils", _static({"required": {"source": ("*", {})}}), (),
                run_preview_any, output_node=True, python_module="comfy_extras.nodes_preview_any"),
        NodeDef("LoadAudio", "Load Audio", "audio", lambda folders: {"required": {
            "audio": (list_input_audio(folders), {"audio_upload": True})}}, ("AUDIO",), run_load_audio,
            python_module="comfy_extras.nodes_audio", validate=validate_load_audio, validate_args=("audio",)),
        NodeDef("SaveAudio", "Save Audio (FLAC)", "audio", _static({
            "required": {"audio": ("AUDIO",), "filename_prefix": ("STRING", {"default": "audio/ComfyUI"})},
            "hidden": HIDDEN_PROMPT,
        }), (), run_save_audio, output_node=True, python_module="comfy_extras.nodes_audio"),
    ]


VHS_VIDEO_COMBINE = NodeDef(
    "VHS_VideoCombine", "Video Combine 🎥🅥🅗🅢", "Video Helper Suite 🎥🅥🅗🅢", _static({
        "required": {"images": ("IMAGE",), "frame_rate": ("FLOAT", {"default": 8, "min": 1, "step": 1}),
                     "loop_count": _int(0, 0, 100), "filename_prefix": ("STRING", {"default": "AnimateDiff"}),
                     "format": (VHS_FORMATS,), "pingpong": ("BOOLEAN", {"default": False}),
                     "save_output": ("BOOLEAN", {"default": True})},
        "hidden": HIDDEN_PROMPT_ID,
    }), ("VHS_FILENAMES",), run_vhs_video_combine, output_node=True,
    python_module="custom_nodes.ComfyUI-VideoHelperSuite",
)


def build_registry(custom_nodes: bool) -> dict[str, NodeDef]:
    # SaveImageWebsocket ships as a custom node, so --disable-all-custom-nodes removes it (as for real).
    defs = _image_nodes() + _model_nodes() + _sampling_nodes() + ([SAVE_IMAGE_WEBSOCKET] if custom_nodes else [])
    defs += _media_nodes() + ([VHS_VIDEO_COMBINE] if custom_nodes else [])  # branch outputs
    return {d.name: d for d in defs}


def node_info(node: NodeDef, folders: FolderPaths) -> dict[str, Any]:
    # real: server.py node_info (key order matters for byte-identical answers)
    inputs = node.inputs(folders)
    info: dict[str, Any] = {
        "input": inputs,
        "input_order": {key: list(value) for key, value in inputs.items()},
        "output": list(node.returns),
        "output_is_list": [False] * len(node.returns),
        "output_name": list(node.returns),
        "name": node.name,
        "display_name": node.display_name,
        "description": node.description,
        "python_module": node.python_module,
        "category": node.category,
        "output_node": node.output_node,
    }
    if node.output_tooltips is not None:
        info["output_tooltips"] = list(node.output_tooltips)
    return info


# --------------------------------------------------------------------------------------------------
# Validation (real: execution.validate_prompt / validate_inputs)
# --------------------------------------------------------------------------------------------------

CONVERTERS: dict[str, Callable[[Any], Any]] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


def validate_node_input(received_type: Any, input_type: Any) -> bool:
    if received_type == input_type:
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    received = {t.strip() for t in received_type.split(",")}
    wanted = {t.strip() for t in input_type.split(",")}
    return "*" in received or "*" in wanted or bool(received & wanted)


@dataclass
class Validation:
    ok: bool
    error: dict[str, Any] | None
    outputs: list[str]
    node_errors: dict[str, Any]


class Validator:
    """One validation pass over a prompt; mutates literal inputs into their converted values like the real one."""

    def __init__(self, registry: dict[str, NodeDef], folders: FolderPaths, prompt: Any) -> None:
        self.registry = registry
        self.folders = folders
        self.prompt = prompt
        self.validated: dict[Any, NodeValidation] = {}

    def run(self, partial: Any) -> Validation:
        outputs = self._collect_outputs(partial)
        if isinstance(outputs, dict):
            return Validation(False, outputs, [], {})
        if not outputs:
            return Validation(False, _err("prompt_no_outputs", "Prompt has no outputs", "", {}), [], {})
        good: list[str] = []
        failed: list[tuple[str, list[dict[str, Any]]]] = []
        node_errors: dict[str, Any] = {}
        for output in outputs:
            valid, reasons = self._validate_output(output)
            if valid:
                good.append(output)
                continue
            log.error("Failed to validate prompt for output %s:", output)
            failed.append((output, reasons))
            self._collect_node_errors(output, node_errors)
            log.error("Output will be ignored")
        if good:
            return Validation(True, None, good, node_errors)
        details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in failed for r in reasons)
        error = _err("prompt_outputs_failed_validation", "Prompt outputs failed validation", details, {})
        return Validation(False, error, [], node_errors)

    def _collect_outputs(self, partial: Any) -> list[str] | dict[str, Any]:
        outputs: list[str] = []
        for node_id in self.prompt:
            if "class_type" not in self.prompt[node_id]:
                message = "Cannot execute because a node is missing the class_type property."
                return _err("invalid_prompt", message, f"Node ID '#{node_id}'", {})
            class_type = self.prompt[node_id]["class_type"]
            node = self.registry.get(class_type)
            if node is None:
                message = f"Cannot execute because node {class_type} does not exist."
                return _err("invalid_prompt", message, f"Node ID '#{node_id}'", {})
            if node.output_node and (partial is None or node_id in partial):
                outputs.append(node_id)
        # real: a set; reversed prompt order is what every capture shows (e.g. ["4", "3"]).
        return outputs[::-1]

    def _validate_output(self, output: str) -> tuple[bool, list[dict[str, Any]]]:
        try:
            valid, reasons, _ = self.validate_inputs(output)
            return valid, reasons
        except Exception as ex:
            reasons = [_err("exception_during_validation", "Exception when validating node", str(ex), {
                "exception_type": full_type_name(type(ex)),
                "traceback": traceback.format_tb(ex.__traceback__),
            })]
            self.validated[output] = (False, reasons, output)
            return False, reasons

    def _collect_node_errors(self, output: str, node_errors: dict[str, Any]) -> None:
        # real quirk kept: every failed node seen so far gets this output appended to dependent_outputs
        for node_id, (valid, reasons, _) in self.validated.items():
            if valid is not True and reasons:
                if node_id not in node_errors:
                    class_type = self.prompt[node_id]["class_type"]
                    node_errors[node_id] = {"errors": reasons, "dependent_outputs": [], "class_type": class_type}
                    for reason in reasons:
                        log.error("* %s %s: %s: %s", class_type, node_id, reason["message"], reason["details"])
                node_errors[node_id]["dependent_outputs"].append(output)

    def validate_inputs(self, unique_id: Any) -> NodeValidation:
        if unique_id in self.validated:
            return self.validated[unique_id]
        inputs = self.prompt[unique_id]["inputs"]
        node = self.registry[self.prompt[unique_id]["class_type"]]
        class_inputs = node.inputs(self.folders)
        errors: list[dict[str, Any]] = []
        valid = True
        for name in [*class_inputs.get("required", {}), *class_inputs.get("optional", {})]:
            outcome = self._check_input(node, class_inputs, inputs, name)
            if outcome is False:
                valid = False
            elif isinstance(outcome, dict):
                errors.append(outcome)
        errors.extend(self._custom_validation(node, inputs))
        result: NodeValidation = (not errors and valid, errors, unique_id)
        self.validated[unique_id] = result
        return result

    def _check_input(
        self, node: NodeDef, class_inputs: InputTypes, inputs: dict[str, Any], name: str
    ) -> dict[str, Any] | bool:
        input_type, category, extra = get_input_info(class_inputs, name)
        if name not in inputs:
            if category == "required":
                return _err("required_input_missing", "Required input is missing", name, {"input_name": name})
            return True
        info = (input_type, extra)
        if isinstance(inputs[name], list):
            return self._check_link(node, name, inputs[name], info)
        return self._check_value(node, inputs, name, info)

    def _check_link(self, node: NodeDef, name: str, val: list[Any], info: tuple[Any, Any]) -> dict[str, Any] | bool:
        if len(val) != 2:
            message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
            return _err("bad_linked_input", message, name,
                        {"input_name": name, "input_config": info, "received_value": val})
        o_id = val[0]
        received_type = self.registry[self.prompt[o_id]["class_type"]].returns[val[1]]
        if "input_types" not in node.validate_args and not validate_node_input(received_type, info[0]):
            details = f"{name}, received_type({received_type}) mismatch input_type({info[0]})"
            return _err("return_type_mismatch", "Return type mismatch between linked nodes", details, {
                "input_name": name, "input_config": info, "received_type": received_type, "linked_node": val,
            })
        try:
            return self.validate_inputs(o_id)[0] is not False
        except Exception as ex:
            self.validated[o_id] = (False, [_inner_exception(name, info, val, ex)], o_id)
            return False

    def _check_value(
        self, node: NodeDef, inputs: dict[str, Any], name: str, info: tuple[Any, Any]
    ) -> dict[str, Any] | bool:
        input_type, extra = info
        val = inputs[name]
        try:
            if isinstance(val, dict) and "__value__" in val:
                val = inputs[name] = val["__value__"]
            if isinstance(input_type, str) and input_type in CONVERTERS:
                val = inputs[name] = CONVERTERS[input_type](val)
        except Exception as ex:
            return _err("invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                        f"{name}, {val}, {ex}", {"input_name": name, "input_config": info, "received_value": val,
                                                 "exception_message": str(ex)})
        if name in node.validate_args:
            return True
        return _range_or_combo_error(name, val, input_type, extra, info) or True

    def _custom_validation(self, node: NodeDef, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        if node.validate is None:
            return []
        missing = [x for x in node.validate_args if x not in inputs]
        if missing:  # real: VALIDATE_INPUTS is called without the argument and raises
            raise TypeError(f"{node.name}.VALIDATE_INPUTS() missing 1 required positional argument: '{missing[0]}'")
        args = {x: inputs[x] for x in node.validate_args if not isinstance(inputs[x], list)}
        result = node.validate(self.folders, args)
        if result is True:
            return []
        suffix = "" if result is False else f" - {result}"
        return [_err("custom_validation_failed", "Custom validation failed for node", f"{x}{suffix}",
                     {"input_name": x}) for x in args]


def _range_or_combo_error(
    name: str, val: Any, input_type: Any, extra: dict[str, Any], info: tuple[Any, Any]
) -> dict[str, Any] | None:
    extra_info = {"input_name": name, "input_config": info, "received_value": val}
    if "min" in extra and val < extra["min"]:
        return _err("value_smaller_than_min", f"Value {val} smaller than min of {extra['min']}", name, extra_info)
    if "max" in extra and val > extra["max"]:
        return _err("value_bigger_than_max", f"Value {val} bigger than max of {extra['max']}", name, extra_info)
    if isinstance(input_type, list) and val not in input_type:
        # Long lists (scanned model files) are not echoed back.
        listed = f"(list of length {len(input_type)})" if len(input_type) > 20 else str(input_type)
        config = None if len(input_type) > 20 else info
        return _err("value_not_in_list", "Value not in list", f"{name}: '{val}' not in {listed}",
                    {"input_name": name, "input_config": config, "received_value": val})
    return None


def _inner_exception(name: str, info: tuple[Any, Any], val: Any, ex: Exception) -> dict[str, Any]:
    return _err("exception_during_inner_validation", "Exception when validating inner node", str(ex), {
        "input_name": name, "input_config": info, "exception_message": str(ex),
        "exception_type": full_type_name(type(ex)), "traceback": traceback.format_tb(ex.__traceback__),
        "linked_node": val,
    })


# --------------------------------------------------------------------------------------------------
# Execution order (real: comfy_execution.graph.ExecutionList) and cache keys (real: caching.py)
# --------------------------------------------------------------------------------------------------


class ExecutionList:
    """Which node runs next; the same output-first heuristic as ComfyUI, so node order matches the captures."""

    def __init__(
        self, prompt: dict[str, Any], registry: dict[str, NodeDef], is_cached: Callable[[str], bool]
    ) -> None:
        self.prompt = prompt
        self.registry = registry
        self.is_cached = is_cached
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, dict[Any, bool]]] = {}

    def add_node(self, node_id: str) -> None:
        stack = [node_id]
        links: list[tuple[str, Any, str]] = []
        while stack:
            unique_id = stack.pop()
            if unique_id in self.pending:
                continue
            self.pending[unique_id] = True
            self.block_count[unique_id] = 0
            self.blocking[unique_id] = {}
            for value in self.prompt[unique_id]["inputs"].values():
                if is_link(value):
                    if not self.is_cached(value[0]):
                        stack.append(value[0])
                    links.append((value[0], value[1], unique_id))
        for from_id, socket_index, to_id in links:
            self._add_strong_link(from_id, socket_index, to_id)

    def _add_strong_link(self, from_id: str, socket_index: Any, to_id: str) -> None:
        if self.is_cached(from_id):
            return
        self.add_node(from_id)
        if to_id not in self.blocking[from_id]:
            self.blocking[from_id][to_id] = {}
            self.block_count[to_id] += 1
        self.blocking[from_id][to_id][socket_index] = True

    def is_empty(self) -> bool:
        return not self.pending

    def stage(self) -> str | None:
        ready = [n for n in self.pending if self.block_count[n] == 0]
        return self._pick(ready) if ready else None

    def _is_output(self, node_id: str) -> bool:
        return self.registry[self.prompt[node_id]["class_type"]].output_node

    def _pick(self, ready: list[str]) -> str:
        # real: ux_friendly_pick_node - outputs first, then nodes feeding an output within two hops
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            if any(self._is_output(b2) for b in self.blocking[node_id] for b2 in self.blocking[b]):
                return node_id
        return ready[0]

    def complete(self, node_id: str) -> None:
        del self.pending[node_id]
        for blocked in self.blocking[node_id]:
            self.block_count[blocked] -= 1
        del self.blocking[node_id]


def ordered_ancestry(prompt: dict[str, Any], node_id: str) -> tuple[list[str], dict[str, int]]:
    ancestors: list[str] = []
    order: dict[str, int] = {}

    def visit(current: str) -> None:
        if current not in prompt:
            return
        inputs = prompt[current]["inputs"]
        for key in sorted(inputs):
            value = inputs[key]
            if is_link(value) and value[0] not in order:
                ancestors.append(value[0])
                order[value[0]] = len(ancestors) - 1
                visit(value[0])

    visit(node_id)
    return ancestors, order


def immediate_signature(
    prompt: dict[str, Any], node_id: str, order: dict[str, int], changed: dict[str, Any], with_id: bool
) -> list[Any]:
    if node_id not in prompt:
        return [uuid.uuid4().hex]  # real: NaN, which never matches
    node = prompt[node_id]
    signature: list[Any] = [node["class_type"], changed[node_id]]
    if with_id:
        signature.append(node_id)
    for key in sorted(node["inputs"]):
        value = node["inputs"][key]
        signature.append([key, ["ANCESTOR", order[value[0]], value[1]] if is_link(value) else value])
    return signature


def cache_key(prompt: dict[str, Any], node_id: str, changed: dict[str, Any], with_id: bool) -> str:
    """real: CacheKeySetInputSignature - the node and all its ancestors; node ids only matter with --cache-none."""
    ancestors, order = ordered_ancestry(prompt, node_id)
    parts = [immediate_signature(prompt, n, order, changed, with_id) for n in [node_id, *ancestors]]
    return json.dumps(parts, sort_keys=True, default=repr)


# --------------------------------------------------------------------------------------------------
# Executor (real: execution.PromptExecutor + progress.ProgressRegistry/WebUIProgressHandler)
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    keys: dict[str, str] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    ui_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class NodeFailure:
    node_id: str
    details: dict[str, Any] | None  # None means interrupted


def format_value(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)


class Executor:
    def __init__(self, server: FakeComfy) -> None:
        self.server = server
        self.outputs: dict[str, tuple[Any, ...]] = {}
        self.ui: dict[str, dict[str, Any]] = {}
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.success = True
        self.status_messages: list[tuple[str, dict[str, Any]]] = []
        self.history_result: dict[str, Any] = {"outputs": {}, "meta": {}}

    def reset(self) -> None:
        """real: PromptExecutor.reset() after /free with free_memory - every cached output is forgotten."""
        self.outputs.clear()
        self.ui.clear()
        self.objects.clear()
        self.status_messages = []
        self.success = True

    def add_message(self, event: str, data: dict[str, Any], broadcast: bool) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.status_messages.append((event, data))
        if self.server.client_id is not None or broadcast:
            self.server.send_sync(event, data, self.server.client_id)

    async def execute(self, prompt: dict[str, Any], prompt_id: str, extra: dict[str, Any], outputs: list[str]) -> None:
        srv = self.server
        srv.interrupt_flag = False  # a stale interrupt must not kill this prompt
        srv.client_id = extra.get("client_id")
        self.status_messages = []
        self.success = True
        self.add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)
        run = Run(prompt_id, prompt, extra, self._set_prompt(prompt))
        cached = [n for n in prompt if run.keys[n] in self.outputs]
        self.add_message("execution_cached", {"nodes": cached, "prompt_id": prompt_id}, broadcast=False)
        await self._run_graph(run, outputs)
        self.history_result = {
            "outputs": {n: ui["output"] for n, ui in run.ui_outputs.items()},
            "meta": {n: ui["meta"] for n, ui in run.ui_outputs.items()},
        }
        srv.last_node_id = None

    def _set_prompt(self, prompt: dict[str, Any]) -> dict[str, str]:
        changed = {n: self._is_changed(prompt[n]) for n in prompt}
        with_id = self.server.cfg.cache_none
        keys = {n: cache_key(prompt, n, changed, with_id) for n in prompt}
        used = set(keys.values())
        # real: clean_unused() - only entries the new prompt can use survive ("classic" cache)
        for cache in (self.outputs, self.ui):
            for key in [k for k in cache if k not in used]:
                del cache[key]
        live = {(n, prompt[n]["class_type"]) for n in prompt}
        for obj_key in [k for k in self.objects if k not in live]:
            del self.objects[obj_key]
        return keys

    def _is_changed(self, node: dict[str, Any]) -> Any:
        definition = self.server.registry[node["class_type"]]
        if definition.is_changed is None:
            return False
        if "is_changed" in node:
            return node["is_changed"]
        try:
            return [definition.is_changed(self.server.folders, node["inputs"])]
        except Exception as ex:
            log.warning("WARNING: %s", ex)
            return uuid.uuid4().hex  # real: NaN, never equal to anything

    async def _run_graph(self, run: Run, outputs: list[str]) -> None:
        elist = ExecutionList(run.prompt, self.server.registry, lambda n: run.keys.get(n) in self.outputs)
        for output in outputs:
            elist.add_node(output)
        while not elist.is_empty():
            node_id = elist.stage()
            if node_id is None:  # only a dependency cycle leaves pending nodes with none ready
                blocked = next(iter(elist.pending))
                failure: NodeFailure | None = NodeFailure(blocked, _cycle_details(blocked))
            else:
                failure = await self._execute_node(run, node_id)
            self.success = failure is None
            if failure is not None or node_id is None:
                self._handle_error(run, failure or NodeFailure("", None))
                return
            elist.complete(node_id)
        self.add_message("execution_success", {"prompt_id": run.prompt_id}, broadcast=False)

    async def _execute_node(self, run: Run, node_id: str) -> NodeFailure | None:
        srv = self.server
        class_type = run.prompt[node_id]["class_type"]
        definition = srv.registry[class_type]
        key = run.keys[node_id]
        if key in self.outputs:
            self._send_cached(run, node_id, key)
            return None
        self._progress_start(run, node_id)
        data: dict[str, Any] | None = None
        try:
            data = self._input_data(run, node_id, definition)
            if srv.client_id is not None:
                srv.last_node_id = node_id
                srv.send_sync("executing", {"node": node_id, "display_node": node_id, "prompt_id": run.prompt_id},
                              srv.client_id)
            state = self.objects.setdefault((node_id, class_type), {})
            self.check_interrupt()  # real: before_node_execution()
            if class_type == "KSampler" and srv.oom_left > 0:
                srv.oom_left -= 1
                raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                       "of 79.19 GiB of which 1.06 GiB is free.")
            call = NodeCall(data, node_id, state, srv.env, self._progress_hook(run, node_id), self.check_interrupt,
                            srv.text_sender(node_id))
            result = await definition.run(call)
            self._store_result(run, node_id, key, result)
        except InterruptProcessingError:
            log.info("Processing interrupted")
            return NodeFailure(node_id, None)
        except Exception as ex:
            log.error("!!! Exception during processing !!! %s\n%s", ex, traceback.format_exc())
            return NodeFailure(node_id, _error_details(node_id, ex, data))
        self._progress_finish(run, node_id)
        run.executed.append(node_id)
        return None

    def _store_result(self, run: Run, node_id: str, key: str, result: NodeOutput) -> None:
        if result.ui:
            meta = {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}
            run.ui_outputs[node_id] = self.ui[key] = {"meta": meta, "output": result.ui}
            if self.server.client_id is not None:
                self.server.send_sync("executed", {
                    "node": node_id, "display_node": node_id, "output": result.ui, "prompt_id": run.prompt_id,
                }, self.server.client_id)
        self.outputs[key] = result.result

    def _send_cached(self, run: Run, node_id: str, key: str) -> None:
        cached_ui = self.ui.get(key) or {}
        if self.server.client_id is not None:
            self.server.send_sync("executed", {
                "node": node_id, "display_node": node_id, "output": cached_ui.get("output"),
                "prompt_id": run.prompt_id,
            }, self.server.client_id)
        if cached_ui:
            run.ui_outputs[node_id] = cached_ui
        self._progress_finish(run, node_id)

    def _input_data(self, run: Run, node_id: str, definition: NodeDef) -> dict[str, Any]:
        # real: execution.get_input_data (links resolve to the upstream output, hidden inputs are injected)
        class_inputs = definition.inputs(self.server.folders)
        data: dict[str, Any] = {}
        for name, value in run.prompt[node_id]["inputs"].items():
            if is_link(value):
                upstream = self.outputs.get(run.keys.get(value[0], ""))
                index = int(value[1])
                data[name] = upstream[index] if upstream is not None and index < len(upstream) else None
            elif get_input_info(class_inputs, name)[1] is not None:
                data[name] = value
        hidden = {"PROMPT": run.prompt, "EXTRA_PNGINFO": run.extra_data.get("extra_pnginfo"), "UNIQUE_ID": node_id}
        for name, kind in class_inputs.get("hidden", {}).items():
            data[name] = hidden.get(kind)
        return data

    def check_interrupt(self) -> None:
        # real: throw_exception_if_processing_interrupted() - the flag is consumed when it fires
        if self.server.interrupt_flag:
            self.server.interrupt_flag = False
            raise InterruptProcessingError()

    def _progress_hook(self, run: Run, node_id: str) -> Callable[[int, int, Preview | None], None]:
        def hook(value: int, total: int, preview: Preview | None) -> None:
            # real: main.hijack_progress hook + WebUIProgressHandler.update_handler, in that frame order
            self.check_interrupt()
            self._progress_set(run, node_id, "running", value, total)
            srv = self.server
            new_style = srv.supports_preview_metadata(srv.client_id)
            if preview is not None and new_style:
                srv.send_preview_with_metadata(preview, run.prompt_id, node_id)
            progress = {"value": value, "max": total, "prompt_id": run.prompt_id, "node": node_id}
            srv.send_sync("progress", progress, srv.client_id)
            if preview is not None and not new_style:
                srv.send_preview_legacy(preview)

        return hook

    def _progress_start(self, run: Run, node_id: str) -> None:
        self._progress_set(run, node_id, "running", 0.0, 1.0)

    def _progress_finish(self, run: Run, node_id: str) -> None:
        entry = run.progress.get(node_id, {"max": 1})
        self._progress_set(run, node_id, "finished", entry["max"], entry["max"])

    def _progress_set(self, run: Run, node_id: str, state: str, value: float, total: float) -> None:
        run.progress[node_id] = {"value": value, "max": total, "state": state}
        nodes = {
            n: {**entry, "node_id": n, "prompt_id": run.prompt_id, "display_node_id": n, "parent_node_id": None,
                "real_node_id": n}
            for n, entry in run.progress.items()
        }
        self.server.send_sync("progress_state", {"prompt_id": run.prompt_id, "nodes": nodes}, self.server.client_id)

    def _handle_error(self, run: Run, failure: NodeFailure) -> None:
        message: dict[str, Any] = {
            "prompt_id": run.prompt_id,
            "node_id": failure.node_id,
            "node_type": run.prompt[failure.node_id]["class_type"],
            "executed": list(run.executed),
        }
        if failure.details is None:
            self.add_message("execution_interrupted", message, broadcast=True)
            return
        for name in ("exception_message", "exception_type", "traceback", "current_inputs"):
            message[name] = failure.details[name]
        message["current_outputs"] = list(run.prompt)[::-1]  # real: a set of all node ids in the prompt
        self.add_message("execution_error", message, broadcast=False)


def _error_details(node_id: str, ex: Exception, data: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "exception_message": f"{ex}\n",
        "exception_type": full_type_name(type(ex)),
        "traceback": traceback.format_tb(ex.__traceback__),
        "current_inputs": {k: [format_value(v)] for k, v in (data or {}).items()},
    }


def _cycle_details(node_id: str) -> dict[str, Any]:
    return {"node_id": node_id, "exception_message": "Dependency cycle detected",
            "exception_type": "graph.DependencyCycleError", "traceback": [], "current_inputs": []}


# --------------------------------------------------------------------------------------------------
# Server state: queue, history, sockets (real: server.PromptServer + execution.PromptQueue + main.prompt_worker)
# --------------------------------------------------------------------------------------------------


@dataclass(order=True)
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any] = field(compare=False)
    extra_data: dict[str, Any] = field(compare=False)
    outputs: list[str] = field(compare=False)
    sensitive: dict[str, Any] = field(compare=False, default_factory=dict)

    def public(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class Config:
    port: int
    listen: str
    output_dir: str
    input_dir: str
    temp_dir: str
    models_dir: str
    extra_model_paths: list[str]
    seconds_per_step: float
    startup_delay: float
    exec_log: str | None
    preview_method: str
    preview_size: int
    max_upload_size: int
    cors_origin: str | None
    disable_metadata: bool
    custom_nodes: bool
    cache_none: bool
    argv: list[str]
    temp_root_owned: bool = False  # no --temp-dir: we made a private root and remove all of it at exit


@dataclass
class Stats:
    executed: list[str] = field(default_factory=list)
    free_calls: list[Any] = field(default_factory=list)
    interrupts: int = 0
    prompts_posted: int = 0
    interrupt_log: list[tuple[float, str | None, bool]] = field(default_factory=list)  # (time, prompt_id, honoured)


def _memory() -> tuple[int, int]:
    """(total, available) bytes, like psutil.virtual_memory() which the real server uses."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if len(line.split()) >= 2}
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return total, total


def encode_preview(preview: Preview) -> bytes:
    kind, image, max_size = preview
    if max_size is not None:
        image = ImageOps.contain(image, (max_size, max_size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format=kind, quality=95, compress_level=1)
    return buffer.getvalue()


class FakeComfy:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.folders = FolderPaths(cfg.output_dir, cfg.input_dir, cfg.temp_dir, cfg.models_dir)
        for path in cfg.extra_model_paths:
            load_extra_model_paths(self.folders, path)
        for name in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
            self.folders.add_model_folder(name, os.path.join(cfg.output_dir, name))
        self.registry = build_registry(cfg.custom_nodes)
        self.env = ExecEnv(self.folders, cfg.seconds_per_step, cfg.preview_method, cfg.preview_size,
                           cfg.disable_metadata)
        self.executor = Executor(self)
        self.queue: list[QueueItem] = []
        self.running: dict[int, QueueItem] = {}
        self.task_counter = 0
        self.history: dict[str, dict[str, Any]] = {}
        self.number = 0
        self.flags: dict[str, Any] = {}
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.sockets_metadata: dict[str, dict[str, Any]] = {}
        self.all_sockets: set[web.WebSocketResponse] = set()
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.interrupt_flag = False
        self.stats = Stats()
        self.vram: dict[str, int] | None = None
        self.oom_left = 0  # POST /fake/oom: this many KSampler runs fail with torch.OutOfMemoryError
        self.messages: asyncio.Queue[tuple[str | int, Any, str | None]] = asyncio.Queue()
        self.wakeup = asyncio.Event()

    # ---- messages ------------------------------------------------------------------------------

    def send_sync(self, event: str | int, data: Any, sid: str | None = None) -> None:
        """Queue a frame; one publisher task sends them in order (real: send_sync + publish_loop)."""
        self.messages.put_nowait((event, data, sid))

    async def publish_loop(self) -> None:
        while True:
            event, data, sid = await self.messages.get()
            await self.send(event, data, sid)

    async def send(self, event: str | int, data: Any, sid: str | None) -> None:
        targets = list(self.sockets.values()) if sid is None else [self.sockets[sid]] if sid in self.sockets else []
        for ws in targets:
            try:
                if isinstance(event, int):
                    await ws.send_bytes(struct.pack(">I", event) + data)
                else:
                    await ws.send_json({"type": event, "data": data})
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as err:
                log.warning("send error: %s", err)

    def supports_preview_metadata(self, sid: str | None) -> bool:
        if sid not in self.sockets_metadata:
            return False
        return self.sockets_metadata[sid].get("feature_flags", {}).get("supports_preview_metadata", False) is True

    def text_sender(self, node_id: str) -> Callable[[str], None]:
        def send(text: str) -> None:
            # real: server.send_progress_text - to every socket (sid None), node id length-prefixed
            blob = node_id.encode("utf-8")
            self.send_sync(BIN_TEXT, struct.pack(">I", len(blob)) + blob + text.encode("utf-8"), None)

        return send

    def send_preview_legacy(self, preview: Preview) -> None:
        image_type = 1 if preview[0] == "JPEG" else 2
        self.send_sync(BIN_PREVIEW_IMAGE, struct.pack(">I", image_type) + encode_preview(preview), self.client_id)

    def send_preview_with_metadata(self, preview: Preview, prompt_id: str, node_id: str) -> None:
        metadata = {"node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id, "parent_node_id": None,
                    "real_node_id": node_id, "image_type": "image/png" if preview[0] == "PNG" else "image/jpeg"}
        blob = json.dumps(metadata).encode("utf-8")
        payload = struct.pack(">I", len(blob)) + blob + encode_preview(preview)
        self.send_sync(BIN_PREVIEW_IMAGE_WITH_METADATA, payload, self.client_id)

    def server_features(self) -> dict[str, Any]:
        return {"supports_preview_metadata": True, "max_upload_size": self.cfg.max_upload_size}

    # ---- queue ---------------------------------------------------------------------------------

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": len(self.queue) + len(self.running)}}

    def queue_updated(self) -> None:
        self.send_sync("status", {"status": self.queue_info()})

    def put(self, item: QueueItem) -> None:
        heapq.heappush(self.queue, item)
        self.queue_updated()
        self.wakeup.set()

    def wipe_queue(self) -> None:
        self.queue = []
        self.queue_updated()

    def delete_queue_item(self, prompt_id: Any) -> None:
        for index, item in enumerate(self.queue):
            if item.prompt_id == prompt_id:
                if len(self.queue) == 1:
                    self.wipe_queue()  # real quirk: this path broadcasts status twice
                else:
                    self.queue.pop(index)
                    heapq.heapify(self.queue)
                self.queue_updated()
                return

    def set_flag(self, name: str, value: Any) -> None:
        self.flags[name] = value
        self.wakeup.set()

    def get_history(self, max_items: int | None, offset: int) -> dict[str, Any]:
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        out: dict[str, Any] = {}
        for index, key in enumerate(self.history):
            if index >= offset:
                out[key] = self.history[key]
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    # ---- worker --------------------------------------------------------------------------------

    async def worker(self) -> None:
        """One prompt at a time, lowest number first; flags from /free are handled between prompts."""
        while True:
            while not self.queue and not self.flags:
                self.wakeup.clear()
                await self.wakeup.wait()
            if self.queue:
                await self._run_next()
            self._apply_flags()

    async def _run_next(self) -> None:
        item = heapq.heappop(self.queue)
        item_id = self.task_counter
        self.running[item_id] = copy.deepcopy(item)  # history and /queue show the prompt as it was queued
        self.task_counter += 1
        self.queue_updated()
        started = time.perf_counter()
        self.last_prompt_id = item.prompt_id
        self._record_start(item.prompt_id)
        extra = {**item.extra_data, **item.sensitive}
        try:
            await self.executor.execute(item.prompt, item.prompt_id, extra, item.outputs)
        except Exception:  # a bug in the double must not wedge its queue: the prompt just ends as an error
            log.exception("fake_comfyui: executor failed")
            self.executor.success = False
            self.executor.history_result = {"outputs": {}, "meta": {}}
        self._task_done(item_id)
        if self.client_id is not None:
            self.send_sync("executing", {"node": None, "prompt_id": item.prompt_id}, self.client_id)
        log.info("Prompt executed in %.2f seconds", time.perf_counter() - started)

    def _record_start(self, prompt_id: str) -> None:
        self.stats.executed.append(prompt_id)
        if self.cfg.exec_log:
            fd = os.open(self.cfg.exec_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (prompt_id + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def _task_done(self, item_id: int) -> None:
        item = self.running.pop(item_id)
        if len(self.history) > MAX_HISTORY:
            self.history.pop(next(iter(self.history)))
        status = {
            "status_str": "success" if self.executor.success else "error",
            "completed": self.executor.success,
            "messages": [list(m) for m in self.executor.status_messages],
        }
        self.history[item.prompt_id] = {"prompt": item.public(), "outputs": {}, "status": status}
        self.history[item.prompt_id].update(copy.deepcopy(self.executor.history_result))
        self.queue_updated()

    def _apply_flags(self) -> None:
        flags, self.flags = self.flags, {}
        free_memory = flags.get("free_memory", False)
        if flags.get("unload_models", free_memory):
            log.info("Unloading all models")
        if free_memory:
            self.executor.reset()


# --------------------------------------------------------------------------------------------------
# HTTP and WebSocket routes (real: server.py, app/model_manager.py)
# --------------------------------------------------------------------------------------------------


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    loopback = False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            for *_, sockaddr in socket.getaddrinfo(host, None, family, socket.SOCK_STREAM):
                if not ipaddress.ip_address(sockaddr[0]).is_loopback:
                    return loopback
                loopback = True
        except socket.gaierror:
            pass
    return loopback


def origin_mismatch(host: str, origin: str) -> bool:
    # real: create_origin_only_middleware - blocks browsers on other sites from driving a loopback server
    host_domain: str | None = host.lower()
    parsed = urllib.parse.urlparse(origin)
    origin_domain: str | None = parsed.netloc.lower()
    host_parsed = urllib.parse.urlsplit("//" + (host_domain or ""))
    loopback = is_loopback(host_parsed.hostname)
    if parsed.port is None:
        host_domain = host_parsed.hostname
    if host_parsed.port is None:
        origin_domain = parsed.hostname
    return bool(loopback and host_domain and origin_domain and host_domain != origin_domain)


def make_middlewares(cors_origin: str | None) -> list[Any]:
    @web.middleware
    async def origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        if "Host" in headers and "Origin" in headers and origin_mismatch(headers["Host"], headers["Origin"]):
            log.warning("WARNING: request with non matching host and origin, returning 403")
            return web.Response(status=403)
        return web.Response() if request.method == "OPTIONS" else await handler(request)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = web.Response() if request.method == "OPTIONS" else await handler(request)
        response.headers["Access-Control-Allow-Origin"] = cors_origin or "*"
        response.headers["Access-Control-Allow-Methods"] = "POST, GET, DELETE, PUT, OPTIONS, PATCH"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
        response.headers["Access-Control-Allow-Credentials"] = "true"
        return response

    return [cors] if cors_origin else [origin_only]


def _query_int(request: web.Request, name: str) -> int | None:
    value = request.rel_url.query.get(name)
    return None if value is None else int(value)


class Routes:
    """Route handlers; each mirrors the real handler of the same path."""

    def __init__(self, server: FakeComfy) -> None:
        self.s = server

    def table(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/", self.index), ("GET", "/ws", self.websocket), ("GET", "/embeddings", self.embeddings),
            ("GET", "/models", self.models), ("GET", "/models/{folder}", self.models_folder),
            ("GET", "/extensions", self.extensions), ("POST", "/upload/image", self.upload_image),
            ("GET", "/view", self.view), ("GET", "/view_metadata/{folder_name}", self.view_metadata),
            ("GET", "/system_stats", self.system_stats), ("GET", "/features", self.features),
            ("GET", "/prompt", self.get_prompt), ("GET", "/object_info", self.object_info),
            ("GET", "/object_info/{node_class}", self.object_info_node), ("GET", "/history", self.get_history),
            ("GET", "/history/{prompt_id}", self.get_history_id), ("GET", "/queue", self.get_queue),
            ("POST", "/prompt", self.post_prompt), ("POST", "/queue", self.post_queue),
            ("POST", "/interrupt", self.post_interrupt), ("POST", "/free", self.post_free),
            ("POST", "/history", self.post_history), ("GET", "/experiment/models", self.experiment_models),
            ("GET", "/experiment/models/{folder}", self.experiment_models_folder),
        ]

    def fake_table(self) -> list[tuple[str, str, Handler]]:
        return [("GET", "/fake/stats", self.fake_stats), ("POST", "/fake/vram", self.fake_vram),
                ("POST", "/fake/oom", self.fake_oom)]

    # ---- websocket -----------------------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        s = self.s
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            s.sockets.pop(sid, None)  # real: the old socket is dropped from routing but not closed
        else:
            sid = uuid.uuid4().hex
        s.sockets[sid] = ws
        s.sockets_metadata[sid] = {"feature_flags": {}}
        s.all_sockets.add(ws)
        try:
            await s.send("status", {"status": s.queue_info(), "sid": sid}, sid)
            if s.client_id == sid and s.last_node_id is not None:
                await s.send("executing", {"node": s.last_node_id}, sid)
            await self._read_client_frames(ws, sid)
        finally:
            # real quirk kept: a replaced socket closing later also unregisters its replacement
            s.sockets.pop(sid, None)
            s.sockets_metadata.pop(sid, None)
            s.all_sockets.discard(ws)
        return ws

    async def _read_client_frames(self, ws: web.WebSocketResponse, sid: str) -> None:
        first_message = True
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                log.warning("ws connection closed with exception %s", ws.exception())
            elif msg.type == WSMsgType.TEXT:
                try:
                    data = json.loads(msg.data)
                    if first_message and data.get("type") == "feature_flags":
                        self.s.sockets_metadata[sid]["feature_flags"] = data.get("data", {})
                        await self.s.send("feature_flags", self.s.server_features(), sid)
                    first_message = False
                except json.JSONDecodeError:
                    log.warning("Invalid JSON received from client %s: %s", sid, msg.data)
                except Exception as ex:
                    log.error("Error processing WebSocket message: %s", ex)

    # ---- prompt and queue ----------------------------------------------------------------------

    async def post_prompt(self, request: web.Request) -> web.StreamResponse:
        s = self.s
        s.stats.prompts_posted += 1
        log.info("got prompt")
        json_data = await request.json()
        number = self._prompt_number(json_data)
        if "prompt" not in json_data:
            error = _err("no_prompt", "No prompt provided", "No prompt provided", {})
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = json_data["prompt"]
        prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        partial = json_data.get("partial_execution_targets")
        valid = Validator(s.registry, s.folders, prompt).run(partial)
        extra_data = json_data.get("extra_data", {})
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        if not valid.ok:
            log.warning("invalid prompt: %s", valid.error)
            return web.json_response({"error": valid.error, "node_errors": valid.node_errors}, status=400)
        sensitive = {k: extra_data.pop(k) for k in SENSITIVE_EXTRA_DATA_KEYS if k in extra_data}
        s.put(QueueItem(number, prompt_id, prompt, extra_data, valid.outputs, sensitive))
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": valid.node_errors})

    def _prompt_number(self, json_data: Any) -> float:
        # The counter only moves when the client gives no number (observed: 28, 29, -30, -100.0, 31).
        if "number" in json_data:
            return float(json_data["number"])
        number = self.s.number
        if "front" in json_data and json_data["front"]:
            number = -number
        self.s.number += 1
        return number

    async def get_prompt(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.s.queue_info())

    async def get_queue(self, request: web.Request) -> web.StreamResponse:
        running = [item.public() for item in self.s.running.values()]
        pending = [item.public() for item in self.s.queue]  # heap order, like the real server
        return web.json_response(copy.deepcopy({"queue_running": running, "queue_pending": pending}))

    async def post_queue(self, request: web.Request) -> web.StreamResponse:
        json_data = await request.json()
        if "clear" in json_data and json_data["clear"]:
            self.s.wipe_queue()
        if "delete" in json_data:
            for prompt_id in json_data["delete"]:
                self.s.delete_queue_item(prompt_id)
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.StreamResponse:
        s = self.s
        s.stats.interrupts += 1
        try:
            json_data = await request.json()
        except json.JSONDecodeError:
            json_data = {}
        prompt_id = json_data.get("prompt_id")
        arrived = time.time()
        honoured = not prompt_id or any(item.prompt_id == prompt_id for item in s.running.values())
        if not prompt_id:
            log.info("Global interrupt (no prompt_id specified)")
            s.interrupt_flag = True
        elif any(item.prompt_id == prompt_id for item in s.running.values()):
            log.info("Interrupting prompt %s", prompt_id)
            s.interrupt_flag = True
        else:
            log.info("Prompt %s is not currently running, skipping interrupt", prompt_id)
        s.stats.interrupt_log.append((arrived, prompt_id, honoured))
        return web.Response(status=200)

    async def post_free(self, request: web.Request) -> web.StreamResponse:
        json_data = await request.json()
        self.s.stats.free_calls.append(json_data)
        unload_models = json_data.get("unload_models", False)
        free_memory = json_data.get("free_memory", False)
        if unload_models:
            self.s.set_flag("unload_models", unload_models)
        if free_memory:
            self.s.set_flag("free_memory", free_memory)
        return web.Response(status=200)

    # ---- history -------------------------------------------------------------------------------

    async def get_history(self, request: web.Request) -> web.StreamResponse:
        offset = _query_int(request, "offset")
        history = self.s.get_history(_query_int(request, "max_items"), -1 if offset is None else offset)
        return web.json_response(copy.deepcopy(history))

    async def get_history_id(self, request: web.Request) -> web.StreamResponse:
        prompt_id = request.match_info["prompt_id"]
        entry = self.s.history.get(prompt_id)
        return web.json_response({} if entry is None else {prompt_id: copy.deepcopy(entry)})

    async def post_history(self, request: web.Request) -> web.StreamResponse:
        json_data = await request.json()
        if "clear" in json_data and json_data["clear"]:
            self.s.history.clear()
        if "delete" in json_data:
            for prompt_id in json_data["delete"]:
                self.s.history.pop(prompt_id, None)
        return web.Response(status=200)

    # ---- files ---------------------------------------------------------------------------------

    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        filename, base = self.s.folders.annotated(query["filename"])
        if not filename or filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        base = base or self.s.folders.directory_by_type(query.get("type", "output"))
        if base is None:
            return web.Response(status=400)
        if "subfolder" in query:
            full = os.path.join(base, query["subfolder"])
            if os.path.commonpath((os.path.abspath(full), base)) != base:
                return web.Response(status=403)
            base = full
        filename = os.path.basename(filename)
        path = os.path.join(base, filename)
        if not os.path.isfile(path):
            return web.Response(status=404)
        return _serve_view(path, filename, query.get("preview"), query.get("channel"))

    async def upload_image(self, request: web.Request) -> web.StreamResponse:
        post = await request.post()
        raw_type = post.get("type")
        upload_type = "input" if raw_type is None else str(raw_type)
        upload_dir = self.s.folders.directory_by_type(upload_type)
        if upload_dir is None:
            raise UnboundLocalError("cannot access local variable 'type_dir'")  # real: 500 for a bad type
        image = post.get("image")
        if not isinstance(image, web.FileField):
            if image:
                raise AttributeError("'str' object has no attribute 'file'")  # real: 500 for a non-file field
            return web.Response(status=400)
        if not image.filename:
            return web.Response(status=400)
        subfolder = str(post.get("subfolder", ""))
        overwrite = post.get("overwrite") in ("true", "1")
        name = _store_upload(upload_dir, subfolder, image.filename, image.file.read(), overwrite)
        if name is None:
            return web.Response(status=400)
        return web.json_response({"name": name, "subfolder": subfolder, "type": upload_type})

    async def view_metadata(self, request: web.Request) -> web.StreamResponse:
        filename = request.rel_url.query.get("filename", "")
        path = self.s.folders.full_path(request.match_info["folder_name"], filename)
        if not filename.endswith(".safetensors") or path is None:
            return web.Response(status=404)
        metadata = _safetensors_metadata(path)
        return web.Response(status=404) if metadata is None else web.json_response(metadata)

    # ---- models --------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(list(self.s.folders.table))

    async def models_folder(self, request: web.Request) -> web.StreamResponse:
        folder = request.match_info["folder"]
        if folder not in self.s.folders.table:
            return web.Response(status=404)
        return web.json_response(self.s.folders.filename_list(folder))

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        names = self.s.folders.filename_list("embeddings")
        return web.json_response([os.path.splitext(n)[0] for n in names])

    async def experiment_models(self, request: web.Request) -> web.StreamResponse:
        folders = self.s.folders
        skip = ("configs", "custom_nodes")
        return web.json_response([{"name": name, "folders": folders.folder_paths(name)}
                                  for name in folders.table if name not in skip])

    async def experiment_models_folder(self, request: web.Request) -> web.StreamResponse:
        folder = request.match_info["folder"]
        if folder not in self.s.folders.table:
            return web.Response(status=404)
        return web.json_response(_model_file_list(self.s.folders.folder_paths(folder)))

    async def object_info(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({name: node_info(node, self.s.folders) for name, node in self.s.registry.items()})

    async def object_info_node(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["node_class"]
        node = self.s.registry.get(name)
        return web.json_response({} if node is None else {name: node_info(node, self.s.folders)})

    # ---- misc ----------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="<!doctype html><title>ComfyUI</title>", content_type="text/html")

    async def extensions(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([])

    async def features(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.s.server_features())

    async def system_stats(self, request: web.Request) -> web.StreamResponse:
        ram_total, ram_free = _memory()
        system = {
            "os": os.name, "ram_total": ram_total, "ram_free": ram_free, "comfyui_version": COMFYUI_VERSION,
            "required_frontend_version": "1.27.10", "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95", "python_version": sys.version,
            "pytorch_version": "2.13.0+cpu", "embedded_python": False, "argv": self.s.cfg.argv,
        }
        return web.json_response({"system": system, "devices": [self._device(ram_total, ram_free)]})

    def _device(self, ram_total: int, ram_free: int) -> dict[str, Any]:
        vram = self.s.vram
        if vram is None:  # on CPU the real server reports system RAM as "vram"
            return {"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total, "vram_free": ram_free,
                    "torch_vram_total": ram_total, "torch_vram_free": ram_free}
        return {"name": "cuda:0 NVIDIA Fake : cudaMallocAsync", "type": "cuda", "index": 0, **vram}

    # ---- test hooks (not in the real server) ---------------------------------------------------

    async def fake_stats(self, request: web.Request) -> web.StreamResponse:
        st = self.s.stats
        return web.json_response({"executed": st.executed, "free_calls": st.free_calls,
                                  "interrupts": st.interrupts, "prompts_posted": st.prompts_posted,
                                  "interrupt_log": st.interrupt_log})

    async def fake_vram(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        keys = ("vram_total", "vram_free")
        if not isinstance(body, dict) or not all(isinstance(body.get(k), int) for k in keys):
            return web.json_response({"error": "need integer vram_total and vram_free"}, status=400)
        self.s.vram = {
            "vram_total": body["vram_total"], "vram_free": body["vram_free"],
            "torch_vram_total": int(body.get("torch_vram_total", 0)),
            "torch_vram_free": int(body.get("torch_vram_free", 0)),
        }
        return web.json_response(self._device(0, 0))


    async def fake_oom(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("times"), int) or body["times"] < 0:
            return web.json_response({"error": "need a non-negative integer times"}, status=400)
        self.s.oom_left = body["times"]
        return web.json_response({"times": self.s.oom_left})


def _serve_view(path: str, filename: str, preview: str | None, channel: str | None) -> web.StreamResponse:
    # real: GET /view (preview re-encodes, channel=rgb drops alpha, channel=a returns the alpha as PNG)
    disposition = {"Content-Disposition": f'filename="{filename}"'}
    if preview is not None:
        return _view_preview(path, preview, channel, disposition)
    if channel in ("rgb", "a"):
        with Image.open(path) as img:
            if channel == "rgb":
                out = img.convert("RGB")
            else:
                out = Image.new("RGBA", img.size)
                out.putalpha(img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255))
            return web.Response(body=_png_bytes(out), content_type="image/png", headers=disposition)
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}:
        content_type = "application/octet-stream"
    return web.FileResponse(path, headers={**disposition, "Content-Type": content_type})


def _view_preview(path: str, preview: str, channel: str | None, disposition: dict[str, str]) -> web.Response:
    parts = preview.split(";")
    image_format = parts[0] if parts[0] in ("webp", "jpeg") and "a" not in (channel or "") else "webp"
    quality = int(parts[-1]) if parts[-1].isdigit() else 90
    with Image.open(path) as img:
        out = img.convert("RGB") if image_format == "jpeg" or channel == "rgb" else img
        buffer = io.BytesIO()
        out.save(buffer, format=image_format, quality=quality)
    return web.Response(body=buffer.getvalue(), content_type=f"image/{image_format}", headers=disposition)


def _png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _store_upload(upload_dir: str, subfolder: str, filename: str, content: bytes, overwrite: bool) -> str | None:
    """real: image_upload - returns the stored name, or None when the path escapes the folder."""
    folder = os.path.join(upload_dir, os.path.normpath(subfolder))
    filepath = os.path.abspath(os.path.join(folder, filename))
    if os.path.commonpath((upload_dir, filepath)) != upload_dir:
        return None
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(filename)
    counter = 1
    while not overwrite and os.path.exists(filepath):
        with open(filepath, "rb") as f:
            if hashlib.sha256(f.read()).digest() == hashlib.sha256(content).digest():
                return filename  # same content under the same name: nothing is written
        filename = f"{stem} ({counter}){ext}"
        filepath = os.path.join(folder, filename)
        counter += 1
    with open(filepath, "wb") as f:
        f.write(content)
    return filename


def _safetensors_metadata(path: str) -> Any:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            return None
        length = struct.unpack("<Q", head)[0]
        if length > 1024 * 1024:
            return None
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return None
    return header.get("__metadata__") if isinstance(header, dict) else None


def _model_file_list(paths: list[str]) -> list[dict[str, Any]]:
    # real: ModelFileManager.get_model_file_list (pathIndex = position in the folder's search paths)
    out: list[dict[str, Any]] = []
    for index, folder in enumerate(paths):
        for rel, full in sorted(walk_files(folder, hidden=False)):
            if has_extension(rel, MODEL_EXTENSIONS):
                stat = os.stat(full)
                out.append({"name": rel, "pathIndex": index, "modified": stat.st_mtime,
                            "created": stat.st_ctime, "size": stat.st_size})
    return out


# --------------------------------------------------------------------------------------------------
# Command line and process lifecycle
# --------------------------------------------------------------------------------------------------


def _existing_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"Invalid directory path: {path}")
    return path


def _add_accepted_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the real main.py that the double accepts; most of them change nothing here."""
    for flag in ("--disable-auto-launch", "--auto-launch", "--log-stdout", "--dont-print-server",
                 "--quick-test-for-ci", "--disable-smart-memory", "--deterministic", "--force-fp32", "--fp32-vae",
                 "--multi-user", "--disable-api-nodes", "--disable-xformers", "--windows-standalone-build"):
        parser.add_argument(flag, action="store_true")
    vram = parser.add_mutually_exclusive_group()
    for flag in ("--cpu", "--gpu-only", "--highvram", "--normalvram", "--lowvram", "--novram"):
        vram.add_argument(flag, action="store_true")
    for flag in ("--database-url", "--reserve-vram", "--front-end-root", "--front-end-version", "--tls-keyfile",
                 "--tls-certfile", "--cuda-device", "--default-device"):
        parser.add_argument(flag)
    parser.add_argument("--user-directory", type=_existing_dir)
    parser.add_argument("--whitelist-custom-nodes", nargs="*", default=[])
    parser.add_argument("--fast", nargs="*")
    parser.add_argument("--verbose", nargs="?", const="DEBUG", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fake_comfyui", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--listen", nargs="?", const="0.0.0.0,::", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--output-dir", "--output-directory", dest="output_dir", required=True)
    p.add_argument("--input-dir", "--input-directory", dest="input_dir", required=True)
    p.add_argument("--temp-dir", "--temp-directory", dest="temp_dir", help="the temp files go to <dir>/temp")
    p.add_argument("--models-dir", dest="models_dir", help="holds checkpoints/, loras/, ... (default <base>/models)")
    p.add_argument("--base-directory", dest="base_directory")
    p.add_argument("--extra-model-paths-config", nargs="+", action="append", default=[])
    p.add_argument("--seconds-per-step", type=float, default=0.0)
    p.add_argument("--startup-delay", type=float, default=float(os.environ.get(STARTUP_DELAY_ENV, "0") or 0))
    p.add_argument("--exec-log")
    p.add_argument("--preview-method", default="none", choices=["none", "auto", "latent2rgb", "taesd"])
    p.add_argument("--preview-size", type=int, default=512)
    p.add_argument("--max-upload-size", type=float, default=100)
    p.add_argument("--enable-cors-header", nargs="?", const="*", default=None)
    p.add_argument("--disable-metadata", action="store_true")
    p.add_argument("--disable-all-custom-nodes", action="store_true")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache-classic", action="store_true")
    cache.add_argument("--cache-lru", type=int, default=0)
    cache.add_argument("--cache-none", action="store_true")
    _add_accepted_flags(p)
    return p


def config_from_args(args: argparse.Namespace, argv: list[str]) -> Config:
    base = os.path.abspath(args.base_directory or os.getcwd())
    temp_root = args.temp_dir or tempfile.mkdtemp(prefix="fake_comfyui_")
    return Config(
        port=args.port, listen=args.listen,
        output_dir=os.path.abspath(args.output_dir), input_dir=os.path.abspath(args.input_dir),
        temp_dir=os.path.join(os.path.abspath(temp_root), "temp"),
        models_dir=os.path.abspath(args.models_dir or os.path.join(base, "models")),
        extra_model_paths=[p for group in args.extra_model_paths_config for p in group],
        seconds_per_step=args.seconds_per_step, startup_delay=args.startup_delay, exec_log=args.exec_log,
        preview_method=args.preview_method, preview_size=args.preview_size,
        max_upload_size=round(args.max_upload_size * 1024 * 1024), cors_origin=args.enable_cors_header,
        disable_metadata=args.disable_metadata, custom_nodes=not args.disable_all_custom_nodes,
        cache_none=args.cache_none, argv=["main.py", *argv], temp_root_owned=args.temp_dir is None,
    )


def make_app(server: FakeComfy) -> web.Application:
    routes = Routes(server)
    app = web.Application(client_max_size=server.cfg.max_upload_size,
                          middlewares=make_middlewares(server.cfg.cors_origin))
    for prefix in ("/api", ""):
        for method, path, handler in routes.table():
            app.router.add_route(method, prefix + path, handler)
    for method, path, handler in routes.fake_table():
        app.router.add_route(method, path, handler)

    async def close_sockets(_app: web.Application) -> None:
        for ws in list(server.all_sockets):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"Server shutdown")

    app.on_shutdown.append(close_sockets)
    return app


def _log_banner(cfg: Config) -> None:
    ram_total, _ = _memory()
    log.info("Total VRAM %d MB, total RAM %d MB", ram_total // 2**20, ram_total // 2**20)
    log.info("pytorch version: 2.13.0+cpu")
    log.info("Device: cpu")
    log.info("Python version: %s", sys.version)
    log.info("ComfyUI version: %s (test double)", COMFYUI_VERSION)
    log.info("Setting output directory to: %s", cfg.output_dir)
    log.info("Setting input directory to: %s", cfg.input_dir)
    log.info("Setting temp directory to: %s", cfg.temp_dir)


async def _start_sites(runner: web.AppRunner, cfg: Config) -> None:
    for address in cfg.listen.split(","):
        site = web.TCPSite(runner, address, cfg.port)
        await site.start()
        port = runner.addresses[-1][1] if cfg.port == 0 else cfg.port
        shown = f"[{address}]" if ":" in address else address
        log.info("Starting server\n")
        log.info("To see the GUI go to: http://%s:%s", shown, port)


async def serve(cfg: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _log_banner(cfg)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=cfg.startup_delay)  # mimic the slow start of the real server
    if stop.is_set():
        return
    for directory in (cfg.output_dir, cfg.input_dir):
        os.makedirs(directory, exist_ok=True)
    shutil.rmtree(cfg.temp_dir, ignore_errors=True)  # real: cleanup_temp() at start and exit
    server = FakeComfy(cfg)
    runner = web.AppRunner(make_app(server), access_log=None)
    await runner.setup()
    tasks = [asyncio.create_task(server.worker()), asyncio.create_task(server.publish_loop())]
    try:
        await _start_sites(runner, cfg)
        await stop.wait()
        log.info("Stopped server")
    finally:
        for task in tasks:
            task.cancel()
        await runner.cleanup()
        shutil.rmtree(os.path.dirname(cfg.temp_dir) if cfg.temp_root_owned else cfg.temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=args.verbose, format="%(message)s", force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    asyncio.run(serve(config_from_args(args, argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
