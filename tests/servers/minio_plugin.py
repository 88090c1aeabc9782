"""pytest fixtures for a real MinIO server.

- `minio_server` (session): one server for the whole run; tests must not stop it.
- `minio_private_server` (function): a server of the test's own, for tests that stop, kill or restart it.
- `s3_bucket` (function): a fresh bucket on `minio_server`, as an S3Bucket (endpoint, keys, bucket, env).
- `s3_private_bucket` (function): the same on `minio_private_server` (its `.server` may be stopped freely).

The binary: SELFIX_MINIO_BIN, else scripts/lib/install-minio is run once (instant when cached).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from minio import Minio

from selfix.settings import Settings, load
from tests.servers.minio_server import MinioServer


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "s3: needs the real MinIO server (started by the minio_server fixture)")


@dataclass(frozen=True)
class S3Bucket:
    server: MinioServer = field(repr=False)
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    bucket: str
    region: str = "us-east-1"

    @property
    def env(self) -> dict[str, str]:
        """selfix's S3 variables pointing at this bucket (merge into an environ for settings.load)."""
        return {
            "S3_ENDPOINT": self.endpoint,
            "S3_ACCESS_KEY": self.access_key,
            "S3_SECRET_KEY": self.secret_key,
            "S3_BUCKET": self.bucket,
            "S3_REGION": self.region,
            "S3_USE_SSL": "false",
        }

    def settings(self, **env: str) -> Settings:
        """selfix Settings for this bucket; keyword arguments override or add variables (e.g. S3_SECRET_KEY)."""
        return load({**self.env, **env})

    def client(self) -> Minio:
        """A MinIO client with the root credentials, for arranging and inspecting objects."""
        return self.server.client()

    def get(self, key: str) -> tuple[bytes, str]:
        """An object's bytes and its stored content type."""
        response = self.client().get_object(self.bucket, key)
        try:
            return response.read(), str(response.headers.get("content-type"))
        finally:
            response.close()
            response.release_conn()


def _bucket_on(server: MinioServer) -> Iterator[S3Bucket]:
    name = f"t-{uuid.uuid4().hex[:16]}"
    server.make_bucket(name)
    yield S3Bucket(server=server, endpoint=server.endpoint, access_key=server.access_key,
                   secret_key=server.secret_key, bucket=name, region=server.region)
    _drop_bucket(server, name)


def _drop_bucket(server: MinioServer, name: str) -> None:
    # Best effort: keeps the session server's drive small (some tests write 40 MB); a stopped server is fine.
    if not server.running:
        return
    with contextlib.suppress(Exception):
        client = server.client()
        for obj in client.list_objects(name, recursive=True):
            client.remove_object(name, obj.object_name)
        client.remove_bucket(name)


@pytest.fixture(scope="session")
def minio_server() -> Iterator[MinioServer]:
    with MinioServer() as server:
        yield server


@pytest.fixture
def minio_private_server() -> Iterator[MinioServer]:
    with MinioServer() as server:
        yield server


@pytest.fixture
def s3_bucket(minio_server: MinioServer) -> Iterator[S3Bucket]:
    yield from _bucket_on(minio_server)


@pytest.fixture
def s3_private_bucket(minio_private_server: MinioServer) -> Iterator[S3Bucket]:
    yield from _bucket_on(minio_private_server)
