"""Pure patches applied to a task's workflow just before it is queued in ComfyUI."""

from __future__ import annotations

import copy
import posixpath
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


def output_images(history_entry: dict[str, Any]) -> list[dict[str, str]]:
    """type=output images from a /history entry, in node-id then image order (deterministic output keys)."""
    outputs = history_entry.get("outputs", {})
    found: list[dict[str, str]] = []
    for node_id in sorted(outputs, key=_node_order):
        for image in outputs[node_id].get("images", []) or []:
            if isinstance(image, dict) and image.get("type") == "output":
                found.append(image)
    return found


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), node_id) if node_id.isdigit() else (1 << 62, node_id)
