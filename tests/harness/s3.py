"""S3-protocol servers on loopback standing in for Kubeflow's artifact store in tests.

``s3_server()`` starts moto's threaded server on 127.0.0.1 with a free port and yields its
``http://127.0.0.1:PORT`` endpoint; ``s3_env(monkeypatch, endpoint)`` points ldm_core.storage
at it with test credentials. Any test that moves artifacts through s3:// can use them.

A :class:`Store` is such a server as a run meets it on one Kubeflow release: the keys the run
gets and a prefix they may write. :func:`moto_store` is Kubeflow 1.10's MinIO (the profile's
Secret holds the root keys: everything allowed, bucket ``mlpipeline`` made by KFP);
tests/harness/seaweedfs.py runs Kubeflow 1.11's SeaweedFS with a profile's scoped user.
:func:`kserve_storage_initializer` reads a ``storageUri`` the way KServe's does.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from minio import Minio
from moto.server import ThreadedMotoServer

TEST_ACCESS_KEY = "AKIATESTLDMACCESS01"
TEST_SECRET_KEY = "sEcReT-ldm-test-9f3b2c7e1d0a"
REGION = "us-east-1"


@dataclass(frozen=True)
class Keys:
    access: str
    secret: str

    def __repr__(self) -> str:  # a failing test's report must not print the secret
        return f"Keys({self.access!r}, ***)"


TEST_KEYS = Keys(TEST_ACCESS_KEY, TEST_SECRET_KEY)


@contextmanager
def s3_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_env(monkeypatch, endpoint: str, keys: Keys = TEST_KEYS) -> None:
    """Environment the storage module reads: endpoint and credentials (no config needed)."""
    for name in ("MINIO_ENDPOINT", "AWS_ENDPOINT_URL", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("S3_ENDPOINT", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys.access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys.secret)
    # No region: the S3 Secret a cluster gives the steps holds none either, and the client
    # must not need one (ldm_core.config StorageConfig.region).
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)


def make_bucket(endpoint: str) -> str:
    """A fresh bucket (unique name) on the server; returns its name."""
    name = f"ldm-{uuid.uuid4().hex[:12]}"
    raw_client(endpoint).make_bucket(name)
    return name


def raw_client(endpoint: str, keys: Keys = TEST_KEYS) -> Minio:
    """A plain SDK client, for tests that need to look at or tamper with objects directly."""
    return Minio(
        endpoint.split("://", 1)[1],
        access_key=keys.access,
        secret_key=keys.secret,
        secure=False,
        region=REGION,
    )


@dataclass(frozen=True)
class Store:
    """An S3 server as a run on one Kubeflow release meets it: ``user`` are the keys of the
    profile's ``mlpipeline-minio-artifact`` Secret, ``writable`` an ``s3://`` prefix they may
    write, ``admin`` keys that may do anything (to look behind the code's back)."""

    name: str
    endpoint: str
    admin: Keys
    user: Keys
    writable: str

    def env(self, monkeypatch) -> None:
        """Point ldm_core.storage at this store with the profile's keys."""
        s3_env(monkeypatch, self.endpoint, self.user)

    def admin_client(self) -> Minio:
        return raw_client(self.endpoint, self.admin)

    def fresh_root(self) -> str:
        """A new, empty ``s3://`` prefix inside ``writable``."""
        return f"{self.writable}/t-{uuid.uuid4().hex[:12]}"


def moto_store(endpoint: str, namespace: str = "brain-ldm") -> Store:
    """Kubeflow 1.10's MinIO on the moto server at ``endpoint``: bucket ``mlpipeline`` (KFP
    makes it), and the profile's Secret holds the root keys (kubeflow/manifests v1.10.x
    pipelines-profile-controller/sync.py copies kubeflow's mlpipeline-minio-artifact)."""
    mc = raw_client(endpoint)
    if not mc.bucket_exists("mlpipeline"):
        mc.make_bucket("mlpipeline")
    return Store("moto", endpoint, TEST_KEYS, TEST_KEYS, f"s3://mlpipeline/private/{namespace}")


def kserve_storage_initializer(uri: str, dest: Path, endpoint: str, keys: Keys) -> list[str]:
    """Fetch an ``s3://`` storageUri into ``dest`` as KServe's storage initializer does, with
    the serving account's keys; returns the keys it fetched.

    kserve v0.15.2 python/kserve/kserve/storage/storage.py, ``Storage._download_s3``: a boto3
    S3 resource on ``AWS_ENDPOINT_URL`` lists the bucket with the URI's path as a plain prefix
    (no trailing slash, no delimiter), skips keys ending in ``/``, and downloads every other
    object to ``dest`` under its key less that prefix (an object that is the path itself
    lands under its base name, and nothing else is fetched); finding nothing is an error.
    """
    import boto3

    s3 = boto3.resource(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=keys.access,
        aws_secret_access_key=keys.secret,
        region_name=REGION,
    )
    parsed = urlparse(uri)
    path = parsed.path.lstrip("/")
    bucket = s3.Bucket(parsed.netloc)
    fetched = []
    for obj in bucket.objects.filter(Prefix=path):
        if obj.key.endswith("/"):
            continue
        exact = obj.key == path
        name = obj.key.rsplit("/", 1)[-1] if exact else re.sub(f"^{re.escape(path)}/?", "", obj.key)
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        bucket.download_file(obj.key, str(target))
        fetched.append(obj.key)
        if exact:
            break
    if not fetched:
        raise RuntimeError(f"Failed to fetch model. No model found in {path}.")
    return fetched
