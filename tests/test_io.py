"""ldm_core.io: the durability steps in their order, a target never torn nor rewritten in
place, the sweep of what killed writers leave, and the one sha256.

The steps are observed on the real calls: ``os.fsync`` and ``os.replace`` are wrapped by
recorders that still make the call and note what the file system holds at that moment.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_core import io

ROOT = Path(__file__).resolve().parents[1]
OLD = b"old content\n"
NEW = b"new content, longer than the old one\n"


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """The fsync and replace calls made while the test runs, in order, each with the inode
    it acted on and the bytes the file held then (fsync reads the fd it is given)."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            events.append(("fsync dir", st.st_ino))
        else:
            events.append(("fsync file", st.st_ino, os.pread(fd, st.st_size + 1, 0)))
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs) -> None:
        src, dst = Path(src), Path(dst)
        events.append(("replace", src.stat().st_ino, src, dst, src.read_bytes()))
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


# --------------------------------------------------------------------------- durable writes


def test_write_flush_fsync_rename_then_fsync_the_directory(tmp_path, calls):
    target = tmp_path / "f.bin"
    target.write_bytes(OLD)

    def write(f) -> None:
        f.write(NEW)
        calls.append(("write", target.read_bytes()))

    assert io.atomic_write(target, write) == target

    steps = [event[0] for event in calls]
    assert steps == ["write", "fsync file", "replace", "fsync dir"]
    _, written_target = calls[0]
    _, synced_inode, synced_bytes = calls[1]
    _, renamed_inode, src, dst, renamed_bytes = calls[2]
    _, dir_inode = calls[3]
    assert written_target == OLD  # the data went elsewhere
    assert synced_bytes == NEW  # flushed before the fsync: all of it reached the file
    assert renamed_inode == synced_inode and renamed_bytes == NEW  # the synced file moved
    assert dst == target and src.parent == target.parent and io.is_temporary(src)
    assert dir_inode == tmp_path.stat().st_ino  # the directory holding the new name
    assert target.read_bytes() == NEW and target.stat().st_ino == synced_inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_a_reader_sees_the_old_file_or_the_new_one_never_a_mix(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(OLD)
    with open(target, "rb") as opened_before:

        def write(f) -> None:
            f.write(NEW[:5])
            f.flush()
            assert target.read_bytes() == OLD  # a reader arriving mid-write
            f.write(NEW[5:])

        io.atomic_write(target, write)
        assert opened_before.read() == OLD  # the old file was replaced, not rewritten
    assert target.read_bytes() == NEW


@pytest.mark.parametrize("existing", [OLD, None], ids=["over an old file", "a new file"])
@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_a_write_that_raises_leaves_the_old_file_and_no_temporary(tmp_path, existing, error):
    """An error (disk full) or an interrupt (Ctrl-C) midway: the old file, or none, and the
    temporary file gone."""
    target = tmp_path / "sub" / "f.bin"
    target.parent.mkdir()
    if existing is not None:
        target.write_bytes(existing)

    def write(f) -> None:
        f.write(NEW[:5])
        f.flush()
        raise error("midway")

    with pytest.raises(error, match="midway"):
        io.atomic_write(target, write)
    assert sorted(p.name for p in target.parent.iterdir()) == (
        [] if existing is None else ["f.bin"]
    )
    if existing is not None:
        assert target.read_bytes() == existing


def test_text_and_json_writers_go_through_the_same_steps(tmp_path, calls):
    io.atomic_write_json(tmp_path / "a.json", {"k": 1})
    io.atomic_write_text(tmp_path / "b.txt", "b")
    assert [event[0] for event in calls] == ["fsync file", "replace", "fsync dir"] * 2
    assert (tmp_path / "a.json").read_text() == '{\n  "k": 1\n}\n'
    assert (tmp_path / "b.txt").read_text() == "b"


# --------------------------------------------------------------------------- the sweep

_KILLED_WRITER = """
import os, signal, sys
from ldm_core import io

def write(f):
    f.write(b"half of a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

io.atomic_write(sys.argv[1], write)
"""


def _killed_write(target: Path) -> Path:
    """Run an atomic_write in a process killed mid-write; return the file it left."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], env=env)
    assert proc.returncode == -9
    (left,) = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
    return left


def test_sweep_removes_what_killed_writers_left_and_nothing_else(tmp_path, caplog):
    run = tmp_path / "checkpoints"
    run.mkdir()
    killed = _killed_write(run / "ckpt-00000010.pt")
    older = run / ".ckpt-00000004.pt.a1b2_c3d.tmp"  # an earlier run's leftover
    older.write_bytes(b"x" * 1000)
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"not ours")
    keep = {
        "ckpt-00000008.pt": b"a finished checkpoint",
        "notes.tmp": b"not hidden",
        ".cache.tmp": b"no random part",
        ".ckpt.ABCDEFGH.tmp": b"not mkstemp's alphabet",
        ".ckpt-00000004.pt.a1b2c3d4.tmp.corrupt": b"another suffix",
        ".ckpt-00000004.pt.a1b2c3d.tmp": b"seven random characters",
    }
    for name, data in keep.items():
        (run / name).write_bytes(data)
    (run / ".d.abcdefgh.tmp").mkdir()  # a directory, not a file
    (run / "sub").mkdir()
    (run / "sub" / ".x.abcdefgh.tmp").write_bytes(b"below: not swept")
    (run / ".link.abcdefgh.tmp").symlink_to(outside)

    with caplog.at_level(logging.INFO, logger="ldm_core.io"):
        removed = io.sweep_temporaries(run)

    assert sorted(removed) == sorted([killed, older])
    left = {p.name for p in run.iterdir()}
    assert left == {*keep, ".d.abcdefgh.tmp", "sub", ".link.abcdefgh.tmp"}
    assert all((run / name).read_bytes() == data for name, data in keep.items())
    assert (run / "sub" / ".x.abcdefgh.tmp").exists() and outside.read_bytes() == b"not ours"
    assert str(killed) in caplog.text and f"{older} (1000 bytes)" in caplog.text
    assert io.sweep_temporaries(run) == []
    assert io.sweep_temporaries(tmp_path / "missing") == []


# --------------------------------------------------------------------------- hashing


@pytest.mark.parametrize("size", [0, 3, 1 << 20, (5 << 19) + 7], ids=lambda n: f"{n}B")
def test_sha256_file_hashes_every_byte(tmp_path, size):
    """Empty, small, exactly one 1 MiB read, and several reads with a partial last one."""
    data = random.Random(size).randbytes(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert io.sha256_file(path) == expected and io.sha256_file(str(path)) == expected
