"""Latent previews for the console (CONSOLE_PREVIEWS): binary frames decoded (selfix/comfy.py), tied to the
prompt they belong to in the order the captures show, kept in the spool only while their task is in processing/
(selfix/spool.py, selfix/previews.py), and the runner in-process against the double run with `--preview-method`.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from selfix.admission import accept, limits_of
from selfix.clock import OffsetClock
from selfix.comfy import ComfyClient, EventStream, PreviewFrame, parse_preview
from selfix.job import Job, JobState
from selfix.previews import MIN_INTERVAL_S, PreviewKeeper
from selfix.process import Heartbeat, StopFlags
from selfix.runner import Runner
from selfix.settings import load
from selfix.spool import PREVIEW_MAX_BYTES, Spool
from selfix.storage import open_store
from selfix.templates import Catalog
from tests.servers.node_plugin import Double, task

pytestmark = pytest.mark.timeout(60)

CAPTURES = Path(__file__).parent / "data" / "comfyui-captures"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 32
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def legacy(image: bytes, image_type: int = 1) -> bytes:
    return struct.pack(">II", 1, image_type) + image


def with_metadata(image: bytes, prompt_id: str, image_type: str = "image/jpeg", node_id: str = "3") -> bytes:
    meta = json.dumps({"node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id,
                       "parent_node_id": None, "real_node_id": node_id, "image_type": image_type}).encode()
    return struct.pack(">II", 4, len(meta)) + meta + image


# --- frames --------------------------------------------------------------------------------------------------------

def test_legacy_frames_carry_the_image_and_no_prompt() -> None:
    assert parse_preview(legacy(JPEG)) == PreviewFrame(None, "image/jpeg", JPEG)
    assert parse_preview(legacy(PNG, 2)) == PreviewFrame(None, "image/png", PNG)


def test_metadata_frames_name_their_prompt_and_node() -> None:
    frame = parse_preview(with_metadata(PNG, "p-1", "image/png", node_id="2"))
    assert frame == PreviewFrame("p-1", "image/png", PNG, "2")


@pytest.mark.parametrize("data", [
    b"", b"\x00\x00\x00\x01", b"\x00\x00\x00\x01\x00\x00\x00",  # shorter than the two header words
    legacy(b""), legacy(JPEG[:2]),  # no image, or less than its magic
    legacy(PNG, 1), legacy(JPEG, 2), legacy(JPEG, 7),  # bytes that are not the type the header says
    struct.pack(">II", 3, 1) + b"3" + b"some text",  # event 3 (node text) is no preview
    struct.pack(">II", 2, 1) + JPEG,  # event 2 never goes out on the wire
    struct.pack(">II", 4, 500) + b"{}" + JPEG,  # metadata longer than the frame
    struct.pack(">II", 4, 5) + b"{nope" + JPEG,  # metadata that is not JSON
    struct.pack(">II", 4, 2) + b"[]" + JPEG,  # not an object
    with_metadata(JPEG, "p")[:20],  # cut inside the metadata
    struct.pack(">II", 4, 17) + b'{"prompt_id": 12}' + JPEG,  # prompt id not a string
    with_metadata(JPEG, "p", "image/webp"), with_metadata(PNG, "p", "image/jpeg"),
    struct.pack(">II", 4, 4000) + b"[" * 4000 + JPEG,  # deep nesting
])
def test_truncated_and_malformed_frames_are_ignored(data: bytes) -> None:
    assert parse_preview(data) is None


def test_random_bytes_never_raise() -> None:
    rng = random.Random(7)
    heads = [b"\x00\x00\x00\x01", b"\x00\x00\x00\x04", b""]
    for _ in range(3000):
        blob = rng.choice(heads) + bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        frame = parse_preview(blob)
        assert frame is None or frame.image[:2] in (b"\xff\xd8", b"\x89P")


# --- the stream: which prompt a frame belongs to -------------------------------------------------------------------

class Msg:
    def __init__(self, kind: aiohttp.WSMsgType, data: Any) -> None:
        self.type, self.data = kind, data


class FakeSocket:
    """What EventStream reads (async iteration of messages) and sends (send_str)."""

    def __init__(self, messages: list[Msg]) -> None:
        self.messages = messages
        self.sent: list[str] = []

    async def send_str(self, data: str) -> None:
        self.sent.append(data)

    def __aiter__(self) -> AsyncIterator[Msg]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Msg]:
        for msg in self.messages:
            yield msg


def replay(ws: list[dict[str, Any]]) -> tuple[list[Msg], int]:
    """A capture's frames as socket messages; binaries rebuilt from what the capture kept of them (header, metadata,
    the image's magic). Returns the messages and the number of preview frames among them."""
    out, previews = [], 0
    for frame in ws:
        if frame["kind"] == "text":
            out.append(Msg(aiohttp.WSMsgType.TEXT, frame["raw"]))
            continue
        image = bytes.fromhex(frame["image_magic_hex"]) + b"\x00" * 64
        if frame["event"] == 1:
            data = legacy(image, frame["image_type"])
        else:
            meta = frame["metadata"]
            data = with_metadata(image, meta["prompt_id"], meta["image_type"], meta["node_id"])
        out.append(Msg(aiohttp.WSMsgType.BINARY, data))
        previews += 1
    return out, previews


async def read_all(messages: list[Msg], previews: bool = True) -> tuple[list[PreviewFrame], FakeSocket, EventStream]:
    got: list[PreviewFrame] = []

    async def handler(_kind: str, _data: dict[str, Any]) -> None:
        return None

    stream = EventStream(None, handler, on_preview=got.append if previews else None)  # type: ignore[arg-type]
    ws = FakeSocket(messages)
    await stream.opened(ws)  # type: ignore[arg-type]
    await stream._read(ws)  # type: ignore[arg-type]
    return got, ws, stream


def capture(name: str, *keys: str) -> Any:
    doc = json.loads((CAPTURES / f"{name}.json").read_text())
    for key in keys:
        doc = doc[key]
    return doc


@pytest.mark.parametrize(("name", "keys", "prompt_id"), [
    ("t2i_real_model", ("first_run", "ws"), "e6cf8d97-c5ad-4f1a-a337-282921547af5"),  # legacy: progress → binary 1
    ("s3_ws_images_legacy", ("ws",), "b244fb06-9c72-46d2-9102-7f006db638ba"),  # SaveImageWebsocket PNGs
    ("t2i_feature_flags", ("ws",), "f66832cd-4b5d-4dbe-ae52-259375660ee9"),  # handshake: binary 4 → progress
    ("s3b_ws_images_feature_flags", ("ws",), "dba1d81b-7fff-4665-abda-d6eabfb860f5"),
])
async def test_every_preview_of_a_capture_is_tied_to_its_prompt(name: str, keys: tuple[str, ...],
                                                                prompt_id: str) -> None:
    messages, count = replay(capture(name, *keys))
    got, ws, stream = await read_all(messages)
    assert count >= 3 and len(got) == count
    assert {f.prompt_id for f in got} == {prompt_id}
    assert json.loads(ws.sent[0]) == {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
    assert stream.preview_metadata == name.endswith("feature_flags")


async def test_a_legacy_frame_with_no_progress_before_it_is_dropped() -> None:
    progress = json.dumps({"type": "progress", "data": {"value": 1, "max": 2, "prompt_id": "mine", "node": "3"}})
    done = json.dumps({"type": "executing", "data": {"node": None, "prompt_id": "mine"}})
    start = json.dumps({"type": "execution_start", "data": {"prompt_id": "next"}})
    text, binary = aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY
    got, _, _ = await read_all([
        Msg(binary, legacy(JPEG)),  # before any progress: whose? nobody's
        Msg(text, progress), Msg(binary, legacy(JPEG)),  # mine
        Msg(text, done), Msg(binary, legacy(JPEG)),  # after mine ended
        Msg(text, progress), Msg(text, start), Msg(binary, legacy(JPEG)),  # a new prompt began, no progress yet
        Msg(binary, b"\x00\x00\x00\x01garbage"),  # malformed: skipped, the stream goes on
        Msg(text, progress), Msg(binary, with_metadata(JPEG, "other")),  # event 4 says whose it is
    ])
    assert [f.prompt_id for f in got] == ["mine", "other"]


async def test_with_previews_off_no_handshake_and_no_frame() -> None:
    messages, _ = replay(capture("t2i_real_model", "first_run", "ws"))
    got, ws, _ = await read_all(messages, previews=False)
    assert got == [] and ws.sent == []


# --- the spool's preview file --------------------------------------------------------------------------------------

@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool").ensure()


def claimed(spool: Spool, task_id: str = "t1") -> Job:
    job = Job(task_id, enqueued_at=time.time(), attempt=1, state=JobState.SUBMITTED)
    spool.write_processing(job)
    return job


def test_preview_written_replaced_and_removed_when_the_task_finishes(spool: Spool) -> None:
    claimed(spool)
    assert spool.preview_version("t1") is None and spool.read_preview("t1") is None
    assert spool.write_preview("t1", JPEG)
    first = spool.preview_version("t1")
    assert spool.read_preview("t1") == JPEG and first is not None
    assert spool.write_preview("t1", PNG)
    assert spool.read_preview("t1") == PNG and spool.preview_version("t1") != first
    assert spool.counts()["tmp"] == 0  # written through tmp/, nothing left there
    spool.drop_processing("t1")
    assert not spool.preview_path("t1").exists() and spool.read_preview("t1") is None
    assert not spool.write_preview("t1", JPEG), "a finished task's preview was written"
    assert not list(spool.previews.iterdir())


def test_preview_removed_when_the_task_goes_back_to_the_inbox(spool: Spool) -> None:
    job = claimed(spool)
    spool.write_preview("t1", JPEG)
    spool.requeue(job.retried(0, {"code": "timeout"}))
    assert not spool.preview_path("t1").exists()


def test_preview_over_the_cap_or_of_a_bad_id_is_refused(spool: Spool) -> None:
    claimed(spool)
    assert not spool.write_preview("t1", JPEG + b"\x00" * PREVIEW_MAX_BYTES)
    assert spool.write_preview("t1", JPEG + b"\x00" * (PREVIEW_MAX_BYTES - len(JPEG)))
    with pytest.raises(ValueError):
        spool.preview_path("../t1")
    spool.drop_preview("../t1")  # never raises, removes nothing outside


def test_read_preview_needs_the_task_in_processing(spool: Spool) -> None:
    claimed(spool)
    spool.write_preview("t1", JPEG)
    spool.processing_path("t1").unlink()  # a crash between the two removals
    assert spool.read_preview("t1") is None
    assert spool.clear_previews() == 1 and spool.clear_previews() == 0


def test_keeper_writes_a_few_per_second_and_survives_a_failed_write(spool: Spool) -> None:
    clock = OffsetClock()
    keeper = PreviewKeeper(spool, clock)
    claimed(spool)
    claimed(spool, "t2")
    frame = PreviewFrame("p", "image/jpeg", JPEG)
    assert keeper.keep("t1", frame)
    assert not keeper.keep("t1", frame)  # within MIN_INTERVAL_S: dropped
    assert keeper.keep("t2", frame)  # another task is not held back by the first one's
    clock.advance(MIN_INTERVAL_S)
    assert keeper.keep("t2", PreviewFrame("p", "image/png", PNG)) and spool.read_preview("t2") == PNG
    spool.clear_previews()
    spool.previews.rmdir()
    spool.previews.write_bytes(b"")  # a file where the directory belongs: every write fails with an OSError
    clock.advance(MIN_INTERVAL_S)
    assert not keeper.keep("t1", frame)


# --- the runner, in-process, against the double with --preview-method latent2rgb ----------------------------------

class PreviewBench:
    def __init__(self, root: Path, double: Double, previews: bool) -> None:
        self.double = double
        self.settings = load({
            "SPOOL_DIR": str(root / "spool"), "STORE_DIR": str(root / "store"), "LORA_CACHE_DIR": str(root / "loras"),
            "TEMP_DIR": str(root / "temp"), "MODELS_DIR": str(double.dirs["models"]), "COMFY_PORT": str(double.port),
            "COMFY_OUTPUT_DIR": str(double.dirs["output"]), "COMFY_INPUT_DIR": str(double.dirs["input"]),
            "DISK_FREE_FLOOR_GB": "0", "CONSOLE_PREVIEWS": str(previews).lower()})
        self.settings.store_dir.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(self.settings.spool_dir).ensure()
        self.flags = StopFlags(Heartbeat(self.spool, "runner"))

    def submit(self, task_id: str, steps: int) -> None:
        outcome = accept(self.spool, json.dumps(task(task_id, steps=steps)).encode(), limits_of(self.settings),
                         Catalog.load())
        assert outcome.kind == "accepted", outcome

    @asynccontextmanager
    async def running(self) -> AsyncIterator[asyncio.Task[int]]:
        async with aiohttp.ClientSession() as session:
            client = ComfyClient(self.settings.comfy_url, f"test-previews-{id(self)}", session)
            runner = Runner(self.settings, self.spool, open_store(self.settings), client, self.flags)
            run = asyncio.create_task(runner.run(until_idle=True))
            try:
                yield run
            finally:
                await asyncio.wait_for(run, 30)


@pytest.fixture
def previews_bench(tmp_path: Path) -> Iterator[Callable[[bool], PreviewBench]]:
    double = Double(tmp_path / "double", seconds_per_step=0.05, extra=("--preview-method", "latent2rgb")).start()
    try:
        yield lambda on: PreviewBench(tmp_path / f"bench-{on}", double, on)
    finally:
        double.stop()


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


async def test_runner_keeps_the_running_tasks_preview_and_removes_it_at_the_end(
        previews_bench: Callable[[bool], PreviewBench]) -> None:
    bench = previews_bench(True)
    stale = bench.spool.previews / "gone.preview"
    bench.spool.previews.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(JPEG)  # what a killed runner left
    bench.submit("p1", steps=40)  # 40 × 0.05 s
    async with bench.running():
        await until(lambda: not stale.exists(), 10, "the stale preview removed at start")
        image = await until(lambda: bench.spool.read_preview("p1"), 20, "p1's preview while it runs")
        assert image.startswith(b"\xff\xd8\xff")  # the double's latent2rgb JPEG
        versions: set[str | None] = set()
        await until(lambda: versions.add(bench.spool.preview_version("p1")) or len(versions - {None}) >= 3, 10,
                    "three successive previews")
    assert bench.spool.read_result("p1")["status"] == "completed"
    assert not bench.spool.preview_path("p1").exists() and not list(bench.spool.previews.iterdir())


async def test_runner_writes_no_preview_with_the_setting_off(previews_bench: Callable[[bool], PreviewBench]) -> None:
    bench = previews_bench(False)
    bench.submit("p2", steps=10)
    seen: list[str] = []
    async with bench.running() as run:
        await until(lambda: bench.spool.processing_path("p2").exists(), 10, "p2 claimed")
        while not run.done():  # the whole run: a preview would be gone again once the task finished
            seen += bench.spool.clear_previews() * ["a preview"]
            await asyncio.sleep(0.01)
    assert bench.spool.read_result("p2")["status"] == "completed"
    assert seen == []
