"""Component: resolve and validate the run's config; size the steps that follow."""

# No "from __future__ import annotations": KFP reads the real annotation objects.
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.base import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def configure(
    preset: str,
    overrides: list,
    image: str,
    pvc_name: str,
    eval_gpus: int,
    deployment_mode: str,
    min_replicas: int,
    max_replicas: int,
    config: Output[Artifact],
) -> NamedTuple(
    "Configured",
    [("overrides", list), ("evaluate_cpu", str), ("evaluate_memory", str), ("evaluate_gpus", int)],
):
    """Fold the pipeline parameters into ``overrides`` (the list every later step resolves
    its config with), fail on an invalid config before any work, write the resolved
    ``config.yaml`` to ``config``, and return the evaluate pod's size."""
    from ldm_core.stages import PipelineParameters, configure_stage

    return configure_stage(
        preset,
        overrides,
        PipelineParameters(image, pvc_name, eval_gpus, deployment_mode, min_replicas, max_replicas),
        config.path,
    )
