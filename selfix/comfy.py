"""Async client for ComfyUI's HTTP + WebSocket API (facts in shared/reference/comfyui-api.md).

The WebSocket only speeds things up: /history is the source of truth, and a silent socket is replaced by polling.
Binary frames (latent previews) are decoded only for an owner that asks for them (CONSOLE_PREVIEWS): then the
socket opens with the feature_flags handshake, so a ComfyUI that knows it sends event 4 (prompt id in its metadata),
and an older one's event 1 is tied to the `progress` frame before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import struct
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from loguru import logger

from selfix.backoff import compute_backoff

PROMPT_NAMESPACE = uuid.UUID("5e1f1c5a-7d0e-4c2b-9a56-0f3e2b7c9d11")
# A healthy ComfyUI answers its control routes in milliseconds, also mid-job (its HTTP server has its own thread).
# Short limits keep one hung call (a stopped or wedged ComfyUI) from holding up the runner's loop.
CONTROL_TIMEOUT_S = 5.0  # /queue, /history, /interrupt, /free, /system_stats, /models
PROMPT_TIMEOUT_S = 15.0  # POST /prompt validates the whole workflow before it answers
TRANSFER_STALL_S = 10.0  # GET /view: no byte for this long ends the download (its total size is unbounded)
WS_HEARTBEAT_S = 10.0  # ping period; a socket whose pong does not come within half of it is closed (stopped peer)
BIN_PREVIEW_IMAGE = 1  # [u32 1][u32 image type: 1 JPEG, 2 PNG][image]: no prompt id
BIN_PREVIEW_WITH_METADATA = 4  # [u32 4][u32 json length][json with prompt_id, node_id, image_type][image]
FEATURE_FLAGS = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
IMAGE_MAGIC = {"image/jpeg": b"\xff\xd8\xff", "image/png": b"\x89PNG\r\n\x1a\n"}
_LEGACY_TYPES = {1: "image/jpeg", 2: "image/png"}


def prompt_id_for(task_id: str, attempt: int) -> str:
    """Deterministic per (task, attempt): after a restart the runner finds its prompt in /queue or /history."""
    return str(uuid.uuid5(PROMPT_NAMESPACE, f"{task_id}/{attempt}"))


class ComfyUnavailable(Exception):
    """ComfyUI did not answer (connection refused, timeout, 5xx): retriable, the job is not at fault."""


class OutputTooLarge(Exception):
    """An output file is larger than MAX_OUTPUT_BYTES: the job's fault, not retriable."""

    def __init__(self, filename: str, limit: int) -> None:
        super().__init__(f"output {filename!r} is larger than MAX_OUTPUT_BYTES={limit}")
        self.filename = filename
        self.limit = limit


class ComfyRejected(Exception):
    """ComfyUI refused the prompt at validation (400, or 200 with node_errors): not retriable for this workflow."""

    def __init__(self, message: str, error: dict[str, Any], node_errors: dict[str, Any],
                 queued: bool = False) -> None:
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors
        self.queued = queued  # a 200: ComfyUI queued the outputs that did validate and will run them


@dataclass(frozen=True)
class QueueState:
    running: tuple[str, ...]
    pending: tuple[str, ...]

    def holds(self, prompt_id: str) -> bool:
        return prompt_id in self.running or prompt_id in self.pending


class ComfyClient:
    """One instance per process; `client_id` names this process's WebSocket so events reach it after a restart."""

    def __init__(self, base_url: str, client_id: str, session: aiohttp.ClientSession,
                 timeout_s: float = CONTROL_TIMEOUT_S, prompt_timeout_s: float = PROMPT_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self.session = session
        connect = min(timeout_s, 5.0)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect)
        self.prompt_timeout = aiohttp.ClientTimeout(total=prompt_timeout_s, connect=connect)
        self.transfer_timeout = aiohttp.ClientTimeout(total=None, connect=connect, sock_read=TRANSFER_STALL_S)

    async def _request(self, method: str, path: str, timeout: aiohttp.ClientTimeout | None = None,
                       **kw: Any) -> tuple[int, bytes]:
        try:
            async with self.session.request(method, self.base_url + path, timeout=timeout or self.timeout,
                                            **kw) as resp:
                body = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ComfyUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if resp.status >= 500:
            raise ComfyUnavailable(f"{method} {path}: HTTP {resp.status}: {body[:200]!r}")
        return resp.status, body

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        status, body = await self._request(method, path, **kw)
        if status != 200:
            raise ComfyUnavailable(f"{method} {path}: unexpected HTTP {status}: {body[:200]!r}")
        return json.loads(body) if body else None

    async def system_stats(self) -> dict[str, Any]:
        return dict(await self._json("GET", "/system_stats"))

    async def alive(self) -> bool:
        try:
            await self.system_stats()
            return True
        except (ComfyUnavailable, ValueError):
            return False

    async def queue_prompt(self, workflow: dict[str, Any], prompt_id: str,
                           extra_data: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"prompt": workflow, "client_id": self.client_id, "prompt_id": prompt_id,
                "extra_data": extra_data or {}}
        status, raw = await self._request("POST", "/prompt", timeout=self.prompt_timeout, json=body)
        try:
            reply = json.loads(raw)
        except ValueError:
            raise ComfyUnavailable(f"POST /prompt: HTTP {status} with a non-JSON body {raw[:200]!r}") from None
        if status == 400:
            error = reply.get("error", {})
            raise ComfyRejected(_rejection_message(error, reply.get("node_errors", {})), error,
                                reply.get("node_errors", {}))
        if status != 200:
            raise ComfyUnavailable(f"POST /prompt: unexpected HTTP {status}")
        if reply.get("node_errors"):
            # 200 with node_errors: ComfyUI dropped the outputs that failed but queued (and will run) the others.
            # A task needs all of them, so the caller must fail it and remove this prompt again.
            raise ComfyRejected(_rejection_message({}, reply["node_errors"]), {}, reply["node_errors"], queued=True)
        return dict(reply)

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        data = await self._json("GET", f"/history/{prompt_id}")
        return data.get(prompt_id) if isinstance(data, dict) else None

    async def queue(self) -> QueueState:
        data = await self._json("GET", "/queue")
        return QueueState(
            running=tuple(item[1] for item in data.get("queue_running", [])),
            pending=tuple(item[1] for item in sorted(data.get("queue_pending", []), key=lambda i: float(i[0]))),
        )

    async def delete_pending(self, prompt_ids: list[str]) -> None:
        await self._request("POST", "/queue", json={"delete": prompt_ids})

    async def interrupt(self, prompt_id: str | None = None) -> None:
        await self._request("POST", "/interrupt", json={"prompt_id": prompt_id} if prompt_id else {})

    async def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        await self._request("POST", "/free", json={"unload_models": unload_models, "free_memory": free_memory})

    async def forget_history(self, prompt_ids: list[str]) -> None:
        await self._request("POST", "/history", json={"delete": prompt_ids})

    async def loras(self) -> list[str]:
        return list(await self._json("GET", "/models/loras"))

    async def download(self, image: dict[str, str], target: Path, max_bytes: int | None = None) -> int:
        """GET /view of one output file straight into `target` (streamed, 64 KiB at a time); returns the byte
        count. Over `max_bytes` it stops and raises OutputTooLarge (the partial file is removed)."""
        params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                  "type": image.get("type", "output")}
        try:
            async with self.session.get(self.base_url + "/view", params=params,
                                        timeout=self.transfer_timeout) as resp:
                if resp.status != 200:
                    raise ComfyUnavailable(f"GET /view {params}: HTTP {resp.status}")
                if max_bytes is not None and (resp.content_length or 0) > max_bytes:
                    raise OutputTooLarge(image["filename"], max_bytes)
                size = 0
                with open(target, "wb") as fh:
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        size += len(chunk)
                        if max_bytes is not None and size > max_bytes:
                            raise OutputTooLarge(image["filename"], max_bytes)
                        fh.write(chunk)
                return size
        except OutputTooLarge:
            target.unlink(missing_ok=True)
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ComfyUnavailable(f"GET /view {params}: {type(exc).__name__}: {exc}") from exc


def _rejection_message(error: dict[str, Any], node_errors: dict[str, Any]) -> str:
    parts = [str(error.get("message") or "prompt failed validation")]
    if error.get("details"):
        parts.append(str(error["details"]))
    for node_id, info in list(node_errors.items())[:5]:
        for err in info.get("errors", [])[:2]:
            parts.append(f"node {node_id} ({info.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "; ".join(parts)


@dataclass(frozen=True)
class PreviewFrame:
    """One preview image of a binary frame. `prompt_id` is None for a legacy frame (event 1) until the stream ties
    it to the `progress` frame before it."""

    prompt_id: str | None
    media_type: str  # image/jpeg or image/png
    image: bytes
    node_id: str | None = None


def parse_preview(data: bytes) -> PreviewFrame | None:
    """Event 1 or 4 decoded; None for any other event and for a truncated or malformed frame (it never raises)."""
    if len(data) < 8:
        return None
    event, word = struct.unpack_from(">II", data)
    if event == BIN_PREVIEW_IMAGE:
        return _preview(None, None, _LEGACY_TYPES.get(word), data[8:])
    if event != BIN_PREVIEW_WITH_METADATA or len(data) < 8 + word:
        return None
    try:
        meta = json.loads(data[8:8 + word])
    except (ValueError, RecursionError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("prompt_id"), str):
        return None
    node = meta.get("node_id")
    return _preview(meta["prompt_id"], node if isinstance(node, str) else None, meta.get("image_type"),
                    data[8 + word:])


def _preview(prompt_id: str | None, node_id: str | None, media_type: object, image: bytes) -> PreviewFrame | None:
    """Only a JPEG or a PNG whose bytes start the way its type says: nothing else is ever kept or served."""
    magic = IMAGE_MAGIC.get(media_type) if isinstance(media_type, str) else None
    if magic is None or not image.startswith(magic):
        return None
    assert isinstance(media_type, str)
    return PreviewFrame(prompt_id, media_type, image, node_id)


EventHandler = Callable[[str, dict[str, Any]], Awaitable[None]]
PreviewHandler = Callable[[PreviewFrame], None]
# Prompt boundaries: a legacy preview frame after one of these belongs to no prompt until the next `progress`.
_PROMPT_BOUNDARIES = frozenset({"execution_start", "execution_success", "execution_error", "execution_interrupted"})


class EventStream:
    """Keeps one WebSocket open with this client id, reconnecting with backoff; feeds JSON frames to `handler`.

    `connected` is set while a socket is open; `on_reconnect` runs after every (re)connection so the owner can
    poll /history for anything that happened while it was deaf (ComfyUI has no replay).

    With `on_preview`, preview frames go to it with the prompt id they belong to, as far as the frames tell: event 4
    names it; an event 1 (a ComfyUI without the handshake) is tied to the last `progress` frame, the order ComfyUI
    sends them in, and dropped when none came since the last prompt boundary. ComfyUI runs one prompt at a time,
    but it broadcasts the previews of a prompt that has no client id to every socket, so the owner must still keep
    only those of the prompt it knows is running. Without `on_preview` binary frames are skipped unread.
    """

    def __init__(self, client: ComfyClient, handler: EventHandler,
                 on_reconnect: Callable[[], Awaitable[None]] | None = None,
                 on_preview: PreviewHandler | None = None) -> None:
        self.client = client
        self.handler = handler
        self.on_reconnect = on_reconnect
        self.on_preview = on_preview
        self.connected = asyncio.Event()
        self.last_frame_at = 0.0
        self.preview_metadata = False  # ComfyUI answered the handshake: its previews carry their prompt id
        self._progress_prompt: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="comfy-ws")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        failures = 0
        url = f"{self.client.base_url}/ws?clientId={self.client.client_id}"
        while True:
            try:
                async with self.client.session.ws_connect(url, heartbeat=WS_HEARTBEAT_S, max_msg_size=0) as ws:
                    failures = 0
                    await self.opened(ws)
                    if self.on_reconnect:
                        await self.on_reconnect()
                    await self._read(ws)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                logger.debug("websocket unavailable: {}", exc)
            self.connected.clear()
            failures += 1
            await asyncio.sleep(compute_backoff(min(failures, 6), 0.2, 5.0))

    async def opened(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.preview_metadata = False
        self._progress_prompt = None
        if self.on_preview is not None:
            # ComfyUI honours the handshake only as the first frame a client sends; later ones it ignores.
            await ws.send_str(json.dumps(FEATURE_FLAGS))
        self.connected.set()
        logger.debug("websocket connected")

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        async for msg in ws:
            self.last_frame_at = loop.time()
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.binary(msg.data)
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                frame = json.loads(msg.data)
                kind, data = frame["type"], frame.get("data") or {}
            except (ValueError, KeyError, TypeError):
                logger.warning("ignoring malformed websocket frame {!r}", msg.data[:200])
                continue
            if self.on_preview is not None and isinstance(data, dict):
                self.track(kind, data)
            await self.handler(kind, data)

    def track(self, kind: str, data: dict[str, Any]) -> None:
        """What a legacy preview frame is tied to: the prompt of the last `progress`, until a prompt boundary."""
        if kind == "progress":
            prompt_id = data.get("prompt_id")
            self._progress_prompt = prompt_id if isinstance(prompt_id, str) else None
        elif kind in _PROMPT_BOUNDARIES or (kind == "executing" and data.get("node") is None):
            self._progress_prompt = None
        elif kind == "feature_flags":
            self.preview_metadata = data.get("supports_preview_metadata") is True

    def binary(self, data: bytes) -> None:
        if self.on_preview is None:
            return  # previews off: not even decoded
        frame = parse_preview(data)
        if frame is None:
            return
        if frame.prompt_id is None:
            if self._progress_prompt is None:
                return
            frame = dataclasses.replace(frame, prompt_id=self._progress_prompt)
        self.on_preview(frame)
