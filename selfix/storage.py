"""The object store: S3 (MinIO client) in production, a local directory when S3_ENDPOINT is empty.

Callers see one small interface (ObjectStore) and one exception family (StorageError). Every exception says
whether a retry can help (`retriable`) and what kind of failure it is (`kind`), so the runner and the uploader
map it to a result error code without knowing S3: ``exc.result_code("lora")`` gives ``lora_not_found``,
``lora_forbidden``, ... Messages name the bucket and key, never a credential.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import mimetypes
import os
import queue
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import urllib3
from loguru import logger
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from selfix.backoff import compute_backoff
from selfix.files import fsync_dir as _fsync_dir
from selfix.settings import Settings
from selfix.spool import has_control

T = TypeVar("T")

MAX_KEY_BYTES = 1024  # S3's limit on an object key
DEFAULT_PART_SIZE = 16 * 1024 * 1024
CHUNK = 1024 * 1024


# --------------------------------------------------------------------------------------------------- errors


class StorageError(Exception):
    """A store operation failed. `kind` is stable (callers switch on it); `s3_code` is the server's code."""

    kind = "error"
    retriable = False

    def __init__(self, message: str, *, key: str | None = None, s3_code: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.s3_code = s3_code

    @property
    def code(self) -> str:
        """Result-style error code for callers that have no better subject (e.g. `object_not_found`)."""
        return self.result_code("object")

    def result_code(self, subject: str) -> str:
        """`lora` -> `lora_not_found` / `lora_forbidden`; availability and other errors keep a storage_ code."""
        if self.kind in ("not_found", "forbidden"):
            return f"{subject}_{self.kind}"
        return f"storage_{self.kind}"


class InvalidKey(StorageError):
    """The key is not a safe relative object key; rejected before any filesystem or network access."""

    kind = "invalid_key"


class ObjectNotFound(StorageError):
    kind = "not_found"


class ObjectForbidden(StorageError):
    """Credentials refused or access denied: permanent, retrying cannot help."""

    kind = "forbidden"


class StorageUnavailable(StorageError):
    """The store did not answer usefully within the retry budget: the task may succeed later."""

    kind = "unavailable"
    retriable = True


class ObjectTooLarge(StorageError):
    """The object is larger than the caller accepts; refused before its body is read."""

    kind = "too_large"


class ChecksumMismatch(StorageError):
    """The bytes received do not match the object's MD5 ETag, again and again: the stored object is damaged.

    A single mismatch (a corrupted transfer) is retried inside the store's retry budget like a broken connection.
    """

    kind = "corrupt"


# --------------------------------------------------------------------------------------------------- interface


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str
    last_modified: datetime | None
    multipart: bool = False
    content_type: str | None = None
    md5: str | None = None  # hex MD5 of the bytes received, when it was computed (and matched the ETag)


@runtime_checkable
class ObjectStore(Protocol):
    def stat(self, key: str, *, retry: bool = True) -> ObjectInfo:
        """The object's size and ETag (a HEAD). retry=False: one try, for callers with a fallback (a cached copy)."""
        ...

    def get_to_file(self, key: str, path: Path, max_bytes: int | None = None) -> ObjectInfo:
        """Download to exactly `path` (fsynced; the caller renames it into place) and verify the size (and the
        MD5 where the ETag is one). An object over `max_bytes` raises ObjectTooLarge before its body is read."""
        ...

    def put_file(self, key: str, path: Path, content_type: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def describe(self) -> str:
        """Where objects go, for logs: never contains a credential."""
        ...


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative key, else raise InvalidKey (no I/O happens before this)."""
    if not isinstance(key, str) or not key:
        raise InvalidKey("object key is empty", key=None)
    shown = key[:200]
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKey(f"object key longer than {MAX_KEY_BYTES} bytes: {shown!r}", key=shown)
    if key.startswith("/") or "\\" in key or has_control(key):
        raise InvalidKey(f"object key must be relative, without backslashes or control characters: {shown!r}",
                         key=shown)
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKey(f"object key has an empty, '.' or '..' segment: {shown!r}", key=shown)
    return key


# --------------------------------------------------------------------------------------------------- local


class _StatExists:
    """`exists` for any store with a `stat` that raises ObjectNotFound."""

    def stat(self, key: str) -> ObjectInfo:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True


class LocalStore(_StatExists):
    """A directory standing in for the bucket: object key = relative path under `root`.

    Writes go to `root/.tmp/`, are fsynced, then renamed into place, so a reader never sees half an object.
    The ETag is derived from mtime and size (hashing multi-GB LoRAs on every stat would be too slow); it
    changes whenever the object is replaced, which is all callers rely on.
    """

    TMP = ".tmp"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return f"local store {self.root}"

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.split("/", 1)[0] == self.TMP:
            raise InvalidKey(f"object key uses the reserved prefix {self.TMP}/: {key!r}", key=key)
        return self.root / key

    def stat(self, key: str, *, retry: bool = True) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(key) from None
        if not path.is_file():
            raise self._not_found(key)
        return self._info(key, st)

    def get_to_file(self, key: str, path: Path, max_bytes: int | None = None) -> ObjectInfo:
        source = self._path(key)
        try:
            src = open(source, "rb")  # noqa: SIM115 - closed by the with below; open first to map errors
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._not_found(key) from None
        try:
            with src, open(path, "wb") as dst:
                # fstat of the open file: the object may be replaced meanwhile, we copy the version we opened.
                info = self._info(key, os.fstat(src.fileno()))
                _check_max(key, info.size, max_bytes)
                shutil.copyfileobj(src, dst, CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
                _check_size(key, dst.tell(), info.size)
        except BaseException:
            Path(path).unlink(missing_ok=True)
            raise
        return info

    def _not_found(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"{self.describe()}: no object {key!r}", key=key)

    @staticmethod
    def _info(key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(
            size=st.st_size,
            etag=f"{st.st_mtime_ns:x}-{st.st_size:x}",
            last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
            content_type=mimetypes.guess_type(key)[0],
        )

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        target = self._path(key)
        tmp_dir = self.root / self.TMP
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)


def _check_max(key: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ObjectTooLarge(f"object {key!r} is {size} bytes; at most {max_bytes} accepted", key=key)


def _check_size(key: str, got: int, expected: int) -> None:
    if got != expected:
        # A short read means the connection broke mid-body: worth another attempt.
        raise StorageUnavailable(f"download of {key!r} truncated: {got} of {expected} bytes", key=key)


# --------------------------------------------------------------------------------------------------- S3


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
_CLIENT_ERRORS: tuple[type[Exception], ...] = (S3Error, ServerError, InvalidResponseError, *_NETWORK_ERRORS)
_CLASSIFIED: tuple[type[Exception], ...] = (StorageError, *_CLIENT_ERRORS)


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


class S3Store(_StatExists):
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
            _check_max(key, expected, max_bytes)
            verify_md5 = self.verify_md5 and _is_md5(etag) and not headers.get("x-amz-server-side-encryption")
            written, md5 = _stream_to_file(response, path, verify_md5)
        if expected >= 0:
            _check_size(key, written, expected)
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


# --------------------------------------------------------------------------------------------------- entry points


def open_store(settings: Settings) -> ObjectStore:
    """S3 when S3_ENDPOINT is set, else the local directory STORE_DIR."""
    if settings.s3_endpoint:
        return S3Store(settings, verify_md5=settings.s3_verify_md5)
    return LocalStore(settings.store_dir)


Check = tuple[str, bool, str]
_PROBE_KEY = ".selfix-doctor-probe"


def check_s3(settings: Settings, timeout: float = 5.0) -> list[Check]:
    """For `selfix doctor`: endpoint reachable, credentials accepted, bucket exists; one line each, no secrets."""
    if not settings.s3_endpoint:
        return [("s3", True, f"S3_ENDPOINT empty: local store {settings.store_dir}")]
    endpoint, secure = split_endpoint(settings.s3_endpoint, settings.s3_use_ssl)
    reach = _check_reachable(endpoint, secure, timeout)
    if not reach[1]:
        return [reach, ("s3 credentials", False, "not checked: endpoint unreachable"),
                ("s3 bucket", False, "not checked: endpoint unreachable")]
    return [reach, *_check_auth_and_bucket(settings, timeout)]


def _check_reachable(endpoint: str, secure: bool, timeout: float) -> Check:
    host, _, port_text = endpoint.rpartition(":")
    if not host or not port_text.isdigit():
        host, port_text = endpoint, "443" if secure else "80"
    try:
        with socket.create_connection((host.strip("[]"), int(port_text)), timeout=timeout):
            pass
    except OSError as exc:
        return ("s3 endpoint", False, f"{endpoint} unreachable: {exc}")
    return ("s3 endpoint", True, f"{endpoint} reachable ({'https' if secure else 'http'})")


def _check_auth_and_bucket(settings: Settings, timeout: float) -> list[Check]:
    """One GET of a key that should not exist: its error code tells credentials and bucket apart.

    NoSuchKey means both are fine; a GET needs only the read right the worker needs anyway (a HEAD would
    return no error code, and ListBuckets needs a right a scoped key may lack).
    """
    bucket = settings.s3_bucket
    client = make_client(settings, timeout, timeout)
    creds = f"access key {settings.s3_access_key}"
    try:
        client.get_object(bucket, _PROBE_KEY).close()
        code = "NoSuchKey"
    except S3Error as exc:
        code = exc.code or ""
    except _CLIENT_ERRORS as exc:
        reason = f"no S3 answer: {type(exc).__name__}"
        return [("s3 credentials", False, reason), ("s3 bucket", False, reason)]
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return [("s3 credentials", False, f"{creds} refused ({code})"),
                ("s3 bucket", False, f"bucket {bucket!r} not checked: credentials refused")]
    if code == "NoSuchBucket":
        return [("s3 credentials", True, f"{creds} accepted"),
                ("s3 bucket", False, f"bucket {bucket!r} does not exist")]
    if code == "NoSuchKey":
        return [("s3 credentials", True, f"{creds} accepted"), ("s3 bucket", True, f"bucket {bucket!r} exists")]
    if code == "AccessDenied":
        # Authenticated, but the key's policy does not allow reading this bucket (or it does not exist).
        return [("s3 credentials", True, f"{creds} authenticated"),
                ("s3 bucket", False, f"bucket {bucket!r}: access denied to {creds}")]
    return [("s3 credentials", False, f"{creds}: unexpected answer {code!r}"),
            ("s3 bucket", False, f"bucket {bucket!r} not checked: unexpected answer {code!r}")]


__all__ = [
    "DEFAULT_PART_SIZE", "ChecksumMismatch", "InvalidKey", "LocalStore", "ObjectForbidden", "ObjectInfo",
    "ObjectNotFound", "ObjectStore", "ObjectTooLarge", "RetryPolicy", "S3Store", "StorageError", "StorageUnavailable",
    "check_s3", "make_client", "open_store", "split_endpoint", "validate_key",
]
