"""A full disk, for real: each test mounts a small tmpfs, fills it with ballast until the kernel says ENOSPC, and
checks that a write that fails leaves nothing behind, that nothing accepted is lost, and that what was cut short
works once space returns. (The whole node on a full disk is in tests/test_kafka_node.py.)"""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from PIL import Image

from selfix import messages as m
from selfix.admission import adopt_dropped, limits_of
from selfix.files import DiskFull, disk_full_error, is_disk_full, write_synced
from selfix.job import Job
from selfix.loras import CacheFull, LoraCache
from selfix.prepare import place_images
from selfix.process import StopFlags
from selfix.settings import load
from selfix.spool import Spool
from selfix.storage import LocalStore, StorageUnavailable
from selfix.templates import Catalog
from selfix.uploader import Uploader
from tests.servers.node_plugin import t2i_workflow, task, write_safetensors
from tests.servers.small_fs import SmallFs, small_fs

pytestmark = pytest.mark.chaos

SIZE = 1 << 20


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[SmallFs]:
    with small_fs(tmp_path / "small", SIZE) as mounted:
        yield mounted


@pytest.fixture
def sp(fs: SmallFs) -> Spool:
    return Spool(fs.root / "spool").ensure()


def result(task_id: str) -> dict[str, Any]:
    return m.completed_result(Job(task_id, "u1"), [], {"attempts": 1})


def job(task_id: str, pad: int = 0) -> Job:
    return Job(task_id, "u1", enqueued_at=1.0, workflow={}, extra={"pad": "x" * pad})


def test_disk_full_is_recognised_through_wrapping_exceptions() -> None:
    inner = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise inner
        except OSError as exc:
            raise StorageUnavailable("cannot write") from exc
    except StorageUnavailable as outer:
        assert disk_full_error(outer) is inner
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied")) and not is_disk_full(None)


def test_a_write_that_fails_for_space_removes_its_own_file(fs: SmallFs) -> None:
    target = fs.root / "big"
    with pytest.raises(OSError) as caught:
        write_synced(target, b"x" * (2 * SIZE))
    assert caught.value.errno == errno.ENOSPC
    assert not target.exists() and fs.free_bytes() == SIZE


def test_spool_writes_on_a_full_disk_leave_nothing_in_tmp(fs: SmallFs, sp: Spool) -> None:
    fs.fill()
    assert fs.free_bytes() == 0
    failures = {
        "enqueue": lambda: sp.enqueue(job("t1", pad=10_000)),
        "write_processing": lambda: sp.write_processing(job("t2", pad=10_000)),
        "write_result": lambda: sp.write_result(result("t3")),
        "quarantine_bytes": lambda: sp.quarantine_bytes(b"junk" * 4000, "junk", "unreadable"),
        "write_run_file": lambda: sp.write_run_file("watchdog.json", b"{}" * 4000),
    }
    for name, write in failures.items():
        with pytest.raises(OSError) as caught:
            write()
        assert caught.value.errno == errno.ENOSPC, name
        assert os.listdir(sp.tmp) == [], f"{name} left {os.listdir(sp.tmp)} in tmp/"
    assert sp.writable() is False and os.listdir(sp.tmp) == []
    assert sp.counts() == {"inbox": 0, "processing": 0, "outbox": 0, "done": 0, "corrupt": 0, "tmp": 0}
    fs.free()
    sp.enqueue(job("t1", pad=10_000))
    assert sp.writable() and [e.task_id for e in sp.inbox_entries()] == ["t1"]


def test_a_staged_result_that_does_not_fit_is_removed_whole(fs: SmallFs, sp: Spool) -> None:
    staged = sp.stage_result("t1")
    (staged / "t1-0.png").write_bytes(b"\x89PNG" + b"\0" * 1000)
    fs.fill()
    with pytest.raises(OSError):
        sp.publish_result(staged, result("t1"))
    assert not staged.exists() and os.listdir(sp.tmp) == [] and sp.outbox_tasks() == []


def test_done_is_recorded_on_a_full_disk_because_it_is_a_rename(fs: SmallFs, sp: Spool) -> None:
    sp.write_result(result("t1"))
    fs.fill()
    sp.finish(sp.read_result("t1"))  # Kafka acknowledged it: recording that needs no new block
    assert sp.read_done("t1") == result("t1") and sp.outbox_tasks() == [] and os.listdir(sp.tmp) == []


class Recorder:
    """Publisher that counts what it is given (stands in for Kafka's output topic)."""

    def __init__(self) -> None:
        self.published: list[str] = []

    def publish(self, res: dict[str, Any]) -> None:
        self.published.append(res["taskId"])

    def idle(self) -> None:
        return None

    def close(self) -> None:
        return None


class FullOnce(Spool):
    """A spool whose done/ step meets ENOSPC the first `n` times (a full ext4 directory block, a quota)."""

    def __init__(self, root: Path, n: int) -> None:
        super().__init__(root)
        self.n = n

    def finish(self, res: dict[str, Any]) -> None:
        if self.n > 0:
            self.n -= 1
            raise OSError(errno.ENOSPC, "No space left on device", str(self.done_path(res["taskId"])))
        super().finish(res)


def test_after_the_ack_a_full_disk_never_publishes_the_result_again(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"SPOOL_DIR": tmp_path / "spool", "STORE_DIR": tmp_path / "store"}.items():
        monkeypatch.setenv(key, str(value))
    spool = FullOnce(tmp_path / "spool", n=3).ensure()
    spool.write_result(result("t1"))
    publisher = Recorder()
    up = Uploader(load(), spool, LocalStore(tmp_path / "store"), publisher, StopFlags())
    for _ in range(4):
        up.not_before.clear()  # skip the backoff's waiting, not its decision
        up.deliver_guarded("t1")
    assert publisher.published == ["t1"], "published once, although done/ failed three times"
    assert spool.read_done("t1") is not None and spool.outbox_tasks() == [] and not up.acked
    assert not up.disk.active


def test_one_log_line_per_episode(fs: SmallFs, tmp_path: Path) -> None:
    lines: list[str] = []
    sink = logger.add(lambda msg: lines.append(str(msg)), level="INFO")
    try:
        disk = DiskFull("test", base_s=0.01, cap_s=0.05)
        delays = [disk.hit(OSError(errno.ENOSPC, "No space left on device", str(fs.root / "x")), fs.root)
                  for _ in range(50)]
        disk.clear()
        disk.clear()
    finally:
        logger.remove(sink)
    assert len(lines) == 2, lines
    assert "disk full (ENOSPC" in lines[0] and str(fs.root / "x") in lines[0] and f"{SIZE} byte(s) free" in lines[0]
    assert "space is back" in lines[1] and "50 tries" in lines[1]
    assert max(delays) <= 0.05 and delays[0] >= 0.005


def test_hand_dropped_files_stay_in_place_while_full_and_are_taken_after(fs: SmallFs, sp: Spool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOOL_DIR", str(sp.root))
    limits, catalog = limits_of(load()), Catalog.load(None)
    dropped = sp.inbox / "mine.json"
    dropped.write_text(json.dumps(task("dropped-1")))
    fs.fill()
    disk = DiskFull("consumer", base_s=0.0, cap_s=0.0)
    assert adopt_dropped(sp, limits, catalog, disk) is False and disk.active
    assert adopt_dropped(sp, limits, catalog, disk) is False, "still full: a probe, and the file untouched"
    assert dropped.exists() and sp.inbox_entries() == [] and os.listdir(sp.tmp) == []
    fs.free()
    assert adopt_dropped(sp, limits, catalog, disk) is True and not disk.active
    assert not dropped.exists() and [e.task_id for e in sp.inbox_entries()] == ["dropped-1"]


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(out, "PNG")
    return out.getvalue()


def test_input_images_on_a_full_disk_leave_no_part_file(fs: SmallFs, tmp_path: Path) -> None:
    data = _png() * 20  # a valid PNG head, some kilobytes
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    j = Job("t1", "u1", workflow=t2i_workflow(), images={"a.png": url})
    fs.fill()
    with pytest.raises(OSError) as caught:
        place_images(j, LocalStore(tmp_path / "store"), fs.root / "input", 1 << 20)
    assert is_disk_full(caught.value)
    assert [p for p in (fs.root / "input").rglob("*") if p.is_file()] == []


def test_a_lora_download_on_a_full_disk_leaves_no_part_file(fs: SmallFs, tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_safetensors(store / "users/u1/models/a.safetensors", b"\1" * (256 << 10))
    # statvfs said there was room when the download began; another writer filled the disk meanwhile.
    cache = LoraCache(fs.root / "loras", LocalStore(store), disk_free=lambda _p: 1 << 40)
    for leave in (0, 32 << 10):  # no room even for the reservation note; room for it but not for the download
        fs.free()
        fs.fill(leave=leave)
        with pytest.raises((CacheFull, OSError)) as caught:  # the runner backs off on either (ENOSPC inside)
            cache.ensure("users/u1/models/a.safetensors", "u1")
        assert is_disk_full(caught.value)
        assert isinstance(caught.value, CacheFull) == bool(leave), caught.value
        assert [p.name for p in (fs.root / "loras").rglob("*.part")] == []
    fs.free()
    assert cache.ensure("users/u1/models/a.safetensors", "u1")
    assert [p.name for p in (fs.root / "loras").rglob("*.part")] == []


def test_selfix_submit_on_a_full_disk_says_so_and_writes_nothing(fs: SmallFs, sp: Spool, tmp_path: Path) -> None:
    task_file = tmp_path / "t.json"
    task_file.write_text(json.dumps(task("sub-1")))
    fs.fill()
    env = {**os.environ, "SPOOL_DIR": str(sp.root), "STORE_DIR": str(tmp_path / "store")}
    proc = subprocess.run([sys.executable, "-m", "selfix", "submit", str(task_file)], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 75, proc.stderr
    assert "disk is full" in proc.stderr and "Traceback" not in proc.stderr
    assert sp.counts() == {"inbox": 0, "processing": 0, "outbox": 0, "done": 0, "corrupt": 0, "tmp": 0}


def test_done_records_what_was_published_when_a_failed_result_replaced_the_outbox_one(sp: Spool) -> None:
    sp.write_result(result("t1"))
    replaced = m.failed_result("t1", "u1", m.TaskError(m.OUTPUT_INVALID, "key refused"), {"attempts": 1})
    sp.finish(replaced)  # not a rename: the outbox's result.json is not what went out
    assert sp.read_done("t1") == replaced and sp.outbox_tasks() == [] and os.listdir(sp.tmp) == []
