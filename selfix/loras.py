"""LoRA files for ComfyUI: fetched from the object store into LORA_CACHE_DIR, which ComfyUI lists.

A file appears under its final name only whole and verified (written as *.part, checked, renamed), because ComfyUI
lists any *.safetensors it finds and would load a truncated one.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

from loguru import logger

from selfix.messages import LORA_INVALID, LORA_NOT_FOUND, TaskError
from selfix.storage import ObjectNotFound, ObjectStore, StorageError

MAX_HEADER = 100 << 20


def check_safetensors(path: Path) -> None:
    """Raise TaskError unless the file starts with a safetensors header (u64 length + JSON object)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise TaskError(LORA_INVALID, "file is too short to be safetensors")
        (length,) = struct.unpack("<Q", head)
        if length < 2 or length > min(MAX_HEADER, size - 8):
            raise TaskError(LORA_INVALID, "file is not safetensors (bad header length)")
        header = fh.read(length)
    try:
        meta = json.loads(header)
    except ValueError:
        raise TaskError(LORA_INVALID, "file is not safetensors (header is not JSON)") from None
    if not isinstance(meta, dict):
        raise TaskError(LORA_INVALID, "file is not safetensors (header is not an object)")


class LoraCache:
    """Key → file under the cache root, named by the key itself so ComfyUI lists it as `users/<u>/.../x.safetensors`."""

    def __init__(self, root: Path, store: ObjectStore) -> None:
        self.root = root
        self.store = store

    def comfy_name(self, key: str) -> str:
        return key

    def path_of(self, key: str) -> Path:
        return self.root / key

    def ensure(self, key: str) -> str:
        """Make the LoRA for `key` present and verified; return the name ComfyUI lists it under."""
        target = self.path_of(key)
        if target.exists():
            os.utime(target)  # recency for LRU eviction
            return self.comfy_name(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f"{target.name}.{os.getpid()}.part")
        started = time.monotonic()
        try:
            info = self.store.get_to_file(key, part)
            check_safetensors(part)
            os.replace(part, target)
        except ObjectNotFound:
            raise TaskError(LORA_NOT_FOUND, f"loraModel {key!r} does not exist in the store") from None
        except StorageError as exc:
            if exc.retriable:
                raise
            raise TaskError(exc.result_code("lora"), f"loraModel {key!r}: {exc}") from None
        finally:
            part.unlink(missing_ok=True)
        logger.info("LoRA {} fetched: {} bytes in {:.2f}s", key, info.size, time.monotonic() - started)
        return self.comfy_name(key)
