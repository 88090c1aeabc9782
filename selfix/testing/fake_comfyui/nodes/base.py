"""What every node is made of: a NodeDef (INPUT_TYPES-like spec, return types, cheap implementation), the NodeCall
it runs with, the NodeOutput it returns, the ModelRef standing in for models, and helpers that write input specs."""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from selfix.testing.fake_comfyui.core import InputTypes, Preview
from selfix.testing.fake_comfyui.folder_paths import FolderPaths

MAX_RESOLUTION = 16384


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


def static_inputs(spec: InputTypes) -> Callable[[FolderPaths], InputTypes]:
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


HIDDEN_PROMPT = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


def int_input(default: int, lo: int, hi: int, step: int | None = 1, **extra: Any) -> tuple[str, dict[str, Any]]:
    spec: dict[str, Any] = {"default": default, "min": lo, "max": hi}
    if step is not None:
        spec["step"] = step
    spec.update(extra)
    return ("INT", spec)
