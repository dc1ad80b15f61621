"""Component: score generated samples against real data; metrics, report and quality gate."""

# No "from __future__ import annotations": KFP reads the real annotation objects.
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.base import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(
    bundle: Input[Model],
    cache: Input[Dataset],
    preset: str,
    overrides: list,
    num_samples: int,
    steps: int,
    gate_min_ms_ssim_ratio: float,
    gate_max_mmd: float,
    gate_min_mask_dice: float,
    gate_max_hist_distance: float,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
) -> NamedTuple("EvaluateOutputs", [("gate_passed", bool), ("gate_reason", str)]):
    """``evaluation`` receives metrics.json, figures and samples; ``metrics`` every scalar
    (for the Kubeflow UI); ``report`` one HTML page with the figures embedded. The gate
    verdict is an output parameter so that the pipeline can branch on it."""
    from ldm_core.stages import GateThresholds, evaluate_stage

    result = evaluate_stage(
        bundle.path, cache.path, evaluation.path, preset, overrides, num_samples, steps,
        GateThresholds(gate_min_ms_ssim_ratio, gate_max_mmd, gate_min_mask_dice, gate_max_hist_distance),
        report_path=report.path,
    )
    for name, value in result["metrics"].items():
        metrics.log_metric(name, value)
    return (result["gate_passed"], result["gate_reason"])
