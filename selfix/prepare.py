"""Everything a job needs before ComfyUI sees it: LoRAs cached, input images placed, workflow patched.

Runs in a worker thread (downloads block). Idempotent, so a runner restarted mid-way simply prepares again.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from selfix.loras import LoraCache
from selfix.messages import INPUT_NOT_FOUND, TaskError, decode_data_url
from selfix.storage import ObjectNotFound, ObjectStore, StorageError
from selfix.workflow import patch, task_subfolder


def input_dir_of(comfy_input_dir: Path, task_id: str) -> Path:
    return comfy_input_dir / task_subfolder(task_id)


def place_images(job: dict[str, Any], store: ObjectStore, comfy_input_dir: Path, max_data_url_bytes: int,
                 ) -> dict[str, str]:
    """Write each input image to ComfyUI's input/selfix/<taskId>/<name>; return name → LoadImage value."""
    images: dict[str, str] = job.get("images") or {}
    if not images:
        return {}
    folder = input_dir_of(comfy_input_dir, job["taskId"])
    folder.mkdir(parents=True, exist_ok=True)
    bound = {}
    for name, ref in images.items():
        target = folder / name
        part = folder / f".{name}.part"
        if ref.startswith("data:"):
            part.write_bytes(decode_data_url(ref, max_data_url_bytes, name))
        else:
            _fetch_input(store, ref, part, name)
        os.replace(part, target)
        bound[name] = f"{task_subfolder(job['taskId'])}/{name}"
    return bound


def _fetch_input(store: ObjectStore, key: str, part: Path, name: str) -> None:
    try:
        store.get_to_file(key, part)
    except ObjectNotFound:
        raise TaskError(INPUT_NOT_FOUND, f"images[{name!r}]: {key!r} does not exist in the store") from None
    except StorageError as exc:
        if exc.retriable:
            raise
        raise TaskError(exc.result_code("input"), f"images[{name!r}]: {exc}") from None


def prepare(job: dict[str, Any], store: ObjectStore, loras: LoraCache, comfy_input_dir: Path,
            max_data_url_bytes: int) -> dict[str, Any]:
    """The workflow as it will be queued. Raises TaskError (permanent) or a retriable StorageError."""
    bound_loras = {key: loras.ensure(key) for key in job.get("loraModels") or []}
    bound_images = place_images(job, store, comfy_input_dir, max_data_url_bytes)
    return patch(job["workflow"], job["taskId"], bound_loras, bound_images)


def remove_task_files(comfy_output_dir: Path, comfy_input_dir: Path, task_id: str) -> None:
    """Delete exactly this task's files in ComfyUI's output and input folders."""
    for root in (comfy_output_dir, comfy_input_dir):
        shutil.rmtree(root / task_subfolder(task_id), ignore_errors=True)
