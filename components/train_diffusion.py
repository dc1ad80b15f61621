"""Component: train the latent diffusion UNet, then pack the model bundle."""

# No "from __future__ import annotations": KFP reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.base import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train_diffusion(
    cache: Input[Dataset],
    autoencoder: Input[Model],
    preset: str,
    overrides: list,
    backend: str,
    local_workdir: str,
    diffusion: Output[Model],
    bundle: Output[Model],
):
    """Train on the cached latents; ``diffusion`` receives the run dir, ``bundle`` the
    servable model bundle (config + autoencoder + EMA UNet + scale factor). ``local_workdir``:
    where the local backend keeps training runs by key (empty: in ``diffusion``)."""
    from ldm_core.stages import train_diffusion_stage

    diffusion.metadata.update(
        train_diffusion_stage(
            cache.path,
            autoencoder.path,
            diffusion.path,
            bundle.path,
            preset,
            overrides,
            backend,
            local_workdir,
        )
    )
