"""ldm preprocess: geometry, intensities, affine, split, idempotence, bad files, odd NIfTI."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ldm_core.cli import main as cli_main
from ldm_core.config import load_config
from ldm_core.data.preprocess import preprocess, split_subjects
from ldm_core.data.preprocessed import VolumeDataset, read_manifest, subjects
from ldm_core.errors import LdmError
from tests.harness.data import demo_config, demo_raw_dir, make_demo_cache

# A small grid for synthetic phantoms: 32^3 voxels of 3 mm (valid with the default models).
SMALL = ["data.shape=[32,32,32]", "data.spacing=[3.0,3.0,3.0]"]


def small_cfg(*extra: str):
    return load_config(overrides=[*SMALL, *extra])


def phantom(shape: tuple[int, int, int] = (40, 48, 36)) -> np.ndarray:
    """An ellipsoidal 'head' with a gradient and a bright block on the +x (right) side."""
    idx = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape, np.float32) - 1) / 2
    r = sum(((idx[a] - centre[a]) / (0.42 * shape[a])) ** 2 for a in range(3))
    head = (r < 1).astype(np.float32)
    data = head * (100.0 + 2.0 * idx[1])
    data[int(shape[0] * 0.7) : int(shape[0] * 0.8), 20:28, 14:22] = 400.0
    return data


def centred_affine(shape: tuple[int, ...], zoom: float = 2.0) -> np.ndarray:
    affine = np.diag([zoom, zoom, zoom, 1.0])
    size = np.array([*shape[:3], 1, 1][:3])
    affine[:3, 3] = -zoom * (size - 1) / 2
    return affine


def save(
    path: Path, data: np.ndarray, affine: np.ndarray | None = None, cls=nib.Nifti1Image, header=None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(
        cls(data, centred_affine(data.shape) if affine is None else affine, header=header), path
    )
    return path


def save_with_header(path: Path, data: np.ndarray, **fields) -> Path:
    """Save ``data`` with header ``fields`` set as given. They are set after nibabel built
    the image, as a careless writer or a damaged file leaves them: nibabel's affine API
    would repair or refuse them, and its loader repairs some (zero or negative pixdim)."""
    img = nib.Nifti1Image(data, None)
    for key, value in fields.items():
        img.header[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


SFORM_2MM = {
    "pixdim": [1.0, 2, 2, 2, 1, 1, 1, 1],
    "sform_code": 1,
    "srow_x": [2.0, 0, 0, -40],
    "srow_y": [0, 2.0, 0, -48],
    "srow_z": [0, 0, 2.0, -36],
}
"""Header fields of a plain 2 mm grid given by the sform alone (qform unset)."""


def run(
    folder: Path, tmp_path: Path, cfg=None, skip_bad: bool = False, name: str = "cache"
) -> tuple[dict, Path]:
    out = preprocess(folder, tmp_path / name, cfg or small_cfg(), skip_bad=skip_bad)
    return read_manifest(out), out


def volume(out: Path, manifest: dict, sid: str) -> np.ndarray:
    entry = next(s for s in manifest["subjects"] if s["id"] == sid)
    return np.load(out / entry["file"]).astype(np.float32)


# --------------------------------------------------------------------------- demo cohort


def test_demo_cache_geometry_intensity_and_affine(tmp_path: Path) -> None:
    out = make_demo_cache(tmp_path, n_subjects=4, shape=(32, 32, 32))
    manifest = read_manifest(out)
    cfg = demo_config((32, 32, 32))
    assert manifest["format"] == 1
    assert manifest["shape"] == [32, 32, 32]
    assert manifest["spacing"] == list(cfg.data.spacing)
    assert len(manifest["dataset_hash"]) == 64

    affine = np.array(manifest["affine"])
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), cfg.data.spacing)
    raw = nib.load(demo_raw_dir(4) / "imagesTr" / "BRATS_001.nii.gz")
    # The output grid is centred on the input volume: same world centre within a voxel.
    raw_centre = raw.affine @ np.r_[(np.array(raw.shape[:3]) - 1) / 2, 1]
    out_centre = affine @ np.r_[(np.array(manifest["shape"]) - 1) / 2, 1]
    assert np.abs(raw_centre - out_centre).max() <= cfg.data.spacing[0]

    for entry in manifest["subjects"]:
        assert entry["status"] == "ok" and entry["reason"] == ""
        assert entry["source"] == f"imagesTr/{entry['id']}.nii.gz"
        raw_bytes = (demo_raw_dir(4) / entry["source"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(raw_bytes).hexdigest()
        array = np.load(out / entry["file"])
        assert array.dtype == np.float16 and array.shape == (1, 32, 32, 32)
        assert array.min() == 0.0 and array.max() == 1.0
        assert 0.05 < (array > 0).mean() < 0.6  # brain inside, zero background
        assert array[0, 0, 0, 0] == 0.0

    assert [s["split"] for s in manifest["subjects"]].count("val") == 1
    assert len(VolumeDataset(out, "train")) == 3
    assert VolumeDataset(out, "val")[0].shape == (1, 32, 32, 32)


def test_rerun_reuses_the_cache_and_config_change_rebuilds(tmp_path: Path) -> None:
    raw = demo_raw_dir(2)
    cfg = demo_config((32, 32, 32))
    out = preprocess(raw, tmp_path / "cache", cfg, skip_bad=False)
    files = [out / "manifest.json", *sorted((out / "volumes").iterdir())]
    stamps = [p.stat().st_mtime_ns for p in files]
    first_hash = read_manifest(out)["dataset_hash"]

    preprocess(raw, out, cfg, skip_bad=False)
    assert [p.stat().st_mtime_ns for p in files] == stamps  # nothing rewritten

    cfg.data.intensity_percentiles = (1.0, 99.0)
    preprocess(raw, out, cfg, skip_bad=False)
    assert all(p.stat().st_mtime_ns != s for p, s in zip(files, stamps))
    assert read_manifest(out)["dataset_hash"] != first_hash


def test_channel_is_chosen_by_name(tmp_path: Path) -> None:
    raw = demo_raw_dir(2)
    cfg = demo_config((32, 32, 32))
    flair_manifest, flair = run(raw, tmp_path, cfg, name="flair")
    cfg.data.channel = "T1GD"
    t1gd_manifest, t1gd = run(raw, tmp_path, cfg, name="t1gd")
    a = volume(flair, flair_manifest, "BRATS_001")
    b = volume(t1gd, t1gd_manifest, "BRATS_001")
    assert np.array_equal(a > 0, b > 0) or np.mean((a > 0) != (b > 0)) < 0.01  # same brain
    brain = (a > 0) & (b > 0)
    assert np.abs(a - b)[brain].mean() > 0.05  # different contrast
    assert flair_manifest["dataset_hash"] != t1gd_manifest["dataset_hash"]


@pytest.mark.parametrize(
    "n, fraction, n_val", [(1, 0.2, 0), (2, 0.2, 1), (10, 0.2, 2), (5, 0.9, 4), (5, 0.0, 0)]
)
def test_split_by_subject_is_deterministic(n: int, fraction: float, n_val: int) -> None:
    ids = [f"s{i:02d}" for i in range(n)]
    val = split_subjects(ids, fraction, seed=3)
    assert len(val) == n_val and val <= set(ids)
    assert split_subjects(list(reversed(ids)), fraction, seed=3) == val  # order-independent


# --------------------------------------------------------------------------- orientation and odd files


def test_orientation_is_ras_whatever_the_storage_order(tmp_path: Path) -> None:
    data = phantom()
    ras = centred_affine(data.shape)
    las = ras.copy()
    las[0, 0] = -ras[0, 0]
    las[0, 3] = -ras[0, 3]  # same world box, x stored right-to-left
    save(tmp_path / "in" / "ras.nii.gz", data, ras)
    save(tmp_path / "in" / "las.nii.gz", data[::-1].copy(), las)
    manifest, out = run(tmp_path / "in", tmp_path)
    a, b = volume(out, manifest, "ras"), volume(out, manifest, "las")
    np.testing.assert_allclose(a, b, atol=2e-3)
    # The bright block is on the subject's right (+x): high indices in RAS.
    block = np.argwhere(a[0] > 0.99)
    assert block[:, 0].mean() > 16


def test_big_endian_nifti2_and_single_volume_4d_match_plain(tmp_path: Path) -> None:
    data = phantom()
    src = tmp_path / "in"
    save(src / "plain.nii.gz", data)
    save(src / "bigendian.nii", data.astype(">f4"), header=nib.Nifti1Header(endianness=">"))
    save(src / "nifti2.nii.gz", data, cls=nib.Nifti2Image)
    save(src / "fourd.nii.gz", data[..., None])
    assert nib.load(src / "bigendian.nii").header.endianness == ">"
    assert isinstance(nib.load(src / "nifti2.nii.gz"), nib.Nifti2Image)
    manifest, out = run(src, tmp_path)
    plain = volume(out, manifest, "plain")
    assert plain.max() == 1.0
    for sid in ("bigendian", "nifti2", "fourd"):
        np.testing.assert_array_equal(volume(out, manifest, sid), plain, err_msg=sid)


def test_oblique_affine_is_resampled_with_its_direction(tmp_path: Path) -> None:
    data = phantom()
    angle = np.deg2rad(20)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    oblique = rotation @ centred_affine(data.shape)
    save(tmp_path / "in" / "oblique.nii.gz", data, oblique)
    manifest, out = run(tmp_path / "in", tmp_path)
    entry = manifest["subjects"][0]
    affine = np.array(entry["affine"])
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [3.0, 3.0, 3.0], atol=1e-5)
    assert abs(affine[0, 1]) > 0.5  # still oblique: the direction is kept, not dropped
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    array = volume(out, manifest, "oblique")
    assert array.shape == (1, 32, 32, 32) and array.max() == 1.0 and (array > 0).mean() > 0.05


# --------------------------------------------------------------------------- bad input


def _bad_files(root: Path) -> dict[str, str]:
    """Write one file per kind of damage; returns file name -> expected reason (regex)."""
    good = phantom()
    save(root / "good.nii.gz", good)
    (root / "corrupt.nii.gz").write_bytes(np.random.default_rng(0).bytes(3000))
    save(root / "truncated.nii.gz", good)
    blob = (root / "truncated.nii.gz").read_bytes()
    (root / "truncated.nii.gz").write_bytes(blob[: len(blob) // 2])
    save(root / "flat.nii.gz", good[:, :, 10])
    save(root / "slice.nii.gz", good[:, :, 10:11])
    save(root / "complex.nii.gz", good.astype(np.complex64))
    rgb = np.zeros(good.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    save(root / "rgb.nii.gz", rgb)
    nan = good.copy()
    nan[20, 20, 20] = np.nan
    save(root / "nan.nii.gz", nan)
    save(root / "fived.nii.gz", good[..., None, None].repeat(2, axis=4))
    # Geometry that nibabel or MONAI would quietly replace with a made-up grid.
    no_affine = {"qform_code": 0, "sform_code": 0}
    save_with_header(
        root / "zero_pixdim.nii.gz", good, pixdim=[1.0, 0, 0, 0, 1, 1, 1, 1], **no_affine
    )
    save_with_header(
        root / "negative_pixdim.nii.gz", good, pixdim=[1.0, 2, -2, 2, 1, 1, 1, 1], **no_affine
    )
    nan_row = {**SFORM_2MM, "srow_x": [np.nan, 0, 0, -40]}
    save_with_header(root / "nonfinite_affine.nii.gz", good, **nan_row)
    save_with_header(
        root / "singular_sform.nii.gz", good, **{**SFORM_2MM, "srow_z": [0, 0, 0, -36]}
    )
    return {
        "corrupt": "not a readable NIfTI",
        "truncated": r"(?i)(eof|compressed|truncat|end of|size)",
        "flat": "2D image",
        "slice": "single slice, not a 3D volume",
        "complex": "not a real number type",
        "rgb": "RGB",
        "nan": "NaN",
        "fived": "5D image",
        "zero_pixdim": r"voxel sizes \(pixdim\[1:4\]\) are \[0\.0, 0\.0, 0\.0\]; they must be "
        r"positive and finite \(and neither qform nor sform is set\)",
        "negative_pixdim": r"voxel sizes \(pixdim\[1:4\]\) are \[2\.0, -2\.0, 2\.0\]",
        "nonfinite_affine": r"the affine from the sform is not finite: \[\[nan",
        "singular_sform": r"the affine from the sform is singular",
    }


def test_each_bad_file_is_named_and_skippable(tmp_path: Path) -> None:
    src = tmp_path / "in"
    reasons = _bad_files(src)
    # Without --skip-bad: a clear one-line error naming the first bad file (sorted order).
    with pytest.raises(LdmError) as err:
        run(src, tmp_path, name="strict")
    assert "complex.nii.gz" in str(err.value) and "--skip-bad" in str(err.value)
    assert "\n" not in str(err.value)

    manifest, out = run(src, tmp_path, skip_bad=True)
    by_id = {s["id"]: s for s in manifest["subjects"]}
    assert by_id["good"]["status"] == "ok" and by_id["good"]["split"] == "train"
    assert subjects(manifest) == [by_id["good"]]
    for sid, pattern in reasons.items():
        entry = by_id[sid]
        assert entry["status"] == "skipped" and entry["file"] is None and entry["split"] is None
        assert f"{sid}.nii.gz" in entry["reason"]
        assert re.search(pattern, entry["reason"]), (sid, entry["reason"])
    assert sorted(p.name for p in (out / "volumes").iterdir()) == ["good.npy"]


def test_geometry_written_as_is_is_used_when_it_is_valid(tmp_path: Path) -> None:
    """The control for the geometry refusals: the same writer, a valid sform, accepted."""
    save_with_header(tmp_path / "in" / "sform.nii.gz", phantom(), **SFORM_2MM)
    manifest, _ = run(tmp_path / "in", tmp_path)
    assert manifest["subjects"][0]["status"] == "ok"
    assert np.allclose(np.abs(np.diag(manifest["affine"])[:3]), 3.0)  # resampled 2 mm -> 3 mm


@pytest.mark.parametrize(
    "name",
    [
        "corrupt",
        "truncated",
        "flat",
        "complex",
        "rgb",
        "nan",
        "zero_pixdim",
        "negative_pixdim",
        "nonfinite_affine",
        "singular_sform",
    ],
)
def test_single_bad_file_error_names_it(tmp_path: Path, name: str) -> None:
    src = tmp_path / "all"
    _bad_files(src)
    only = tmp_path / "one"
    only.mkdir()
    (only / f"{name}.nii.gz").write_bytes((src / f"{name}.nii.gz").read_bytes())
    with pytest.raises(LdmError, match=rf"{name}\.nii\.gz"):
        run(only, tmp_path)
    with pytest.raises(LdmError, match="no usable subjects"):
        run(only, tmp_path, skip_bad=True)
    assert read_manifest(tmp_path / "cache")["subjects"][0]["status"] == "skipped"


def test_missing_file_listed_in_dataset_json(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    save(raw / "imagesTr" / "BRATS_001.nii.gz", phantom()[..., None].repeat(2, axis=3))
    listing = {
        "name": "BRATS",
        "modality": {"0": "FLAIR", "1": "T1w"},
        "training": [{"image": f"./imagesTr/BRATS_00{i}.nii.gz"} for i in (1, 2)],
    }
    (raw / "dataset.json").write_text(json.dumps(listing))
    with pytest.raises(
        LdmError,
        match=r"BRATS_002\.nii\.gz: file not found \(listed in dataset\.json training\[1\]",
    ):
        run(raw, tmp_path)
    manifest, _ = run(raw, tmp_path, small_cfg("data.channel=t1w"), skip_bad=True)
    assert [s["status"] for s in manifest["subjects"]] == ["ok", "skipped"]


def test_multi_volume_file_without_names_needs_an_index(tmp_path: Path) -> None:
    save(tmp_path / "in" / "multi.nii.gz", phantom()[..., None].repeat(3, axis=3))
    with pytest.raises(LdmError, match=r"3 volumes; set data\.channel"):
        run(tmp_path / "in", tmp_path, skip_bad=True)
    manifest, _ = run(tmp_path / "in", tmp_path, small_cfg("data.channel=2"))
    assert manifest["subjects"][0]["status"] == "ok"


# --------------------------------------------------------------------------- CLI


def test_cli_download_and_preprocess_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    assert (
        cli_main(
            ["download", "--source", "demo", "--output", str(raw), "--subjects", "2", "--seed", "1"]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(raw)
    args = [
        "preprocess",
        "--input",
        str(raw),
        "--output",
        str(cache),
        *sum((["--set", s] for s in SMALL), []),
    ]
    assert cli_main(args) == 0
    assert len(subjects(read_manifest(cache))) == 2

    gzip_bad = raw / "imagesTr" / "BRATS_002.nii.gz"
    gzip_bad.write_bytes(gzip.compress(b"not a nifti at all" * 50))
    capsys.readouterr()
    assert cli_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("ldm preprocess: error: ") and "BRATS_002.nii.gz" in err
    assert cli_main([*args, "--skip-bad"]) == 0
