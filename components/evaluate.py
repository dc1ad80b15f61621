"""Component: score generated samples against real data; metrics, report and quality gate."""

# No "from __future__ import annotations": KFP reads the real annotation objects.
from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.base import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(
    bundle: Input[Model],
    cache: Input[Dataset],
    autoencoder: Input[Model],
    diffusion: Input[Model],
    preset: str,
    overrides: list,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
) -> bool:
    """``evaluation`` receives metrics.json, figures and samples; ``metrics`` every scalar
    (for the Kubeflow UI); ``report`` one HTML page with the figures embedded (the training
    run dirs are inputs only for their loss curves).

    Returns the gate verdict, the output the pipeline branches on. It is a single bool
    because kfp.local 2.17 cannot resolve a NamedTuple field in a ``dsl.If`` condition;
    the reasons go to ``evaluation``'s metadata and metrics.json.
    """
    from ldm_core.stages import evaluate_stage

    result = evaluate_stage(
        bundle.path,
        cache.path,
        evaluation.path,
        preset,
        overrides,
        training_runs=[autoencoder.path, diffusion.path],
        report_path=report.path,
        metrics_path=metrics.path,
    )
    for name, value in result["metrics"].items():
        metrics.log_metric(name, value)
    evaluation.metadata.update(gate_passed=result["gate_passed"], gate_reason=result["gate_reason"])
    return result["gate_passed"]
