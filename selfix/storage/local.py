"""`LocalStore`: a directory standing in for the bucket, when S3_ENDPOINT is empty."""

from __future__ import annotations

import mimetypes
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

from selfix.files import fsync_dir as _fsync_dir
from selfix.storage.base import CHUNK, ObjectInfo, StatExists, check_max, check_size, validate_key
from selfix.storage.errors import InvalidKey, ObjectNotFound


class LocalStore(StatExists):
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
                check_max(key, info.size, max_bytes)
                shutil.copyfileobj(src, dst, CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
                check_size(key, dst.tell(), info.size)
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
