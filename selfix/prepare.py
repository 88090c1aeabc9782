"""Everything a job needs before ComfyUI sees it: LoRAs cached, input images placed, workflow patched.

Runs in a worker thread (downloads block). Idempotent, so a runner restarted mid-way simply prepares again.
Every key is checked again here (intake checked it already): a job file edited by hand or written by an older
version must not make the node fetch another user's object. No request is made for a refused key.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from selfix import isolation
from selfix.job import Job
from selfix.loras import LORA_TOO_LARGE, CacheFull, LoraCache
from selfix.messages import (
    IMAGE_NAME_RE,
    INPUT_FORBIDDEN,
    INPUT_NOT_FOUND,
    INPUT_TOO_LARGE,
    Limits,
    TaskError,
    check_user_key,
    decode_data_url,
)
from selfix.storage import ObjectNotFound, ObjectStore, ObjectTooLarge, StorageError, StorageUnavailable
from selfix.workflow import patch, task_subfolder

# What LoadImage may be given: PNG, JPEG, WebP, by their first bytes (the name's extension proves nothing).
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


def input_dir_of(comfy_input_dir: Path, task_id: str) -> Path:
    return comfy_input_dir / task_subfolder(task_id)


def is_image(head: bytes) -> bool:
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def place_images(job: Job, store: ObjectStore, comfy_input_dir: Path, max_data_url_bytes: int,
                 limits: Limits | None = None) -> dict[str, str]:
    """Write each input image to ComfyUI's input/selfix/<taskId>/<name>; return name → LoadImage value.

    An S3 image must be under the user's prefix and at most `max_data_url_bytes` (the same limit as a data: URL);
    either kind must really be a PNG, JPEG or WebP image.
    """
    images = job.images  # its type checked when the file was read (selfix.job), its content checked here
    if not images:
        return {}
    limits = limits or Limits(max_data_url_bytes=max_data_url_bytes)
    for name, ref in images.items():  # every check before the first byte is written or fetched
        if not IMAGE_NAME_RE.fullmatch(name):
            raise TaskError(INPUT_FORBIDDEN, f"image name {name[:80]!r} must be a plain .png/.jpg/.webp name")
        if not ref.startswith("data:"):
            check_user_key(ref, str(job.user_id), limits, INPUT_FORBIDDEN, f"images[{name!r}]")
    folder = input_dir_of(comfy_input_dir, job.task_id)
    folder.mkdir(parents=True, exist_ok=True)
    bound = {}
    for name, ref in images.items():
        target = folder / name
        part = folder / f".{name}.part"
        try:
            if ref.startswith("data:"):
                part.write_bytes(decode_data_url(ref, max_data_url_bytes, name))
            else:
                _fetch_input(store, ref, part, name, max_data_url_bytes)
            with open(part, "rb") as fh:
                if not is_image(fh.read(12)):
                    raise TaskError(INPUT_FORBIDDEN, f"images[{name!r}] is not a PNG, JPEG or WebP image")
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
        bound[name] = f"{task_subfolder(job.task_id)}/{name}"
    return bound


def _fetch_input(store: ObjectStore, key: str, part: Path, name: str, max_bytes: int) -> None:
    try:
        store.get_to_file(key, part, max_bytes=max_bytes)
    except ObjectNotFound:
        raise TaskError(INPUT_NOT_FOUND, f"images[{name!r}]: {key!r} does not exist in the store") from None
    except ObjectTooLarge:
        raise TaskError(INPUT_TOO_LARGE, f"images[{name!r}]: {key!r} is larger than {max_bytes} bytes") from None
    except StorageError as exc:
        if exc.retriable:
            raise
        raise TaskError(exc.result_code("input"), f"images[{name!r}]: {exc}") from None


def ensure_loras(job: Job, loras: LoraCache) -> dict[str, str]:
    """key → the name ComfyUI lists, for each of the job's LoRAs (fetched when absent)."""
    keys = list(job.lora_models)
    bound = {}
    for key in keys:
        try:
            bound[key] = loras.ensure(key, str(job.user_id))
        except CacheFull as exc:
            if exc.blocking and exc.blocking <= set(keys):
                raise TaskError(LORA_TOO_LARGE, f"the job's LoRAs together do not fit the LoRA cache: {exc}") from None
            raise  # other jobs' LoRAs hold the room: the runner defers this job
    return bound


def prepare(job: Job, store: ObjectStore, loras: LoraCache, comfy_input_dir: Path,
            max_data_url_bytes: int, guard: isolation.Guard | None = None) -> dict[str, Any]:
    """The workflow as it will be queued. Raises TaskError (not retriable) or a retriable StorageError.

    Every file name in the workflow is checked against this node's files (selfix.isolation) before anything is
    fetched, and the patched workflow once more before it goes to ComfyUI. `guard`: the node's (runner); without
    one, the LoRA cache and the input folder are the places checked, with the default node policy."""
    guard = guard or isolation.Guard(isolation.Roots(lora_cache_dir=loras.root, input_dir=comfy_input_dir),
                                     user_prefix=loras.limits.user_prefix)
    task_id, user_id, workflow = job.task_id, str(job.user_id), job.workflow or {}
    listing = guard.listing(loras.cached_keys())
    guard.check(workflow, isolation.grant_for_task(task_id, user_id, list(job.lora_models), dict(job.images)), listing,
                skip_inputs=frozenset({"filename_prefix"}))  # rewritten by patch() and checked after it
    bound_loras = ensure_loras(job, loras)
    limits = dataclasses.replace(loras.limits, max_data_url_bytes=max_data_url_bytes)
    try:
        bound_images = place_images(job, store, comfy_input_dir, max_data_url_bytes, limits)
    except OSError as exc:  # ComfyUI's input dir unwritable or full: the job waits, the runner lives
        raise StorageUnavailable(f"cannot write input images into {comfy_input_dir}: {exc}") from exc
    patched = patch(workflow, task_id, bound_loras, bound_images)
    guard.check(patched, isolation.grant_for_bound(task_id, user_id, bound_loras.values(), bound_images.values()),
                listing)
    return patched


def remove_task_files(comfy_output_dir: Path, comfy_input_dir: Path, task_id: str) -> None:
    """Delete exactly this task's files in ComfyUI's output and input folders."""
    for root in (comfy_output_dir, comfy_input_dir):
        shutil.rmtree(root / task_subfolder(task_id), ignore_errors=True)
