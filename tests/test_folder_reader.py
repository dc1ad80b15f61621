"""The plain-folder reader: recursive, sorted, hidden files skipped, ids from file names."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm_core.data import folder
from ldm_core.errors import LdmError


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0")


def test_lists_nifti_recursively_sorted(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "b/sub-02_T1w.nii.gz",
        "a/sub-01_T1w.nii",
        "c/deeper/sub-03.NII.GZ",
        "a/._sub-01_T1w.nii",  # macOS resource fork
        ".hidden/sub-09.nii.gz",
        "a/notes.txt",
        "a/sub-01.json",
    )
    volumes = folder.list_volumes(tmp_path)
    assert [v.id for v in volumes] == ["sub-01_T1w", "sub-02_T1w", "sub-03"]
    assert volumes[0].path == tmp_path / "a" / "sub-01_T1w.nii"


def test_duplicate_names_get_path_ids(tmp_path: Path) -> None:
    _touch(tmp_path, "site1/scan.nii.gz", "site2/scan.nii.gz")
    assert [v.id for v in folder.list_volumes(tmp_path)] == ["site1__scan", "site2__scan"]


def test_channel_name_picks_one_modality_of_brats2021(tmp_path: Path) -> None:
    for sid in ("BraTS2021_00000", "BraTS2021_00002"):
        _touch(tmp_path, *(f"{sid}/{sid}_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2", "seg")))
    assert [v.id for v in folder.list_volumes(tmp_path, "FLAIR")] == [
        "BraTS2021_00000_flair",
        "BraTS2021_00002_flair",
    ]
    assert [v.id for v in folder.list_volumes(tmp_path, "t1gd")] == [
        "BraTS2021_00000_t1ce",
        "BraTS2021_00002_t1ce",
    ]
    assert len(folder.list_volumes(tmp_path, "0")) == 10  # an index filters nothing


def test_channel_name_absent_from_names_keeps_all(tmp_path: Path) -> None:
    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    assert len(folder.list_volumes(tmp_path, "FLAIR")) == 2


def test_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(LdmError, match="no NIfTI files"):
        folder.list_volumes(tmp_path)
    with pytest.raises(LdmError, match="not a directory"):
        folder.list_volumes(tmp_path / "missing")
