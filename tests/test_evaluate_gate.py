"""The quality gate's calibration, both sides measured on the demo population.

Unseen subjects of the population the model was trained on are what an ideal model
generates; they must pass with the default thresholds. Each failure a generative model of
brains is known for, built from the same subjects (``tests/harness/gate_cases.py``), must
fail; each threshold must be able to fail on its own, so removing any check fails a test.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from scipy.ndimage import gaussian_filter

from ldm_core.config import EvaluationConfig, load_config
from ldm_core.gate import gate
from ldm_core.measures import detail_ratio, lesion_share, ventricle_region
from ldm_core.metrics import (
    MASK_THRESHOLD,
    MIN_VENTRICLE_COHORT,
    compute_metrics,
    lesion_metrics,
    nearest_real_correlation,
    ventricle_metrics,
)
from tests.harness.gate_cases import NEGATIVES, NUM, demo_cohorts, smooth_interior

DEFAULTS = EvaluationConfig()

# (metric, direction, config field): every check the gate makes.
CHECKS = [
    ("ms_ssim_ratio", "min", "gate_min_ms_ssim_ratio"),
    ("ms_ssim_ratio", "max", "gate_max_ms_ssim_ratio"),
    ("mmd", "max", "gate_max_mmd"),
    ("mask_dice", "min", "gate_min_mask_dice"),
    ("hist_distance", "max", "gate_max_hist_distance"),
    ("detail_ratio", "min", "gate_min_detail_ratio"),
    ("detail_ratio", "max", "gate_max_detail_ratio"),
    ("nn_correlation", "max", "gate_max_nn_correlation"),
]


def blurred_noisy_copies(real: torch.Tensor) -> torch.Tensor:
    """Training subjects through a blurry round trip (sigma-1 smoothing plus noise): what a
    memorising model decodes."""
    g = torch.Generator().manual_seed(0)
    smoothed = torch.from_numpy(gaussian_filter(real[:NUM].numpy(), sigma=(0, 0, 1, 1, 1)))
    return (smoothed + 0.02 * torch.randn(smoothed.shape, generator=g)).clamp(0, 1)


def failed_fields(metrics: dict[str, float], ecfg: EvaluationConfig = DEFAULTS) -> set[str]:
    """The config fields named by the gate's reasons (each reason names one field)."""
    passed, reasons = gate(metrics, ecfg)
    fields = {r.split("evaluation.")[1].split(" ")[0] for r in reasons}
    assert passed == (not reasons) and len(fields) == len(reasons), reasons
    return fields


@pytest.fixture(scope="module")
def cohorts() -> tuple[torch.Tensor, torch.Tensor]:
    torch.set_num_threads(2)
    return demo_cohorts()


@pytest.fixture(scope="module")
def scored(cohorts) -> Callable[[str], dict[str, float]]:
    """The metrics of a case ("unseen" or a negative), computed once, when first asked for
    (so no single test pays for all of them)."""
    real, unseen = cohorts
    done: dict[str, dict[str, float]] = {}

    def score(case: str) -> dict[str, float]:
        if case not in done:
            volumes = unseen if case == "unseen" else NEGATIVES[case](real, unseen)
            done[case] = compute_metrics(real, volumes)
        return done[case]

    return score


def test_unseen_subjects_of_the_population_pass_with_margin(scored):
    """The ideal model passes, and not by a hair: with each threshold moved 10 % of the way
    towards the ideal value, it still passes (a trained model is noisier than this)."""
    ideal = scored("unseen")
    assert failed_fields(ideal) == set()
    perfect = {"ms_ssim_ratio": 1.0, "mmd": 0.0, "mask_dice": 1.0, "hist_distance": 0.0}
    perfect |= {"detail_ratio": 1.0, "nn_correlation": 0.0}
    tighter = EvaluationConfig(
        **{
            f: getattr(DEFAULTS, f) + 0.1 * (perfect[m] - getattr(DEFAULTS, f))
            for m, _, f in CHECKS
        }
    )
    assert failed_fields(ideal, tighter) == set()


# Which checks each negative fails with the default thresholds (measured on this cohort at
# 32^3; the values are in the report of the commit that calibrated them).
EXPECTED = {
    "collapse": {"gate_max_ms_ssim_ratio"},
    "mean_image": {"gate_max_ms_ssim_ratio"},
    "uniform_blob": {"gate_max_ms_ssim_ratio"},
    "shuffled": {"gate_max_detail_ratio"},
    "blurred": {"gate_max_ms_ssim_ratio", "gate_min_detail_ratio"},  # detail 0.68 (demo size 0.53)
    "copies": {"gate_max_nn_correlation"},
    "noise": {
        "gate_min_ms_ssim_ratio",
        "gate_max_mmd",
        "gate_min_mask_dice",
        "gate_max_detail_ratio",
    },
    "blank": {
        "gate_max_ms_ssim_ratio",
        "gate_max_mmd",
        "gate_min_mask_dice",
        "gate_max_hist_distance",
        "gate_min_detail_ratio",
    },
    "shifted": {"gate_max_mmd", "gate_min_mask_dice"},
}


@pytest.mark.parametrize("case", sorted(NEGATIVES))
def test_each_known_failure_fails_the_gate(scored, case):
    assert failed_fields(scored(case)) == EXPECTED[case]


@pytest.mark.parametrize("metric, direction, field", CHECKS, ids=[c[2] for c in CHECKS])
def test_each_threshold_fails_on_its_own(scored, metric, direction, field):
    """The ideal model's measured metrics with one value just past one threshold: exactly
    that check fails (so deleting any check, or flipping its direction, fails here)."""
    threshold = getattr(DEFAULTS, field)
    past = threshold - 0.01 if direction == "min" else threshold + 0.01
    assert failed_fields({**scored("unseen"), metric: past}) == {field}
    at = {**scored("unseen"), metric: threshold}
    assert failed_fields(at) == set()  # the limit itself is allowed


def test_distinct_subjects_stay_far_below_the_memorisation_threshold(cohorts, scored):
    """Distinct subjects' deviations from the mean image correlate well below the threshold
    (held-out real ones and unseen ones alike), a copy exactly 1, and a lightly degraded copy
    (sigma-1 smoothing plus noise) still above it. A copy that went through a blurry
    autoencoder is another matter: the first demo model's round trip scores 0.40-0.57."""
    real, unseen = cohorts
    assert scored("unseen")["nn_correlation_real"] < DEFAULTS.gate_max_nn_correlation - 0.1
    assert scored("unseen")["nn_correlation"] < DEFAULTS.gate_max_nn_correlation - 0.1
    assert scored("copies")["nn_correlation"] == pytest.approx(1.0, abs=1e-3)  # float32
    near_copies = blurred_noisy_copies(real)
    assert nearest_real_correlation(near_copies, real).min() > DEFAULTS.gate_max_nn_correlation
    assert math.isclose(float(nearest_real_correlation(real.mean(0, keepdim=True), real)), 0.0)


@pytest.fixture(scope="module")
def demo_size() -> tuple[torch.Tensor, torch.Tensor]:
    """``(real, unseen)`` at the CPU presets' own 48x64x48 (4 mm)."""
    torch.set_num_threads(2)
    return demo_cohorts((48, 64, 48))


def test_detail_threshold_refuses_brains_without_inner_anatomy_at_the_demo_size(demo_size):
    """gate_min_detail_ratio's calibration at the demo's own 48x64x48, both sides
    measured: unseen subjects pass with margin; the same subjects with a sharp outline but
    their inside smoothed (no ventricles, no cortical rim: what the first demo model drew;
    its samples measured 0.71) fail. At the 32^3 of the other cases the outline dominates
    the measure, so this case is scored here."""
    real, unseen = demo_size

    def ratio(volumes: torch.Tensor) -> float:
        return detail_ratio(volumes.numpy(), real.numpy())

    assert ratio(unseen) > DEFAULTS.gate_min_detail_ratio + 0.15
    assert ratio(smooth_interior(unseen)) < DEFAULTS.gate_min_detail_ratio - 0.02


QUALITY = load_config(preset="quality-cpu").evaluation
DEMO_SPACING = load_config(preset="quality-cpu").data.spacing


# What the quality preset's gate must refuse at its own size, and the checks that refuse it.
QUALITY_NEGATIVES = {
    "blurred": (NEGATIVES["blurred"], {"gate_min_detail_ratio", "gate_max_ms_ssim_ratio"}),
    "smooth_interior": (lambda real, unseen: smooth_interior(unseen), {"gate_min_detail_ratio"}),
    "uniform_blob": (NEGATIVES["uniform_blob"], {"gate_max_ms_ssim_ratio"}),
    "collapse": (NEGATIVES["collapse"], {"gate_max_ms_ssim_ratio"}),
    "copies": (NEGATIVES["copies"], {"gate_max_nn_correlation"}),
    "near_copies": (lambda real, unseen: blurred_noisy_copies(real), {"gate_max_nn_correlation"}),
}


@pytest.fixture(scope="module")
def quality_scored(demo_size) -> Callable[[str], dict[str, float]]:
    real, unseen = demo_size
    done: dict[str, dict[str, float]] = {}

    def score(case: str) -> dict[str, float]:
        if case not in done:
            volumes = unseen if case == "unseen" else QUALITY_NEGATIVES[case][0](real, unseen)
            done[case] = compute_metrics(real, volumes)
        return done[case]

    return score


def test_quality_preset_gate_passes_unseen_subjects_at_its_size(quality_scored):
    """quality-cpu's stricter thresholds (detail, mask Dice, memorisation) still let new
    subjects of the population through, with room: each of its three tightened thresholds
    stays short of what unseen subjects score by a margin a trained model needs."""
    ideal = quality_scored("unseen")
    assert failed_fields(ideal, QUALITY) == set()
    assert ideal["detail_ratio"] > QUALITY.gate_min_detail_ratio + 0.05
    assert ideal["mask_dice"] > QUALITY.gate_min_mask_dice + 0.03
    assert ideal["nn_correlation"] < QUALITY.gate_max_nn_correlation - 0.05
    assert ideal["nn_correlation_real"] < QUALITY.gate_max_nn_correlation - 0.05
    # tighter than tiny-cpu's where it matters, never looser
    assert QUALITY.gate_min_detail_ratio > DEFAULTS.gate_min_detail_ratio
    assert QUALITY.gate_max_nn_correlation < DEFAULTS.gate_max_nn_correlation
    assert QUALITY.gate_min_mask_dice >= DEFAULTS.gate_min_mask_dice


@pytest.mark.parametrize("case", sorted(QUALITY_NEGATIVES))
def test_quality_preset_gate_refuses_blur_blobs_collapse_and_copies(quality_scored, case):
    """Each failure fails quality-cpu's gate at 48x64x48, and the check meant to catch it is
    among the reasons."""
    assert QUALITY_NEGATIVES[case][1] <= failed_fields(quality_scored(case), QUALITY)


# --------------------------------------------------------------------------- lesions


def _lesions_smoothed_into_tissue(volumes: torch.Tensor) -> torch.Tensor:
    """``volumes`` with every voxel brighter than 1.2 x its brain's median brought down to
    that level: the lesions flattened into the surrounding tissue, the rest untouched (what
    the first autoencoders did to them; a plain sigma-2 blur keeps them at 4 mm)."""
    out = volumes.clone()
    for v in out:
        cap = 1.2 * float(v[v > MASK_THRESHOLD].median())
        v.clamp_(max=cap)
    return out


def test_lesions_are_found_in_demo_subjects_and_lost_when_flattened(demo_size):
    """The lesion report beside the gate, on demo FLAIR at 4 mm: (almost) every subject has
    a lesion (the generator paints one or two; the rule misses one faint one in 16), blurred
    ones still do, the mean image has none, and reconstructions that flatten them keep none,
    where a faithful one keeps all."""
    real, unseen = demo_size
    assert lesion_share(torch.cat([real, unseen]).numpy()) >= 12 / 14
    assert lesion_share(NEGATIVES["blurred"](real, unseen).numpy()) >= 0.5
    mean = real.mean(0, keepdim=True).repeat(NUM, 1, 1, 1, 1)
    found = lesion_metrics(
        real, mean, reconstructed=(unseen, _lesions_smoothed_into_tissue(unseen))
    )
    assert found["lesion_share_real"] == lesion_share(real.numpy())
    assert found["lesion_share_generated"] == 0.0
    assert found["recon_lesions_kept"] == 0.0
    assert lesion_metrics(real, unseen, reconstructed=(unseen, unseen))["recon_lesions_kept"] == 1.0


# --------------------------------------------------------------------------- ventricles


def _ventricles_filled(volumes: torch.Tensor, region) -> torch.Tensor:
    """``volumes`` with the ventricle region set to each brain's median: the tissue drawn
    where the fluid is, everything else untouched."""
    out = volumes.clone()
    mask = torch.from_numpy(region)
    for v in out:
        v[0][mask] = float(v[v > MASK_THRESHOLD].median())
    return out


@pytest.fixture(scope="module")
def ventricle_cohorts() -> tuple[torch.Tensor, torch.Tensor]:
    """``(real, unseen)`` at 48x64x48: the 16 real subjects the ventricle region needs at
    least (as many as the demo's cohort), 8 unseen ones."""
    torch.set_num_threads(2)
    return demo_cohorts((48, 64, 48), real=MIN_VENTRICLE_COHORT, unseen=8)


def test_ventricle_contrast_tells_drawn_ventricles_from_smoothed_or_filled_ones(
    ventricle_cohorts,
):
    """The ventricle report beside the gate, on demo FLAIR at 4 mm: the region half the
    real cohort draws lies deep in the brain and is a small part of it; unseen subjects are
    about as dark there as the other half; smoothing the inside of the brain (what blurred
    samples do) lightens it, filling the ventricles with tissue erases it, and
    reconstructions are scored against their own volumes."""
    real, unseen = ventricle_cohorts
    region = ventricle_region(real[::2].numpy(), DEMO_SPACING)
    brain = (real.mean(0)[0] > MASK_THRESHOLD).numpy()
    assert 20 < region.sum() < 0.02 * brain.sum()
    assert not (region & ~brain).any()

    found = ventricle_metrics(real, unseen, DEMO_SPACING, reconstructed=(unseen, unseen))
    assert found["ventricle_contrast_real"] > 0.25
    assert found["ventricle_contrast_generated"] > 0.75 * found["ventricle_contrast_real"]
    assert found["recon_ventricle_contrast_ratio"] == pytest.approx(1.0)

    smoothed = ventricle_metrics(real, smooth_interior(unseen), DEMO_SPACING)
    assert smoothed["ventricle_contrast_generated"] < 0.6 * found["ventricle_contrast_generated"]
    filled = _ventricles_filled(unseen, region)
    lost = ventricle_metrics(real, filled, DEMO_SPACING, reconstructed=(unseen, filled))
    assert abs(lost["ventricle_contrast_generated"]) < 0.05
    assert lost["recon_ventricle_contrast_ratio"] < 0.15
    # Fewer real volumes than that give no figure rather than a noisy one.
    assert ventricle_metrics(real[: MIN_VENTRICLE_COHORT - 1], unseen, DEMO_SPACING) == {}


def test_ventricle_metrics_are_absent_for_a_cohort_without_a_shared_dark_region():
    """An unaligned or fluid-bright cohort has no region its mean agrees on: the report
    leaves the ventricle metrics out rather than scoring an empty region as 0."""
    brain = torch.zeros((MIN_VENTRICLE_COHORT, 1, 16, 16, 16))
    brain[:, :, 3:13, 3:13, 3:13] = 0.6
    assert ventricle_metrics(brain, brain, DEMO_SPACING) == {}
