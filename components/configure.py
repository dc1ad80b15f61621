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
    mount_path: str,
    image: str,
    step_image: str,
    pvc_name: str,
    nproc: int,
    nnodes: int,
    eval_samples: int,
    eval_steps: int,
    eval_gpus: int,
    gate_min_ms_ssim_ratio: float,
    gate_max_mmd: float,
    gate_min_mask_dice: float,
    gate_max_hist_distance: float,
    deployment_mode: str,
    min_replicas: int,
    max_replicas: int,
    config: Output[Artifact],
) -> NamedTuple(
    "Configured",
    [
        ("overrides", list),
        ("data_overrides", list),
        ("training_overrides", list),
        ("evaluate_cpu", str),
        ("evaluate_memory", str),
        ("evaluate_gpus", str),
    ],
):
    """Fold the pipeline parameters into ``overrides`` (the list later steps resolve their
    config with; the data and training steps get the part of it their sections read), fail
    on an invalid config before any work, write the resolved ``config.yaml`` to ``config``,
    and return the evaluate pod's size."""
    from ldm_core.stages import PIPELINE_PARAMETERS, configure_stage

    given = locals()  # the parameters above, forwarded by the names configure_stage knows
    params = {name: given[name] for name in PIPELINE_PARAMETERS}
    return configure_stage(preset, overrides, config.path, mount_path=mount_path, **params)
