"""The MONAI transform chain that turns one raw NIfTI into one training volume.

load -> channel first -> one channel of a 4D file -> refuse NaN/inf -> RAS orientation -> resample to
``data.spacing`` -> centre crop/pad to ``data.shape`` -> percentile scaling to [0, 1].

Every step keeps the MetaTensor's affine current, so the affine that comes out is the true
voxel-to-world map of the output grid (orientation, spacing and the crop's shift of origin
included): samples saved with it overlay the training data in any viewer.

Intensity scaling uses the percentiles of the non-zero voxels only: brain MRI here is
skull-stripped, and the zero background (most of the volume) would otherwise pull the low
percentile to zero and make the scale depend on the head's size in the field of view.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    LoadImage,
    Orientation,
    ResizeWithPadOrCrop,
    Spacing,
    Transform,
)

from ldm_core.config import DataConfig


class SelectChannel(Transform):
    """Keep one channel of a channel-first image (``None``: the image must have one)."""

    def __init__(self, index: int | None) -> None:
        self.index = index

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        channels = img.shape[0]
        if self.index is None:
            if channels != 1:
                raise ValueError(
                    f"image has {channels} volumes; set data.channel to the index of the one to use"
                )
            return img
        if not 0 <= self.index < channels:
            raise ValueError(
                f"data.channel {self.index} is out of range: the image has {channels} volumes"
            )
        return img[self.index : self.index + 1]


class CheckFinite(Transform):
    """Refuse NaN or infinite voxels: resampling would smear them over their neighbours."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        bad = int((~torch.isfinite(img)).sum())
        if bad:
            raise ValueError(f"{bad} voxels are NaN or infinite")
        return img


class ScaleNonzeroPercentiles(Transform):
    """Map the ``lower``/``upper`` percentiles of non-zero voxels to 0/1 and clip to [0, 1]."""

    def __init__(self, lower: float, upper: float) -> None:
        self.lower = lower
        self.upper = upper

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        values = img.detach().cpu().numpy()
        nonzero = values[values != 0]
        if nonzero.size == 0:
            raise ValueError("every voxel is zero after resampling")
        lo, hi = np.percentile(nonzero, [self.lower, self.upper])
        if not hi > lo:
            raise ValueError(
                f"no intensity range to scale (percentiles {lo:g} and {hi:g} are equal)"
            )
        scaled = (img - float(lo)) / float(hi - lo)
        return scaled.clamp_(0.0, 1.0)


def build_transforms(data: DataConfig, channel: int | None) -> Compose:
    """The chain for one file; ``channel`` picks a volume of a 4D file (None for 3D)."""
    return Compose(
        [
            LoadImage(reader="NibabelReader", image_only=True, dtype=np.float32),
            EnsureChannelFirst(),
            SelectChannel(channel),
            CheckFinite(),
            Orientation(axcodes="RAS", labels=None),
            Spacing(pixdim=data.spacing, mode="bilinear", padding_mode="zeros", dtype=np.float32),
            ResizeWithPadOrCrop(spatial_size=data.shape, method="symmetric", mode="constant"),
            ScaleNonzeroPercentiles(*data.intensity_percentiles),
        ]
    )


def load_volume(
    path: str | Path, data: DataConfig, channel: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Run the chain on ``path``: ``(volume float32 [1, D, H, W], affine float64 4x4)``."""
    out = build_transforms(data, channel)(str(path))
    if not isinstance(out, MetaTensor):
        raise TypeError(f"transform chain returned {type(out).__name__}, expected a MetaTensor")
    volume = out.as_tensor().numpy().astype(np.float32, copy=False)
    affine = np.asarray(out.affine, dtype=np.float64)
    return volume, affine
