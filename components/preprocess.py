"""Component: resample, crop/pad and intensity-scale the raw data into the training cache."""

# No "from __future__ import annotations": KFP reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.base import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def preprocess(
    raw_data: Input[Dataset],
    preset: str,
    overrides: list,
    cache: Output[Dataset],
):
    """Write the preprocessed cache (manifest.json + float16 volumes) to ``cache``."""
    from ldm_core.stages import preprocess_stage

    cache.metadata.update(preprocess_stage(raw_data.path, cache.path, preset, overrides))
