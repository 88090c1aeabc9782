"""`selfix doctor`'s S3 checks: endpoint reachable, credentials accepted, bucket exists; one line each, no secrets."""

from __future__ import annotations

import socket

from minio.error import S3Error

from selfix.settings import Settings
from selfix.storage.s3 import CLIENT_ERRORS, make_client, split_endpoint

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
    except CLIENT_ERRORS as exc:
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
