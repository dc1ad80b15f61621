"""The demo cohort: exact Task01 layout, brain-like contrast with lesions, reproducible."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ldm_core.data import demo
from tests.harness.data import demo_raw_dir


@pytest.fixture(scope="module")
def cohort() -> Path:
    return demo_raw_dir(n_subjects=2)


def test_task01_layout(cohort: Path) -> None:
    meta = json.loads((cohort / "dataset.json").read_text())
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"] == {
        "0": "background",
        "1": "edema",
        "2": "non-enhancing tumor",
        "3": "enhancing tumour",
    }
    assert meta["tensorImageSize"] == "4D"
    assert meta["numTraining"] == 2 == len(meta["training"])
    assert meta["training"][0] == {
        "image": "./imagesTr/BRATS_001.nii.gz",
        "label": "./labelsTr/BRATS_001.nii.gz",
    }
    for pair in meta["training"]:
        image = nib.load(cohort / pair["image"])
        label = nib.load(cohort / pair["label"])
        assert image.ndim == 4 and image.shape[3] == 4
        assert label.shape == image.shape[:3]
        assert np.issubdtype(label.get_data_dtype(), np.integer)


def test_real_affine_is_the_template_affine(cohort: Path) -> None:
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=demo.DEFAULT_RESOLUTION)
    image = nib.load(cohort / "imagesTr" / "BRATS_001.nii.gz")
    assert image.shape[:3] == template.shape
    np.testing.assert_allclose(image.affine, template.affine)
    assert image.header["sform_code"] > 0 and image.header["qform_code"] > 0
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert image.header.get_zooms()[:3] == (2.0, 2.0, 2.0)


def test_contrast_and_lesions_look_like_brats(cohort: Path) -> None:
    image = np.asarray(nib.load(cohort / "imagesTr" / "BRATS_001.nii.gz").dataobj)
    label = np.asarray(nib.load(cohort / "labelsTr" / "BRATS_001.nii.gz").dataobj)
    flair, t1, t1gd, t2 = (image[..., m].astype(np.float64) for m in range(4))
    brain = flair > 0
    assert 0.1 < brain.mean() < 0.4  # skull-stripped: zero outside the brain
    assert set(np.unique(label)) == {0, 1, 2, 3}
    assert (label[~brain] == 0).all()
    normal = brain & (label == 0)
    edema, core, rim = label == 1, label == 2, label == 3
    assert flair[edema].mean() > 1.3 * flair[normal].mean()  # oedema bright on FLAIR
    assert t2[edema].mean() > t2[normal].mean()
    assert t1gd[rim].mean() > 1.4 * t1[rim].mean()  # the rim enhances with contrast
    assert t1gd[rim].mean() > t1gd[core].mean()
    assert np.corrcoef(flair[brain], t2[brain])[0, 1] < 0.9  # modalities differ in contrast


def test_same_seed_same_bytes_other_seed_other_brain(tmp_path: Path) -> None:
    atlas = demo.load_atlas(4)  # coarse grid: this test is about randomness, not detail
    a_img, a_lab = demo.make_subject(atlas, seed=7, index=1)
    b_img, b_lab = demo.make_subject(atlas, seed=7, index=1)
    assert a_img.tobytes() == b_img.tobytes() and a_lab.tobytes() == b_lab.tobytes()
    c_img, _ = demo.make_subject(atlas, seed=8, index=1)
    d_img, _ = demo.make_subject(atlas, seed=7, index=2)
    assert not np.array_equal(a_img, c_img)
    assert ((a_img[..., 0] > 0) != (d_img[..., 0] > 0)).mean() > 0.005  # shapes differ

    one = demo.generate_cohort(tmp_path / "one", n_subjects=1, seed=7, resolution=4)
    two = demo.generate_cohort(tmp_path / "two", n_subjects=2, seed=7, resolution=4)

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    # Files, not only arrays, are identical; and subject 1 does not depend on the cohort size.
    assert digest(one / "imagesTr/BRATS_001.nii.gz") == digest(two / "imagesTr/BRATS_001.nii.gz")
    assert digest(one / "labelsTr/BRATS_001.nii.gz") == digest(two / "labelsTr/BRATS_001.nii.gz")


def test_noise_free_subject_is_the_same_subject_without_its_noise() -> None:
    """``noise=False`` changes nothing but the noise: same labels, same brain; the noisy
    image differs from it by about the generator's 1-3 % of the signal's gain inside the
    brain, and is rougher (its voxel-to-voxel differences are larger)."""
    atlas = demo.load_atlas(4)
    noisy, labels = demo.make_subject(atlas, seed=3, index=0)
    clean, clean_labels = demo.make_subject(atlas, seed=3, index=0, noise=False)
    assert labels.tobytes() == clean_labels.tobytes()
    brain = noisy[..., 0] > 0
    assert np.array_equal(brain, clean[..., 0] > 0)
    for m in range(noisy.shape[-1]):
        a, b = noisy[..., m].astype(np.float64), clean[..., m].astype(np.float64)
        relative = np.abs(a - b)[brain].mean() / b[brain].mean()
        assert 0.003 < relative < 0.1, (m, relative)
        assert (
            np.abs(np.diff(a, axis=0))[brain[1:]].mean()
            > np.abs(np.diff(b, axis=0))[brain[1:]].mean()
        )


def test_subject_generation_is_fast() -> None:
    import time

    atlas = demo.load_atlas(demo.DEFAULT_RESOLUTION)
    start = time.process_time()
    demo.make_subject(atlas, seed=0, index=0)
    assert time.process_time() - start < 5.0  # about 0.5 s of CPU here
