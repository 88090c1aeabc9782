"""The object store: S3 (MinIO client) in production, a local directory when S3_ENDPOINT is empty.

Callers see one small interface (`ObjectStore`, from `open_store`) and one exception family (`StorageError`,
whose `retriable` and `kind` say what a failure means; see `errors`). One module per concern:
- `errors`: the StorageError family;
- `base`: `ObjectStore`, `ObjectInfo`, `validate_key`, the checks both stores share;
- `local`: `LocalStore`, a directory standing in for the bucket;
- `s3`: `S3Store`, `RetryPolicy`, the MinIO client, streamed and verified downloads;
- `doctor`: `check_s3`.

Code outside the package imports from the package; modules inside it, and the tests of one module, import from
that module.
"""

from selfix.settings import Settings
from selfix.storage.base import ObjectInfo, ObjectStore, validate_key
from selfix.storage.doctor import check_s3
from selfix.storage.errors import (
    ChecksumMismatch,
    InvalidKey,
    ObjectForbidden,
    ObjectNotFound,
    ObjectTooLarge,
    StorageError,
    StorageUnavailable,
)
from selfix.storage.local import LocalStore
from selfix.storage.s3 import DEFAULT_PART_SIZE, RetryPolicy, S3Store, make_client, split_endpoint


def open_store(settings: Settings) -> ObjectStore:
    """S3 when S3_ENDPOINT is set, else the local directory STORE_DIR."""
    if settings.s3_endpoint:
        return S3Store(settings, verify_md5=settings.s3_verify_md5)
    return LocalStore(settings.store_dir)


__all__ = [
    "DEFAULT_PART_SIZE", "ChecksumMismatch", "InvalidKey", "LocalStore", "ObjectForbidden", "ObjectInfo",
    "ObjectNotFound", "ObjectStore", "ObjectTooLarge", "RetryPolicy", "S3Store", "StorageError", "StorageUnavailable",
    "check_s3", "make_client", "open_store", "split_endpoint", "validate_key",
]
