"""The Task01 reader on a generated cohort, channel choice, and dataset.json errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm_core.data import msd
from ldm_core.errors import LdmError
from tests.harness.data import demo_raw_dir


def test_reads_generated_cohort() -> None:
    root = demo_raw_dir(n_subjects=2)
    dataset = msd.read_dataset(root)
    assert msd.is_msd(root)
    assert dataset.name == "BRATS"
    assert dataset.modalities == {0: "FLAIR", 1: "T1w", 2: "t1gd", 3: "T2w"}
    assert dataset.labels[3] == "enhancing tumour"
    assert [s.id for s in dataset.subjects] == ["BRATS_001", "BRATS_002"]
    assert dataset.subjects[1].image == root / "imagesTr" / "BRATS_002.nii.gz"
    assert dataset.subjects[1].label == root / "labelsTr" / "BRATS_002.nii.gz"
    assert all(s.image.is_file() and s.label.is_file() for s in dataset.subjects)


@pytest.mark.parametrize(
    "channel, index",
    [
        ("FLAIR", 0),
        ("flair", 0),
        ("T1w", 1),
        ("t1gd", 2),
        ("T1GD", 2),
        ("t1ce", 2),
        ("T2", 3),
        ("3", 3),
    ],
)
def test_channel_by_name_alias_or_index(channel: str, index: int) -> None:
    dataset = msd.read_dataset(demo_raw_dir(n_subjects=2))
    assert dataset.channel_index(channel) == index


@pytest.mark.parametrize("channel", ["PD", "7"])
def test_unknown_channel_names_the_choices(channel: str) -> None:
    dataset = msd.read_dataset(demo_raw_dir(n_subjects=2))
    with pytest.raises(
        LdmError, match=r"data\.channel.*dataset\.json.*0=FLAIR, 1=T1w, 2=t1gd, 3=T2w"
    ):
        dataset.channel_index(channel)


def _write(tmp_path: Path, content: object) -> Path:
    text = content if isinstance(content, str) else json.dumps(content)
    (tmp_path / "dataset.json").write_text(text)
    return tmp_path


GOOD = {
    "name": "BRATS",
    "modality": {"0": "FLAIR"},
    "labels": {"0": "background"},
    "numTraining": 1,
    "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"training": None}, "'training'"),
        ({"training": []}, "'training' is empty"),
        ({"modality": None}, "'modality'"),
        ({"modality": {"zero": "FLAIR"}}, "'modality'"),
        ({"modality": {"0": 5}}, "'modality.0'"),
        ({"training": [{"label": "./labelsTr/x.nii.gz"}]}, r"'training\[0\]\.image'"),
        ({"training": [7]}, r"'training\[0\]'"),
        ({"training": [{"image": "/etc/x.nii.gz"}]}, "absolute path"),
        ({"training": [{"image": "../x.nii.gz"}]}, "leaves the dataset directory"),
        (
            {"training": [{"image": "./imagesTr/a.nii.gz"}, {"image": "./other/a.nii.gz"}]},
            r"'training\[1\]\.image' repeats subject 'a'",
        ),
    ],
)
def test_bad_dataset_json_names_file_and_field(tmp_path: Path, change: dict, field: str) -> None:
    root = _write(tmp_path, {**GOOD, **change})
    with pytest.raises(LdmError, match=rf"dataset\.json: .*{field}"):
        msd.read_dataset(root)


def test_invalid_json_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LdmError, match=r"dataset\.json: not found"):
        msd.read_dataset(tmp_path)
    with pytest.raises(LdmError, match=r"dataset\.json: not valid JSON"):
        msd.read_dataset(_write(tmp_path, '{"name": "BRATS",'))


def test_bare_image_paths_are_accepted(tmp_path: Path) -> None:
    dataset = msd.read_dataset(
        _write(tmp_path, {**GOOD, "training": ["./imagesTr/BRATS_007.nii.gz"]})
    )
    assert dataset.subjects[0].id == "BRATS_007" and dataset.subjects[0].label is None
