"""Server state (real: server.PromptServer + execution.PromptQueue + main.prompt_worker).

FakeComfy holds the prompt queue, the history, the WebSocket clients and the frames sent to them (JSON events,
binary preview and text frames, in order through one publisher), and the worker that runs one prompt at a time.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import io
import json
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image, ImageOps

from selfix.testing.fake_comfyui.core import Preview
from selfix.testing.fake_comfyui.execution import Executor
from selfix.testing.fake_comfyui.folder_paths import FolderPaths, load_extra_model_paths
from selfix.testing.fake_comfyui.nodes.base import ExecEnv
from selfix.testing.fake_comfyui.nodes.registry import build_registry

log = logging.getLogger("comfyui")

MAX_HISTORY = 10000

BIN_PREVIEW_IMAGE = 1
BIN_PREVIEW_IMAGE_WITH_METADATA = 4
BIN_TEXT = 3  # real: server.BinaryEventTypes.TEXT (send_progress_text)


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
