"""The MinIO the suite starts is a real S3 server: it authenticates, checks signatures and keeps data."""

from __future__ import annotations

import io
import os
import subprocess
import time
import urllib.error
import urllib.request
from datetime import timedelta

import pytest
from minio.error import S3Error

from tests.servers.minio_plugin import S3Bucket
from tests.servers.minio_server import INSTALL_SCRIPT, MinioServer

pytestmark = pytest.mark.s3


def _put(bucket: S3Bucket, key: str, data: bytes) -> None:
    bucket.client().put_object(bucket.bucket, key, io.BytesIO(data), len(data))


def _http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_put_get_with_the_right_keys(s3_bucket: S3Bucket) -> None:
    _put(s3_bucket, "users/u1/a.bin", b"hello minio")
    response = s3_bucket.client().get_object(s3_bucket.bucket, "users/u1/a.bin")
    try:
        assert response.read() == b"hello minio"
    finally:
        response.close()
        response.release_conn()


@pytest.mark.parametrize(
    ("access", "secret", "code"),
    [("selfix-test", "a-wrong-secret-key", "SignatureDoesNotMatch"),
     ("nobody", "whatever-secret", "InvalidAccessKeyId")],
)
def test_wrong_credentials_are_refused(s3_bucket: S3Bucket, access: str, secret: str, code: str) -> None:
    _put(s3_bucket, "k", b"x")
    client = s3_bucket.server.client(access_key=access, secret_key=secret)
    with pytest.raises(S3Error) as info:
        client.get_object(s3_bucket.bucket, "k")
    assert info.value.code == code


def test_presigned_url_works_and_a_tampered_one_is_refused(s3_bucket: S3Bucket) -> None:
    _put(s3_bucket, "users/u1/a.png", b"png bytes")
    _put(s3_bucket, "users/u2/b.png", b"someone else's")
    url = s3_bucket.client().presigned_get_object(s3_bucket.bucket, "users/u1/a.png", expires=timedelta(minutes=5))
    assert _http_get(url) == (200, b"png bytes")

    sig_at = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    flipped = "0" if url[sig_at] != "0" else "1"
    tampered = {
        "signature": url[:sig_at] + flipped + url[sig_at + 1:],
        "other key": url.replace("users/u1/a.png", "users/u2/b.png"),
        "longer expiry": url.replace("X-Amz-Expires=300", "X-Amz-Expires=604800"),
    }
    for what, bad in tampered.items():
        assert bad != url, what
        status, body = _http_get(bad)
        assert status == 403, (what, status, body[:200])
        assert b"SignatureDoesNotMatch" in body, what


def test_restart_keeps_objects(minio_private_server: MinioServer) -> None:
    server = minio_private_server
    server.make_bucket("keep")
    server.client().put_object("keep", "a/b.txt", io.BytesIO(b"durable"), 7)
    port = server.port
    server.restart()
    assert server.port == port
    response = server.client().get_object("keep", "a/b.txt")
    try:
        assert response.read() == b"durable"
    finally:
        response.close()
        response.release_conn()


def test_kill_then_start_keeps_objects(minio_private_server: MinioServer) -> None:
    server = minio_private_server
    server.make_bucket("crash")
    server.client().put_object("crash", "k", io.BytesIO(b"synced"), 6)
    server.kill()
    assert not server.running
    server.start()
    assert server.client().stat_object("crash", "k").size == 6


def test_install_script_is_cached_and_prints_the_binary(minio_server: MinioServer) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SELFIX_MINIO_BIN"}
    started = time.monotonic()
    proc = subprocess.run([str(INSTALL_SCRIPT)], capture_output=True, text=True, env=env, check=False, timeout=1800)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-2000:]
    binary = proc.stdout.strip().splitlines()[-1]
    assert os.path.isabs(binary) and os.access(binary, os.X_OK)
    second = time.monotonic()
    again = subprocess.run([str(INSTALL_SCRIPT)], capture_output=True, text=True, env=env, check=True)
    assert again.stdout.strip().splitlines()[-1] == binary
    assert time.monotonic() - second < 2.0, f"a cached install must be instant (first call took {took:.1f}s)"
