"""Output monitoring: a few numbers per generated volume, exported as Prometheus histograms
next to the training set's values, so an alert can say "served outputs drift from what the
model was trained on" (``manifests/components/output-drift-alert``).

The measures are :func:`ldm_core.quality.summarise`'s (mean intensity, foreground fraction
and the quality gate's detail measure), defined there once so that the monitor, the gate and
the bundle's reference agree.

The reference values come from ``bundle.json``'s optional ``reference`` dict (the mean of
the same :func:`summarise` over the training volumes, stored by ``ldm bundle --data``). A bundle without one
exports no reference series, so the drift rule has nothing to compare with and stays quiet;
the server logs that once at load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_core.measures import FOREGROUND_THRESHOLD, MEASURES, summarise
from ldm_core.serve.metrics import OUTPUT_REFERENCE, OUTPUT_SUMMARY

__all__ = [
    "FOREGROUND_THRESHOLD",
    "MEASURES",
    "export_reference",
    "observe",
    "read_reference",
    "summarise",
]


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
