"""The detail measure and volume summary shared by the quality gate, the bundle's training
reference and the served-output monitor."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from ldm_core import measures


def _phantom(seed: int = 0) -> np.ndarray:
    """A bright ellipsoid with darker inner structures on a black background."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:32, :40, :32]
    brain = ((z - 16) / 13) ** 2 + ((y - 20) / 17) ** 2 + ((x - 16) / 13) ** 2 < 1
    vol = np.where(brain, 0.6, 0.0)
    vol[brain & (rng.random(brain.shape) < 0.3)] = 0.9
    ventricles = ((z - 16) / 4) ** 2 + ((y - 20) / 8) ** 2 + ((x - 16) / 3) ** 2 < 1
    vol[ventricles] = 0.2
    return vol


def test_otsu_splits_two_populations() -> None:
    values = np.concatenate([np.full(500, 0.1), np.full(300, 0.8)])
    threshold = measures.otsu_threshold(values)
    assert 0.1 < threshold < 0.8


def test_blur_lowers_detail_and_scale_does_not_change_it() -> None:
    sharp = _phantom()
    blurred = gaussian_filter(sharp, sigma=2)
    assert measures.detail(blurred) < 0.6 * measures.detail(sharp)
    assert np.isclose(measures.detail(sharp * 250 + 7), measures.detail(sharp))


def test_detail_ratio_is_one_for_the_same_set_and_zero_for_constant_volumes() -> None:
    real = np.stack([_phantom(s)[None] for s in range(3)])
    assert np.isclose(measures.detail_ratio(real, real), 1.0)
    assert measures.detail_ratio(np.full_like(real, 0.5), real) == 0.0
    assert measures.detail(np.zeros((4, 4, 4))) == 0.0


def test_summarise_uses_the_one_detail_measure_and_reference_averages_it() -> None:
    vols = [_phantom(s) for s in range(3)]
    rows = [measures.summarise(v[None]) for v in vols]
    assert [r["detail"] for r in rows] == [measures.detail(v) for v in vols]
    assert rows[0]["foreground_fraction"] == pytest.approx((vols[0] > 0.1).mean())
    ref = measures.reference(vols)
    assert ref == pytest.approx({m: np.mean([r[m] for r in rows]) for m in measures.MEASURES})
    with pytest.raises(ValueError, match="no volumes"):
        measures.reference([])


def _brain_with_lesions(centres: list[tuple[int, int, int]], radius: float) -> np.ndarray:
    """An ellipsoidal "brain" at 0.5 with a little texture, and bright spheres (twice the
    brain's level, as oedema is on FLAIR) of ``radius`` voxels at ``centres``."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in (48, 64, 48)), indexing="ij"))
    half = np.array([24, 32, 24])[:, None, None, None]
    brain = ((((grid - half) / (0.8 * half)) ** 2).sum(0) < 1).astype(np.float32)
    volume = brain * (0.5 + 0.02 * rng.standard_normal(brain.shape).astype(np.float32))
    for c in centres:
        inside = ((grid - np.array(c)[:, None, None, None]) ** 2).sum(0) <= radius**2
        volume[inside & (brain > 0)] = 1.0
    return volume


def test_lesion_count_counts_separate_bright_regions_and_ignores_specks() -> None:
    assert measures.lesion_count(_brain_with_lesions([], 2.0)) == 0
    assert measures.lesion_count(_brain_with_lesions([(24, 24, 24)], 2.0)) == 1
    two = _brain_with_lesions([(16, 24, 24), (32, 40, 24)], 2.0)
    assert measures.lesion_count(two[None]) == 2  # [1, D, H, W] as the cache holds it
    speck = _brain_with_lesions([(24, 24, 24)], 0.5)  # one voxel: noise, not a lesion
    assert measures.lesion_count(speck) == 0
    assert measures.lesion_count(np.zeros((48, 64, 48), np.float32)) == 0


def test_lesion_share_is_the_share_of_volumes_with_one() -> None:
    with_one = _brain_with_lesions([(24, 24, 24)], 2.0)
    without = _brain_with_lesions([], 2.0)
    stack = np.stack([with_one, without, without, with_one])[:, None]
    assert measures.lesion_share(stack) == 0.5
    assert measures.lesion_share(stack[:0]) == 0.0
