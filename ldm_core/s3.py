"""The S3 side of :mod:`ldm_core.storage`: talking to MinIO (or any S3-protocol server).

A client for the configured endpoint, SDK and network errors turned into a
:class:`~ldm_core.errors.StorageError` that names the URI (and never a credential), bucket
creation, and the few per-object calls the storage interface is built from: an object's
stored SHA-256, an upload that carries it, a stat and a small read.

- The endpoint (``storage.endpoint`` or ``S3_ENDPOINT``) decides TLS by its scheme:
  ``http://minio-service.kubeflow:9000`` (Kubeflow's MinIO, plain HTTP inside the cluster)
  or ``https://…``; a bare ``host:port`` falls back to ``storage.secure``.
- Credentials come only from the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
  or ``MINIO_ACCESS_KEY``/``MINIO_SECRET_KEY``, filled from a Secret on a cluster). They are
  handed to the SDK and never logged, never put in an error message or a repr.
- What a Kubeflow profile's credentials may do depends on the release: on 1.10 they are
  MinIO's root keys (everything); on 1.11 SeaweedFS scopes them to a few prefixes of
  ``mlpipeline`` (:data:`KUBEFLOW_PROFILE_PREFIXES`), with no bucket-level call at all. So a
  refused HeadBucket means "may not look", not "missing", and a refusal says where the keys
  may go.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import certifi
import urllib3
from minio import Minio
from minio.error import S3Error

from ldm_core.config import StorageConfig
from ldm_core.errors import StorageError

log = logging.getLogger(__name__)

SCHEME = "s3://"
"""What starts an S3 URI; anything else is a local path or ``file://`` URI."""
SHA256_META = "sha256"
"""User metadata key holding an object's SHA-256 (sent as ``x-amz-meta-sha256``)."""
MIN_PART_SIZE = 5 * 1024 * 1024
"""S3's smallest multipart part; the SDK refuses less."""
_ENDPOINT_ENV = ("S3_ENDPOINT", "MINIO_ENDPOINT", "AWS_ENDPOINT_URL")
_CREDENTIAL_ENV = (
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"),
)
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
}
_NOT_FOUND = ("NoSuchKey", "NoSuchObject", "ResourceNotFound")
KUBEFLOW_BUCKET = "mlpipeline"
KUBEFLOW_PROFILE_PREFIXES = (
    "private/<namespace>/",
    "private-artifacts/<namespace>/",
    "artifacts/",
    "shared/",
)
"""Where Kubeflow 1.11 lets a profile's S3 keys read, write and list in bucket ``mlpipeline``,
and nowhere else: no other bucket, no new bucket (kubeflow/manifests v1.11.0, the KFP profile
controller's sync.py, which puts this policy on each profile's SeaweedFS user). KFP's own
runs write under ``private-artifacts/<namespace>/``, which an install may expire after
``ARTIFACT_RETENTION_DAYS``; models belong under ``private/<namespace>/``."""
_BUCKET_TAKEN = ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")


def parse_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the prefix has no leading/trailing slash
    handling beyond stripping the leading one (a trailing slash is kept: it means "folder")."""
    if not uri.startswith(SCHEME):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    rest = uri[len(SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} has no bucket name (expected s3://BUCKET/PREFIX)")
    return bucket, prefix


# --------------------------------------------------------------------------- client


def _endpoint(cfg: StorageConfig) -> tuple[str, bool]:
    """host[:port] and TLS flag; a scheme in the endpoint (http:// / https://) wins over
    ``cfg.secure`` so that one environment variable fully describes the server."""
    raw = cfg.endpoint or next((os.environ[k] for k in _ENDPOINT_ENV if os.environ.get(k)), "")
    if not raw:
        raise StorageError(
            "no S3 endpoint: set storage.endpoint in the config or one of "
            + ", ".join(_ENDPOINT_ENV)
        )
    secure = cfg.secure
    if "://" in raw:
        parsed = urlparse(raw)
        if parsed.scheme not in ("http", "https"):
            raise StorageError(f"S3 endpoint {raw!r}: scheme must be http or https")
        secure = parsed.scheme == "https"
        raw = parsed.netloc
    return raw.rstrip("/"), secure


def _credentials() -> tuple[str | None, str | None, str | None]:
    for key_env, secret_env in _CREDENTIAL_ENV:
        if os.environ.get(key_env) and os.environ.get(secret_env):
            return os.environ[key_env], os.environ[secret_env], os.environ.get("AWS_SESSION_TOKEN")
    return None, None, None


def client(cfg_storage: StorageConfig | None = None) -> Minio:
    """A MinIO client for the configured endpoint.

    The HTTP pool has short connect timeouts and few retries so that a wrong endpoint fails in
    seconds with a clear message instead of retrying for minutes.
    """
    cfg = cfg_storage or StorageConfig()
    endpoint, secure = _endpoint(cfg)
    access, secret, token = _credentials()
    if access is None:
        log.info("no S3 credentials in the environment; using anonymous access to %s", endpoint)
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10.0, read=300.0),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )
    return Minio(
        endpoint,
        access_key=access,
        secret_key=secret,
        session_token=token,
        secure=secure,
        region=cfg.region,
        http_client=http,
    )


def _where(mc: Minio) -> str:
    return f"{'https' if mc._base_url.is_https else 'http'}://{mc._base_url.host}"


def profile_scope() -> str:
    """What to tell someone whose keys were refused: where Kubeflow's releases let a profile's
    keys go, and what else to check."""
    *first, last = [f"s3://{KUBEFLOW_BUCKET}/{p}" for p in KUBEFLOW_PROFILE_PREFIXES]
    return (
        f"on Kubeflow 1.11 (SeaweedFS) a profile's keys reach only {', '.join(first)} and "
        f"{last}, and create no bucket; the default storage_prefix "
        f"s3://{KUBEFLOW_BUCKET}/private/{{namespace}}/models is inside. On 1.10 (MinIO) they "
        "reach everything: check the keys (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the "
        "bucket policy"
    )


@contextmanager
def translated(uri: str, action: str, mc: Minio) -> Iterator[None]:
    """Turn SDK and network errors into StorageError naming the URI (and no secret)."""
    try:
        yield
    except StorageError:
        raise
    except S3Error as err:
        if err.code == "NoSuchBucket":
            reason = f"bucket {parse_s3(uri)[0]!r} does not exist"
        elif err.code in _NOT_FOUND:
            reason = "no such object"
        elif err.code == "AccessDenied":
            reason = f"access refused (AccessDenied): {profile_scope()}"
        elif err.code in _AUTH_CODES:
            reason = (
                f"access refused ({err.code}): check the S3 credentials in the environment "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or MINIO_ACCESS_KEY/MINIO_SECRET_KEY)"
            )
        else:
            reason = f"{err.code}: {err.message}"
        raise StorageError(f"{action} {uri} failed: {reason}") from None
    except (urllib3.exceptions.HTTPError, ConnectionError) as err:
        if isinstance(getattr(err, "reason", err), urllib3.exceptions.SSLError):
            raise StorageError(
                f"{action} {uri} failed: TLS handshake with {_where(mc)} failed; if the server "
                "speaks plain HTTP (Kubeflow's MinIO does), give the endpoint as "
                "http://HOST:PORT (a bare HOST:PORT uses TLS when storage.secure is true)"
            ) from None
        raise StorageError(
            f"{action} {uri} failed: S3 endpoint {_where(mc)} unreachable "
            f"({type(err).__name__}); check storage.endpoint / S3_ENDPOINT and the network"
        ) from None
    except OSError as err:
        raise StorageError(f"{action} {uri} failed: {err}") from None


# --------------------------------------------------------------------------- buckets


def ensure_bucket(mc: Minio, bucket: str, uri: str) -> None:
    """Create ``bucket`` before the first write of an upload to ``uri``, only when it is known
    to be missing.

    Kubeflow 1.10's MinIO starts with only ``mlpipeline`` and hands profiles its root keys,
    so a bucket of the user's choosing is made on first upload. Kubeflow 1.11's SeaweedFS
    refuses a profile's keys every bucket-level call: a refused lookup creates nothing, and
    the write itself decides (its refusal names where the keys may write). Keys that may
    look but not create get an error saying so.
    """
    with translated(uri, "upload to", mc):
        try:
            if mc.bucket_exists(bucket):
                return
        except S3Error as err:
            if err.code in _AUTH_CODES:
                return
            raise
        try:
            mc.make_bucket(bucket)
        except S3Error as err:
            if err.code in _BUCKET_TAKEN:  # another writer created it meanwhile
                return
            if err.code not in _AUTH_CODES:
                raise
            raise StorageError(
                f"upload to {uri} failed: bucket {bucket!r} does not exist and these "
                f"credentials may not create it ({err.code}); create it (e.g. "
                f"`mc mb <alias>/{bucket}`) or write where they may: {profile_scope()}"
            ) from None
    log.info("created bucket %s at %s", bucket, _where(mc))


# --------------------------------------------------------------------------- objects


def stored_sha256(info: Any) -> str | None:
    """The SHA-256 an object's stat carries in its metadata (None: written by another tool)."""
    meta = info.metadata or {}
    return meta.get(f"x-amz-meta-{SHA256_META}") or meta.get(f"X-Amz-Meta-{SHA256_META}")


def put_file(mc: Minio, cfg: StorageConfig, src: Path, bucket: str, key: str, digest: str) -> str:
    """Upload ``src`` (whose hash is ``digest``) as ``bucket/key`` with the hash in its
    metadata, in parts of ``storage.part_size_mb``; an object already holding the same hash
    is left alone. Returns ``digest``."""
    target = f"s3://{bucket}/{key}"
    with translated(target, "upload to", mc):
        if remote_sha256(mc, bucket, key) == digest:
            log.debug("%s already holds %s (same sha256); not uploading again", target, src.name)
            return digest
        part_size = max(MIN_PART_SIZE, int(cfg.part_size_mb) * 1024 * 1024)
        mc.fput_object(bucket, key, str(src), metadata={SHA256_META: digest}, part_size=part_size)
    log.debug("uploaded %s -> %s (%d bytes)", src, target, src.stat().st_size)
    return digest


def remote_sha256(mc: Minio, bucket: str, key: str) -> str | None:
    """Stored hash of an object ("" when it carries none), or None when it does not exist."""
    try:
        return stored_sha256(mc.stat_object(bucket, key)) or ""
    except S3Error as err:
        if err.code in _NOT_FOUND:
            return None
        raise


def stat(mc: Minio, bucket: str, key: str) -> Any:
    """An object's stat; a missing bucket is told apart from a missing object (a HEAD on
    either answers a bare 404, which the SDK reads as NoSuchKey)."""
    try:
        return mc.stat_object(bucket, key)
    except S3Error as err:
        if err.code == "NoSuchKey" and _bucket_missing(mc, bucket):
            raise StorageError(
                f"download s3://{bucket}/{key} failed: bucket {bucket!r} does not exist"
            ) from None
        raise


def _bucket_missing(mc: Minio, bucket: str) -> bool:
    """Whether ``bucket`` is known not to exist. Keys that may not look at it (a Kubeflow
    1.11 profile's) found the object missing in a bucket they may use."""
    try:
        return not mc.bucket_exists(bucket)
    except S3Error as err:
        if err.code in _AUTH_CODES:
            return False
        raise


def object_exists(mc: Minio, bucket: str, key: str) -> bool:
    """Whether ``bucket/key`` exists; a missing bucket holds nothing."""
    try:
        return remote_sha256(mc, bucket, key) is not None
    except S3Error as err:
        if err.code == "NoSuchBucket":
            return False
        raise


def read_text(uri: str, cfg_storage: StorageConfig | None) -> str | None:
    """A small object's text (a marker), or None when it does not exist."""
    mc = client(cfg_storage)
    bucket, key = parse_s3(uri)
    with translated(uri, "read", mc):
        try:
            response = mc.get_object(bucket, key)
        except S3Error as err:
            if err.code in _NOT_FOUND:
                return None
            raise
        try:
            return response.read().decode()
        finally:
            response.close()
            response.release_conn()
