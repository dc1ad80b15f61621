"""Component: fetch or generate the raw dataset (Decathlon Task01 layout)."""

# No "from __future__ import annotations": KFP reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Dataset, Output

from components.base import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def download(
    source: str,
    preset: str,
    overrides: list,
    subjects: int,
    seed: int,
    raw_data: Output[Dataset],
):
    """Download ``source`` (demo | msd | http(s):// | s3:// | a directory) into ``raw_data``."""
    from ldm_core.stages import download_stage

    raw_data.metadata.update(
        download_stage(source, raw_data.path, preset, overrides, subjects, seed)
    )
