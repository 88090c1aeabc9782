"""Folders and model files (real: folder_paths.py).

Input/output/temp directories, the model search paths (and extra_model_paths.yaml), annotated names such as
"x.png [output]", the file lists the loaders offer, the save paths of output nodes, the check that a model file is a
readable safetensors file, and the loaders' VALIDATE_INPUTS (annotated_file_check).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mimetypes
import os
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import yaml

log = logging.getLogger("comfyui")

MODEL_EXTENSIONS: frozenset[str] = frozenset(
    {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
)

LEGACY_FOLDER_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}

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


class SafetensorError(Exception):
    """Same name and module as the real safetensors error, so exception_type reads the same."""


SafetensorError.__module__ = "safetensors_rust"


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


def list_input_images(folders: FolderPaths) -> list[str]:
    names = [f for f in os.listdir(folders.input_dir) if os.path.isfile(os.path.join(folders.input_dir, f))]
    return sorted(f for f in names if (mimetypes.guess_type(f)[0] or "").startswith("image/"))


def list_input_files(folders: FolderPaths, ext: str) -> list[str]:
    names = [f for f in os.listdir(folders.input_dir) if os.path.isfile(os.path.join(folders.input_dir, f))]
    return sorted(f for f in names if f.endswith(ext))


def list_input_audio(folders: FolderPaths) -> list[str]:
    names = [f for f in os.listdir(folders.input_dir) if os.path.isfile(os.path.join(folders.input_dir, f))]
    return sorted(f for f in names if (mimetypes.guess_type(f)[0] or "").startswith(("audio/", "video/")))


def annotated_file_check(arg: str, kind: str) -> Callable[[FolderPaths, dict[str, Any]], bool | str]:
    """VALIDATE_INPUTS of the file loaders (real: LoadImage, LoadLatent, LoadVideo, LoadAudio): the annotated path
    must exist, so a sub-folder name such as selfix/<taskId>/x passes though the choice list omits it."""
    def check(folders: FolderPaths, args: dict[str, Any]) -> bool | str:
        value = args.get(arg)
        if value is None or not os.path.exists(folders.annotated_filepath(str(value))):
            return f"Invalid {kind} file: {value}"
        return True
    return check
