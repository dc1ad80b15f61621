"""An S3-protocol server on loopback (moto) standing in for MinIO in tests.

``s3_server()`` starts moto's threaded server on 127.0.0.1 with a free port and yields its
``http://127.0.0.1:PORT`` endpoint; ``s3_env(monkeypatch, endpoint)`` points ldm_core.storage
at it with test credentials. Any test that moves artifacts through s3:// can use them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from minio import Minio
from moto.server import ThreadedMotoServer

TEST_ACCESS_KEY = "AKIATESTLDMACCESS01"
TEST_SECRET_KEY = "sEcReT-ldm-test-9f3b2c7e1d0a"


@contextmanager
def s3_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_env(monkeypatch, endpoint: str) -> None:
    """Environment the storage module reads: endpoint and credentials (no config needed)."""
    for name in ("MINIO_ENDPOINT", "AWS_ENDPOINT_URL", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("S3_ENDPOINT", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", "us-east-1")


def make_bucket(endpoint: str) -> str:
    """A fresh bucket (unique name) on the server; returns its name."""
    name = f"ldm-{uuid.uuid4().hex[:12]}"
    raw_client(endpoint).make_bucket(name)
    return name


def raw_client(endpoint: str) -> Minio:
    """A plain SDK client, for tests that need to look at or tamper with objects directly."""
    return Minio(
        endpoint.split("://", 1)[1],
        access_key=TEST_ACCESS_KEY,
        secret_key=TEST_SECRET_KEY,
        secure=False,
        region="us-east-1",
    )
