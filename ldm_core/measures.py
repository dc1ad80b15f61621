"""Per-volume image measures shared by evaluation and serving.

One definition of "how much anatomical detail does this volume carry" and of the per-volume
summary that the served-output monitor exports, so the evaluation's detail ratio
(``ldm_core.metrics``, which the quality gate checks), the bundle's training reference
(``ldm_core.bundle``) and the monitor (``ldm_core.serve.monitoring``) measure the same thing.

The detail measure: the volume scaled to [0, 1] by its own minimum and maximum (so it does
not depend on the intensity scale), its foreground taken by Otsu's threshold (so the flat
background does not dilute it), then the mean 3D gradient magnitude, by central
differences, over that foreground. Smooth brain-shaped blobs score low (their interior is
flat); ventricles, the cortical rim and grey/white contrast raise it; noise raises it too,
which is why the gate reads it beside the distribution metrics rather than alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

OTSU_BINS = 256
FOREGROUND_THRESHOLD = 0.1
"""Brain/background rule on the cache's [0, 1] intensity scale: preprocessing maps the
background to 0 and tissue well above 0.1. The gate's masks and the monitor's foreground
fraction both use it."""
LESION_SMOOTHING = 0.7
LESION_OVER_MEDIAN = 1.4
LESION_MIN_VOXELS = 4
"""A lesion, in a FLAIR volume at the 4 mm of the CPU presets: a connected region at least
:data:`LESION_MIN_VOXELS` voxels large that, after a Gaussian smoothing of
:data:`LESION_SMOOTHING` voxels (against the Rician noise), is brighter than
:data:`LESION_OVER_MEDIAN` times the brain's median (oedema is about twice as bright as grey
and white matter on FLAIR). Checked on 16 demo subjects against their label maps (connected
regions of the labels at full resolution): the count matches in 15, the other's single
lesion is too faint at 4 mm, and their mean image has none."""
INTERIOR_EROSION = 2
"""Voxels taken off the brain's filled foreground before its median is read as the tissue's
brightness: the cortical rim's partial-volume voxels are dark."""
VENTRICLE_DEPTH_MM = 16.0
VENTRICLE_OVER_MEDIAN = 0.6
"""The ventricle region of an aligned cohort: the voxels of its mean volume more than
:data:`VENTRICLE_DEPTH_MM` inside the brain (off the cortical sulci, which are dark too)
and darker than :data:`VENTRICLE_OVER_MEDIAN` times the median of its
:func:`brain_interior`. On the demo cohort's FLAIR at 4 mm (half of 32 subjects' mean):
about 90 voxels, the bodies of the lateral ventricles."""
MEASURES = ("mean_intensity", "foreground_fraction", "detail")
"""What :func:`summarise` reports for one volume (the served-output monitor's measures)."""


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance
    of a ``bins``-bin histogram. A constant input returns its value."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(flat, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(counts * centres)
    mean_low = mass_low / np.maximum(weight_low, 1)
    mean_high = (mass_low[-1] - mass_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def detail(volume: np.ndarray) -> float:
    """Mean gradient magnitude over the Otsu foreground of ``volume`` scaled to [0, 1].

    ``volume`` is ``[D, H, W]`` or anything whose last three axes are spatial with a single
    volume before them (``[1, D, H, W]``). A constant volume has no detail: 0.
    """
    v = np.asarray(volume, dtype=np.float64).reshape(np.shape(volume)[-3:])
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return 0.0
    v = (v - lo) / (hi - lo)
    grads = np.gradient(v)  # central differences inside, one-sided at the borders
    magnitude = np.sqrt(sum(g * g for g in grads))
    mask = v > otsu_threshold(v)
    if not mask.any():
        return 0.0
    return float(magnitude[mask].mean())


def detail_ratio(generated: np.ndarray, real: np.ndarray) -> float:
    """Mean :func:`detail` of ``generated`` volumes over the mean of ``real`` ones (both
    ``[N, 1, D, H, W]`` or ``[N, D, H, W]``): 1 = as detailed as the real cohort."""
    gen = float(np.mean([detail(v) for v in np.asarray(generated)]))
    ref = float(np.mean([detail(v) for v in np.asarray(real)]))
    return gen / max(ref, 1e-12)


def lesion_count(volume: np.ndarray) -> int:
    """Bright lesions in one FLAIR volume ``[..., D, H, W]`` on the cache's [0, 1] scale; see
    :data:`LESION_MIN_VOXELS` for the rule and its calibration. A blank volume has none."""
    v = np.asarray(volume, dtype=np.float32).reshape(np.shape(volume)[-3:])
    brain = v > FOREGROUND_THRESHOLD
    if not brain.any():
        return 0
    smoothed = ndimage.gaussian_filter(v, LESION_SMOOTHING)
    bright = (smoothed > LESION_OVER_MEDIAN * np.median(v[brain])) & brain
    labels, n = ndimage.label(bright)
    if n == 0:
        return 0
    sizes = ndimage.sum_labels(np.ones_like(v), labels, range(1, n + 1))
    return int((sizes >= LESION_MIN_VOXELS).sum())


def lesion_share(volumes: np.ndarray) -> float:
    """Share of ``volumes`` (``[N, 1, D, H, W]`` or ``[N, D, H, W]``) with at least one
    :func:`lesion_count`; 0 for none."""
    counts = [lesion_count(v) for v in np.asarray(volumes)]
    return float(np.mean([c > 0 for c in counts])) if counts else 0.0


def brain_interior(volume: np.ndarray) -> np.ndarray:
    """The foreground of ``volume`` (above :data:`FOREGROUND_THRESHOLD`), holes filled, eroded
    by :data:`INTERIOR_EROSION` voxels: the tissue whose median is the reference brightness."""
    v = np.asarray(volume).reshape(np.shape(volume)[-3:])
    filled = ndimage.binary_fill_holes(v > FOREGROUND_THRESHOLD)
    return ndimage.binary_erosion(filled, iterations=INTERIOR_EROSION)


def ventricle_region(volumes: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Where the cohort ``volumes`` (``[N, 1, D, H, W]`` or ``[N, D, H, W]``, [0, 1] scale,
    voxels of ``spacing`` mm) agree on dark fluid deep inside the brain: see
    :data:`VENTRICLE_OVER_MEDIAN`. It needs the cohort aligned to one template, as the demo
    cohort and Task01 are; on an unaligned one the mean blurs the ventricles away and the
    region comes out empty."""
    v = np.asarray(volumes, dtype=np.float64)
    mean = v.reshape((-1, *v.shape[-3:])).mean(axis=0)
    filled = ndimage.binary_fill_holes(mean > FOREGROUND_THRESHOLD)
    inside = brain_interior(mean)
    if not inside.any():
        return inside
    deep = ndimage.distance_transform_edt(filled, sampling=tuple(spacing)) > VENTRICLE_DEPTH_MM
    return deep & (mean < VENTRICLE_OVER_MEDIAN * np.median(mean[inside]))


def ventricle_contrast(volume: np.ndarray, region: np.ndarray) -> float:
    """How much darker than its own brain ``volume`` is in the cohort's ``region``
    (:func:`ventricle_region`): 1 minus the region's median over the median of the volume's
    :func:`brain_interior` (medians, so that a lesion drawn across the region does not
    outweigh it). Demo FLAIR subjects score about 0.4; a volume whose ventricles are filled
    with tissue scores about 0, a blank one 0."""
    v = np.asarray(volume, dtype=np.float64).reshape(np.shape(volume)[-3:])
    inside = brain_interior(v)
    if not inside.any() or not region.any():
        return 0.0
    reference = float(np.median(v[inside]))
    if reference <= 0:
        return 0.0
    return 1.0 - float(np.median(v[region])) / reference


def summarise(volume: np.ndarray) -> dict[str, float]:
    """The :data:`MEASURES` of one volume (``[1, D, H, W]`` or ``[D, H, W]``, [0, 1] scale).

    ``mean_intensity`` moves first when a model drifts to blank or saturated volumes,
    ``foreground_fraction`` (share of voxels above :data:`FOREGROUND_THRESHOLD`) when the
    anatomy shrinks, swells or vanishes, and :func:`detail` when outputs blur or turn noisy
    while the other two hold still.
    """
    v = np.asarray(volume, dtype=np.float64).reshape(np.shape(volume)[-3:])
    return {
        "mean_intensity": float(v.mean()),
        "foreground_fraction": float((v > FOREGROUND_THRESHOLD).mean()),
        "detail": detail(v),
    }


def reference(volumes: Iterable[np.ndarray]) -> dict[str, float]:
    """Mean :func:`summarise` over ``volumes``: the training set's values that served outputs
    are compared with (``bundle.json``'s ``reference``).

    Raises:
        ValueError: ``volumes`` is empty.
    """
    rows = [summarise(v) for v in volumes]
    if not rows:
        raise ValueError("reference: no volumes to summarise")
    return {m: float(np.mean([r[m] for r in rows])) for m in MEASURES}
