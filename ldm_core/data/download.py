"""``ldm download``: put a raw dataset into a directory, safely and only once.

Sources: ``demo`` (generated, see :mod:`ldm_core.data.demo`), ``msd`` (the Decathlon
``Task01_BrainTumour.tar``), an ``http(s)://`` URL of a ``.tar``/``.tar.gz``, an
``s3://bucket/prefix`` written by :func:`ldm_core.storage.upload_dir`, or a local directory.

What the output directory holds when this returns:

- the dataset itself (for archives with one top-level directory, that directory's content:
  ``dataset.json``, ``imagesTr/`` ... right in the output);
- ``SHA256SUMS``: the sha256 of every raw file, in ``sha256sum -c`` format;
- ``.ldm-download.json``: the marker of a finished download (what was asked for, and the
  archive's verified MD5). A second call with the same request finds it and does nothing.

Large downloads are interrupted in practice (7 GB over hospital links), so HTTP fetches
resume from a ``.part`` file with a ``Range`` request and retry with back-off; a server that
ignores ``Range`` makes the fetch restart cleanly from zero. An archive is used only after
its MD5 matches (a mismatch deletes it), and it is extracted member by member into a staging
directory with every member checked first: absolute paths, ``..``, links that point outside,
device files and FIFOs are refused by name. Only a fully extracted tree is moved into place,
and the marker is written last, so an interrupted run never looks finished.

Nothing but the URL given is contacted: redirects to another host are refused.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ldm_core.config import Config
from ldm_core.errors import LdmError
from ldm_core.io import atomic_write_json, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

# The Decathlon Task01 archive as MONAI's DecathlonDataset fetches it
# (monai.apps.datasets.DecathlonDataset.resource / .md5).
MSD_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task01_BrainTumour.tar"
MSD_MD5 = "240a19d752f0d9e9101544901065d872"
"""A local mirror of the archive (hospitals without internet) is a source of its own:
``https://mirror/Task01_BrainTumour.tar#md5=240a19d752f0d9e9101544901065d872``."""

MARKER = ".ldm-download.json"
SUMS = "SHA256SUMS"
STAGING = ".ldm-download"
_OURS = {MARKER, SUMS, STAGING}

CHUNK = 1 << 20
TIMEOUT_S = 60.0
RETRIES = 5
RETRY_DELAY_S = 0.5
"""First back-off delay; it doubles per attempt (capped at 30 s)."""


class _Interrupted(Exception):
    """A transient failure after which the fetch resumes from the ``.part`` file."""


# --------------------------------------------------------------------------- entry point


def download(
    source: str, output: Path, cfg: Config, subjects: int | None = None, seed: int = 0
) -> Path:
    """Fetch or generate ``source`` into ``output``; returns the dataset directory (``output``)."""
    output = Path(output)
    source = str(source).strip()
    request = _request(source, cfg.data.demo_subjects if subjects is None else subjects, seed)
    if _finished(output, request):
        log.info("%s: already holds %s (verified earlier); nothing to do", output, _redact(source))
        return output
    if subjects is not None and source != "demo":
        log.warning("--subjects applies to the demo source only; ignored for %s", _redact(source))
    if output.exists() and not output.is_dir():
        raise LdmError(f"{output}: exists and is not a directory")
    if request["source"] != str(output.resolve()):
        _forget_previous(output)
    staging = output / STAGING
    staging.mkdir(parents=True, exist_ok=True)

    verified_md5: str | None = None
    if source == "demo":
        _from_demo(staging, output, request["subjects"], seed)
    elif source == "msd" or source.startswith(("http://", "https://")):
        verified_md5 = _from_archive(request["url"], request["md5"], staging, output)
    elif source.startswith("s3://"):
        _from_s3(source, staging, output, cfg)
    else:
        _from_directory(Path(source), staging, output)
    shutil.rmtree(staging, ignore_errors=True)
    described = check_layout(output)
    write_sums(output)
    marker = {
        "request": request,
        "md5": verified_md5,
        "installed": request["source"] != str(output.resolve()),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(output / MARKER, marker)
    log.info("%s: %s", output, described)
    return output


def _request(source: str, subjects: int, seed: int) -> dict[str, Any]:
    """What was asked for, as stored in the marker: equal requests mean equal content.

    Also where a bad ``--source`` is refused, before anything in ``output`` is touched.
    """
    from ldm_core.data import demo

    if source == "demo":
        if subjects < 1:
            raise LdmError(f"--subjects (data.demo_subjects): must be at least 1, got {subjects}")
        return {
            "source": "demo",
            "subjects": subjects,
            "seed": seed,
            "resolution": demo.DEFAULT_RESOLUTION,
        }
    if source == "msd":
        return {"source": "msd", "url": MSD_URL, "md5": MSD_MD5}
    if source.startswith(("http://", "https://")):
        url, md5 = split_md5(source)
        return {"source": "url", "url": url, "md5": md5}
    if source.startswith("s3://"):
        return {"source": source}
    if Path(source).is_dir():
        return {"source": str(Path(source).resolve())}
    if "://" not in source and ("/" in source or source.startswith(".")):
        raise LdmError(f"--source {source}: no such directory")
    raise LdmError(
        f"--source {source!r}: not demo, msd, an http(s):// or s3:// URI, or an existing directory"
    )


def split_md5(url: str) -> tuple[str, str | None]:
    """``https://host/a.tar#md5=<hex>`` -> (``https://host/a.tar``, ``<hex>``).

    The fragment never reaches the server, so it is a safe place to pin a checksum.
    """
    base, _, fragment = url.partition("#")
    md5 = None
    if fragment:
        match = re.fullmatch(r"md5=([0-9a-fA-F]+)", fragment)
        if not match:
            raise LdmError(
                f"--source {url!r}: the only URL fragment understood is #md5=<32 hex digits>"
            )
        md5 = match.group(1)
    return base, _check_md5(md5, "--source #md5")


def _check_md5(md5: str | None, where: str) -> str | None:
    if md5 is None:
        return None
    md5 = md5.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{32}", md5):
        raise LdmError(f"{where}: {md5!r} is not an MD5 (32 hex digits)")
    return md5


# --------------------------------------------------------------------------- sources


def _from_demo(staging: Path, output: Path, subjects: int, seed: int) -> None:
    from ldm_core.data import demo

    tree = staging / "demo"
    shutil.rmtree(tree, ignore_errors=True)
    demo.generate_cohort(tree, n_subjects=subjects, seed=seed)
    _install(tree, output)


def _from_archive(url: str, md5: str | None, staging: Path, output: Path) -> str:
    name = Path(urllib.parse.urlparse(url).path).name or "archive.tar"
    archive = staging / name
    # An archive verified by an earlier run whose extraction failed (disk full, killed)
    # is not fetched again: 7 GB is worth the re-hash.
    if md5 is not None and archive.is_file() and md5_file(archive) == md5:
        digest = md5
    else:
        digest = fetch(url, archive, md5)
    tree = staging / "extract"
    shutil.rmtree(tree, ignore_errors=True)
    extract_tar(archive, tree, label=_redact(url))
    _install(_single_root(tree), output)
    archive.unlink()
    return digest


def _from_s3(uri: str, staging: Path, output: Path, cfg: Config) -> None:
    from ldm_core import storage  # the minio SDK, only when S3 is used

    tree = staging / "s3"
    storage.download_dir(uri, tree, cfg.storage)  # resumes: files already there are kept
    _install(tree, output)


def _from_directory(source: Path, staging: Path, output: Path) -> None:
    src, out = source.resolve(), output.resolve()
    if src == out:
        log.info("%s: validating in place", output)
        return
    if out.is_relative_to(src):
        raise LdmError(f"--output {output}: must not lie inside the source directory {source}")
    tree = staging / "copy"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(src, tree, symlinks=False, ignore=shutil.ignore_patterns(*_OURS))
    _install(tree, output)


# --------------------------------------------------------------------------- HTTP


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects on the host that was given; refuse any other (never contact it)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        old, new = urllib.parse.urlparse(req.full_url), urllib.parse.urlparse(newurl)
        if (old.scheme, old.netloc) != (new.scheme, new.netloc):
            raise LdmError(
                f"{_redact(req.full_url)}: redirected to {new.scheme}://{new.netloc}, another host; "
                "pass that URL as --source if it is trusted"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_opener = urllib.request.build_opener(_SameHostRedirects())


def fetch(url: str, dest: Path, md5: str | None = None) -> str:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); returns the file's MD5.

    With ``md5`` given, a mismatch deletes the download and raises: a corrupt or tampered
    archive is never kept as if it were good.
    """
    part = dest.with_name(dest.name + ".part")
    for attempt in range(RETRIES + 1):
        try:
            _fetch_once(url, part)
            break
        except _Interrupted as e:
            if attempt == RETRIES:
                raise LdmError(
                    f"{_redact(url)}: download failed after {RETRIES + 1} attempts: {e}"
                ) from None
            delay = min(RETRY_DELAY_S * 2**attempt, 30.0)
            log.warning("%s: %s; resuming in %.1f s", _redact(url), e, delay)
            time.sleep(delay)
    digest = md5_file(part)
    if md5 is not None and digest != md5:
        part.unlink()
        raise LdmError(
            f"{_redact(url)}: MD5 mismatch (got {digest}, expected {md5}); the download was deleted"
        )
    os.replace(part, dest)
    return digest


def _fetch_once(url: str, part: Path) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "brain-ldm"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = _opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            total = _content_range(e.headers.get("Content-Range", ""))[1]
            if total == offset:
                return  # the .part was already complete
            part.unlink()
            raise _Interrupted("server refused the resume range; restarting") from None
        if e.code >= 500 or e.code == 429:
            raise _Interrupted(f"HTTP {e.code} {e.reason}") from None
        raise LdmError(f"{_redact(url)}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, LdmError):
            raise e.reason from None
        raise _Interrupted(f"cannot connect ({e.reason})") from None
    except (OSError, http.client.HTTPException) as e:
        raise _Interrupted(f"cannot connect ({e})") from None

    with response:
        total: int | None
        if offset and response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != offset:
                part.unlink()
                raise _Interrupted(f"server resumed at byte {start}, not {offset}; restarting")
            mode = "ab"
        else:
            if offset:
                log.info("%s: server ignores Range requests; restarting from zero", _redact(url))
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with (
            open(part, mode) as f,
            tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[:-5]
            ) as bar,
        ):
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except http.client.IncompleteRead as e:
                f.write(e.partial)
                raise _Interrupted(f"connection closed early ({e})") from None
            except (OSError, http.client.HTTPException) as e:
                raise _Interrupted(f"connection lost ({e})") from None
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Interrupted(f"connection closed at {size} of {total} bytes")


def _content_range(value: str) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` -> (100, 1000); ``bytes */1000`` -> (None, 1000)."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _redact(url: str) -> str:
    """The URL without credentials or query (pre-signed URLs carry secrets there)."""
    parsed = urllib.parse.urlparse(url)
    if not parsed.scheme or not parsed.netloc:
        return url
    host = parsed.hostname or ""
    if parsed.port:
        host = f"{host}:{parsed.port}"
    return urllib.parse.urlunparse((parsed.scheme, host, parsed.path, "", "", ""))


# --------------------------------------------------------------------------- extraction


def extract_tar(archive: Path, dest: Path, label: str | None = None) -> None:
    """Extract ``archive`` into the new directory ``dest``, refusing unsafe members by name.

    Members are checked one by one as the archive streams by; on the first bad one the
    partial tree is deleted, so nothing of an unsafe archive is ever installed. ``label``
    names the archive in errors (its URL), default its file name.
    """
    label = label or archive.name
    dest.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tqdm(tar, desc="extract", unit="file"):
                reason = unsafe_member(member)
                if reason:
                    raise LdmError(f"{label}: refused member {member.name!r}: {reason}")
                try:
                    tar.extract(member, dest, filter="data")
                except tarfile.FilterError as e:
                    raise LdmError(f"{label}: refused member {member.name!r}: {e}") from None
    except tarfile.TarError as e:
        shutil.rmtree(dest, ignore_errors=True)
        detail = str(e).splitlines()[0].rstrip(":")
        raise LdmError(
            f"{label}: not a readable tar archive (.tar, .tar.gz, .tar.bz2, .tar.xz): {detail}"
        ) from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` must not be extracted, or None if it is a plain file/dir/inside link."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "path contains '..'"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    if member.issym() or member.islnk():
        kind = "symbolic link" if member.issym() else "hard link"
        target = member.linkname
        if target.startswith(("/", "\\")):
            return f"{kind} to an absolute path ({target})"
        # A symlink is relative to its own directory; a hard link names an archive member.
        base = posixpath.dirname(name) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, target))
        if resolved == ".." or resolved.startswith("../"):
            return f"{kind} pointing outside the archive ({target})"
        return None
    if not (member.isfile() or member.isdir()):
        return f"unsupported member type {member.type!r}"
    return None


def _single_root(tree: Path) -> Path:
    """The one top-level directory of an archive (``Task01_BrainTumour/``), else the tree.

    Hidden top-level entries (macOS ``._*`` forks) do not count.
    """
    entries = [p for p in tree.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return tree


def _install(tree: Path, output: Path) -> None:
    """Move ``tree``'s top-level entries into ``output`` (renames on one filesystem).

    An entry of the same name already in ``output`` is what an interrupted earlier install
    left (no marker was written), so it is replaced.
    """
    output.mkdir(parents=True, exist_ok=True)
    for entry in sorted(tree.iterdir()):
        if entry.name in _OURS:
            continue
        target = output / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)


# --------------------------------------------------------------------------- bookkeeping


def check_layout(root: Path) -> str:
    """Confirm ``root`` holds a dataset preprocess can read; returns a one-line summary."""
    from ldm_core.data import folder, msd

    if msd.is_msd(root):
        dataset = msd.read_dataset(root)
        missing = [s.image for s in dataset.subjects if not s.image.is_file()]
        if missing:
            raise LdmError(
                f"{root / msd.DATASET_JSON}: {len(missing)} of {len(dataset.subjects)} training "
                f"images are missing, e.g. {missing[0]}"
            )
        modalities = ", ".join(dataset.modalities[i] for i in sorted(dataset.modalities))
        return f"Decathlon task {dataset.name!r}: {len(dataset.subjects)} training cases ({modalities})"
    volumes = folder.list_volumes(root)
    return f"folder of {len(volumes)} NIfTI files"


def write_sums(root: Path) -> Path:
    """Write ``SHA256SUMS`` for every raw file under ``root`` (``sha256sum -c`` format)."""
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] not in _OURS),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    lines = [
        f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n"
        for p in tqdm(files, desc="sha256", unit="file")
    ]
    return atomic_write_text(root / SUMS, "".join(lines))


def _finished(output: Path, request: dict[str, Any]) -> bool:
    """Whether ``output`` holds a finished download of exactly ``request``, files present."""
    marker = _read_json(output / MARKER)
    if not isinstance(marker, dict) or marker.get("request") != request:
        return False
    try:
        lines = (output / SUMS).read_text().splitlines()
    except OSError:
        return False
    return all((output / line.split("  ", 1)[1]).is_file() for line in lines if "  " in line)


def _forget_previous(output: Path) -> None:
    """Before a different download: remove the files a previous one installed, and its marker.

    A directory validated in place was the user's own data, not ours: it is left alone.
    """
    marker = _read_json(output / MARKER)
    (output / MARKER).unlink(missing_ok=True)
    if not isinstance(marker, dict) or not marker.get("installed"):
        return
    try:
        lines = (output / SUMS).read_text().splitlines()
    except OSError:
        return
    for line in lines:
        if "  " in line:
            rel = line.split("  ", 1)[1]
            if not Path(rel).is_absolute() and ".." not in Path(rel).parts:
                (output / rel).unlink(missing_ok=True)
    (output / SUMS).unlink(missing_ok=True)
    for directory in sorted((p for p in output.rglob("*") if p.is_dir()), reverse=True):
        if directory.name != STAGING and not any(directory.iterdir()):
            directory.rmdir()


def md5_file(path: Path) -> str:
    """Hex MD5 of a file: the checksum the Decathlon archive is published with."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
