"""LocalStore (the stand-in for the bucket) and the storage module's server-free parts."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from selfix import storage
from selfix.settings import load
from selfix.storage import (
    InvalidKey,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StorageError,
    StorageUnavailable,
    check_s3,
    open_store,
    validate_key,
)

BAD_KEYS = [
    "", "/etc/passwd", "..", "../x", "a/../../b", "a/..", "a//b", "a/", "/", "./a", "a/./b",
    "a\\b", "..\\x", "a\x00b", "a\nb", "x" * 1025,
]
GOOD_KEYS = ["a", "users/u1/models/x.safetensors", "users/u-1/images/t.1_2-0.png", "a..b/c", "é/ü.png"]


def _src(tmp_path: Path, data: bytes, name: str = "src.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused_before_any_filesystem_access(tmp_path: Path, key: str) -> None:
    root = tmp_path / "store"  # does not exist: any access would create it or fail differently
    store = LocalStore(root)
    missing_source = tmp_path / "no-such-source"
    dest = tmp_path / "out.part"
    for call in (lambda: store.put_file(key, missing_source, "image/png"), lambda: store.stat(key),
                 lambda: store.exists(key), lambda: store.get_to_file(key, dest)):
        with pytest.raises(InvalidKey) as info:
            call()
        assert info.value.retriable is False
        assert info.value.kind == "invalid_key"
    assert not root.exists()
    assert not dest.exists()


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_good_keys_pass(key: str) -> None:
    assert validate_key(key) == key


def test_reserved_tmp_prefix_is_not_a_key(tmp_path: Path) -> None:
    with pytest.raises(InvalidKey):
        LocalStore(tmp_path).stat(".tmp/anything")


def test_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    data = os.urandom(300_000)
    store.put_file("users/u1/images/t1-0.png", _src(tmp_path, data), "image/png")

    info = store.stat("users/u1/images/t1-0.png")
    assert info.size == len(data)
    assert info.multipart is False
    assert info.content_type == "image/png"
    assert info.etag
    assert store.exists("users/u1/images/t1-0.png")
    assert (tmp_path / "store" / "users" / "u1" / "images" / "t1-0.png").read_bytes() == data

    dest = tmp_path / "x.safetensors.part"
    got = store.get_to_file("users/u1/images/t1-0.png", dest)
    assert dest.read_bytes() == data
    assert got.size == len(data)


def test_overwrite_changes_the_etag(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_file("k", _src(tmp_path, b"one"), "text/plain")
    first = store.stat("k").etag
    store.put_file("k", _src(tmp_path, b"second"), "text/plain")
    assert store.stat("k").etag != first
    assert store.stat("k").size == 6


def test_missing_objects(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_file("users/u1/a", _src(tmp_path, b"x"), "application/octet-stream")
    for key in ("users/u1/missing", "users/u1/a/below-a-file", "users"):  # absent, under a file, a directory
        assert not store.exists(key)
        with pytest.raises(ObjectNotFound) as info:
            store.stat(key)
        assert info.value.retriable is False
        assert info.value.result_code("lora") == "lora_not_found"
        assert info.value.result_code("input") == "input_not_found"
    dest = tmp_path / "dest.part"
    with pytest.raises(ObjectNotFound):
        store.get_to_file("users/u1/missing", dest)
    assert not dest.exists()


def test_failed_write_keeps_the_old_object_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_file("k", _src(tmp_path, b"old object"), "text/plain")

    def broken_copy(src: object, dst: object, length: int = 0) -> None:
        dst.write(b"half")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", broken_copy)
    with pytest.raises(OSError):
        store.put_file("k", _src(tmp_path, b"new object"), "text/plain")
    assert (tmp_path / "store" / "k").read_bytes() == b"old object"
    assert list((tmp_path / "store" / LocalStore.TMP).iterdir()) == []


def test_failed_download_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_file("k", _src(tmp_path, b"object bytes"), "text/plain")

    def broken_copy(src: object, dst: object, length: int = 0) -> None:
        dst.write(b"obj")  # type: ignore[attr-defined]
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(shutil, "copyfileobj", broken_copy)
    with pytest.raises(OSError):
        store.get_to_file("k", tmp_path / "k.part")
    assert not (tmp_path / "k.part").exists()


def test_readers_never_see_a_partial_object(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    versions = [bytes([n]) * 2_000_000 for n in (1, 2)]
    sources = [_src(tmp_path, v, f"v{n}") for n, v in enumerate(versions)]
    store.put_file("big", sources[0], "application/octet-stream")
    stop = threading.Event()
    seen: list[bool] = []

    def read() -> None:
        while not stop.is_set():
            seen.append((tmp_path / "store" / "big").read_bytes() in versions)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(20):
            store.put_file("big", sources[n % 2], "application/octet-stream")
    finally:
        stop.set()
        reader.join()
    assert seen and all(seen)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(["big", LocalStore.TMP])
    assert list((tmp_path / "store" / LocalStore.TMP).iterdir()) == []


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    local = open_store(load({"STORE_DIR": str(tmp_path / "st")}))
    assert isinstance(local, LocalStore)
    assert isinstance(local, ObjectStore)
    assert str(tmp_path / "st") in local.describe()

    s3 = open_store(load({"S3_ENDPOINT": "127.0.0.1:9", "S3_ACCESS_KEY": "ak", "S3_SECRET_KEY": "sekrit-value",
                          "S3_BUCKET": "bkt"}))
    assert isinstance(s3, S3Store)
    assert isinstance(s3, ObjectStore)
    assert s3.describe() == "s3://bkt at http://127.0.0.1:9"
    assert "sekrit" not in s3.describe()


def test_error_kinds_and_codes() -> None:
    assert StorageUnavailable("x").retriable is True
    assert StorageUnavailable("x").code == "storage_unavailable"
    assert StorageError("x").retriable is False
    assert StorageError("x").code == "storage_error"
    assert storage.ObjectForbidden("x").result_code("lora") == "lora_forbidden"
    assert ObjectNotFound("x").code == "object_not_found"


def test_split_endpoint() -> None:
    assert storage.split_endpoint("minio:9000", False) == ("minio:9000", False)
    assert storage.split_endpoint("minio:9000", True) == ("minio:9000", True)
    assert storage.split_endpoint("https://s3.example.com/", False) == ("s3.example.com", True)
    assert storage.split_endpoint("http://m:9000", True) == ("m:9000", False)


def test_check_s3_without_endpoint(tmp_path: Path) -> None:
    lines = check_s3(load({"STORE_DIR": str(tmp_path)}))
    assert lines == [("s3", True, f"S3_ENDPOINT empty: local store {tmp_path}")]
