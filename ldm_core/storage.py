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
- Buckets: an upload creates its bucket only when it is known to be missing (Kubeflow
  1.10's MinIO starts with only ``mlpipeline``); Kubeflow 1.11's SeaweedFS lets a profile's
  keys neither look at a bucket nor create one, so there the write decides, and a refusal
  says where those keys may write (:func:`ldm_core.s3.profile_scope`).
- Prefixes may name the run's namespace, ``{namespace}`` (:func:`fill_namespace`): on
  Kubeflow 1.11 a profile may write only under ``s3://mlpipeline/private/<namespace>/`` and
  a few shared prefixes.

The S3 client (endpoint and TLS, credentials from the environment, errors that name the
URI and never a secret, buckets) is :mod:`ldm_core.s3`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

from minio import Minio
from tqdm import tqdm

from ldm_core import s3
from ldm_core.config import StorageConfig
from ldm_core.errors import StorageError
from ldm_core.io import atomic_write, atomic_write_bytes, is_temporary, sha256_file

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
"""Name of the object (or file) that marks a directory upload as finished."""
NAMESPACE_PLACEHOLDER = "{namespace}"
"""What a storage prefix writes for the namespace the run is in (see :func:`fill_namespace`)."""
_CHUNK = 1024 * 1024


# --------------------------------------------------------------------------- URIs


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URIs; local paths and ``file://`` URIs are not remote."""
    return isinstance(uri, str) and uri.startswith(s3.SCHEME)


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


def fill_namespace(prefix: str, namespace: str) -> str:
    """``prefix`` with every ``{namespace}`` replaced by ``namespace``.

    Kubeflow 1.11 lets a profile's S3 keys write only under a few prefixes of ``mlpipeline``
    (:data:`ldm_core.s3.KUBEFLOW_PROFILE_PREFIXES`), the profile's own being
    ``private/<namespace>/``. A pipeline is compiled once and run in any profile, and only the
    running pod knows its namespace, so a prefix that works on every release names it by
    placeholder: the pipeline's default ``storage_prefix`` is
    ``s3://mlpipeline/private/{namespace}/models``.
    Any other ``{...}`` is a mistake, and an error names it.
    """
    unknown = re.findall(r"\{[^{}]*\}", prefix.replace(NAMESPACE_PLACEHOLDER, ""))
    if unknown:
        raise StorageError(
            f"storage_prefix {prefix!r}: {unknown[0]} is not a placeholder; the only one is "
            f"{NAMESPACE_PLACEHOLDER} (the run's namespace)"
        )
    return prefix.replace(NAMESPACE_PLACEHOLDER, namespace)


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


# --------------------------------------------------------------------------- files


def _object_key(uri: str, local: Path) -> tuple[str, str]:
    bucket, key = s3.parse_s3(uri)
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
    mc = s3.client(cfg)
    s3.ensure_bucket(mc, bucket, uri)
    s3.put_file(mc, cfg, src, bucket, key, digest)
    log.info("uploaded %s -> s3://%s/%s (%d bytes)", src, bucket, key, src.stat().st_size)
    return digest


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
    _get_file(s3.client(cfg_storage), uri, dst, expected_sha256)
    log.info("downloaded %s -> %s (%d bytes)", uri, dst, dst.stat().st_size)
    return dst


def _get_file(mc: Minio, uri: str, dst: Path, expected_sha256: str | None) -> Path:
    bucket, key = s3.parse_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"download {uri} failed: the URI names a folder; use download_dir")
    with s3.translated(uri, "download", mc):
        stat = s3.stat(mc, bucket, key)
        expected = expected_sha256 or s3.stored_sha256(stat)
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
    mc = s3.client(cfg_storage)
    bucket, key = s3.parse_s3(uri)
    with s3.translated(uri, "check", mc):
        if key and not key.endswith("/") and s3.object_exists(mc, bucket, key):
            return True
        return s3.object_exists(mc, bucket, join(key, COMPLETE_MARKER).lstrip("/"))


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
    mc = s3.client(cfg_storage)
    bucket, prefix = s3.parse_s3(uri)
    prefix = prefix.rstrip("/")
    marker_key = join(prefix, COMPLETE_MARKER).lstrip("/")
    s3.ensure_bucket(mc, bucket, uri)
    with s3.translated(uri, "upload to", mc):  # the first write: its refusal is the upload's
        mc.remove_object(bucket, marker_key)
    cfg = cfg_storage or StorageConfig()
    with _progress(files, f"upload {uri}") as bar:
        for rel, path in files:
            digest = sha256_file(path)
            key = join(prefix, rel).lstrip("/")
            entries[rel] = {"sha256": s3.put_file(mc, cfg, path, bucket, key, digest)}
            entries[rel]["size"] = path.stat().st_size
            bar.update(entries[rel]["size"])
    payload = _manifest_bytes(entries)
    with s3.translated(f"s3://{bucket}/{marker_key}", "upload marker", mc):
        mc.put_object(
            bucket,
            marker_key,
            io.BytesIO(payload),
            len(payload),
            content_type="application/json",
            metadata={s3.SHA256_META: hashlib.sha256(payload).hexdigest()},
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
    return s3.read_text(uri, cfg_storage)


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
    mc = s3.client(cfg_storage) if is_remote(uri) else None
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
