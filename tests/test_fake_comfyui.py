"""Replays the recorded ComfyUI 0.3.64 transcripts against the test double and compares what comes back.

Each test starts the double as a real subprocess on a free port, sends the requests a capture scenario sent,
and compares status codes, content types, JSON shapes (keys and value types; ids and timestamps differ) and
the WebSocket frame type sequences with the recording. Where the real server answers deterministically the
bodies are compared verbatim.

progress_state frames are compared one for one where the capture kept them. A few captures were recorded with
progress_state (and preview binaries) filtered out; for those the same frames are dropped from our side too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import struct
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from tests.servers.node import ComfyDouble as Double

pytestmark = pytest.mark.comfy_double

REPO = Path(__file__).resolve().parents[1]
# CI lays shared/ beside the clone, as on developer machines.
CAPTURE_DIRS = [REPO / "tests" / "data" / "comfyui-captures", REPO.parent / "shared" / "reference" / "comfyui-captures"]
CAPTURES = next((d for d in CAPTURE_DIRS if d.is_dir()), None)
SECONDS_PER_STEP = 0.05
NO_JSON = object()

if CAPTURES is None:
    pytest.skip("ComfyUI capture transcripts not found", allow_module_level=True)


def load(name: str) -> Any:
    assert CAPTURES is not None
    return json.loads((CAPTURES / f"{name}.json").read_text())


def first_entry(history: dict[str, Any]) -> dict[str, Any]:
    assert len(history) == 1, history
    return next(iter(history.values()))


# ------------------------------------------------------------------------------------------------
# The double as a subprocess
# ------------------------------------------------------------------------------------------------


def start_double(root: Path, *extra: str, deadline_s: float = 20.0) -> Double:
    return Double(root, SECONDS_PER_STEP, checkpoint=False, extra=(
        "--preview-method", "latent2rgb", "--disable-auto-launch", "--cpu", "--log-stdout", *extra)).start(deadline_s)


@pytest.fixture
def double(tmp_path: Path) -> Iterator[Double]:
    d = start_double(tmp_path)
    yield d
    assert d.stop() == 0, d.log()  # SIGTERM must shut it down cleanly


# ------------------------------------------------------------------------------------------------
# HTTP / WebSocket client helpers
# ------------------------------------------------------------------------------------------------


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str | None:
        return self.headers.get("Content-Type")

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Frame:
    type: str
    data: Any = None
    meta: Any = None
    image: bytes = b""


def parse_binary(payload: bytes) -> Frame:
    event = struct.unpack(">I", payload[:4])[0]
    if event == 4:
        length = struct.unpack(">I", payload[4:8])[0]
        return Frame("bin4", meta=json.loads(payload[8 : 8 + length]), image=payload[8 + length :])
    return Frame(f"bin{event}", meta=struct.unpack(">I", payload[4:8])[0], image=payload[8:])


def capture_frames(raw: list[dict[str, Any]]) -> list[Frame]:
    frames = []
    for f in raw:
        if f["kind"] == "text":
            frames.append(Frame(f["json"]["type"], f["json"]["data"]))
        else:
            meta = f.get("metadata", f.get("image_type"))
            frames.append(Frame(f"bin{f['event']}", meta=meta, image=bytes.fromhex(f["image_magic_hex"])))
    return frames


class Socket:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[Frame] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                parsed = json.loads(msg.data)
                self.frames.append(Frame(parsed["type"], parsed["data"]))
            elif msg.type == aiohttp.WSMsgType.BINARY:
                self.frames.append(parse_binary(msg.data))
            self._changed.set()

    async def wait_for(self, pred: Callable[[Frame], bool], start: int = 0, timeout: float = 15.0) -> int:
        async def scan() -> int:
            index = start
            while True:
                while index < len(self.frames):
                    if pred(self.frames[index]):
                        return index
                    index += 1
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(scan(), timeout)

    async def wait_done(self, prompt_id: str, start: int = 0) -> int:
        return await self.wait_for(lambda f: is_done(f, prompt_id), start)

    async def close(self) -> None:
        await self.ws.close()
        await self._task


def is_done(frame: Frame, prompt_id: str) -> bool:
    return frame.type == "executing" and frame.data.get("node") is None and frame.data.get("prompt_id") == prompt_id


class Api:
    def __init__(self, double: Double, session: aiohttp.ClientSession) -> None:
        self.double = double
        self.session = session
        self.sockets: list[Socket] = []

    async def request(self, method: str, path: str, body: Any = NO_JSON, **kw: Any) -> Resp:
        if body is not NO_JSON:
            kw["data"] = json.dumps(body).encode()
        async with self.session.request(method, self.double.url + path, **kw) as resp:
            return Resp(resp.status, dict(resp.headers), await resp.read())

    async def get(self, path: str, **kw: Any) -> Resp:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = NO_JSON, **kw: Any) -> Resp:
        return await self.request("POST", path, body, **kw)

    async def socket(self, client_id: str | None = None, feature_flags: bool = False) -> Socket:
        query = f"?clientId={client_id}" if client_id else ""
        ws = await self.session.ws_connect(self.double.url.replace("http", "ws") + "/ws" + query)
        if feature_flags:
            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        sock = Socket(ws)
        self.sockets.append(sock)
        await sock.wait_for(lambda f: f.type == "status" and "sid" in f.data)
        return sock

    async def run(self, sock: Socket, body: dict[str, Any]) -> tuple[Resp, list[Frame]]:
        """POST a prompt and return the answer and the frames up to its executing(null)."""
        mark = len(sock.frames)
        resp = await self.post("/prompt", body)
        assert resp.status == 200, resp.body
        end = await sock.wait_done(resp.json["prompt_id"], mark)
        return resp, sock.frames[mark : end + 1]


@contextlib.asynccontextmanager
async def api_for(double: Double) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        api = Api(double, session)
        try:
            yield api
        finally:
            for sock in api.sockets:
                await sock.close()


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------


def kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", dict: "dict", list: "list"}[type(value)]


def assert_shape(actual: Any, expected: Any, path: str = "$") -> None:
    """Same keys and value types; lists of another length (tracebacks, executed ids) must hold the same kinds."""
    assert kind(actual) == kind(expected), f"{path}: {actual!r} is not like {expected!r}"
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_shape(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list) and len(actual) == len(expected):
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_shape(a, e, f"{path}[{index}]")
    elif isinstance(expected, list) and actual and expected:
        assert {kind(a) for a in actual} == {kind(e) for e in expected}, path


def assert_response_like(resp: Resp, captured: dict[str, Any], exact: bool = False) -> None:
    assert resp.status == captured["status"], resp.body
    assert resp.content_type == captured["headers"].get("Content-Type")
    if captured["json"] is not None:
        if exact:
            assert resp.json == captured["json"]
        else:
            assert_shape(resp.json, captured["json"])
    elif captured["body_text"] is not None:
        assert resp.body.decode() == captured["body_text"]


def assert_history_like(resp: Resp, captured: dict[str, Any]) -> dict[str, Any]:
    """A history answer is keyed by prompt id, so the single entries are compared; returns ours."""
    assert (resp.status, resp.content_type) == (captured["status"], captured["headers"].get("Content-Type"))
    mine = first_entry(resp.json)
    assert_shape(mine, first_entry(captured["json"]))
    return mine


def types(frames: list[Frame]) -> list[str]:
    return [f.type for f in frames]


def without(frames: list[Frame], *dropped: str) -> list[Frame]:
    return [f for f in frames if f.type not in dropped]


def assert_frames_like(actual: list[Frame], expected: list[Frame]) -> None:
    assert types(actual) == types(expected)
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if a.type.startswith("bin"):
            assert_binary_like(a, e)
        else:
            assert_shape(a.data, e.data, f"frame[{index}]:{a.type}")
            if a.type == "execution_cached":
                assert a.data["nodes"] == e.data["nodes"]


def assert_binary_like(actual: Frame, expected: Frame) -> None:
    if actual.type == "bin4":
        assert set(actual.meta) == set(expected.meta)
        assert actual.meta["image_type"] == expected.meta["image_type"]
    else:
        assert actual.meta == expected.meta  # 1 = JPEG, 2 = PNG
    assert actual.image.startswith(expected.image[:4])


def progress_states_like(actual: list[Frame], expected: list[Frame]) -> None:
    """progress_state payloads must agree node for node on value, max and state (and their number types)."""
    pairs = zip(without_types(actual, "progress_state"), without_types(expected, "progress_state"), strict=True)
    for a, e in pairs:
        assert list(a.data["nodes"]) == list(e.data["nodes"])
        for node_id, entry in e.data["nodes"].items():
            mine = a.data["nodes"][node_id]
            assert (mine["value"], mine["max"], mine["state"]) == (entry["value"], entry["max"], entry["state"])
            assert (kind(mine["value"]), kind(mine["max"])) == (kind(entry["value"]), kind(entry["max"]))


def without_types(frames: list[Frame], keep: str) -> list[Frame]:
    return [f for f in frames if f.type == keep]


def collapse(names: list[str], repeated: str) -> list[str]:
    out: list[str] = []
    for name in names:
        if not (name == repeated and out and out[-1] == repeated + "*"):
            out.append(repeated + "*" if name == repeated else name)
    return out


def node_types(frames: list[Frame]) -> list[str]:
    """Frame types with executing(node) and executing(null) told apart, for collapsing runs of node starts."""
    return ["executing_node" if f.type == "executing" and f.data.get("node") else f.type for f in frames]


def write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path.read_bytes()


def png_bytes(color: tuple[int, int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_safetensors(path: Path) -> None:
    """A minimal valid safetensors file (header only); the double checks the header like the real loader."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def t2i_prompt(capture_key: str = "first_run") -> dict[str, Any]:
    cap = load("t2i_real_model")[capture_key]
    prompt: dict[str, Any] = json.loads(json.dumps(first_entry(cap["history"])["prompt"][2]))
    return prompt


# ------------------------------------------------------------------------------------------------
# s1 + s2: basic graph, then the identical graph again (served from cache)
# ------------------------------------------------------------------------------------------------


def test_s1_basic_then_s2_cached_rerun(double: Double) -> None:
    s1, s2 = load("s1_basic"), load("s2_cached_rerun")
    entry = first_entry(s1["history"]["json"])
    prompt, extra = entry["prompt"][2], entry["prompt"][3]

    async def scenario() -> None:
        async with api_for(double) as api:
            client = extra["client_id"]  # the captured id, so extra_data compares verbatim
            main = await api.socket(client)
            observer = await api.socket("probe-observer")
            extra_data = {k: v for k, v in extra.items() if k != "client_id"}
            resp, _ = await api.run(main, {"prompt": prompt, "client_id": client, "extra_data": extra_data})
            assert_response_like(resp, s1["post"])
            assert_frames_like(main.frames, capture_frames(s1["ws"]))
            progress_states_like(main.frames, capture_frames(s1["ws"]))
            await observer.wait_for(lambda f: f.type == "status" and f.data["status"]["exec_info"]
                                    == {"queue_remaining": 0} and "sid" not in f.data)
            assert types(observer.frames) == types(capture_frames(s1["observer_so_far"]))
            await check_s1_history_and_view(api, resp.json["prompt_id"], s1)

            resp2, frames2 = await api.run(main, {"prompt": prompt, "client_id": client})
            assert_response_like(resp2, s2["post"])
            assert_frames_like(frames2, capture_frames(s2["ws"]))
            progress_states_like(frames2, capture_frames(s2["ws"]))
            cached = next(f for f in frames2 if f.type == "execution_cached")
            assert cached.data["nodes"] == ["1", "2", "3", "4"]
            history2 = await api.get(f"/history/{resp2.json['prompt_id']}")
            mine, theirs = first_entry(history2.json), first_entry(s2["history"]["json"])
            assert_shape(mine, theirs)
            assert mine["outputs"]["3"] == theirs["outputs"]["3"]  # same files: served from cache

    asyncio.run(scenario())


async def check_s1_history_and_view(api: Api, prompt_id: str, s1: dict[str, Any]) -> None:
    mine = assert_history_like(await api.get(f"/history/{prompt_id}"), s1["history"])
    theirs = first_entry(s1["history"]["json"])
    assert mine["prompt"][2:] == theirs["prompt"][2:]
    assert [m[0] for m in mine["status"]["messages"]] == [m[0] for m in theirs["status"]["messages"]]
    assert mine["outputs"]["3"] == theirs["outputs"]["3"]
    assert all(re.fullmatch(r"ComfyUI_temp_[a-z]{5}_0000[12]_\.png", i["filename"])
               for i in mine["outputs"]["4"]["images"])
    assert mine["meta"] == theirs["meta"]
    view = await api.get("/view?filename=basic_00001_.png&subfolder=probe&type=output")
    assert view.status == 200 and view.content_type == "image/png" and view.body.startswith(b"\x89PNG")
    assert view.headers["Content-Disposition"] == s1["view"]["headers"]["Content-Disposition"]
    temp_name = mine["outputs"]["4"]["images"][0]["filename"]
    preview = await api.get(f"/view?filename={temp_name}&type=temp")
    assert preview.status == 200 and preview.content_type == s1["view_preview_temp"]["content_type"]
    with Image.open(api.double.path("output") / "probe" / "basic_00001_.png") as img:
        assert img.size == (128, 96) and json.loads(img.info["workflow"]) == {"note": "probe"}


# ------------------------------------------------------------------------------------------------
# s3 / s3b: SaveImageWebsocket, legacy binary frames and the feature_flags handshake
# ------------------------------------------------------------------------------------------------


def test_s3_websocket_images_legacy_then_feature_flags(double: Double) -> None:
    s3, s3b = load("s3_ws_images_legacy"), load("s3b_ws_images_feature_flags")
    theirs = first_entry(s3["history"]["json"])

    async def scenario() -> None:
        async with api_for(double) as api:
            main = await api.socket("probe-main")
            resp, frames = await api.run(main, {"prompt": theirs["prompt"][2], "client_id": "probe-main"})
            assert_response_like(resp, s3["post"])
            assert_frames_like(frames, capture_frames(s3["ws"]))
            progress_states_like(frames, capture_frames(s3["ws"]))
            history = first_entry((await api.get(f"/history/{resp.json['prompt_id']}")).json)
            assert_shape(history, theirs)
            assert (history["outputs"], history["meta"]) == ({}, {})

            flagged = await api.socket("probe-ff", feature_flags=True)
            await flagged.wait_for(lambda f: f.type == "feature_flags")
            resp_b, _ = await api.run(flagged, {"prompt": theirs["prompt"][2], "client_id": "probe-ff"})
            assert_response_like(resp_b, s3b["post"])
            assert_frames_like(flagged.frames, capture_frames(s3b["ws"]))
            progress_states_like(flagged.frames, capture_frames(s3b["ws"]))
            assert flagged.frames[1].data == capture_frames(s3b["ws"])[1].data  # the server's feature flags

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------
# s4: validation errors, byte for byte where the real server is deterministic
# ------------------------------------------------------------------------------------------------


def _s4_requests() -> dict[str, Any]:
    empty: dict[str, Any] = {"class_type": "EmptyImage",
                             "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}}
    save: dict[str, Any] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}

    def with_empty(**inputs: Any) -> dict[str, Any]:
        node: dict[str, Any] = {"class_type": "EmptyImage", "inputs": {**empty["inputs"], **inputs}}
        node["inputs"] = {k: v for k, v in node["inputs"].items() if v is not None}
        return {"prompt": {"1": node, "2": save}}

    t2i = t2i_prompt()
    t2i["4"]["inputs"]["ckpt_name"] = "nope.safetensors"
    t2i["10"]["inputs"]["lora_name"] = "nope_lora.safetensors"
    scale = {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "magic", "width": 8,
                                                    "height": 8, "crop": "disabled"}}
    return {
        "missing_required_input": with_empty(width=None),
        "unknown_class_type": {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}},
        "missing_class_type": {"prompt": {"1": {"inputs": {}}}},
        "bad_ckpt_and_lora_name": {"prompt": t2i},
        "no_outputs": {"prompt": {"1": empty}},
        "no_prompt_key": {"client_id": "probe"},
        "value_smaller_than_min": with_empty(width=0),
        "invalid_input_type": with_empty(width="abc"),
        "return_type_mismatch": {"prompt": {
            "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "2": save}},
        "bad_linked_input": {"prompt": {"1": empty, "2": {**save, "inputs": {**save["inputs"], "images": ["1"]}}}},
        "link_to_missing_node": {"prompt": {"1": empty, "2": {**save, "inputs": {**save["inputs"],
                                                                                 "images": ["99", 0]}}}},
        "bad_combo_value": {"prompt": {"1": empty, "2": scale, "3": {**save, "inputs": {**save["inputs"],
                                                                                        "images": ["2", 0]}}}},
        "load_image_missing_file": {"prompt": {"1": {"class_type": "LoadImage",
                                                     "inputs": {"image": "does_not_exist.png"}}, "2": save}},
        "prompt_is_list": {"prompt": []},
    }


def test_s4_validation_errors(double: Double) -> None:
    s4 = load("s4_validation_errors")
    captured = s4["responses"]

    async def scenario() -> None:
        async with api_for(double) as api:
            main = await api.socket("probe-main")
            for name, body in _s4_requests().items():
                resp = await api.post("/prompt", body)
                exact = name != "link_to_missing_node"  # tracebacks name other files and lines
                assert_response_like(resp, captured[name], exact=exact)
                if not exact:
                    assert resp.json["node_errors"]["2"]["errors"][0]["details"] == "'99'"
                    assert resp.json["error"] == captured[name]["json"]["error"]
            bad = await api.post("/prompt", data=b"{this is not json")
            assert_response_like(bad, captured["invalid_json_body"])
            assert len(main.frames) == 1  # a rejected prompt sends nothing on the socket
            await check_partial_outputs(api, main, s4)

    asyncio.run(scenario())


async def check_partial_outputs(api: Api, main: Socket, s4: dict[str, Any]) -> None:
    theirs = first_entry(s4["responses"]["partial_valid_two_outputs_history"]["json"])
    resp, _ = await api.run(main, {"prompt": theirs["prompt"][2], "client_id": "probe-main"})
    assert_response_like(resp, s4["responses"]["partial_valid_two_outputs"])
    assert resp.json["node_errors"] == s4["responses"]["partial_valid_two_outputs"]["json"]["node_errors"]
    assert_frames_like(main.frames, capture_frames(s4["ws_during"]))
    mine = first_entry((await api.get(f"/history/{resp.json['prompt_id']}")).json)
    assert_shape(mine, theirs)
    assert mine["prompt"][4] == theirs["prompt"][4] == ["4", "3"]
    assert mine["outputs"]["3"] == theirs["outputs"]["3"]


# ------------------------------------------------------------------------------------------------
# s5: runtime error (LoadImage of a file that is not an image)
# ------------------------------------------------------------------------------------------------


def test_s5_execution_error(double: Double) -> None:
    s5 = load("s5_execution_error")
    theirs = first_entry(s5["history"]["json"])

    async def scenario() -> None:
        async with api_for(double) as api:
            main = await api.socket("probe-main")
            form = aiohttp.FormData()
            form.add_field("image", b"this is not a png at all", filename="corrupt.png", content_type="image/png")
            upload = await api.post("/upload/image", data=form)
            assert_response_like(upload, s5["upload"], exact=True)
            resp, frames = await api.run(main, {"prompt": theirs["prompt"][2], "client_id": "probe-main"})
            assert_response_like(resp, s5["post"])
            assert_frames_like(frames, capture_frames(s5["ws"]))
            mine = first_entry((await api.get(f"/history/{resp.json['prompt_id']}")).json)
            assert_shape(mine, theirs)
            error = mine["status"]["messages"][-1][1]
            assert (mine["status"]["status_str"], mine["status"]["completed"]) == ("error", False)
            assert error["exception_type"] == "PIL.UnidentifiedImageError"
            corrupt = api.double.path("input") / "corrupt.png"
            assert error["exception_message"] == f"cannot identify image file '{corrupt}'\n"
            assert error["current_inputs"] == {"image": ["corrupt.png"]}
            assert error["executed"] == [] and sorted(error["current_outputs"]) == ["1", "2"]

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------
# s6: queue priorities, delete, clear and interrupts (global and targeted)
# ------------------------------------------------------------------------------------------------


def long_prompt(color: int, prefix: str = "probe/long", blurs: int = 20) -> dict[str, Any]:
    nodes: dict[str, Any] = {"1": {"class_type": "EmptyImage",
                                   "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}}}
    previous = "1"
    for index in range(100, 100 + blurs):
        nodes[str(index)] = {"class_type": "ImageBlur",
                             "inputs": {"image": [previous, 0], "blur_radius": 31, "sigma": 5.0}}
        previous = str(index)
    nodes["2"] = {"class_type": "SaveImage", "inputs": {"images": [previous, 0], "filename_prefix": prefix}}
    return nodes


def test_s6_interrupt_and_queue(double: Double) -> None:
    s6 = load("s6_interrupt_queue")
    log = {entry["what"]: entry["resp"] for entry in s6["log"]}

    async def scenario() -> None:
        async with api_for(double) as api:
            sock = await api.socket("probe-s6")
            ids = await queue_five_prompts(api, sock, log)
            await check_queue_listing(api, ids, log)
            await interrupt_a_then_d_then_c(api, sock, ids, log)
            stats = (await api.get("/fake/stats")).json
            assert stats["executed"] == [ids["a"], ids["d"], ids["c"]]  # capture: ["a", "d", "c"]
            assert stats["interrupts"] == 4
            history_a = first_entry((await api.get(f"/history/{ids['a']}")).json)
            assert_shape(history_a, first_entry(log["history a"]))
            compare_prompt_streams(sock.frames, capture_frames(s6["ws_text"]), ids, s6)

    asyncio.run(scenario())


async def queue_five_prompts(api: Api, sock: Socket, log: dict[str, Any]) -> dict[str, str]:
    client = {"client_id": "probe-s6"}
    resp_a = await api.post("/prompt", {"prompt": long_prompt(1), **client})
    assert_response_like(resp_a, log["post a"])
    a = resp_a.json["prompt_id"]
    await sock.wait_for(lambda f: f.type == "executing" and f.data.get("node") == "101"
                        and f.data.get("prompt_id") == a)
    bodies: dict[str, dict[str, Any]] = {"b": {}, "c": {"front": True}, "d": {"number": -100}, "e": {}}
    captured = {"b": "post b", "c": "post c front=true", "d": "post d number=-100", "e": "post e"}
    ids = {"a": a}
    for key, extra in bodies.items():
        resp = await api.post("/prompt", {"prompt": long_prompt(ord(key)), **client, **extra})
        assert_response_like(resp, log[captured[key]])
        ids[key] = resp.json["prompt_id"]
    return ids


async def check_queue_listing(api: Api, ids: dict[str, str], log: dict[str, Any]) -> None:
    queue = (await api.get("/queue")).json
    assert [item[1] for item in queue["queue_running"]] == [ids["a"]]
    pending = queue["queue_pending"]
    assert [item[1] for item in pending] == [ids["d"], ids["b"], ids["c"], ids["e"]]  # heap order
    assert [kind(item[0]) for item in pending] == [kind(item[0]) for item in log["GET /queue (summarised)"]["pending"]]
    assert all(item[3] == {"client_id": "probe-s6"} and item[4] == ["2"] for item in pending)
    prompt_count = await api.get("/prompt")
    assert_response_like(prompt_count, log["GET /prompt"], exact=True)
    deleted = await api.post("/queue", {"delete": [ids["b"]]})
    assert_response_like(deleted, log["POST /queue delete b"])
    after = (await api.get("/queue")).json["queue_pending"]
    assert [item[1] for item in after] == [ids["d"], ids["c"], ids["e"]]


async def interrupt_a_then_d_then_c(api: Api, sock: Socket, ids: dict[str, str], log: dict[str, Any]) -> None:
    def interrupted(prompt_id: str) -> Callable[[Frame], bool]:
        return lambda f: f.type == "execution_interrupted" and f.data["prompt_id"] == prompt_id

    def started(prompt_id: str) -> Callable[[Frame], bool]:
        return lambda f: f.type == "execution_start" and f.data["prompt_id"] == prompt_id

    other = await api.post("/interrupt", {"prompt_id": "not-running"})
    assert_response_like(other, log["POST /interrupt other id"])
    targeted = await api.post("/interrupt", {"prompt_id": ids["a"]})
    assert_response_like(targeted, log["POST /interrupt targeted a"])
    await sock.wait_for(interrupted(ids["a"]))
    await sock.wait_for(started(ids["d"]))
    assert_response_like(await api.post("/interrupt"), log["POST /interrupt global (no body)"])
    await sock.wait_for(interrupted(ids["d"]))
    await sock.wait_for(started(ids["c"]))
    assert_response_like(await api.post("/queue", {"clear": True}), log["POST /queue clear"])
    queue = (await api.get("/queue")).json
    assert ([i[1] for i in queue["queue_running"]], queue["queue_pending"]) == ([ids["c"]], [])
    await api.post("/interrupt")  # the capture's harness stopped c the same way after clearing
    await sock.wait_done(ids["c"])


def compare_prompt_streams(mine: list[Frame], theirs: list[Frame], ids: dict[str, str], s6: dict[str, Any]) -> None:
    """Per prompt: start, cached, a run of node starts, interrupted, executing(null) - timing-free."""
    captured_ids = {"a": "11861983-44f2-4ff4-88a6-d59c1d1e860b", "d": "e989529a-dfde-4d48-b26f-99726e97c97c",
                    "c": "3c727685-8c44-404f-9b8b-b9e9947bc3fa"}
    for key, captured_id in captured_ids.items():
        ours = [f for f in without(mine, "progress_state") if (f.data or {}).get("prompt_id") == ids[key]]
        recorded = [f for f in theirs if (f.data or {}).get("prompt_id") == captured_id]
        assert collapse(node_types(ours), "executing_node") == collapse(node_types(recorded), "executing_node")
        ours_int = next(f for f in ours if f.type == "execution_interrupted")
        assert_shape(ours_int.data, next(f for f in recorded if f.type == "execution_interrupted").data)
        assert ours_int.data["node_type"] == "ImageBlur"
    assert mine[-1].type == "executing" and mine[-1].data == {"node": None, "prompt_id": ids["c"]}


# ------------------------------------------------------------------------------------------------
# s7: everything else (system stats, models, object_info, history, /free, /view, uploads)
# ------------------------------------------------------------------------------------------------


def test_s7_misc_endpoints(double: Double) -> None:
    s7 = load("s7_misc")
    basic = first_entry(load("s1_basic")["history"]["json"])["prompt"][2]

    async def scenario() -> None:
        async with api_for(double) as api:
            main = await api.socket("probe-s7")
            await check_info_endpoints(api, s7)
            await api.run(main, {"prompt": basic, "client_id": "probe-s7"})
            await check_history_and_free(api, s7)
            await check_view(api, s7)
            await check_uploads(api, s7)
            await check_load_uploaded(api, main, s7)

    asyncio.run(scenario())


async def check_info_endpoints(api: Api, s7: dict[str, Any]) -> None:
    exact = ["features", "prompt", "models", "models_loras", "models_checkpoints", "models_bogus",
             "experiment_models_loras", "embeddings", "object_info_LoraLoader", "object_info_SaveImage",
             "object_info_unknown"]
    paths = {"features": "/features", "prompt": "/prompt", "models": "/models", "models_loras": "/models/loras",
             "models_checkpoints": "/models/checkpoints", "models_bogus": "/models/bogus",
             "experiment_models_loras": "/experiment/models/loras", "embeddings": "/embeddings",
             "object_info_LoraLoader": "/object_info/LoraLoader", "object_info_SaveImage": "/object_info/SaveImage",
             "object_info_unknown": "/object_info/NoSuchNode"}
    for name in exact:
        assert_response_like(await api.get(paths[name]), s7[name], exact=True)
    stats = await api.get("/system_stats")
    assert_response_like(stats, s7["system_stats"])
    assert stats.json["system"]["argv"][0] == "main.py"
    experiment = await api.get("/experiment/models")
    assert_response_like(experiment, s7["experiment_models"])
    assert [e["name"] for e in experiment.json] == [e["name"] for e in s7["experiment_models"]["json"]]
    assert [len(e["folders"]) for e in experiment.json] == [len(e["folders"]) for e in s7["experiment_models"]["json"]]
    assert (await api.get("/api/system_stats")).status == s7["api_prefix_system_stats_status"]
    everything = await api.get("/object_info")
    assert everything.status == s7["object_info_all_summary"]["status"]
    assert {"EmptyImage", "KSampler", "LoraLoader", "SaveImageWebsocket"} <= set(everything.json)


async def check_history_and_free(api: Api, s7: dict[str, Any]) -> None:
    latest = await api.get("/history?max_items=1")
    assert latest.status == 200 and len(latest.json) == 1
    assert set(first_entry(latest.json)) == set(first_entry(s7["history_max_items_1"]["json"]))
    assert_response_like(await api.get("/history/does-not-exist"), s7["history_unknown_id"], exact=True)
    free = await api.post("/free", {"unload_models": True, "free_memory": True})
    assert_response_like(free, s7["free_both"])
    assert_response_like(await api.post("/free"), s7["free_empty_body"])
    assert (await api.get("/fake/stats")).json["free_calls"] == [{"unload_models": True, "free_memory": True}]


async def check_view(api: Api, s7: dict[str, Any]) -> None:
    cases = {
        "view_missing": "filename=nope.png", "view_no_filename": "type=output",
        "view_dotdot": "filename=../x.png", "view_subfolder_escape": "filename=basic_00001_.png&subfolder=../..",
        "view_bad_type": "filename=basic_00001_.png&type=bogus",
        "view_annotated": "filename=basic_00001_.png%20[output]&subfolder=probe&type=temp",
        "view_preview_webp": "filename=basic_00001_.png&subfolder=probe&preview=webp;50",
        "view_channel_rgb": "filename=basic_00001_.png&subfolder=probe&channel=rgb",
    }
    for name, query in cases.items():
        resp = await api.get("/view?" + query)
        captured = s7[name]
        assert (resp.status, resp.content_type) == (captured["status"], captured["content_type"]), name
        assert resp.headers.get("Content-Disposition") == captured["headers"].get("Content-Disposition"), name
        assert resp.body[:4] == bytes.fromhex(captured["magic_hex"])[:4], name


async def check_uploads(api: Api, s7: dict[str, Any]) -> None:
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))

    async def upload(content: bytes | None, **fields: str) -> Resp:
        form = aiohttp.FormData()
        for key, value in fields.items():
            form.add_field(key, value)
        if content is not None:
            form.add_field("image", content, filename="probe_up.png", content_type="image/png")
        return await api.post("/upload/image", data=form)

    steps = [
        ("upload_new", red, {}), ("upload_same_content_same_name", red, {}),
        ("upload_diff_content_same_name", blue, {}), ("upload_overwrite_true", blue, {"overwrite": "true"}),
        ("upload_subfolder_temp", red, {"subfolder": "clients/abc", "type": "temp"}),
        ("upload_subfolder_escape", red, {"subfolder": "../.."}), ("upload_no_image_field", None, {"type": "input"}),
    ]
    for name, content, fields in steps:
        assert_response_like(await upload(content, **fields), s7[name], exact=True)
    assert (api.double.path("input") / "probe_up.png").read_bytes() == blue


async def check_load_uploaded(api: Api, main: Socket, s7: dict[str, Any]) -> None:
    theirs = first_entry(s7["loadimage_annotated_temp_history"]["json"])
    resp, _ = await api.run(main, {"prompt": theirs["prompt"][2], "client_id": "probe-s7"})
    assert_response_like(resp, s7["loadimage_annotated_temp_post"])
    history = await api.get(f"/history/{resp.json['prompt_id']}")
    assert assert_history_like(history, s7["loadimage_annotated_temp_history"])["outputs"] == theirs["outputs"]
    prompt = json.loads(json.dumps(theirs["prompt"][2]))
    prompt["1"]["inputs"]["image"] = "probe_up.png"
    resp2, _ = await api.run(main, {"prompt": prompt, "client_id": "probe-s7"})
    assert_response_like(resp2, s7["loadimage_input_post"])
    pid = resp2.json["prompt_id"]
    assert first_entry((await api.get(f"/history/{pid}")).json)["outputs"] == s7["loadimage_input_history_outputs"]
    assert_response_like(await api.post("/history", {"delete": [pid]}), s7["history_delete"])
    assert_response_like(await api.get(f"/history/{pid}"), s7["history_after_delete"], exact=True)


# ------------------------------------------------------------------------------------------------
# s8 and lora_not_in_long_list: LoRA files appearing and disappearing on a running server
# ------------------------------------------------------------------------------------------------


def test_s8_lora_hot_reload(double: Double) -> None:
    s8 = load("s8_lora_hot")
    loras = double.path("models") / "loras"

    async def scenario() -> None:
        async with api_for(double) as api:
            assert_response_like(await api.get("/models/loras"), s8["before"], exact=True)
            write_safetensors(loras / "hot_new.safetensors")
            assert_response_like(await api.get("/models/loras"), s8["after_add"], exact=True)
            write_safetensors(loras / "sub" / "nested.safetensors")
            (loras / "readme.txt").write_text("not a model")
            assert_response_like(await api.get("/models/loras"), s8["after_nested_and_txt"], exact=True)
            write_safetensors(double.path("output") / "loras" / "in_output_dir.safetensors")
            assert_response_like(await api.get("/models/loras"), s8["after_output_loras"], exact=True)
            for name, lora in (("prompt_with_hot_lora", "hot_new.safetensors"),
                               ("prompt_with_nested_lora", "sub/nested.safetensors")):
                prompt = t2i_prompt()
                prompt["4"]["inputs"]["ckpt_name"] = "nope.safetensors"
                prompt["10"]["inputs"]["lora_name"] = lora
                assert_response_like(await api.post("/prompt", {"prompt": prompt}), s8[name], exact=True)
            info = (await api.get("/object_info/LoraLoader")).json
            assert info["LoraLoader"]["input"]["required"]["lora_name"] == s8["object_info_lora_list"]
            (loras / "hot_new.safetensors").unlink()
            assert_response_like(await api.get("/models/loras"), s8["after_remove"], exact=True)

    asyncio.run(scenario())


def test_lora_not_in_long_list(double: Double) -> None:
    captured = load("lora_not_in_long_list")
    write_safetensors(double.path("models") / "checkpoints" / "tiny_sd15.safetensors")
    for index in range(22):
        write_safetensors(double.path("models") / "loras" / f"lora_{index:02}.safetensors")
    prompt = t2i_prompt()
    prompt["11"] = prompt.pop("9")
    prompt["10"]["inputs"]["lora_name"] = "missing.safetensors"

    async def scenario() -> None:
        async with api_for(double) as api:
            resp = await api.post("/prompt", {"prompt": prompt})
            assert resp.status == captured["status"]
            assert resp.json == json.loads(captured["body_text"])

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------
# misc2: prompts without client_id, joining late, duplicate prompt ids, numeric ids and numbers
# ------------------------------------------------------------------------------------------------


def test_misc2(double: Double) -> None:
    misc = load("misc2")

    async def scenario() -> None:
        async with api_for(double) as api:
            await check_no_client_id(api, misc["no_client_id"])
            await check_late_join(api, misc["late_join"])
            await check_duplicate_prompt_id(api, misc["dup_prompt_id"])
            resp = await api.post("/prompt", {"prompt": long_prompt(5, "probe/num", blurs=0), "prompt_id": 12345,
                                              "number": "7"})
            assert_response_like(resp, misc["numeric_prompt_id_string_number"], exact=True)

    asyncio.run(scenario())


async def check_no_client_id(api: Api, captured: dict[str, Any]) -> None:
    observer = await api.socket("observer-misc2")
    mark = len(observer.frames)
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2, "color": 77}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                     "width": 8, "height": 8, "crop": "disabled"}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["3", 0]}},
    }
    resp = await api.post("/prompt", {"prompt": prompt})
    assert_response_like(resp, captured["post"])
    await observer.wait_for(lambda f: f.type == "status" and f.data["status"]["exec_info"]["queue_remaining"] == 0,
                            mark + 2)
    expected = capture_frames(captured["observer_msgs"])
    assert_frames_like(observer.frames[mark:], expected)
    progress_states_like(observer.frames[mark:], expected)
    history = first_entry((await api.get(f"/history/{resp.json['prompt_id']}")).json)
    assert history["status"]["status_str"] == captured["history_status"]


async def check_late_join(api: Api, captured: dict[str, Any]) -> None:
    early = await api.socket("late-join")
    resp = await api.post("/prompt", {"prompt": long_prompt(9, "probe/late", blurs=6), "client_id": "late-join"})
    assert_response_like(resp, captured["post"])
    await early.wait_for(lambda f: f.type == "executing" and f.data.get("node") == "102")
    late = await api.socket("late-join")  # same clientId: replaces the first socket
    await late.wait_done(resp.json["prompt_id"])
    mine, theirs = without(late.frames, "progress_state"), capture_frames(captured["msgs"])
    assert collapse(node_types(mine), "executing_node") == collapse(node_types(theirs), "executing_node")
    assert list(mine[1].data) == ["node"] and mine[1].type == "executing"  # only the node, no prompt_id
    assert_shape(mine[0].data, theirs[0].data)
    assert not any(f.type == "execution_success" for f in early.frames)  # the replaced socket gets nothing more


async def check_duplicate_prompt_id(api: Api, captured: dict[str, Any]) -> None:
    sock = await api.socket("probe-dup")
    answers = []
    for color in (1, 2):
        body = {"prompt": long_prompt(color, "probe/dup", blurs=0), "client_id": "probe-dup",
                "prompt_id": "my-fixed-id-123"}
        answers.append(await api.post("/prompt", body))
    assert_response_like(answers[0], captured["post1"])
    assert_response_like(answers[1], captured["post2"])
    first = await sock.wait_done("my-fixed-id-123")
    await sock.wait_done("my-fixed-id-123", first + 1)
    assert sum(is_done(f, "my-fixed-id-123") for f in sock.frames) == captured["n_executing_null"]
    history = first_entry((await api.get("/history/my-fixed-id-123")).json)
    assert history["outputs"] == captured["history_outputs"]


# ------------------------------------------------------------------------------------------------
# t2i: checkpoint -> LoRA -> sampler -> decode -> save, with previews, caching, interrupt and /free
# ------------------------------------------------------------------------------------------------


def _install_tiny_models(double: Double) -> None:
    write_safetensors(double.path("models") / "checkpoints" / "tiny_sd15.safetensors")
    write_safetensors(double.path("models") / "loras" / "tiny_lora.safetensors")


def test_t2i_real_model(double: Double) -> None:
    t2i = load("t2i_real_model")
    _install_tiny_models(double)

    async def scenario() -> None:
        async with api_for(double) as api:
            sock = await api.socket("t2i-probe")
            for key in ("first_run", "second_run_models_loaded"):
                captured = t2i[key]
                theirs = first_entry(captured["history"])
                resp, frames = await api.run(sock, {"prompt": theirs["prompt"][2], "client_id": "t2i-probe"})
                assert_response_like(resp, captured["post"])
                assert_frames_like(frames, capture_frames(captured["ws"]))
                progress_states_like(frames, capture_frames(captured["ws"]))
                mine = first_entry((await api.get(f"/history/{resp.json['prompt_id']}")).json)
                assert_shape(mine, theirs)
                assert mine["outputs"] == theirs["outputs"]
            await check_t2i_interrupt(api, sock, t2i["interrupt_mid_sampling"])
            assert_response_like(await api.post("/free", {"unload_models": True, "free_memory": True}), t2i["free"])
            assert_response_like(await api.get("/system_stats"), t2i["system_stats_after_free"])
            again = t2i_prompt()
            _, frames = await api.run(sock, {"prompt": again, "client_id": "t2i-probe"})
            assert next(f for f in frames if f.type == "execution_cached").data["nodes"] == []  # caches were reset

    asyncio.run(scenario())


async def check_t2i_interrupt(api: Api, sock: Socket, captured: dict[str, Any]) -> None:
    prompt = t2i_prompt("second_run_models_loaded")
    prompt["3"]["inputs"]["steps"] = 200
    prompt["5"]["inputs"]["height"] = 72
    mark = len(sock.frames)
    resp = await api.post("/prompt", {"prompt": prompt, "client_id": "t2i-probe"})
    assert_response_like(resp, captured["post"])
    pid = resp.json["prompt_id"]
    await sock.wait_for(lambda f: f.type == "progress" and f.data["value"] == 3, mark)
    assert_response_like(await api.post("/interrupt"), captured["interrupt"])
    end = await sock.wait_done(pid, mark)
    mine = without(sock.frames[mark : end + 1], "progress_state", "bin1")
    theirs = capture_frames(captured["ws"])
    assert collapse(types(mine), "progress") == collapse(types(theirs), "progress")
    for a, e in zip(mine, theirs, strict=False):
        if a.type == e.type and a.type not in ("progress",):
            assert_shape(a.data, e.data)
    stop = next(f for f in mine if f.type == "execution_interrupted").data
    recorded = next(f for f in theirs if f.type == "execution_interrupted").data
    assert {k: stop[k] for k in ("node_id", "node_type", "executed")} == {
        k: recorded[k] for k in ("node_id", "node_type", "executed")}
    cached = next(f for f in mine if f.type == "execution_cached").data["nodes"]
    assert cached == next(f for f in theirs if f.type == "execution_cached").data["nodes"]
    status = first_entry((await api.get(f"/history/{pid}")).json)["status"]
    assert_shape(status, captured["history_status"])


def test_t2i_feature_flags(double: Double) -> None:
    ff = load("t2i_feature_flags")
    _install_tiny_models(double)
    prompt = t2i_prompt()
    prompt["3"]["inputs"]["steps"] = 3
    prompt["9"]["inputs"]["filename_prefix"] = "probe/ff"

    async def scenario() -> None:
        async with api_for(double) as api:
            anonymous = await api.socket()
            assert_shape(anonymous.frames[0].data, ff["anon_first"]["json"]["data"])
            assert re.fullmatch(r"[0-9a-f]{32}", anonymous.frames[0].data["sid"])
            flagged = await api.socket("t2iff-probe", feature_flags=True)
            await flagged.wait_for(lambda f: f.type == "feature_flags")
            resp, _ = await api.run(flagged, {"prompt": prompt, "client_id": "t2iff-probe"})
            assert_frames_like(without(flagged.frames, "progress_state"), capture_frames(ff["ws"]))
            await anonymous.wait_for(lambda f: f.type == "status" and "sid" not in f.data
                                     and f.data["status"]["exec_info"]["queue_remaining"] == 0)
            assert types(anonymous.frames) == ff["anon_all_types"]
            history = first_entry((await api.get(f"/history/{resp.json['prompt_id']}")).json)
            assert history["outputs"]["9"]["images"][0]["filename"] == "ff_00001_.png"

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------
# Things only the double has, and behaviour the captures describe but do not replay
# ------------------------------------------------------------------------------------------------


def test_fake_hooks_exec_log_and_origin_check(double: Double) -> None:
    async def scenario() -> None:
        async with api_for(double) as api:
            sock = await api.socket("probe-hooks")
            await api.run(sock, {"prompt": long_prompt(3, "probe/h", blurs=0), "client_id": "probe-hooks"})
            await api.post("/prompt", {"prompt": {"1": {"class_type": "Nope", "inputs": {}}}})
            stats = (await api.get("/fake/stats")).json
            assert stats["prompts_posted"] == 2 and len(stats["executed"]) == 1
            assert api.double.path("exec.log").read_text() == stats["executed"][0] + "\n"
            vram = await api.post("/fake/vram", {"vram_total": 8 * 2**30, "vram_free": 2**30})
            assert vram.status == 200
            device = (await api.get("/system_stats")).json["devices"][0]
            assert device["name"] == "cuda:0 NVIDIA Fake : cudaMallocAsync"
            assert (device["type"], device["index"], device["vram_free"]) == ("cuda", 0, 2**30)
            foreign = {"Origin": f"http://localhost:{api.double.port}"}
            assert (await api.get("/system_stats", headers=foreign)).status == 403
            assert (await api.get("/system_stats", headers={"Origin": api.double.url})).status == 200
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await api.session.ws_connect(api.double.url.replace("http", "ws") + "/ws", headers=foreign)
            assert info.value.status == 403

    asyncio.run(scenario())


def test_extra_model_paths_and_startup_delay(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    write_safetensors(shared / "loras" / "from_yaml.safetensors")
    write_safetensors(tmp_path / "cfg" / "relative_loras" / "relative.safetensors")
    config = tmp_path / "cfg" / "extra.yaml"
    config.write_text(f"worker:\n    base_path: {shared}\n    is_default: true\n    loras: loras/\n"
                      "other:\n    loras: |\n        relative_loras\n")
    started = time.monotonic()
    d = start_double(tmp_path / "run", "--extra-model-paths-config", str(config), "--startup-delay", "0.5")
    try:
        assert time.monotonic() - started >= 0.5
        with urllib.request.urlopen(d.url + "/models/loras") as resp:
            assert json.loads(resp.read()) == ["from_yaml.safetensors", "relative.safetensors"]
        with urllib.request.urlopen(d.url + "/experiment/models") as resp:
            loras = next(e for e in json.loads(resp.read()) if e["name"] == "loras")
        assert loras["folders"] == [str(shared / "loras"), str(tmp_path / "run" / "models" / "loras"),
                                    str(tmp_path / "cfg" / "relative_loras"),
                                    str(tmp_path / "run" / "output" / "loras")]
    finally:
        assert d.stop() == 0
    assert "Adding extra search path loras" in d.log() and "To see the GUI go to" in d.log()


# ------------------------------------------------------------------------------------------------
# media_outputs: animations, video, latents, text (outputs other than still PNGs)
# ------------------------------------------------------------------------------------------------


def media_frames(raw: list[dict[str, Any]]) -> list[Frame]:
    """This capture keeps binary frames as length + head only: bin<event> with the head as `image`."""
    frames = []
    for f in raw:
        if f["kind"] == "text":
            frames.append(Frame(f["json"]["type"], f["json"]["data"]))
        else:
            head = bytes.fromhex(f["head_hex"])
            frames.append(Frame(f"bin{struct.unpack('>I', head[:4])[0]}", meta=f["len"], image=head))
    return frames


def test_media_outputs_in_recorded_order(double: Double) -> None:
    """The cases were recorded one after another on one server, so identical upstream nodes (the EmptyImage of
    save_animated_png and save_webm) come from the cache there: they are replayed the same way here."""
    media = load("media_outputs")

    async def scenario() -> None:
        async with api_for(double) as api:
            for case, captured in media.items():
                await check_media_case(api, case, captured)

    asyncio.run(scenario())


async def check_media_case(api: Api, case: str, captured: dict[str, Any]) -> None:
    theirs = first_entry(captured["history"]["json"])
    client = theirs["prompt"][3]["client_id"]
    main = await api.socket(client)
    resp, mine = await api.run(main, {"prompt": captured["prompt"], "client_id": client})
    assert_shape(resp.json, json.loads(captured["post"]["body_text"]))
    expected = media_frames(captured["ws"])[1:]  # the capture starts with the status sent on connect
    assert types(mine) == types(expected), case
    for a, e in zip(mine, expected, strict=True):
        if a.type.startswith("bin"):
            # real: send_progress_text: 4-byte event, 4-byte node id length, node id, UTF-8 text
            assert struct.pack(">I", a.meta) == e.image[4:8] and len(a.image) + 8 == e.meta, (case, a, e)
        else:
            assert_shape(a.data, e.data, f"{case}:{a.type}")
            if a.type == "execution_cached":
                assert a.data["nodes"] == e.data["nodes"], case
    progress_states_like(mine, expected)
    ours = first_entry((await api.get(f"/history/{resp.json['prompt_id']}")).json)
    assert_shape(ours, theirs)
    assert ours["outputs"] == theirs["outputs"], case  # keys, file names, subfolders, animated flags
    for view in captured["views"]:
        item = view["item"]
        got = await api.get(f"/view?filename={item['filename']}&subfolder={item['subfolder']}&type=output")
        assert (got.status, got.content_type) == (view["status"], view["content_type"]), view
        magic = bytes.fromhex(view["magic_hex"])
        if view["key"] == "latents":  # safetensors: an 8-byte little-endian header length, then JSON
            assert got.body[8:10] == magic[8:10] == b'{"'
        else:
            assert got.body[: len(magic)] == magic, (case, got.body[:16].hex(), view["magic_hex"])
    await main.close()
    api.sockets.remove(main)


def test_vhs_video_combine_reports_gifs(double: Double) -> None:
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 4, "color": 255}},
        "2": {"class_type": "VHS_VideoCombine", "inputs": {
            "images": ["1", 0], "frame_rate": 8.0, "loop_count": 0, "filename_prefix": "vhs/clip",
            "format": "video/h264-mp4", "pingpong": False, "save_output": True}},
    }

    async def scenario() -> None:
        async with api_for(double) as api:
            main = await api.socket("vhs")
            resp, _ = await api.run(main, {"prompt": prompt, "client_id": "vhs"})
            out = first_entry((await api.get(f"/history/{resp.json['prompt_id']}")).json)["outputs"]["2"]
            (item,) = out["gifs"]
            assert {k: item[k] for k in ("filename", "subfolder", "type", "format", "frame_rate", "workflow")} == {
                "filename": "clip_00001.mp4", "subfolder": "vhs", "type": "output", "format": "video/h264-mp4",
                "frame_rate": 8.0, "workflow": "clip_00001.png"}
            assert item["fullpath"] == str(double.path("output") / "vhs" / "clip_00001.mp4")
            view = await api.get("/view?filename=clip_00001.mp4&subfolder=vhs&type=output")
            assert view.content_type == "video/mp4" and view.body[4:8] == b"ftyp"

    asyncio.run(scenario())
