"""ldm download: HTTP with resume and MD5 against a real server on 127.0.0.1, safe tar
extraction, idempotence, the msd source (with its URL overridden), and directory sources."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ldm_core.config import Config
from ldm_core.data import download as dl
from ldm_core.errors import LdmError


@dataclass
class Server:
    """A tiny file server: Range support can be switched off, and the first N responses
    can be cut off after ``cut_at`` bytes to simulate a dropped connection."""

    files: dict[str, bytes] = field(default_factory=dict)
    ranges: bool = True
    cut_first: int = 0
    cut_at: int = 0
    redirect: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    sent: int = 0
    port: int = 0

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            name = self.path.lstrip("/")
            rng = self.headers.get("Range")
            state.requests.append((name, rng))
            if name in state.redirect:
                self.send_response(302)
                self.send_header("Location", state.redirect[name])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if name not in state.files:
                self.send_error(404)
                return
            body = state.files[name]
            start = 0
            if rng and state.ranges:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if state.cut_first > 0:
                state.cut_first -= 1
                payload = payload[: state.cut_at]
                self.close_connection = True
            # Counted before the write: the client may have read it all (and the test
            # asserted the count) before this thread runs again.
            state.sent += len(payload)
            self.wfile.write(payload)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "RETRY_DELAY_S", 0.01)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _nifti_bytes(seed: int) -> bytes:
    data = np.random.default_rng(seed).random((6, 6, 6, 2)).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    return img.to_bytes()


def _task_tar(gz: bool = False) -> bytes:
    """A miniature Task01 archive: one top-level directory, plus a macOS resource fork."""
    files = {
        "Task01_BrainTumour/dataset.json": json.dumps(
            {
                "name": "BRATS",
                "modality": {"0": "FLAIR", "1": "T1w"},
                "labels": {"0": "background"},
                "numTraining": 2,
                "training": [
                    {"image": f"./imagesTr/BRATS_00{i}.nii", "label": f"./labelsTr/BRATS_00{i}.nii"}
                    for i in (1, 2)
                ],
            }
        ).encode(),
        "Task01_BrainTumour/imagesTr/BRATS_001.nii": _nifti_bytes(1),
        "Task01_BrainTumour/imagesTr/BRATS_002.nii": _nifti_bytes(2),
        "Task01_BrainTumour/imagesTr/._BRATS_001.nii": b"\x00\x05\x16\x07junk",
        "Task01_BrainTumour/labelsTr/BRATS_001.nii": _nifti_bytes(3),
        "Task01_BrainTumour/labelsTr/BRATS_002.nii": _nifti_bytes(4),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _evil_tar(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ok = tarfile.TarInfo("data/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        info = tarfile.TarInfo(
            {"dotdot": "data/../../evil.txt", "absolute": "/tmp/ldm-evil.txt"}.get(kind, "data/x")
        )
        if kind in ("dotdot", "absolute"):
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
            return buf.getvalue()
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
        elif kind == "symlink_abs":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "../outside"
        elif kind == "device":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        tar.addfile(info)
    return buf.getvalue()


# --------------------------------------------------------------------------- fetch


def test_fetch_verifies_md5(server: Server, tmp_path: Path) -> None:
    body = np.random.default_rng(0).bytes(300_000)
    server.files["a.bin"] = body
    digest = dl.fetch(server.url("a.bin"), tmp_path / "a.bin", _md5(body))
    assert digest == _md5(body)
    assert (tmp_path / "a.bin").read_bytes() == body
    assert not (tmp_path / "a.bin.part").exists()


def test_interrupted_download_resumes_with_range(server: Server, tmp_path: Path) -> None:
    body = np.random.default_rng(1).bytes(3 * dl.CHUNK + 123)
    server.files["a.bin"] = body
    server.cut_first, server.cut_at = 1, dl.CHUNK + 17  # the first response dies part-way
    dl.fetch(server.url("a.bin"), tmp_path / "a.bin", _md5(body))
    assert (tmp_path / "a.bin").read_bytes() == body
    assert server.requests[0] == ("a.bin", None)
    resumed_at = int(server.requests[1][1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= dl.CHUNK + 17
    assert server.sent == len(body) + (
        dl.CHUNK + 17 - resumed_at
    )  # nothing fetched twice beyond the lost tail


def test_partial_file_from_an_earlier_run_resumes(server: Server, tmp_path: Path) -> None:
    body = np.random.default_rng(2).bytes(200_000)
    server.files["a.bin"] = body
    (tmp_path / "a.bin.part").write_bytes(body[:150_000])
    dl.fetch(server.url("a.bin"), tmp_path / "a.bin", _md5(body))
    assert server.requests == [("a.bin", "bytes=150000-")]
    assert server.sent == 50_000
    assert (tmp_path / "a.bin").read_bytes() == body


def test_complete_partial_file_is_not_fetched_again(server: Server, tmp_path: Path) -> None:
    body = b"x" * 1000
    server.files["a.bin"] = body
    (tmp_path / "a.bin.part").write_bytes(body)
    dl.fetch(server.url("a.bin"), tmp_path / "a.bin", _md5(body))
    assert server.sent == 0
    assert (tmp_path / "a.bin").read_bytes() == body


def test_server_without_range_restarts_cleanly(server: Server, tmp_path: Path) -> None:
    body = np.random.default_rng(3).bytes(100_000)
    server.files["a.bin"] = body
    server.ranges = False
    (tmp_path / "a.bin.part").write_bytes(b"stale prefix that must not survive")
    dl.fetch(server.url("a.bin"), tmp_path / "a.bin", _md5(body))
    assert (tmp_path / "a.bin").read_bytes() == body


def test_bad_md5_is_refused_and_not_kept(server: Server, tmp_path: Path) -> None:
    server.files["a.bin"] = b"tampered content"
    with pytest.raises(LdmError, match="MD5 mismatch"):
        dl.fetch(server.url("a.bin"), tmp_path / "a.bin", "0" * 32)
    assert not (tmp_path / "a.bin").exists()
    assert not (tmp_path / "a.bin.part").exists()


def test_http_error_is_one_clear_line(server: Server, tmp_path: Path) -> None:
    with pytest.raises(LdmError, match=r"HTTP 404") as err:
        dl.fetch(server.url("missing.tar"), tmp_path / "m.tar")
    assert "\n" not in str(err.value)


def test_redirect_to_another_host_is_refused(server: Server, tmp_path: Path) -> None:
    server.redirect["a.tar"] = "http://127.0.0.2:9/a.tar"
    with pytest.raises(LdmError, match="another host"):
        dl.fetch(server.url("a.tar"), tmp_path / "a.tar")


# --------------------------------------------------------------------------- download()


def test_url_source_extracts_verifies_and_is_idempotent(server: Server, tmp_path: Path) -> None:
    archive = _task_tar(gz=True)
    server.files["task.tar.gz"] = archive
    out = tmp_path / "raw"
    source = server.url("task.tar.gz") + "#md5=" + _md5(archive)
    assert dl.download(source, out, Config()) == out
    # The single top-level directory is stripped: the task is right in the output.
    assert json.loads((out / "dataset.json").read_text())["name"] == "BRATS"
    assert (out / "imagesTr" / "BRATS_002.nii").read_bytes() == _nifti_bytes(2)
    assert not (out / dl.STAGING).exists()
    sums = dict(reversed(line.split("  ", 1)) for line in (out / dl.SUMS).read_text().splitlines())
    assert sums["imagesTr/BRATS_001.nii"] == hashlib.sha256(_nifti_bytes(1)).hexdigest()
    assert json.loads((out / dl.MARKER).read_text())["md5"] == _md5(archive)

    hits = len(server.requests)
    dl.download(source, out, Config())
    assert len(server.requests) == hits  # verified marker: nothing fetched the second time


def test_msd_source_is_monais_archive_and_a_mirror_is_a_url_with_its_md5(
    server: Server, tmp_path: Path
) -> None:
    """``msd`` fetches the archive MONAI's DecathlonDataset fetches, verified by its MD5; a
    mirror of it (a hospital without internet) is the same archive under another URL, given
    as a source of its own with the MD5 pinned in the fragment, and refused when it differs."""
    from monai.apps import DecathlonDataset

    assert dl.MSD_URL == DecathlonDataset.resource["Task01_BrainTumour"]
    assert dl.MSD_MD5 == DecathlonDataset.md5["Task01_BrainTumour"]
    assert dl._request("msd", None, 0) == {"source": "msd", "url": dl.MSD_URL, "md5": dl.MSD_MD5}

    archive = _task_tar()
    server.files["Task01_BrainTumour.tar"] = archive
    mirror = server.url("Task01_BrainTumour.tar")
    out = dl.download(f"{mirror}#md5={_md5(archive)}", tmp_path / "msd", Config())
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "._BRATS_001.nii",
        "BRATS_001.nii",
        "BRATS_002.nii",
    ]

    with pytest.raises(LdmError, match="MD5 mismatch"):
        dl.download(f"{mirror}#md5={'f' * 32}", tmp_path / "msd2", Config())
    assert not (tmp_path / "msd2" / dl.MARKER).exists()


@pytest.mark.parametrize(
    "kind, why",
    [
        ("dotdot", "'..'"),
        ("absolute", "absolute path"),
        ("symlink", "pointing outside"),
        ("symlink_abs", "absolute path"),
        ("hardlink", "pointing outside"),
        ("device", "device file"),
        ("fifo", "FIFO"),
    ],
)
def test_unsafe_tar_members_are_refused_by_name(
    server: Server, tmp_path: Path, kind: str, why: str
) -> None:
    archive = _evil_tar(kind)
    server.files["evil.tar"] = archive
    out = tmp_path / "box" / "raw"
    with pytest.raises(LdmError, match=why) as err:
        dl.download(server.url("evil.tar") + "#md5=" + _md5(archive), out, Config())
    assert "refused member" in str(err.value)
    assert not (out / dl.MARKER).exists()
    assert not (out / "data").exists()  # nothing installed, not even the good member
    assert not (out / dl.STAGING / "extract").exists()
    assert not (tmp_path / "box" / "evil.txt").exists()
    assert not Path("/tmp/ldm-evil.txt").exists()


def test_not_a_tar_is_refused(server: Server, tmp_path: Path) -> None:
    server.files["x.tar"] = b"this is not a tar archive" * 40
    with pytest.raises(LdmError, match="not a readable tar"):
        dl.download(server.url("x.tar"), tmp_path / "raw", Config())


def test_directory_source_copies_and_validates_in_place(tmp_path: Path) -> None:
    src = tmp_path / "mine" / "sub"
    src.mkdir(parents=True)
    (src / "a.nii").write_bytes(_nifti_bytes(5))
    (src / "notes.txt").write_text("hello")
    out = dl.download(str(tmp_path / "mine"), tmp_path / "copy", Config())
    assert (out / "sub" / "a.nii").read_bytes() == _nifti_bytes(5)
    assert (
        f"{hashlib.sha256(_nifti_bytes(5)).hexdigest()}  sub/a.nii" in (out / dl.SUMS).read_text()
    )
    assert (tmp_path / "mine" / "sub" / "a.nii").exists()  # a copy, the source is untouched

    in_place = dl.download(str(tmp_path / "mine"), tmp_path / "mine", Config())
    assert in_place == tmp_path / "mine"
    assert (tmp_path / "mine" / dl.SUMS).is_file()
    # A different download into the same directory must not delete the user's own files.
    dl.download(str(tmp_path / "copy"), tmp_path / "mine", Config())
    assert (tmp_path / "mine" / "sub" / "a.nii").exists()


def test_directory_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(LdmError, match="no NIfTI files"):
        dl.download(str(tmp_path / "empty"), tmp_path / "out", Config())


def test_unknown_source_is_one_line_and_touches_nothing(tmp_path: Path) -> None:
    out = dl.download("demo", tmp_path / "out", Config(), subjects=1)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(LdmError, match="not demo, msd") as err:
        dl.download("ftp://example.org/x.tar", out, Config())
    assert "\n" not in str(err.value)
    with pytest.raises(LdmError, match="no such directory"):
        dl.download(str(tmp_path / "missing"), out, Config())
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_demo_source_is_idempotent_and_replaced_on_new_request(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    dl.download("demo", out, Config(), subjects=1, seed=0)
    first = (out / "imagesTr" / "BRATS_001.nii.gz").stat().st_mtime_ns
    dl.download("demo", out, Config(), subjects=1, seed=0)
    assert (out / "imagesTr" / "BRATS_001.nii.gz").stat().st_mtime_ns == first
    dl.download("demo", out, Config(), subjects=2, seed=0)
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    assert len((out / dl.SUMS).read_text().splitlines()) == 5  # dataset.json + 2 images + 2 labels


def test_demo_cohort_size_comes_from_the_config_unless_given(tmp_path: Path) -> None:
    """A preset sets its cohort (quality-cpu: 64 subjects); an explicit --subjects wins."""
    cfg = Config()
    cfg.data.demo_subjects = 2
    dl.download("demo", tmp_path / "cfg", cfg)
    assert json.loads((tmp_path / "cfg" / "dataset.json").read_text())["numTraining"] == 2
    dl.download("demo", tmp_path / "arg", cfg, subjects=1)
    assert json.loads((tmp_path / "arg" / "dataset.json").read_text())["numTraining"] == 1


def test_s3_source_through_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ldm_core import storage
    from tests.harness.s3 import make_bucket, s3_env, s3_server

    src = tmp_path / "task"
    with tarfile.open(fileobj=io.BytesIO(_task_tar())) as tar:
        tar.extractall(src, filter="data")
    with s3_server() as endpoint:
        s3_env(monkeypatch, endpoint)
        bucket = make_bucket(endpoint)
        uri = f"s3://{bucket}/raw"
        storage.upload_dir(src / "Task01_BrainTumour", uri)
        out = dl.download(uri, tmp_path / "raw", Config())
        assert (out / "imagesTr" / "BRATS_001.nii").read_bytes() == _nifti_bytes(1)
        assert "imagesTr/BRATS_002.nii" in (out / dl.SUMS).read_text()
        stamp = (out / dl.MARKER).stat().st_mtime_ns
        dl.download(uri, out, Config())
        assert (out / dl.MARKER).stat().st_mtime_ns == stamp


def test_verified_archive_is_not_fetched_again_after_failed_extraction(
    server: Server, tmp_path: Path
) -> None:
    archive = _task_tar()
    server.files["task.tar"] = archive
    out = tmp_path / "raw"
    staged = out / dl.STAGING / "task.tar"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(archive)  # left by a run that died while extracting
    dl.download(server.url("task.tar") + "#md5=" + _md5(archive), out, Config())
    assert server.requests == []
    assert (out / "dataset.json").is_file()
