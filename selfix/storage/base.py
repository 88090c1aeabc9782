"""What every store is: the `ObjectStore` protocol, `ObjectInfo`, and the key and size checks shared by the two
implementations (`local.LocalStore`, `s3.S3Store`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from selfix.spool import has_control
from selfix.storage.errors import InvalidKey, ObjectNotFound, ObjectTooLarge, StorageUnavailable

MAX_KEY_BYTES = 1024  # S3's limit on an object key
CHUNK = 1024 * 1024


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


class StatExists:
    """`exists` for any store with a `stat` that raises ObjectNotFound."""

    def stat(self, key: str) -> ObjectInfo:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True


def check_max(key: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ObjectTooLarge(f"object {key!r} is {size} bytes; at most {max_bytes} accepted", key=key)


def check_size(key: str, got: int, expected: int) -> None:
    if got != expected:
        # A short read means the connection broke mid-body: worth another attempt.
        raise StorageUnavailable(f"download of {key!r} truncated: {got} of {expected} bytes", key=key)
