"""ldm_core.storage (and the S3 client beneath it, ldm_core.s3) against real S3-protocol
servers on loopback, and local paths.

The storage rules (markers, hashes, resume, atomicity) run against both artifact stores a
Kubeflow run meets, each with the keys a profile gets there: moto standing in for Kubeflow
1.10's MinIO (root keys), and the real SeaweedFS of Kubeflow 1.11 with a profile's scoped
user (tests/harness/seaweedfs.py). What only one store can show (moto's switchable
authentication, bucket creation) runs on that one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from moto import settings as moto_settings

from ldm_core import s3, storage
from ldm_core.config import StorageConfig
from ldm_core.io import sha256_file
from tests.harness.s3 import (
    TEST_ACCESS_KEY,
    TEST_SECRET_KEY,
    make_bucket,
    moto_store,
    raw_client,
    s3_env,
    s3_server,
)
from tests.harness.seaweedfs import seaweedfs_server, weed_or_skip


@pytest.fixture(scope="module")
def endpoint():
    with s3_server() as url:
        yield url


@pytest.fixture
def bucket(endpoint, monkeypatch):
    s3_env(monkeypatch, endpoint)
    return make_bucket(endpoint)


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory):
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs"), weed_or_skip()) as store:
        yield store


@pytest.fixture(params=["moto", "seaweedfs"])
def store(request, monkeypatch):
    """A store of either kind, the environment holding the keys a profile gets there."""
    if request.param == "moto":
        chosen = moto_store(request.getfixturevalue("endpoint"))
    else:
        chosen = request.getfixturevalue("seaweedfs")
    chosen.env(monkeypatch)
    return chosen


@pytest.fixture
def root(store) -> str:
    """A fresh prefix the profile's keys may write."""
    return store.fresh_root()


def _tree(root: Path) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "bundle.json": b'{"format": 1}\n',
        "weights/unet.pt": os.urandom(300_000),
        "weights/deep/autoencoder.pt": os.urandom(70_000),
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != storage.COMPLETE_MARKER
    }


def test_uris():
    assert storage.is_remote("s3://b/k") and not storage.is_remote("/tmp/x")
    assert not storage.is_remote("file:///tmp/x") and not storage.is_remote(Path("s3:/x"))
    assert s3.parse_s3("s3://bucket/a/b.pt") == ("bucket", "a/b.pt")
    assert s3.parse_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(storage.StorageError, match="no bucket"):
        s3.parse_s3("s3:///key")
    assert storage.local_path("file:///tmp/a%20b") == Path("/tmp/a b")
    with pytest.raises(storage.StorageError, match="not a local path"):
        storage.local_path("gs://b/k")


def test_endpoint_scheme_decides_tls(monkeypatch):
    monkeypatch.delenv("S3_ENDPOINT", raising=False)
    monkeypatch.delenv("MINIO_ENDPOINT", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with pytest.raises(storage.StorageError, match="no S3 endpoint"):
        s3.client(StorageConfig())
    mc = s3.client(StorageConfig(endpoint="http://minio.kubeflow:9000", secure=True))
    assert not mc._base_url.is_https and mc._base_url.host == "minio.kubeflow:9000"
    monkeypatch.setenv("MINIO_ENDPOINT", "minio:9000")
    assert s3.client(StorageConfig(secure=True))._base_url.is_https
    assert not s3.client(StorageConfig(secure=False))._base_url.is_https


def test_dir_roundtrip_with_marker(store, root, tmp_path):
    files = _tree(tmp_path / "src")
    uri = f"{root}/runs/r1/bundle"
    entries = storage.upload_dir(tmp_path / "src", uri)
    assert set(entries) == set(files)

    bucket, prefix = s3.parse_s3(uri)
    admin = store.admin_client()
    keys = {o.object_name for o in admin.list_objects(bucket, f"{prefix}/", recursive=True)}
    assert keys == {f"{prefix}/{k}" for k in files} | {f"{prefix}/_COMPLETE"}
    marker = json.loads(admin.get_object(bucket, f"{prefix}/_COMPLETE").read())
    assert marker["files"]["weights/unet.pt"]["size"] == 300_000

    assert storage.exists(uri) and storage.exists(f"{uri}/bundle.json")
    assert not storage.exists(f"{uri}/nope.pt") and not storage.exists(f"{root}/runs/r1")

    out = storage.download_dir(uri, tmp_path / "dst")
    assert _read_tree(out) == files
    assert (out / storage.COMPLETE_MARKER).is_file()  # the local copy is complete too
    assert not list(out.rglob(".*"))  # no temporary file left behind


def test_multipart_upload_and_verified_download(store, root, tmp_path):
    big = tmp_path / "ckpt.pt"
    data = os.urandom(11 * 1024 * 1024 + 123)
    big.write_bytes(data)
    uri = f"{root}/ckpt/ckpt.pt"
    storage.upload_file(big, uri, StorageConfig(part_size_mb=5))
    stat = store.admin_client().stat_object(*s3.parse_s3(uri))
    assert stat.etag.endswith("-3"), f"expected a 3-part upload, etag {stat.etag}"
    assert stat.metadata["x-amz-meta-sha256"] == sha256_file(big)

    got = storage.download_file(uri, tmp_path / "out" / "ckpt.pt", StorageConfig(part_size_mb=5))
    assert got.read_bytes() == data


def test_checksum_mismatch_detected_and_partial_removed(store, root, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"original bytes" * 1000)
    uri = f"{root}/x/a.bin"
    digest = storage.upload_file(src, uri)
    # Corrupt the object in place while keeping its recorded hash.
    bad = b"tampered bytes" * 1000
    store.admin_client().put_object(
        *s3.parse_s3(uri), io.BytesIO(bad), len(bad), metadata={"sha256": digest}
    )
    dst = tmp_path / "out" / "a.bin"
    with pytest.raises(storage.StorageError) as err:
        storage.download_file(uri, dst)
    assert "checksum mismatch" in str(err.value) and uri in str(err.value)
    assert not dst.exists() and not list((tmp_path / "out").iterdir())


def test_tampered_directory_member_fails_download_dir(store, root, tmp_path):
    _tree(tmp_path / "src")
    uri = f"{root}/d"
    storage.upload_dir(tmp_path / "src", uri)
    bad = b"not the bundle"
    # Even with matching object metadata, the marker's hash catches the change.
    store.admin_client().put_object(
        *s3.parse_s3(f"{uri}/bundle.json"),
        io.BytesIO(bad),
        len(bad),
        metadata={"sha256": "0" * 64},
    )
    with pytest.raises(storage.StorageError, match=f"checksum mismatch for {uri}/bundle.json"):
        storage.download_dir(uri, tmp_path / "dst")
    assert not (tmp_path / "dst" / storage.COMPLETE_MARKER).exists()


def test_resume_skips_current_files(root, tmp_path, caplog):
    files = _tree(tmp_path / "src")
    uri = f"{root}/resume"
    storage.upload_dir(tmp_path / "src", uri)
    dst = storage.download_dir(uri, tmp_path / "dst")
    inodes = {rel: (dst / rel).stat().st_ino for rel in files}
    (dst / "weights/unet.pt").unlink()  # an interrupted earlier download
    (dst / "bundle.json").write_bytes(b"stale")  # a stale local file

    storage.download_dir(uri, dst)
    assert _read_tree(dst) == files
    for rel in ("weights/deep/autoencoder.pt", "empty.txt"):
        assert (dst / rel).stat().st_ino == inodes[rel], f"{rel} was downloaded again"
    assert (dst / "bundle.json").stat().st_ino != inodes["bundle.json"]

    # Re-uploading the same tree sends no file again (same stored hashes).
    with caplog.at_level(logging.DEBUG, logger="ldm_core.s3"):
        storage.upload_dir(tmp_path / "src", uri)
    assert caplog.text.count("not uploading again") == len(files)


def test_incomplete_prefix_refused_then_waited_for(root, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 10)
    uri = f"{root}/partial"
    storage.upload_file(src, f"{uri}/a.bin")
    with pytest.raises(storage.StorageError, match="not a complete directory: no _COMPLETE"):
        storage.download_dir(uri, tmp_path / "dst")
    assert not storage.exists(uri)

    # A reader that waits sees the directory once the writer marks it complete.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"x" * 10)
    writer = threading.Timer(0.5, storage.upload_dir, args=(tmp_path / "src", uri))
    writer.start()
    try:
        t0 = time.monotonic()
        out = storage.download_dir(uri, tmp_path / "dst", wait_s=20)
        assert time.monotonic() - t0 < 15
    finally:
        writer.join()
    assert (out / "a.bin").read_bytes() == b"x" * 10


def test_rewrite_removes_old_marker_first(root, tmp_path):
    _tree(tmp_path / "src")
    uri = f"{root}/rw"
    storage.upload_dir(tmp_path / "src", uri)
    (tmp_path / "src2").mkdir()
    (tmp_path / "src2" / "only.txt").write_bytes(b"v2")
    storage.upload_dir(tmp_path / "src2", uri)
    # Old objects may linger, but the marker defines the directory.
    out = storage.download_dir(uri, tmp_path / "dst")
    assert _read_tree(out) == {"only.txt": b"v2"}


def test_local_and_file_uris_use_the_same_calls(tmp_path):
    files = _tree(tmp_path / "src")
    dest_uri = (tmp_path / "store" / "bundle").as_uri()  # file:///...
    storage.upload_dir(tmp_path / "src", dest_uri)
    assert storage.exists(dest_uri) and storage.exists(str(tmp_path / "store/bundle/bundle.json"))
    out = storage.download_dir(str(tmp_path / "store" / "bundle"), tmp_path / "dst")
    assert _read_tree(out) == files
    with pytest.raises(storage.StorageError, match="not a complete directory"):
        storage.download_dir(str(tmp_path / "src"), tmp_path / "dst2")
    with pytest.raises(storage.StorageError, match="checksum mismatch"):
        storage.download_file(
            str(tmp_path / "src/bundle.json"), tmp_path / "f", expected_sha256="0" * 64
        )
    assert not (tmp_path / "f").exists()


def test_upload_dir_leaves_out_what_a_killed_writer_left(tmp_path):
    """A hidden temporary of ldm_core.io.atomic_write is a write in progress, not content."""
    files = _tree(tmp_path / "src")
    (tmp_path / "src" / "weights" / ".unet.pt.k1ll3d_0.tmp").write_bytes(b"half of a write")
    entries = storage.upload_dir(tmp_path / "src", str(tmp_path / "store"))
    assert set(entries) == set(files)
    assert _read_tree(tmp_path / "store") == files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_errors_name_the_uri_and_never_a_secret(
    bucket, endpoint, tmp_path, monkeypatch, caplog, capsys
):
    caplog.set_level(logging.DEBUG)  # every logger, SDK and urllib3 included
    src = tmp_path / "a.bin"
    src.write_bytes(b"payload")
    errors: list[storage.StorageError] = []

    def expect(call, pattern):
        with pytest.raises(storage.StorageError, match=pattern) as err:
            call()
        errors.append(err.value)

    storage.upload_file(src, f"s3://{bucket}/ok/a.bin")
    storage.download_file(f"s3://{bucket}/ok/a.bin", tmp_path / "b.bin")
    assert not storage.exists("s3://no-such-bucket-ldm/x")
    expect(  # an upload would create it (test_an_upload_creates_its_missing_bucket)
        lambda: storage.download_file("s3://no-such-bucket-ldm/a.bin", tmp_path / "nb"),
        "s3://no-such-bucket-ldm/a.bin failed: bucket 'no-such-bucket-ldm' does not exist",
    )
    expect(
        lambda: storage.download_file(f"s3://{bucket}/missing.pt", tmp_path / "m"),
        f"s3://{bucket}/missing.pt failed: no such object",
    )

    # Authentication enforced: moto refuses keys it does not know.
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    expect(
        lambda: storage.download_file(f"s3://{bucket}/ok/a.bin", tmp_path / "c"),
        f"s3://{bucket}/ok/a.bin failed: access refused",
    )
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))

    monkeypatch.setenv("S3_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    t0 = time.monotonic()
    expect(lambda: storage.download_file(f"s3://{bucket}/ok/a.bin", tmp_path / "d"), "unreachable")
    assert time.monotonic() - t0 < 20, "an unreachable endpoint must fail fast"

    out, err = capsys.readouterr()
    visible = [caplog.text, out, err, repr(s3.client(StorageConfig()))]
    visible += [str(e) for e in errors] + [repr(e) for e in errors]
    visible += [repr(e.__cause__) + repr(e.__context__) for e in errors]
    assert "uploaded" in caplog.text  # logging was on
    for text in visible:
        assert TEST_SECRET_KEY not in text
    assert TEST_ACCESS_KEY not in "".join(str(e) for e in errors)


def test_malformed_marker_is_an_error_naming_it(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / storage.COMPLETE_MARKER).write_text('{"files": {"a.bin": {"size": 1}}}')
    with pytest.raises(storage.StorageError, match="_COMPLETE is not a valid completion marker"):
        storage.download_dir(str(tmp_path / "d"), tmp_path / "out")


def test_object_without_hash_metadata_downloads_with_a_warning(store, root, tmp_path, caplog):
    """Objects written by other tools (mc cp, the KFP UI) carry no sha256: still usable."""
    data = b"written by another tool"
    uri = f"{root}/other/x.txt"
    store.admin_client().put_object(*s3.parse_s3(uri), io.BytesIO(data), len(data))
    with caplog.at_level(logging.WARNING, logger="ldm_core.storage"):
        out = storage.download_file(uri, tmp_path / "x.txt")
    assert out.read_bytes() == data
    assert "no sha256 metadata" in caplog.text


# --------------------------------------------------------------------------- Kubeflow's MinIO


def test_an_upload_creates_its_missing_bucket(endpoint, monkeypatch, tmp_path):
    """Kubeflow's MinIO starts with only the ``mlpipeline`` bucket: the first upload to the
    bucket of ``storage_prefix`` creates it; the next finds it (and a read of a missing
    bucket still says it is missing)."""
    s3_env(monkeypatch, endpoint)
    name = f"ldm-new-{os.urandom(4).hex()}"
    assert not raw_client(endpoint).bucket_exists(name)
    files = _tree(tmp_path / "src")
    storage.upload_dir(tmp_path / "src", f"s3://{name}/models/m1")
    assert raw_client(endpoint).bucket_exists(name)
    storage.upload_file(tmp_path / "src" / "bundle.json", f"s3://{name}/again/bundle.json")
    storage.download_dir(f"s3://{name}/models/m1", tmp_path / "out")
    assert _read_tree(tmp_path / "out") == files


def _restricted_keys(endpoint: str) -> tuple[str, str]:
    """An IAM user of the moto server that may read and write objects of any bucket but not
    create one (as a MinIO user with a readwrite policy scoped to existing buckets). Looking
    a bucket up (HeadBucket) needs s3:ListBucket on AWS and MinIO; moto checks s3:HeadBucket."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=TEST_ACCESS_KEY,
        aws_secret_access_key=TEST_SECRET_KEY,
    )
    user = f"writer-{os.urandom(3).hex()}"
    iam.create_user(UserName=user)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:HeadBucket"],
                "Resource": "*",
            },
            {"Effect": "Deny", "Action": "s3:CreateBucket", "Resource": "*"},
        ],
    }
    iam.put_user_policy(UserName=user, PolicyName="rw", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def test_credentials_that_may_not_create_the_bucket_get_a_clear_error(
    endpoint, monkeypatch, tmp_path
):
    s3_env(monkeypatch, endpoint)
    access, secret = _restricted_keys(endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    # moto checks signatures and IAM policies only from now on (as MinIO always does).
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    src = tmp_path / "a.bin"
    src.write_bytes(b"payload")
    with pytest.raises(storage.StorageError) as err:
        storage.upload_file(src, "s3://ldm-not-mine/models/a.bin")
    assert str(err.value) == (
        "upload to s3://ldm-not-mine/models/a.bin failed: bucket 'ldm-not-mine' does not exist "
        "and these credentials may not create it (AccessDenied); create it (e.g. "
        f"`mc mb <alias>/ldm-not-mine`) or write where they may: {s3.profile_scope()}"
    )
    assert secret not in str(err.value)


def test_a_bare_endpoint_against_plain_http_says_to_write_the_scheme(
    endpoint, monkeypatch, tmp_path
):
    """``minio-service.kubeflow:9000`` with storage.secure (the default) speaks TLS to a
    plain-HTTP server: the error says what to write instead."""
    s3_env(monkeypatch, endpoint)
    monkeypatch.setenv("S3_ENDPOINT", endpoint.removeprefix("http://"))
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match="give the endpoint as http://HOST:PORT"):
        storage.download_file("s3://any/a.bin", tmp_path / "a", StorageConfig(secure=True))
    assert time.monotonic() - t0 < 20
    monkeypatch.setenv("S3_ENDPOINT", endpoint)  # the scheme wins over storage.secure
    assert not storage.exists("s3://any/a.bin", StorageConfig(secure=True))
