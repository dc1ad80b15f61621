"""Component: train the AutoencoderKL (torchrun locally, a PyTorchJob on a cluster)."""

# No "from __future__ import annotations": KFP reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.base import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train_autoencoder(
    cache: Input[Dataset],
    preset: str,
    overrides: list,
    backend: str,
    local_workdir: str,
    autoencoder: Output[Model],
):
    """Train on ``cache``; ``autoencoder`` receives the run dir (weights + scale factor).
    ``local_workdir``: where the local backend keeps training runs by key (empty: in
    ``autoencoder``)."""
    from ldm_core.stages import train_autoencoder_stage

    autoencoder.metadata.update(
        train_autoencoder_stage(
            cache.path,
            autoencoder.path,
            preset,
            overrides,
            backend,
            local_workdir,
        )
    )
