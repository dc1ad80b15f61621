"""Test helpers that build real data quickly: a demo cohort and its preprocessed cache.

``make_demo_cache(tmp_path, n_subjects=4, shape=(32, 32, 32))`` is what other tests use to
get a cache (``manifest.json`` + ``volumes/``) without caring how it is made. The raw
cohort is generated once per test process and per size, then only preprocessed per call.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from ldm_core.config import Config
from ldm_core.data.download import download
from ldm_core.data.preprocess import preprocess

# Field of view of the 2 mm MNI152 grid the demo uses, in mm (99 x 117 x 95 voxels).
_DEMO_FOV_MM = (198.0, 234.0, 190.0)
_RAW: dict[tuple[int, int], Path] = {}


def demo_raw_dir(n_subjects: int = 4, seed: int = 0) -> Path:
    """A demo cohort in the Task01 layout, shared by every caller in this process: read only."""
    key = (n_subjects, seed)
    if key not in _RAW:
        root = Path(tempfile.mkdtemp(prefix="ldm-demo-"))
        atexit.register(shutil.rmtree, root, True)
        _RAW[key] = download("demo", root / "raw", Config(), subjects=n_subjects, seed=seed)
    return _RAW[key]


def demo_config(shape: tuple[int, int, int] = (32, 32, 32)) -> Config:
    """A config whose data section maps the whole demo brain onto ``shape`` voxels.

    Only ``cfg.data`` is set: the model sections keep their defaults and are not validated
    here, so any shape works for preprocessing.
    """
    cfg = Config()
    cfg.data.shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    spacing = max(fov / size for fov, size in zip(_DEMO_FOV_MM, shape))
    cfg.data.spacing = (spacing, spacing, spacing)
    return cfg


def make_demo_cache(
    tmp_path: Path, n_subjects: int = 4, shape: tuple[int, int, int] = (32, 32, 32)
) -> Path:
    """Preprocess a demo cohort of ``n_subjects`` into ``tmp_path/cache`` and return that dir."""
    return preprocess(
        demo_raw_dir(n_subjects), Path(tmp_path) / "cache", demo_config(shape), skip_bad=False
    )
