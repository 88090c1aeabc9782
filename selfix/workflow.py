"""Pure patches applied to a task's workflow just before it is queued in ComfyUI."""

from __future__ import annotations

import copy
import posixpath
from dataclasses import dataclass, field
from typing import Any

from selfix.messages import lora_matches

OUTPUT_ROOT = "selfix"


def task_subfolder(task_id: str) -> str:
    """Where a task's files live inside ComfyUI's output/ and input/ dirs, so cleanup removes exactly them."""
    return f"{OUTPUT_ROOT}/{task_id}"


def patch(workflow: dict[str, Any], task_id: str, loras: dict[str, str], images: dict[str, str]) -> dict[str, Any]:
    """Return a copy with LoRAs bound to cached names, image names bound to the task's input subfolder, and every
    filename_prefix moved under the task's output subfolder.

    Binding keys on the value, not the input's name (Efficiency Nodes' LoRA Stacker has lora_name_1, ...). A name
    this leaves unbound is not made safe here: selfix.isolation refuses it before and after patching."""
    out = copy.deepcopy(workflow)
    for node in out.values():
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            continue
        _bind_lora(inputs, loras)
        _bind_image(inputs, images)
        _scope_prefix(inputs, task_id)
    return out


def _bind_lora(inputs: dict[str, Any], loras: dict[str, str]) -> None:
    for name, value in inputs.items():
        if isinstance(value, str) and name != "filename_prefix":
            for key, cached in loras.items():
                if lora_matches(value, key):
                    inputs[name] = cached
                    break


def _bind_image(inputs: dict[str, Any], images: dict[str, str]) -> None:
    for name, value in inputs.items():
        if isinstance(value, str) and value in images and name != "filename_prefix":
            inputs[name] = images[value]


def _scope_prefix(inputs: dict[str, Any], task_id: str) -> None:
    prefix = inputs.get("filename_prefix")
    if "filename_prefix" in inputs:
        base = posixpath.basename(prefix) if isinstance(prefix, str) and prefix else "ComfyUI"
        inputs["filename_prefix"] = f"{task_subfolder(task_id)}/{base or 'ComfyUI'}"


@dataclass(frozen=True)
class OutputItem:
    """One output of a finished prompt: a file in ComfyUI's output dir, or an inline text value.

    `animated` is ComfyUI's own flag (core SaveAnimatedWEBP/PNG, SaveVideo, SaveWEBM report their files under
    `images` with `animated: [true]`); the real file type is decided later from the file's bytes.
    """

    node: str
    key: str
    file: dict[str, str] | None = None
    text: str | None = None
    animated: bool = False
    hints: dict[str, Any] = field(default_factory=dict)


# Item fields that custom nodes add and that are worth passing to the client (VideoHelperSuite: format like
# "video/h264-mp4", frame_rate). Everything else (fullpath, workflow) names paths of this machine: dropped.
HINT_FIELDS = {"format": "format", "frame_rate": "frameRate"}


def collect_outputs(history_entry: dict[str, Any]) -> list[OutputItem]:
    """Every file output (any key whose items have filename/subfolder/type "output") and every inline `text`
    value of a /history entry, in node-id order, then key name, then item order: the order fixes object keys.

    temp/input items (PreviewImage, PreviewAudio) are previews, not results; they are skipped.
    """
    outputs = history_entry.get("outputs") or {}
    found: list[OutputItem] = []
    if not isinstance(outputs, dict):
        return found
    for node_id in sorted(outputs, key=_node_order):
        node_out = outputs[node_id]
        if not isinstance(node_out, dict):
            continue
        animated = _is_animated(node_out.get("animated"))
        for key in sorted(node_out):
            values = node_out[key]
            if not isinstance(values, list):
                continue
            for value in values:
                item = _item(str(node_id), key, value, animated)
                if item is not None:
                    found.append(item)
    return found


def _item(node_id: str, key: str, value: Any, animated: bool) -> OutputItem | None:
    if isinstance(value, dict) and _is_output_file(value):
        file = {"filename": value["filename"], "subfolder": str(value.get("subfolder") or ""), "type": "output"}
        hints = {name: value[field_] for field_, name in HINT_FIELDS.items()
                 if isinstance(value.get(field_), (str, int, float)) and not isinstance(value.get(field_), bool)}
        return OutputItem(node_id, key, file=file, animated=animated, hints=hints)
    if key == "text" and isinstance(value, str):
        return OutputItem(node_id, key, text=value)
    return None


def _is_output_file(value: dict[str, Any]) -> bool:
    name = value.get("filename")
    return (value.get("type") == "output" and isinstance(name, str) and bool(name)
            and "/" not in name and "\\" not in name and name not in (".", ".."))


def _is_animated(flag: Any) -> bool:
    # real: `"animated": (True,)` serialised as [true]; one flag for the node's whole list
    return isinstance(flag, list) and any(v is True for v in flag)


def output_images(history_entry: dict[str, Any]) -> list[dict[str, str]]:
    """type=output files under `images`, in node-id then image order (kept for callers of the seed's API)."""
    return [o.file for o in collect_outputs(history_entry) if o.key == "images" and o.file is not None]


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), node_id) if node_id.isdigit() else (1 << 62, node_id)
