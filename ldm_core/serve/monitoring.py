"""Output monitoring: a few numbers per generated volume, exported as Prometheus histograms
next to the training set's values, so an alert can say "served outputs drift from what the
model was trained on" (``manifests/components/output-drift-alert``).

Why these three:

- ``mean_intensity``: the volume's mean on the [0, 1] scale preprocessing produces; a model
  drifting to blank or saturated volumes moves it first.
- ``foreground_fraction``: share of voxels above :data:`FOREGROUND_THRESHOLD` (the brain);
  shrunk, swollen or missing anatomy moves it.
- ``detail``: mean absolute difference between neighbouring voxels along each axis; blur
  lowers it and noise raises it while the other two may hold still.

The reference values come from ``bundle.json``'s optional ``reference`` dict (the same
:func:`summarise` over the training volumes, stored by ``ldm bundle``). A bundle without one
exports no reference series, so the drift rule has nothing to compare with and stays quiet;
the server logs that once at load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_core.serve.metrics import OUTPUT_REFERENCE, OUTPUT_SUMMARY

FOREGROUND_THRESHOLD = 0.1
"""The brain/background rule of ``ldm_core.evaluate.MASK_THRESHOLD``, so served outputs
and the quality gate call the same voxels brain (a test holds the two equal)."""
MEASURES = ("mean_intensity", "foreground_fraction", "detail")


def summarise(volume: np.ndarray) -> dict[str, float]:
    """The :data:`MEASURES` of one volume (``[1, D, H, W]`` or ``[D, H, W]``, [0, 1] scale)."""
    v = np.asarray(volume, dtype=np.float64).reshape(np.shape(volume)[-3:])
    diffs = [np.abs(np.diff(v, axis=a)).mean() for a in range(3)]
    return {
        "mean_intensity": float(v.mean()),
        "foreground_fraction": float((v > FOREGROUND_THRESHOLD).mean()),
        "detail": float(np.mean(diffs)),
    }


def observe(volumes: np.ndarray) -> None:
    """Record the summary of each of ``volumes`` (``[N, 1, D, H, W]``) in the histograms."""
    for volume in volumes:
        for measure, value in summarise(volume).items():
            OUTPUT_SUMMARY.labels(measure).observe(value)


def read_reference(bundle_info: Mapping[str, Any], source: str) -> dict[str, float]:
    """The training reference in ``bundle.json`` (``{}`` if the bundle has none).

    Raises:
        ValueError: ``reference`` is not a dict of the :data:`MEASURES` to finite numbers.
    """
    reference = bundle_info.get("reference")
    if reference is None:
        return {}
    if not isinstance(reference, Mapping):
        raise ValueError(f"{source}: reference: expected a dict of {', '.join(MEASURES)}")
    out: dict[str, float] = {}
    for measure in MEASURES:
        value = reference.get(measure)
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            raise ValueError(
                f"{source}: reference.{measure}: expected a finite number, got {value!r}"
            )
        out[measure] = float(value)
    return out


def export_reference(reference: Mapping[str, float]) -> None:
    """Publish the training reference as ``ldm_output_reference{measure=...}`` gauges."""
    for measure, value in reference.items():
        OUTPUT_REFERENCE.labels(measure).set(value)
