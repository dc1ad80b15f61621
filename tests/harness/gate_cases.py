"""What a quality gate must refuse, and what it must let through, built from demo cohorts.

``demo_cohorts(shape)`` gives two disjoint cohorts of the demo population, preprocessed as
the pipeline does: the ``real`` set a model is scored against (its training data) and
``unseen`` subjects of the same population. The unseen subjects are what an ideal model
generates: new brains, not copies, with the real set's anatomy, contrast and variety.

``NEGATIVES`` builds, from those, each failure a generative model of brains is known for:
mode collapse, the mean image, a featureless blob, textures without anatomy, blur, memorised
training subjects, noise, blank and misplaced volumes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from ldm_core.data.preprocess import preprocess
from ldm_core.evaluate import load_real
from ldm_core.metrics import MASK_THRESHOLD, reference_mask
from tests.harness.data import demo_config, demo_raw_dir

NUM = 6
"""Generated volumes per case (the evaluation's default is 8; 6 keeps the tests quick)."""
REAL_SUBJECTS = 8


def demo_cohorts(
    shape: tuple[int, int, int] = (32, 32, 32), real: int = REAL_SUBJECTS, unseen: int = NUM
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(real, unseen)``: ``real`` demo subjects (seed 0) and ``unseen`` others (seed 1),
    each ``[N, 1, *shape]`` on [0, 1] as the cache holds them."""
    sets = []
    with tempfile.TemporaryDirectory(prefix="ldm-gate-") as tmp:
        for seed, n in ((0, real), (1, unseen)):
            cache = preprocess(
                demo_raw_dir(n, seed=seed), Path(tmp) / f"cache{seed}", demo_config(shape), False
            )
            sets.append(load_real(cache, shape, limit=n)[0])
    return sets[0], sets[1]


def _collapse(real: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    """One new, plausible subject generated every time (mode collapse)."""
    return unseen[:1].repeat(NUM, 1, 1, 1, 1)


def _mean_image(real: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    """The real set's mean image every time: the right shape and contrast on average."""
    return real.mean(0, keepdim=True).repeat(NUM, 1, 1, 1, 1)


def _uniform_blob(real: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    """The real majority mask filled with the real brain's mean intensity: no anatomy."""
    mask = reference_mask(real)
    level = float(real[real > MASK_THRESHOLD].mean())
    return (mask.float() * level)[None, None].repeat(NUM, 1, 1, 1, 1)


def _shuffled(real: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    """Unseen subjects with their brain voxels permuted: the right histogram and brain
    outline, a texture without anatomy."""
    g = torch.Generator().manual_seed(0)
    out = unseen.clone()
    for volume in out:
        brain = volume > MASK_THRESHOLD
        values = volume[brain]
        volume[brain] = values[torch.randperm(values.numel(), generator=g)]
    return out


def _blurred(real: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    """Unseen subjects under a sigma-2 voxel Gaussian blur: the blobs of an undertrained
    model or a blurry autoencoder."""
    return torch.from_numpy(
        np.stack([gaussian_filter(v.numpy(), sigma=(0, 2, 2, 2)) for v in unseen])
    )


def smooth_interior(volumes: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """``volumes`` with a sharp brain outline but their inside smoothed (``sigma`` voxels,
    normalised within the brain): no ventricles, no cortical rim, as the first demo model's
    autoencoder drew them. Not in :data:`NEGATIVES`: at their 32^3 the outline
    dominates the detail measure (0.92), so it is a case for the demo's own size."""
    out = []
    for v in volumes.numpy()[:, 0]:
        brain = v > MASK_THRESHOLD
        inside = gaussian_filter(v * brain, sigma) / np.maximum(
            gaussian_filter(brain.astype(np.float32), sigma), 1e-3
        )
        out.append(np.where(brain, inside, 0.0)[None])
    return torch.from_numpy(np.stack(out).astype(np.float32))


def _copies(real: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    """Exact copies of training subjects (memorisation)."""
    return real[:NUM].clone()


def _noise(real: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    return torch.rand((NUM, *real.shape[1:]), generator=torch.Generator().manual_seed(1))


def _blank(real: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    return torch.zeros((NUM, *real.shape[1:]))


def _shifted(real: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    """Unseen subjects moved by a quarter of the field of view: misplaced brains."""
    return torch.roll(unseen, real.shape[2] // 4, dims=2)


NEGATIVES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "collapse": _collapse,
    "mean_image": _mean_image,
    "uniform_blob": _uniform_blob,
    "shuffled": _shuffled,
    "blurred": _blurred,
    "copies": _copies,
    "noise": _noise,
    "blank": _blank,
    "shifted": _shifted,
}
