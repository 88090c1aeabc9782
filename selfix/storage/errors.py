"""The store's one exception family. Every exception says whether a retry can help (`retriable`) and what kind of
failure it is (`kind`), so the runner and the uploader map it to a result error code without knowing S3:
``exc.result_code("lora")`` gives ``lora_not_found``, ``lora_forbidden``, ... Messages name the bucket and key,
never a credential."""

from __future__ import annotations


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
    """Credentials refused or access denied: not retriable."""

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
