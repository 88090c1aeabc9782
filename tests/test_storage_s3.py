"""S3Store and check_s3 against a real MinIO: bytes, content types, multipart, error mapping, retries."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from loguru import logger

from selfix.storage import (
    ChecksumMismatch,
    InvalidKey,
    ObjectForbidden,
    ObjectInfo,
    ObjectNotFound,
    ObjectTooLarge,
    RetryPolicy,
    S3Store,
    StorageError,
    StorageUnavailable,
    check_s3,
)
from tests.servers.minio_plugin import S3Bucket
from tests.servers.minio_server import MinioServer

T = TypeVar("T")

pytestmark = pytest.mark.s3

FAST_GIVE_UP = RetryPolicy(attempts=4, deadline_s=10.0, base_s=0.2, cap_s=1.0)
PATIENT = RetryPolicy(attempts=100, deadline_s=30.0, base_s=0.1, cap_s=0.5)


def _file(tmp_path: Path, data: bytes, name: str = "src.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    yield lines
    logger.remove(sink)


def test_round_trip_bytes_and_content_type(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = S3Store(s3_bucket.settings())
    data = os.urandom(123_457)
    store.put_file("users/u1/images/t1-0.png", _file(tmp_path, data), "image/png")

    info = store.stat("users/u1/images/t1-0.png")
    assert (info.size, info.content_type, info.multipart) == (len(data), "image/png", False)
    assert info.etag == hashlib.md5(data).hexdigest()  # single-part S3 ETag: the MD5 of the bytes
    assert info.last_modified is not None
    assert store.exists("users/u1/images/t1-0.png")

    dest = tmp_path / "t1-0.png.part"
    got = store.get_to_file("users/u1/images/t1-0.png", dest)
    assert dest.read_bytes() == data
    assert isinstance(got, ObjectInfo)
    assert (got.size, got.etag, got.content_type) == (len(data), info.etag, "image/png")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("t1-0")] == ["t1-0.png.part"]


def test_40_mb_upload_is_multipart_and_reads_back_identical(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = S3Store(s3_bucket.settings())
    src = _file(tmp_path, os.urandom(40 * 1024 * 1024), "lora.safetensors")
    store.put_file("users/u1/models/lora.safetensors", src, "application/octet-stream")

    info = store.stat("users/u1/models/lora.safetensors")
    assert info.multipart is True
    assert info.etag.endswith("-3")  # 16 MiB + 16 MiB + 8 MiB parts
    assert info.size == src.stat().st_size

    dest = tmp_path / "lora.safetensors.part"
    store.get_to_file("users/u1/models/lora.safetensors", dest)
    assert _sha(dest) == _sha(src)


def test_missing_key_is_object_not_found(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = S3Store(s3_bucket.settings())
    assert store.exists("users/u1/models/none.safetensors") is False
    calls: list[Callable[[], object]] = [
        lambda: store.stat("users/u1/models/none.safetensors"),
        lambda: store.get_to_file("users/u1/models/none.safetensors", tmp_path / "none.part"),
    ]
    for call in calls:
        with pytest.raises(ObjectNotFound) as info:
            call()
        assert info.value.retriable is False
        assert info.value.result_code("lora") == "lora_not_found"
        assert "users/u1/models/none.safetensors" in str(info.value)
    assert not (tmp_path / "none.part").exists()


@pytest.mark.parametrize("variables", [{"S3_SECRET_KEY": "wrong-secret-d41d8cd98f"},
                                       {"S3_ACCESS_KEY": "nobody", "S3_SECRET_KEY": "wrong-secret-d41d8cd98f"}])
def test_wrong_credentials_are_forbidden_and_never_echo_the_secret(
    s3_bucket: S3Bucket, tmp_path: Path, variables: dict[str, str]
) -> None:
    store = S3Store(s3_bucket.settings(**variables), retry=FAST_GIVE_UP)
    calls: list[Callable[[], object]] = [
        lambda: store.stat("users/u1/a.png"),
        lambda: store.get_to_file("users/u1/a.png", tmp_path / "a.part"),
        lambda: store.put_file("users/u1/a.png", _file(tmp_path, b"x"), "image/png"),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(ObjectForbidden) as info:
            call()
        assert time.monotonic() - started < 2, "an error that is not retriable must not be retried"
        exc = info.value
        assert (exc.retriable, exc.kind, exc.result_code("lora")) == (False, "forbidden", "lora_forbidden")
        assert "users/u1/a.png" in str(exc)
        for text in (str(exc), repr(exc), str(exc.__cause__), repr(exc.__cause__)):
            assert "wrong-secret-d41d8cd98f" not in text
            assert s3_bucket.secret_key not in text


def test_missing_bucket_is_not_retriable(s3_bucket: S3Bucket) -> None:
    store = S3Store(s3_bucket.settings(S3_BUCKET="no-such-bucket-here"), retry=FAST_GIVE_UP)
    with pytest.raises(StorageError) as info:
        store.stat("k")
    assert info.value.retriable is False
    assert info.value.s3_code == "NoSuchBucket"


def test_invalid_key_is_refused_without_a_request(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = S3Store(s3_bucket.settings(S3_ENDPOINT="127.0.0.1:9"))  # nothing listens there
    with pytest.raises(InvalidKey):
        store.stat("users/../etc/passwd")
    with pytest.raises(InvalidKey):
        store.put_file("/abs", tmp_path / "missing", "image/png")


def test_server_down_retries_then_unavailable_within_the_budget(
    s3_private_bucket: S3Bucket, tmp_path: Path, warnings_logged: list[str]
) -> None:
    store = S3Store(s3_private_bucket.settings(), retry=FAST_GIVE_UP)
    src = _file(tmp_path, b"image bytes")
    store.put_file("users/u1/a.png", src, "image/png")
    s3_private_bucket.server.stop()

    for call in (lambda: store.stat("users/u1/a.png"), lambda: store.put_file("users/u1/b.png", src, "image/png"),
                 lambda: store.get_to_file("users/u1/a.png", tmp_path / "a.part")):
        warnings_logged.clear()
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as info:
            call()
        assert time.monotonic() - started < FAST_GIVE_UP.deadline_s
        assert info.value.retriable is True
        assert "4 attempts" in str(info.value)
        assert len(warnings_logged) == 3, warnings_logged  # one line per retry
        assert all(s3_private_bucket.secret_key not in line for line in warnings_logged)
    assert not (tmp_path / "a.part").exists()


def _while_down(server: MinioServer, down_s: float, call: Callable[[], T]) -> tuple[T, float]:
    """Run `call` in a worker while the server is down for `down_s`; the main thread brings it back.

    (The server is started from the main thread so that its die-with-parent signal stays tied to pytest.)
    """
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        future = pool.submit(call)
        time.sleep(down_s)
        assert not future.done(), "the call should still be retrying while the server is down"
        server.start()
        return future.result(timeout=PATIENT.deadline_s), time.monotonic() - started


def test_server_back_mid_retry_the_call_succeeds(s3_private_bucket: S3Bucket, tmp_path: Path) -> None:
    store = S3Store(s3_private_bucket.settings(), retry=PATIENT)
    store.put_file("users/u1/a.png", _file(tmp_path, b"still here"), "image/png")
    server = s3_private_bucket.server
    server.stop()
    info, took = _while_down(server, 1.5, lambda: store.get_to_file("users/u1/a.png", tmp_path / "a.part"))
    assert took >= 1.5
    assert (tmp_path / "a.part").read_bytes() == b"still here"
    assert info.size == len(b"still here")


def test_server_killed_then_back_upload_succeeds(s3_private_bucket: S3Bucket, tmp_path: Path) -> None:
    store = S3Store(s3_private_bucket.settings(), retry=PATIENT)
    server = s3_private_bucket.server
    server.kill()
    src = _file(tmp_path, b"uploaded late")
    _while_down(server, 1.0, lambda: store.put_file("users/u1/after.png", src, "image/png"))
    assert store.stat("users/u1/after.png").size == len(b"uploaded late")


def _lines(result: list[tuple[str, bool, str]]) -> dict[str, bool]:
    return {name: ok for name, ok, _ in result}


def test_check_s3_ok(s3_bucket: S3Bucket) -> None:
    result = check_s3(s3_bucket.settings())
    assert _lines(result) == {"s3 endpoint": True, "s3 credentials": True, "s3 bucket": True}, result


def test_check_s3_wrong_credentials(s3_bucket: S3Bucket) -> None:
    result = check_s3(s3_bucket.settings(S3_SECRET_KEY="wrong-secret-d41d8cd98f"))
    assert _lines(result) == {"s3 endpoint": True, "s3 credentials": False, "s3 bucket": False}, result
    assert "SignatureDoesNotMatch" in result[1][2]
    assert all("wrong-secret" not in detail and s3_bucket.secret_key not in detail for _, _, detail in result)


def test_check_s3_missing_bucket(s3_bucket: S3Bucket) -> None:
    result = check_s3(s3_bucket.settings(S3_BUCKET="no-such-bucket-here"))
    assert _lines(result) == {"s3 endpoint": True, "s3 credentials": True, "s3 bucket": False}, result
    assert "does not exist" in result[2][2]


def test_check_s3_unreachable(s3_private_bucket: S3Bucket) -> None:
    settings = s3_private_bucket.settings()
    s3_private_bucket.server.stop()
    started = time.monotonic()
    result = check_s3(settings, timeout=2.0)
    assert time.monotonic() - started < 3
    assert _lines(result) == {"s3 endpoint": False, "s3 credentials": False, "s3 bucket": False}, result


class _Corrupting:
    """A GET body with one byte flipped (headers untouched), for the first `times` GETs."""

    def __init__(self, store: S3Store, times: int) -> None:
        self.real = store._get
        self.left = times
        self.gets = 0

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[Any]:
        self.gets += 1
        corrupt = self.left > 0
        self.left -= 1
        with self.real(key) as response:
            if not corrupt:
                yield response
                return

            class Flipped:
                headers = response.headers

                def stream(self, amt: int) -> Iterator[bytes]:
                    for i, chunk in enumerate(response.stream(amt)):
                        yield bytes([chunk[0] ^ 0xFF]) + chunk[1:] if i == 0 else chunk

            yield Flipped()


def test_md5_mismatch_is_retried_and_a_persistent_one_is_not_retriable(
        s3_bucket: S3Bucket, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    store = S3Store(s3_bucket.settings(), retry=RetryPolicy(attempts=5, deadline_s=10, base_s=0.01, cap_s=0.02))
    store.put_file("users/u1/a.png", _file(tmp_path, data), "image/png")

    once = _Corrupting(store, times=1)
    store._get = once  # type: ignore[method-assign]
    info = store.get_to_file("users/u1/a.png", tmp_path / "a.part")
    assert once.gets == 2 and info.md5 == info.etag == hashlib.md5(data).hexdigest()
    assert (tmp_path / "a.part").read_bytes() == data

    always = _Corrupting(store, times=100)
    store._get = always  # type: ignore[method-assign]
    with pytest.raises(ChecksumMismatch) as err:
        store.get_to_file("users/u1/a.png", tmp_path / "b.part")
    assert always.gets == 3 and not err.value.retriable and err.value.kind == "corrupt"
    assert not (tmp_path / "b.part").exists()


def test_multipart_object_is_size_checked_only(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = S3Store(s3_bucket.settings(), part_size=5 * 1024 * 1024)
    store.put_file("users/u1/big.bin", _file(tmp_path, os.urandom(11 * 1024 * 1024)), "application/octet-stream")
    info = store.get_to_file("users/u1/big.bin", tmp_path / "big.part")
    assert info.multipart and info.md5 is None


def test_object_over_max_bytes_is_refused_before_its_body(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = S3Store(s3_bucket.settings())
    store.put_file("users/u1/a.png", _file(tmp_path, os.urandom(5000)), "image/png")
    with pytest.raises(ObjectTooLarge) as err:
        store.get_to_file("users/u1/a.png", tmp_path / "a.part", max_bytes=4999)
    assert not err.value.retriable and not (tmp_path / "a.part").exists()
    assert store.get_to_file("users/u1/a.png", tmp_path / "a.part", max_bytes=5000).size == 5000
