"""`S3Store`: S3 through the MinIO client, with bounded timeouts and selfix's own retries (`RetryPolicy`), downloads
streamed to disk with the MD5 computed beside the network and writeback started as they go."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from loguru import logger
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from selfix.backoff import compute_backoff
from selfix.settings import Settings
from selfix.storage.base import CHUNK, ObjectInfo, StatExists, check_max, check_size, validate_key
from selfix.storage.errors import (
    ChecksumMismatch,
    ObjectForbidden,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
)

T = TypeVar("T")

DEFAULT_PART_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one store call: at most `attempts` tries, no new try once `deadline_s` would be passed."""

    attempts: int = 5
    deadline_s: float = 60.0
    base_s: float = 0.5
    cap_s: float = 8.0


_FORBIDDEN = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
              "InvalidToken", "ExpiredToken"}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                    "XMinioServerNotInitialized", "OperationAborted"}
# Network-level failures: urllib3's errors (connect refused/timeouts, broken reads) and raw socket errors.
# Deliberately not plain OSError, so a full local disk is not mistaken for a flaky network.
_NETWORK_ERRORS: tuple[type[Exception], ...] = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)
CLIENT_ERRORS: tuple[type[Exception], ...] = (S3Error, ServerError, InvalidResponseError, *_NETWORK_ERRORS)
_CLASSIFIED: tuple[type[Exception], ...] = (StorageError, *CLIENT_ERRORS)


def split_endpoint(endpoint: str, use_ssl: bool) -> tuple[str, bool]:
    """`host:port`, tolerating an http(s):// prefix (which then decides TLS); returns (host:port, secure)."""
    if "://" in endpoint:
        scheme, _, rest = endpoint.partition("://")
        return rest.rstrip("/"), scheme.lower() == "https"
    return endpoint.rstrip("/"), use_ssl


def _http_client(connect_timeout: float, read_timeout: float) -> urllib3.PoolManager:
    # retries=False: urllib3 must not retry behind our back; S3Store retries with its own budget and logs.
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        retries=False,
        maxsize=10,
    )


def make_client(settings: Settings, connect_timeout: float = 5.0, read_timeout: float = 60.0) -> Minio:
    endpoint, secure = split_endpoint(settings.s3_endpoint or "", settings.s3_use_ssl)
    return Minio(
        endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=secure,
        # A fixed region skips GetBucketLocation: one round trip less, and no ListBucket right needed.
        region=settings.s3_region,
        http_client=_http_client(connect_timeout, read_timeout),
    )


def _status(exc: BaseException) -> int:
    if isinstance(exc, S3Error):
        return int(getattr(exc.response, "status", 0) or 0)
    if isinstance(exc, ServerError):
        return exc.status_code
    return int(getattr(exc, "_code", 0) or 0)  # InvalidResponseError keeps the status privately


class S3Store(StatExists):
    """S3 through the MinIO client, with bounded timeouts and selfix's own retries."""

    def __init__(
        self,
        settings: Settings,
        *,
        retry: RetryPolicy | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        part_size: int = DEFAULT_PART_SIZE,
        verify_md5: bool = True,
    ) -> None:
        if not settings.s3_endpoint:
            raise ValueError("S3Store needs S3_ENDPOINT")
        self.bucket = settings.s3_bucket
        self.retry = retry or RetryPolicy()
        self.part_size = part_size
        self.verify_md5 = verify_md5  # off: size checks only (MD5 caps one download near 0.6-0.9 GB/s per core)
        self._secret = settings.s3_secret_key or ""
        endpoint, secure = split_endpoint(settings.s3_endpoint, settings.s3_use_ssl)
        self._where = f"s3://{self.bucket} at {'https' if secure else 'http'}://{endpoint}"
        self._client = make_client(settings, connect_timeout, read_timeout)

    def describe(self) -> str:
        return self._where

    # -- operations

    def stat(self, key: str, *, retry: bool = True) -> ObjectInfo:
        validate_key(key)
        policy = None if retry else RetryPolicy(attempts=1)
        try:
            obj = self._call("HEAD", key, lambda: self._client.stat_object(self.bucket, key), policy)
        except ObjectNotFound:
            self._check_bucket(key)
            raise
        etag = obj.etag or ""
        return ObjectInfo(
            size=obj.size or 0,
            etag=etag,
            last_modified=obj.last_modified,
            multipart=_is_multipart(etag),
            content_type=obj.content_type,
        )

    def get_to_file(self, key: str, path: Path, max_bytes: int | None = None) -> ObjectInfo:
        validate_key(key)
        try:
            return self._call("GET", key, lambda: self._download(key, Path(path), max_bytes))
        except BaseException:
            # A truncated file must not survive under a name a caller might trust.
            Path(path).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        validate_key(key)
        self._call("PUT", key, lambda: self._client.fput_object(
            self.bucket, key, str(path), content_type=content_type, part_size=self.part_size))

    # -- internals

    def _check_bucket(self, key: str) -> None:
        """A HEAD answers a bare 404 for a missing bucket too; a misconfigured bucket is not a missing LoRA."""
        if not self._call("HEAD", key, lambda: self._client.bucket_exists(self.bucket)):
            raise StorageError(f"s3 bucket {self.bucket!r} does not exist (looking for {key!r})", key=key,
                               s3_code="NoSuchBucket")

    def _download(self, key: str, path: Path, max_bytes: int | None) -> ObjectInfo:
        """One GET streamed into `path` (truncated first, so a retry starts clean).

        The size is checked against Content-Length; the MD5 against the ETag when the ETag is a plain MD5 (a
        single-part upload without server-side encryption). Hashing runs in a second thread, beside the network.
        """
        with self._get(key) as response:
            headers = response.headers
            etag = headers.get("etag", "").replace('"', "")
            expected = int(headers.get("content-length", "-1"))
            check_max(key, expected, max_bytes)
            verify_md5 = self.verify_md5 and _is_md5(etag) and not headers.get("x-amz-server-side-encryption")
            written, md5 = _stream_to_file(response, path, verify_md5)
        if expected >= 0:
            check_size(key, written, expected)
        if md5 is not None and md5 != etag.lower():
            raise _Corrupted(f"download of {key!r}: MD5 {md5} does not match the ETag {etag}", key=key)
        modified = headers.get("last-modified")
        return ObjectInfo(
            size=written,
            etag=etag,
            last_modified=_http_date(modified) if modified else None,
            multipart=_is_multipart(etag),
            content_type=headers.get("content-type"),
            md5=md5,
        )

    @contextlib.contextmanager
    def _get(self, key: str) -> Iterator[Any]:
        response = self._client.get_object(self.bucket, key)
        try:
            yield response
        finally:
            response.close()
            response.release_conn()

    def _call(self, op: str, key: str, fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
        """Run `fn`, retrying transient failures with jittered backoff inside the policy's budget."""
        retry = policy or self.retry
        deadline = time.monotonic() + retry.deadline_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except _CLASSIFIED as exc:
                error = self._classify(op, key, exc)
                if isinstance(error, _Corrupted) and attempt >= min(retry.attempts, CORRUPT_ATTEMPTS):
                    raise ChecksumMismatch(f"{error} ({attempt} times)", key=key) from exc
                if not error.retriable:
                    if error is exc:
                        raise
                    raise error from exc
                delay = compute_backoff(attempt, retry.base_s, retry.cap_s)
                if attempt >= retry.attempts or time.monotonic() + delay > deadline:
                    raise StorageUnavailable(
                        f"{error} (gave up after {attempt} attempts)", key=key, s3_code=error.s3_code) from exc
                logger.warning("s3 {} {!r} failed (attempt {}/{}): {}; retrying in {:.2f}s",
                               op, key, attempt, retry.attempts, error, delay)
                time.sleep(delay)

    def _classify(self, op: str, key: str, exc: BaseException) -> StorageError:
        if isinstance(exc, StorageError):
            return exc
        where = f"s3 {op} {self.bucket}/{key}"
        if isinstance(exc, _NETWORK_ERRORS):
            return StorageUnavailable(f"{where}: {self._scrub(type(exc).__name__ + ': ' + str(exc))}", key=key)
        code = exc.code if isinstance(exc, S3Error) else None
        status = _status(exc)
        detail = self._scrub(f"{code or 'HTTP ' + str(status)}"
                             f"{': ' + exc.message if isinstance(exc, S3Error) and exc.message else ''}")
        if code == "NoSuchKey":
            return ObjectNotFound(f"{where}: no such object", key=key, s3_code=code)
        if code == "NoSuchBucket":
            return StorageError(f"{where}: bucket {self.bucket!r} does not exist", key=key, s3_code=code)
        if code in _FORBIDDEN or status == 403:
            return ObjectForbidden(f"{where}: access refused ({detail})", key=key, s3_code=code)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return StorageUnavailable(f"{where}: {detail}", key=key, s3_code=code)
        return StorageError(f"{where}: {detail}", key=key, s3_code=code)

    def _scrub(self, text: str) -> str:
        # Servers never echo the secret, but a message is cheap to sanitize and a leak is not.
        return text.replace(self._secret, "***") if self._secret else text


class _Corrupted(StorageUnavailable):
    """One download whose bytes did not match the ETag: retried; ChecksumMismatch once it keeps happening."""


CORRUPT_ATTEMPTS = 3
WRITEBACK_EVERY = 8 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): start writeback of what was written so far, without waiting.

    Started every few MB, it spreads the disk writes over the download, so the final fsync (needed before the
    rename into place) finds little left to write instead of the whole file.
    """
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, length: int) -> None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    return start_writeback


_start_writeback = _load_sync_file_range()


class _Hasher:
    """MD5 in a second thread (hashlib releases the GIL on large buffers), so hashing overlaps the network."""

    def __init__(self) -> None:
        self.digest = hashlib.md5(usedforsecurity=False)
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="md5", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self.digest.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def finish(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self.digest.hexdigest()


def _stream_to_file(response: Any, path: Path, md5: bool = False) -> tuple[int, str | None]:
    """Write the body to `path`, fsynced; returns (bytes written, MD5 hex or None)."""
    written = synced = 0
    hasher = _Hasher() if md5 else None
    try:
        with open(path, "wb") as out:
            fd = out.fileno()
            for chunk in response.stream(CHUNK):
                out.write(chunk)
                written += len(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                if _start_writeback is not None and written - synced >= WRITEBACK_EVERY:
                    out.flush()
                    _start_writeback(fd, synced, written - synced)
                    synced = written
            out.flush()
            os.fsync(fd)
    finally:
        digest = hasher.finish() if hasher is not None else None
    return written, digest


def _is_md5(etag: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-fA-F]{32}", etag))


def _is_multipart(etag: str) -> bool:
    # S3 marks an object assembled from parts with an ETag of the form "<md5 of md5s>-<part count>".
    return bool(re.fullmatch(r"[0-9a-fA-F]+-\d+", etag))


def _http_date(value: str) -> datetime | None:
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
