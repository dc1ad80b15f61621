"""One URI interface for artifacts: local paths, ``file://`` and ``s3://`` (MinIO SDK).

Every stage reads and writes datasets, checkpoints and bundles through these few calls, so
the same code runs against a local directory (no cluster) and MinIO (cluster). The rules,
the same for every backend:

- Integrity: every uploaded object carries its SHA-256 in its metadata (``x-amz-meta-sha256``);
  a download is hashed while it is written and compared, and a mismatch is an error naming the
  object (the partial file is removed). Multipart ETags are not content hashes, hence our own.
- Atomic for the reader: a file is written to a temporary name beside its target and renamed
  into place, file and directory fsynced (:mod:`ldm_core.io`). A directory upload writes a
  ``_COMPLETE`` marker object last, listing every file with its hash and size; ``download_dir``
  refuses (or waits for) a prefix without it, and downloads exactly the files the marker
  lists, so a reader never sees half an upload.
- Resume: a file whose local copy already has the expected hash is not transferred again; an
  object whose stored hash equals the local file's is not uploaded again.
- Buckets: an upload creates its bucket when it is missing (Kubeflow's MinIO starts with
  only ``mlpipeline``); credentials that may not create it get an error saying so.
- The endpoint (``storage.endpoint`` or ``S3_ENDPOINT``) decides TLS by its scheme:
  ``http://minio-service.kubeflow:9000`` (Kubeflow's MinIO, plain HTTP inside the cluster)
  or ``https://…``; a bare ``host:port`` falls back to ``storage.secure``.
- Credentials come only from the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
  or ``MINIO_ACCESS_KEY``/``MINIO_SECRET_KEY``, filled from a Secret on a cluster). They are
  handed to the SDK and never logged, never put in an error message or a repr.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

import certifi
import urllib3
from minio import Minio
from minio.error import S3Error
from tqdm import tqdm

from ldm_core.config import StorageConfig
from ldm_core.errors import LdmError
from ldm_core.io import atomic_write, atomic_write_bytes, is_temporary, sha256_file

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
"""Name of the object (or file) that marks a directory upload as finished."""
SHA256_META = "sha256"
"""User metadata key holding an object's SHA-256 (sent as ``x-amz-meta-sha256``)."""
MIN_PART_SIZE = 5 * 1024 * 1024
"""S3's smallest multipart part; the SDK refuses less."""
_CHUNK = 1024 * 1024
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


class StorageError(LdmError):
    """A transfer failed; the message names the URI and the reason, never a credential."""


# --------------------------------------------------------------------------- URIs


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URIs; local paths and ``file://`` URIs are not remote."""
    return isinstance(uri, str) and uri.startswith("s3://")


def parse_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the prefix has no leading/trailing slash
    handling beyond stripping the leading one (a trailing slash is kept: it means "folder")."""
    if not is_remote(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} has no bucket name (expected s3://BUCKET/PREFIX)")
    return bucket, prefix


def local_path(uri: str | os.PathLike[str]) -> Path:
    """The filesystem path of a local path or ``file://`` URI."""
    text = os.fspath(uri)
    if text.startswith("file://"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{text!r}: file:// URIs must name this host (file:///path)")
        return Path(unquote(parsed.path))
    if is_remote(text) or "://" in text:
        raise StorageError(f"{text!r} is not a local path (supported: PATH, file://, s3://)")
    return Path(text)


def join(uri: str, *parts: str) -> str:
    """Append path parts to a local path or URI with ``/`` (what S3 keys use)."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


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
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return Minio(
        endpoint,
        access_key=access,
        secret_key=secret,
        session_token=token,
        secure=secure,
        region=region or None,
        http_client=http,
    )


def _where(mc: Minio) -> str:
    return f"{'https' if mc._base_url.is_https else 'http'}://{mc._base_url.host}"


@contextmanager
def _translated(uri: str, action: str, mc: Minio) -> Iterator[None]:
    """Turn SDK and network errors into StorageError naming the URI (and no secret)."""
    try:
        yield
    except StorageError:
        raise
    except S3Error as err:
        if err.code == "NoSuchBucket":
            reason = f"bucket {parse_s3(uri)[0]!r} does not exist"
        elif err.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
            reason = "no such object"
        elif err.code in _AUTH_CODES:
            reason = (
                f"access refused ({err.code}): check the S3 credentials in the environment "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or MINIO_ACCESS_KEY/MINIO_SECRET_KEY) "
                "and the bucket policy"
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


# --------------------------------------------------------------------------- verified writes


def _write_atomic(
    target: Path, fill: Callable[[BinaryIO], None], expected: str | None, source: str
) -> str:
    """Write ``target`` durably through :func:`ldm_core.io.atomic_write`, hashing the bytes
    as they pass (a multi-GB download is not read twice), and let the temporary file become
    ``target`` only when the hash matches ``expected`` (if given). Returns the hash."""
    digest = hashlib.sha256()

    def write(raw: BinaryIO) -> None:
        fill(_HashingWriter(raw, digest))  # type: ignore[arg-type]
        got = digest.hexdigest()
        if expected is not None and got != expected:
            raise StorageError(
                f"checksum mismatch for {source}: expected sha256 {expected}, got {got}; "
                "the partial download was removed"
            )

    atomic_write(target, write)
    return digest.hexdigest()


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, raw: BinaryIO, digest: Any) -> None:
        self._raw = raw
        self._digest = digest

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        return self._raw.write(data)


# --------------------------------------------------------------------------- buckets

_BUCKET_TAKEN = ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")


def _ensure_bucket(mc: Minio, bucket: str, uri: str) -> None:
    """Create ``bucket`` if it is missing, before the first write of an upload to ``uri``.

    Credentials that may not create a bucket known to be missing get an error saying so.
    Credentials that may not even look (HeadBucket refused) get a creation attempt, and if
    that is refused too the write itself decides (a missing bucket is then named by it).
    """
    with _translated(uri, "upload to", mc):
        try:
            if mc.bucket_exists(bucket):
                return
            missing = True
        except S3Error as err:
            if err.code not in _AUTH_CODES:
                raise
            missing = False
        try:
            mc.make_bucket(bucket)
        except S3Error as err:
            if err.code in _BUCKET_TAKEN:  # another writer created it meanwhile
                return
            if err.code not in _AUTH_CODES:
                raise
            if missing:
                raise StorageError(
                    f"upload to {uri} failed: bucket {bucket!r} does not exist and these "
                    f"credentials may not create it ({err.code}); create it (e.g. "
                    f"`mc mb <alias>/{bucket}`) or name a bucket they may write to"
                ) from None
            return
    log.info("created bucket %s at %s", bucket, _where(mc))


# --------------------------------------------------------------------------- files


def _stored_sha256(stat: Any) -> str | None:
    meta = stat.metadata or {}
    return meta.get(f"x-amz-meta-{SHA256_META}") or meta.get(f"X-Amz-Meta-{SHA256_META}")


def _object_key(uri: str, local: Path) -> tuple[str, str]:
    bucket, key = parse_s3(uri)
    if not key or key.endswith("/"):
        key = f"{key}{local.name}"
    return bucket, key


def upload_file(
    local: str | os.PathLike[str], uri: str, cfg_storage: StorageConfig | None = None
) -> str:
    """Copy one file to ``uri`` (s3:// object, file:// or path); returns its SHA-256.

    A URI ending in ``/`` names a folder: the file keeps its name inside it. Large files go
    up in parts of ``storage.part_size_mb``. An object that already holds the same bytes
    (same stored hash) is left alone, so retried uploads are cheap.
    """
    src = Path(local)
    if not src.is_file():
        raise StorageError(f"upload {src} -> {uri} failed: {src} is not a file")
    digest = sha256_file(src)
    if not is_remote(uri):
        dst = local_path(uri)
        if uri.endswith("/") or dst.is_dir():
            dst = dst / src.name
        if dst.is_file() and sha256_file(dst) == digest:
            return digest
        with open(src, "rb") as fh:
            _write_atomic(dst, lambda out: shutil.copyfileobj(fh, out, _CHUNK), digest, str(src))
        return digest
    cfg = cfg_storage or StorageConfig()
    bucket, key = _object_key(uri, src)
    mc = client(cfg)
    _ensure_bucket(mc, bucket, uri)
    _put_file(mc, cfg, src, bucket, key, digest)
    log.info("uploaded %s -> s3://%s/%s (%d bytes)", src, bucket, key, src.stat().st_size)
    return digest


def _put_file(mc: Minio, cfg: StorageConfig, src: Path, bucket: str, key: str, digest: str) -> str:
    target = f"s3://{bucket}/{key}"
    with _translated(target, "upload to", mc):
        if _remote_sha256(mc, bucket, key) == digest:
            log.debug("%s already holds %s (same sha256); not uploading again", target, src.name)
            return digest
        part_size = max(MIN_PART_SIZE, int(cfg.part_size_mb) * 1024 * 1024)
        mc.fput_object(bucket, key, str(src), metadata={SHA256_META: digest}, part_size=part_size)
    log.debug("uploaded %s -> %s (%d bytes)", src, target, src.stat().st_size)
    return digest


def _remote_sha256(mc: Minio, bucket: str, key: str) -> str | None:
    """Stored hash of an object, or None when it does not exist."""
    try:
        return _stored_sha256(mc.stat_object(bucket, key)) or ""
    except S3Error as err:
        if err.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
            return None
        raise


def download_file(
    uri: str,
    local: str | os.PathLike[str],
    cfg_storage: StorageConfig | None = None,
    expected_sha256: str | None = None,
) -> Path:
    """Copy one object (or local file) to ``local``, verified and atomic.

    The expected hash is ``expected_sha256`` if given, else the object's stored hash. If
    ``local`` already has that hash nothing is transferred (resume). The object is read with
    ``If-Match`` on the ETag seen at stat time, so a concurrent overwrite fails the download
    instead of mixing two versions.
    """
    dst = Path(local)
    if not is_remote(uri):
        src = local_path(uri)
        if not src.is_file():
            raise StorageError(f"download {uri} failed: no such file {src}")
        if expected_sha256 and dst.is_file() and sha256_file(dst) == expected_sha256:
            return dst
        with open(src, "rb") as fh:
            _write_atomic(
                dst, lambda out: shutil.copyfileobj(fh, out, _CHUNK), expected_sha256, uri
            )
        return dst
    _get_file(client(cfg_storage), uri, dst, expected_sha256)
    log.info("downloaded %s -> %s (%d bytes)", uri, dst, dst.stat().st_size)
    return dst


def _get_file(mc: Minio, uri: str, dst: Path, expected_sha256: str | None) -> Path:
    bucket, key = parse_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"download {uri} failed: the URI names a folder; use download_dir")
    with _translated(uri, "download", mc):
        stat = _stat(mc, bucket, key)
        expected = expected_sha256 or _stored_sha256(stat)
        if expected is None:
            log.warning("%s carries no sha256 metadata; downloading without verification", uri)
        elif dst.is_file() and sha256_file(dst) == expected:
            log.debug("%s is already current (sha256 matches); skipped", dst)
            return dst
        response = mc.get_object(bucket, key, request_headers={"If-Match": stat.etag})
        try:
            _write_atomic(dst, lambda out: _copy_response(response, out), expected, uri)
        finally:
            response.close()
            response.release_conn()
    log.debug("downloaded %s -> %s (%d bytes)", uri, dst, dst.stat().st_size)
    return dst


def _stat(mc: Minio, bucket: str, key: str) -> Any:
    """An object's stat; a missing bucket is told apart from a missing object (a HEAD on
    either answers a bare 404, which the SDK reads as NoSuchKey)."""
    try:
        return mc.stat_object(bucket, key)
    except S3Error as err:
        if err.code == "NoSuchKey" and not mc.bucket_exists(bucket):
            raise StorageError(
                f"download s3://{bucket}/{key} failed: bucket {bucket!r} does not exist"
            ) from None
        raise


def _copy_response(response: Any, out: BinaryIO) -> None:
    for chunk in response.stream(_CHUNK):
        out.write(chunk)


def exists(uri: str, cfg_storage: StorageConfig | None = None) -> bool:
    """True if ``uri`` is an existing file/object, or a complete directory (has ``_COMPLETE``).

    A missing bucket counts as "does not exist"; auth and network failures raise.
    """
    if not is_remote(uri):
        path = local_path(uri)
        return path.is_file() or (path / COMPLETE_MARKER).is_file()
    mc = client(cfg_storage)
    bucket, key = parse_s3(uri)
    with _translated(uri, "check", mc):
        try:
            if key and not key.endswith("/") and _remote_sha256(mc, bucket, key) is not None:
                return True
            return _remote_sha256(mc, bucket, join(key, COMPLETE_MARKER).lstrip("/")) is not None
        except S3Error as err:
            if err.code == "NoSuchBucket":
                return False
            raise


# --------------------------------------------------------------------------- directories


def _progress(items: list[tuple[str, Any]], desc: str) -> tqdm:
    """Byte progress of a directory transfer; updates at most every 10 s so pod logs
    (no TTY) get a readable line now and then rather than a flood."""
    total = sum(p.stat().st_size if isinstance(p, Path) else int(p) for _, p in items)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, mininterval=10.0, leave=False)


def _local_files(root: Path) -> list[tuple[str, Path]]:
    """(relative posix name, path) of every regular file under ``root`` except the marker
    and our own temporary files, sorted for a stable order."""
    out = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(root).as_posix()
        if rel == COMPLETE_MARKER or is_temporary(path):
            continue
        out.append((rel, path))
    return out


def _manifest_bytes(entries: dict[str, dict[str, Any]]) -> bytes:
    doc = {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": entries,
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def upload_dir(
    local_dir: str | os.PathLike[str], uri: str, cfg_storage: StorageConfig | None = None
) -> dict[str, dict[str, Any]]:
    """Copy a directory tree to ``uri`` and mark it complete; returns the manifest entries.

    An existing marker at the destination is removed first, so readers stop trusting the
    prefix while it is being rewritten; the new marker goes up last.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(f"upload {root} -> {uri} failed: {root} is not a directory")
    files = _local_files(root)
    entries: dict[str, dict[str, Any]] = {}
    if not is_remote(uri):
        dest = local_path(uri)
        (dest / COMPLETE_MARKER).unlink(missing_ok=True)
        for rel, path in files:
            entries[rel] = {
                "sha256": upload_file(path, str(dest / rel)),
                "size": path.stat().st_size,
            }
        payload = _manifest_bytes(entries)
        atomic_write_bytes(dest / COMPLETE_MARKER, payload)
        return entries
    mc = client(cfg_storage)
    bucket, prefix = parse_s3(uri)
    prefix = prefix.rstrip("/")
    marker_key = join(prefix, COMPLETE_MARKER).lstrip("/")
    _ensure_bucket(mc, bucket, uri)
    with _translated(f"s3://{bucket}/{marker_key}", "remove stale marker of", mc):
        mc.remove_object(bucket, marker_key)
    cfg = cfg_storage or StorageConfig()
    with _progress(files, f"upload {uri}") as bar:
        for rel, path in files:
            digest = sha256_file(path)
            key = join(prefix, rel).lstrip("/")
            entries[rel] = {"sha256": _put_file(mc, cfg, path, bucket, key, digest)}
            entries[rel]["size"] = path.stat().st_size
            bar.update(entries[rel]["size"])
    payload = _manifest_bytes(entries)
    with _translated(f"s3://{bucket}/{marker_key}", "upload marker", mc):
        mc.put_object(
            bucket,
            marker_key,
            io.BytesIO(payload),
            len(payload),
            content_type="application/json",
            metadata={SHA256_META: hashlib.sha256(payload).hexdigest()},
        )
    log.info("uploaded %s -> %s (%d files, marked complete)", root, uri, len(entries))
    return entries


def read_manifest(
    uri: str, cfg_storage: StorageConfig | None = None, wait_s: float = 0.0, poll_s: float = 2.0
) -> dict[str, dict[str, Any]] | None:
    """The ``files`` of a directory's ``_COMPLETE`` marker, waiting up to ``wait_s`` for it;
    None when it is absent."""
    deadline = time.monotonic() + wait_s
    marker = join(uri, COMPLETE_MARKER)
    while True:
        text = _read_small(marker, cfg_storage)
        if text is not None:
            try:
                files = json.loads(text)["files"]
                if not all(isinstance(e, dict) and len(e["sha256"]) == 64 for e in files.values()):
                    raise ValueError("every file needs a sha256")
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise StorageError(f"{marker} is not a valid completion marker: {err}") from None
            return files
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


def _read_small(uri: str, cfg_storage: StorageConfig | None) -> str | None:
    if not is_remote(uri):
        path = local_path(uri)
        return path.read_text() if path.is_file() else None
    mc = client(cfg_storage)
    bucket, key = parse_s3(uri)
    with _translated(uri, "read", mc):
        try:
            response = mc.get_object(bucket, key)
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            raise
        try:
            return response.read().decode()
        finally:
            response.close()
            response.release_conn()


def download_dir(
    uri: str,
    local_dir: str | os.PathLike[str],
    cfg_storage: StorageConfig | None = None,
    wait_s: float = 0.0,
) -> Path:
    """Copy a completed directory upload to ``local_dir``; refuse an incomplete one.

    Only the files the ``_COMPLETE`` marker lists are fetched, each verified against the
    marker's hash; files already present with the right hash are skipped (resume). The marker
    is written locally last, so the local copy is itself a complete directory. ``wait_s`` > 0
    waits that long for a marker that is not there yet (an upload still running).
    """
    dest = Path(local_dir)
    files = read_manifest(uri, cfg_storage, wait_s=wait_s)
    if files is None:
        raise StorageError(
            f"{uri} is not a complete directory: no {COMPLETE_MARKER} marker (an upload is "
            "still running, failed, or the path is wrong)"
        )
    (dest / COMPLETE_MARKER).unlink(missing_ok=True)
    mc = client(cfg_storage) if is_remote(uri) else None
    skipped = 0
    sizes = [(rel, int(entry.get("size", 0))) for rel, entry in files.items()]
    with _progress(sizes, f"download {uri}") as bar:
        for rel, entry in files.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise StorageError(f"{join(uri, COMPLETE_MARKER)} lists an unsafe path {rel!r}")
            target = dest / rel
            if target.is_file() and sha256_file(target) == entry["sha256"]:
                skipped += 1
            elif mc is not None:
                _get_file(mc, join(uri, rel), target, entry["sha256"])
            else:
                download_file(join(uri, rel), target, expected_sha256=entry["sha256"])
            bar.update(int(entry.get("size", 0)))
    payload = _manifest_bytes(files)
    atomic_write_bytes(dest / COMPLETE_MARKER, payload)
    log.info("downloaded %s -> %s (%d files, %d already current)", uri, dest, len(files), skipped)
    return dest
