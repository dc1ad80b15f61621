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
