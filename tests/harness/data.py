"""Test data built quickly: a demo cohort and its preprocessed cache, synthetic caches of
blobs, and finished-looking autoencoder runs and bundles with untrained weights.

``make_demo_cache(tmp_path, n_subjects=4, shape=(32, 32, 32))`` is what other tests use to
get a cache (``manifest.json`` + ``volumes/``) without caring how it is made. The raw
cohort is generated once per test process and per size, then only preprocessed per call.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ldm_core import bundle
from ldm_core.config import Config
from ldm_core.data.download import download
from ldm_core.data.preprocess import data_settings, preprocess
from ldm_core.data.preprocessed import write_manifest
from ldm_core.models import build_autoencoder, build_unet
from ldm_core.train import checkpoint as ckpt
from tests.harness.configs import tiny_config

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


BLOB_SHAPE = (32, 32, 32)


def make_cache(
    root: Path, n_train: int = 3, n_val: int = 1, seed: int = 0, nan: bool = False
) -> Path:
    """A preprocessed cache of smooth, head-like blobs (ellipsoids with a soft texture)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "volumes").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in BLOB_SHAPE], indexing="ij"))
    entries = []
    for i in range(n_train + n_val):
        radii = rng.uniform(0.55, 0.8, 3)[:, None, None, None]
        centre = rng.uniform(-0.1, 0.1, 3)[:, None, None, None]
        dist = (((grid - centre) / radii) ** 2).sum(0)
        vol = np.clip(1.3 - dist, 0, 1) * (0.7 + 0.3 * np.cos(3 * grid[0] + i))
        if nan:
            vol[0, 0, 0] = np.nan
        np.save(root / "volumes" / f"s{i}.npy", vol[None].astype(np.float16))
        entries.append(
            {
                "id": f"s{i}",
                "source": f"s{i}.nii.gz",
                "sha256": f"{seed}-{i}",
                "split": "train" if i < n_train else "val",
                "file": f"volumes/s{i}.npy",
                "status": "ok",
            }
        )
    write_manifest(
        root,
        {
            "format": 1,
            "shape": list(BLOB_SHAPE),
            "spacing": [6.0, 6.0, 6.0],
            "affine": [[-6.0, 0, 0, 90.0], [0, 6.0, 0, -120.0], [0, 0, 6.0, -70.0], [0, 0, 0, 1]],
            "subjects": entries,
            "dataset_hash": f"blobs-{seed}-{n_train}-{n_val}-{nan}",
        },
    )
    return root


def tiny_cache(root: Path, n: int = 4) -> Path:
    """A cache of spheres at the tiny config's geometry (last subject in val)."""
    cfg = tiny_config()
    rng = np.random.default_rng(0)
    (root / "volumes").mkdir(parents=True)
    affine = np.diag([*cfg.data.spacing, 1.0]).tolist()
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in cfg.data.shape], indexing="ij"))
    subjects = []
    for i in range(n):
        radius = 0.6 + 0.1 * rng.random()
        vol = (np.sqrt((grid**2).sum(0)) < radius).astype(np.float16)[None] * np.float16(0.8)
        np.save(root / "volumes" / f"s{i}.npy", vol)
        subjects.append(
            {
                "id": f"s{i}",
                "source": f"s{i}.nii.gz",
                "sha256": f"{i:064d}",
                "split": "val" if i == n - 1 else "train",
                "file": f"volumes/s{i}.npy",
                "status": "ok",
                "reason": "",
                "affine": affine,
            }
        )
    write_manifest(
        root,
        {
            "format": 1,
            "layout": "folder",
            "channel_index": 0,
            "channel": "FLAIR",
            "data": data_settings(cfg.data),
            "shape": list(cfg.data.shape),
            "spacing": list(cfg.data.spacing),
            "affine": affine,
            "dataset_hash": "tiny-" + "0" * 59,
            "subjects": subjects,
        },
    )
    return root


def fake_autoencoder_run(out: Path, cfg, seed: int = 0, scale_factor: float = 1.7) -> Path:
    """A finished autoencoder run directory with untrained weights (what train-diffusion reads)."""
    torch.manual_seed(seed)
    model = build_autoencoder(cfg)
    ckpt.atomic_save(
        {
            "state_dict": model.state_dict(),
            "scale_factor": scale_factor,
            "config": cfg.to_dict(),
            "steps": 1,
        },
        out / "autoencoder.pt",
    )
    return out


def random_bundle(
    path: str | Path,
    cfg: Config,
    seed: int = 0,
    scale_factor: float = 1.0,
    latent_range: list[list[float]] | None = None,
    latent_moments: list[list[float]] | None = None,
    latent_prior: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A bundle with untrained weights and the config's geometry: what serving and sampling
    tests need when the weights' quality does not matter."""
    torch.manual_seed(seed)
    autoencoder = build_autoencoder(cfg, use_checkpoint=False)
    unet = build_unet(cfg)
    affine = np.diag([*cfg.data.spacing, 1.0])
    return bundle.save(
        path,
        cfg,
        autoencoder.state_dict(),
        unet.state_dict(),
        scale_factor,
        affine,
        latent_range=latent_range,
        latent_moments=latent_moments,
        latent_prior=latent_prior,
    )
