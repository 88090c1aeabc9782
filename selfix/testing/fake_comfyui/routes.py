"""HTTP and WebSocket routes (real: server.py, app/model_manager.py), also served under /api, the /fake/ test hooks,
the origin/CORS middlewares, and make_app, which builds the aiohttp application."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import ipaddress
import json
import logging
import mimetypes
import os
import socket
import struct
import sys
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from PIL import Image

from selfix.testing.fake_comfyui.core import COMFYUI_VERSION, api_error, system_memory
from selfix.testing.fake_comfyui.folder_paths import MODEL_EXTENSIONS, has_extension, walk_files
from selfix.testing.fake_comfyui.nodes.registry import node_info
from selfix.testing.fake_comfyui.server import FakeComfy, QueueItem
from selfix.testing.fake_comfyui.validation import Validator

log = logging.getLogger("comfyui")

SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
            error = api_error("no_prompt", "No prompt provided", "No prompt provided", {})
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
        ram_total, ram_free = system_memory()
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
