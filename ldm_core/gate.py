"""The quality gate: deploy a model or not, from its evaluation metrics.

Each check compares one metric of :mod:`ldm_core.metrics` with one threshold of the
``evaluation`` config section; a model is deployed only when every check holds. The
pipeline runs the deploy step only on a pass.
"""

from __future__ import annotations

import math

from ldm_core.config import EvaluationConfig


def gate(metrics: dict[str, float], ecfg: EvaluationConfig) -> tuple[bool, list[str]]:
    """Deploy or not: every threshold of ``ecfg`` checked, one reason per failing check.

    A metric that is missing or not a finite number fails its check (a broken evaluation
    must never let a model through).
    """
    checks = [
        ("ms_ssim_ratio", ">=", "gate_min_ms_ssim_ratio"),
        ("ms_ssim_ratio", "<=", "gate_max_ms_ssim_ratio"),
        ("mmd", "<=", "gate_max_mmd"),
        ("mask_dice", ">=", "gate_min_mask_dice"),
        ("hist_distance", "<=", "gate_max_hist_distance"),
        ("detail_ratio", ">=", "gate_min_detail_ratio"),
        ("detail_ratio", "<=", "gate_max_detail_ratio"),
        ("nn_correlation", "<=", "gate_max_nn_correlation"),
    ]
    reasons = []
    for key, op, field in checks:
        threshold = getattr(ecfg, field)
        field_name = f"evaluation.{field}"
        value = metrics.get(key)
        if value is None or not math.isfinite(value):
            reasons.append(
                f"{key} is {value!r}, not a number; cannot check {field_name}={threshold}"
            )
            continue
        ok = value >= threshold if op == ">=" else value <= threshold
        if not ok:
            need = "at least" if op == ">=" else "at most"
            reasons.append(f"{key}={value:.4g} but {field_name} requires {need} {threshold:g}")
    return not reasons, reasons
