"""Component: serve the model bundle and smoke-test it (local server or InferenceService)."""

# No "from __future__ import annotations": KFP reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.base import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def deploy(
    bundle: Input[Model],
    evaluation: Input[Artifact],
    preset: str,
    overrides: list,
    backend: str,
    storage_prefix: str,
    smoke_steps: int,
    serving_dir: str,
    run_id: str,
    run_name: str,
    deployment: Output[Artifact],
) -> str:
    """Roll the bundle out, run one inference through it, and record where it is served
    (``deployment.json`` in ``deployment``); returns the endpoint URL. ``serving_dir``: where
    a local model server keeps its pid and log (empty: in ``deployment``). ``evaluation``
    (the gate's evaluation) and the KFP run (``run_id``, ``run_name``: placeholders the
    backend fills) complete the lineage the deployment records."""
    from ldm_core.stages import deploy_stage

    result = deploy_stage(
        bundle.path,
        deployment.path,
        preset,
        overrides,
        backend,
        storage_prefix,
        smoke_steps,
        serving_dir,
        evaluation.path,
        {"run_id": run_id, "run_name": run_name, "pipeline_name": "brain-ldm"},
    )
    deployment.metadata.update(
        {k: v for k, v in result.items() if isinstance(v, str | int | float | bool)}
    )
    return str(result["endpoint"])
