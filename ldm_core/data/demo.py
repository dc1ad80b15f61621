"""A synthetic demo cohort in the exact Decathlon Task01 (BraTS) layout, made offline.

The demo and the tests need brain-like data without a 7 GB download or any network. Each
subject starts from the MNI152 tissue probability maps that nilearn ships inside its package
(grey matter, white matter, brain mask; CSF is what the mask holds beyond GM + WM) and gets:

- a smooth random deformation (a small global affine plus a low-frequency displacement),
  so subjects differ in shape the way real brains do;
- one or two tumour-like lesions: a necrotic core, an enhancing rim and surrounding oedema,
  written to ``labelsTr`` with the Task01 label values;
- contrast per modality from the tissue classes (FLAIR with dark CSF and bright oedema, T1w,
  T1gd with an enhancing rim, T2w with bright CSF), each with its own gain;
- a smooth multiplicative bias field, Rician noise, then skull stripping (zero outside the
  brain), as in the Task01 images.

The output layout is that of ``Task01_BrainTumour``: ``imagesTr/BRATS_XXX.nii.gz`` 4D
``(x, y, z, 4)`` with the modalities in Task01 order, ``labelsTr/BRATS_XXX.nii.gz`` and a
``dataset.json``. Subject ``i`` depends only on ``(seed, i)``, so a cohort is reproducible
byte for byte (on one platform: vectorised float maths may differ in the last bit between
CPU generations) and a larger cohort extends a smaller one with the same seed.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ldm_core.data.msd import DATASET_JSON
from ldm_core.io import atomic_write_json

log = logging.getLogger(__name__)

DEFAULT_SUBJECTS = 16
DEFAULT_RESOLUTION = 2
"""Template resolution in mm: 2 mm gives 99 x 117 x 95 voxels, about a second per subject."""

# Task01_BrainTumour's dataset.json spells these exactly so (note the lower-case "t1gd").
MODALITIES: dict[str, str] = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
LABELS: dict[str, str] = {
    "0": "background",
    "1": "edema",
    "2": "non-enhancing tumor",
    "3": "enhancing tumour",
}
EDEMA, NON_ENHANCING, ENHANCING = 1, 2, 3

# Relative signal of each class per modality (rows in MODALITIES order), chosen for the
# textbook appearance: columns are CSF, GM, WM, oedema, enhancing rim, necrotic core.
_CONTRAST = np.array(
    [
        [0.08, 0.55, 0.45, 0.95, 0.75, 0.35],  # FLAIR: CSF suppressed, oedema bright
        [0.20, 0.55, 0.80, 0.45, 0.50, 0.25],  # T1w: WM brighter than GM
        [0.20, 0.55, 0.80, 0.45, 1.00, 0.25],  # T1gd: contrast lights up the rim
        [1.00, 0.60, 0.40, 0.85, 0.65, 0.95],  # T2w: fluid bright
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class Atlas:
    """Tissue probability maps on the template grid, float32 in [0, 1]."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


@functools.lru_cache(maxsize=2)
def load_atlas(resolution: int = DEFAULT_RESOLUTION) -> Atlas:
    """The MNI152 tissue maps bundled with nilearn, resampled to ``resolution`` mm.

    nilearn is imported here, not at module level: importing it costs over a second, and
    the result is cached because resampling the templates costs a few more.
    """
    from nilearn import datasets

    mask_img = datasets.load_mni152_brain_mask(resolution=resolution)
    mask = (mask_img.get_fdata(dtype=np.float32) > 0.5).astype(np.float32)
    gm = datasets.load_mni152_gm_template(resolution=resolution).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=resolution).get_fdata(dtype=np.float32)
    gm = np.clip(gm, 0, 1) * mask
    wm = np.clip(wm, 0, 1) * mask
    csf = np.clip(mask - gm - wm, 0, 1)
    for array in (gm, wm, csf, mask):
        array.setflags(write=False)  # shared through the cache
    return Atlas(
        gm=gm, wm=wm, csf=csf, mask=mask, affine=np.asarray(mask_img.affine, dtype=np.float64)
    )


def subject_id(index: int) -> str:
    """Task01 names: ``BRATS_001`` for the first subject."""
    return f"BRATS_{index + 1:03d}"


def make_subject(
    atlas: Atlas, seed: int, index: int, noise: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """One subject: image ``(x, y, z, 4)`` int16 and label ``(x, y, z)`` uint8.

    The random stream is seeded by ``(seed, index)`` alone, so the subject does not depend
    on how many others are generated alongside it. ``noise=False`` gives the same subject
    without its Rician noise (the noise is still drawn, so nothing else changes): the
    ground truth that says how close any denoising reconstruction can come.
    """
    rng = np.random.default_rng([seed, index])
    shape = atlas.mask.shape
    coords = _deformation(rng, shape)
    gm, wm, csf, mask = (
        ndimage.map_coordinates(m, coords, order=1, mode="constant", cval=0.0)
        for m in (atlas.gm, atlas.wm, atlas.csf, atlas.mask)
    )
    brain = mask > 0.5

    # Nested soft fractions of lesion tissue: whole lesion (oedema) > rim > core.
    lesion_out = np.zeros(shape, np.float32)
    lesion_rim = np.zeros(shape, np.float32)
    lesion_core = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(1, 3))):
        _add_lesion(rng, wm, brain, lesion_out, lesion_rim, lesion_core)
    lesion_out *= brain
    lesion_rim = np.minimum(lesion_rim, lesion_out)
    lesion_core = np.minimum(lesion_core, lesion_rim)

    tissue = 1.0 - lesion_out
    fractions = np.stack(
        [
            csf * tissue,
            gm * tissue,
            wm * tissue,
            lesion_out - lesion_rim,
            lesion_rim - lesion_core,
            lesion_core,
        ]
    )  # (6, x, y, z)

    label = np.zeros(shape, np.uint8)
    label[(lesion_out > 0.5) & brain] = EDEMA
    label[(lesion_rim > 0.5) & brain] = ENHANCING
    label[(lesion_core > 0.5) & brain] = NON_ENHANCING

    image = np.empty((*shape, len(MODALITIES)), np.int16)
    for m in range(len(MODALITIES)):
        contrast = _CONTRAST[m] * rng.uniform(0.95, 1.05, size=_CONTRAST.shape[1]).astype(
            np.float32
        )
        signal = np.tensordot(contrast, fractions, axes=1)
        gain = rng.uniform(800.0, 1200.0)
        signal *= _bias_field(rng, shape) * gain
        sigma = rng.uniform(0.01, 0.03) * gain
        # Rician: the magnitude of a complex signal with Gaussian noise on both parts.
        real = signal + rng.normal(0.0, sigma, size=shape).astype(np.float32)
        imag = rng.normal(0.0, sigma, size=shape).astype(np.float32)
        magnitude = np.sqrt(real * real + imag * imag) if noise else signal
        magnitude[~brain] = 0.0  # skull-stripped, as Task01 is
        image[..., m] = np.clip(np.rint(magnitude), 0, np.iinfo(np.int16).max).astype(np.int16)
    return image, label


def generate_cohort(
    output: Path,
    n_subjects: int = DEFAULT_SUBJECTS,
    seed: int = 0,
    resolution: int = DEFAULT_RESOLUTION,
    noise: bool = True,
) -> Path:
    """Write ``n_subjects`` demo subjects and a Task01 ``dataset.json`` into ``output``
    (``noise``: as :func:`make_subject`)."""
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    output = Path(output)
    (output / "imagesTr").mkdir(parents=True, exist_ok=True)
    (output / "labelsTr").mkdir(parents=True, exist_ok=True)
    atlas = load_atlas(resolution)
    training = []
    for i in tqdm(range(n_subjects), desc="demo cohort", unit="subject"):
        sid = subject_id(i)
        image, label = make_subject(atlas, seed, i, noise=noise)
        _save(image, atlas.affine, output / "imagesTr" / f"{sid}.nii.gz")
        _save(label, atlas.affine, output / "labelsTr" / f"{sid}.nii.gz")
        training.append({"image": f"./imagesTr/{sid}.nii.gz", "label": f"./labelsTr/{sid}.nii.gz"})
    dataset = {
        "name": "BRATS",
        "description": "Synthetic demo cohort in the Task01_BrainTumour layout, generated "
        f"by brain-ldm from the MNI152 template (seed {seed}, {resolution} mm)",
        "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
        "licence": "CC-BY-SA 4.0",
        "release": "synthetic",
        "tensorImageSize": "4D",
        "modality": MODALITIES,
        "labels": LABELS,
        "numTraining": n_subjects,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    atomic_write_json(output / DATASET_JSON, dataset, indent=4)
    log.info("demo cohort: %d subjects at %d mm in %s", n_subjects, resolution, output)
    return output


# --------------------------------------------------------------------------- pieces


def _deformation(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Sampling coordinates ``(3, x, y, z)``: a small affine about the centre + a smooth warp."""
    angles = np.deg2rad(rng.uniform(-6.0, 6.0, size=3))
    rotation = _rotation(angles)
    scale = np.diag(rng.uniform(0.92, 1.08, size=3))
    matrix = (rotation @ scale).astype(np.float32)
    centre = (np.asarray(shape, np.float32) - 1) / 2
    shift = rng.uniform(-3.0, 3.0, size=3).astype(np.float32)
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"))
    grid -= centre[:, None, None, None]
    coords = np.tensordot(matrix, grid, axes=1)
    coords += (centre + shift)[:, None, None, None]
    amplitude = rng.uniform(1.0, 2.5)  # voxels
    for axis in range(3):
        coords[axis] += amplitude * _smooth_noise(rng, shape, (4, 4, 4))
    return coords


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], grid: tuple[int, ...]
) -> np.ndarray:
    """Unit-variance low-frequency noise: random low-order cosine (DCT) coefficients.

    Separable, so it costs three small tensor products rather than a spline upsampling
    over every voxel (which took most of a subject's time).
    """
    # Amplitude falls with frequency (1 / order), as in a smooth anatomical warp.
    orders = np.add.outer(
        np.add.outer(np.arange(1, grid[0] + 1), np.arange(grid[1])), np.arange(grid[2])
    )
    field = (rng.standard_normal(grid) / orders).astype(np.float32)
    for axis, (n, g) in enumerate(zip(shape, grid)):
        x = (np.arange(n, dtype=np.float32) + 0.5) / n
        basis = np.cos(np.pi * np.outer(np.arange(1, g + 1, dtype=np.float32), x))  # (g, n)
        field = np.moveaxis(np.tensordot(field, basis, axes=([axis], [0])), -1, axis)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A smooth multiplicative field (exp of a random quadratic), about +-20 %."""
    x, y, z = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    c = rng.normal(0.0, 0.08, size=9).astype(np.float32)
    log_field = c[0] * x + c[1] * y + c[2] * z + c[3] * x * y + c[4] * y * z + c[5] * x * z
    log_field = log_field + c[6] * x * x + c[7] * y * y + c[8] * z * z
    return np.exp(log_field).astype(np.float32)


def _add_lesion(
    rng: np.random.Generator,
    wm: np.ndarray,
    brain: np.ndarray,
    out: np.ndarray,
    rim: np.ndarray,
    core: np.ndarray,
) -> None:
    """Paint one irregular lesion, centred in white matter, into the fraction maps (in place).

    Distances are normalised by the rim's outer radius; a low-frequency perturbation makes
    the outline irregular. Work happens in a bounding box, which keeps it cheap.
    """
    candidates = np.flatnonzero((wm > 0.6) & brain)
    if candidates.size == 0:
        candidates = np.flatnonzero(brain)
    centre = np.array(np.unravel_index(int(rng.choice(candidates)), brain.shape), np.float32)
    radius = rng.uniform(3.0, 7.0)  # rim outer radius in voxels
    edema_extent = rng.uniform(1.5, 2.2)  # oedema reaches this many radii
    axes = rng.uniform(0.75, 1.3, size=3).astype(np.float32)
    rotation = _rotation(rng.uniform(-np.pi, np.pi, size=3)).astype(np.float32)

    half = int(np.ceil(radius * edema_extent * axes.max() * 1.3)) + 2
    lo = np.maximum(centre.astype(int) - half, 0)
    hi = np.minimum(centre.astype(int) + half + 1, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    box_shape = tuple(int(b - a) for a, b in zip(lo, hi))
    grid = np.stack(
        np.meshgrid(*(np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)), indexing="ij")
    )
    offset = (
        np.tensordot(rotation, grid - centre[:, None, None, None], axes=1)
        / axes[:, None, None, None]
    )
    dist = np.sqrt((offset * offset).sum(axis=0)) / radius
    dist += 0.12 * _smooth_noise(rng, box_shape, (3, 3, 3))
    width = 0.06  # soft edge, a partial-volume effect of about a voxel
    core_edge = rng.uniform(0.5, 0.7)

    def step(edge: float) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(np.clip((dist - edge) / width, -60.0, 60.0)))).astype(
            np.float32
        )

    np.maximum(out[box], step(edema_extent), out=out[box])
    np.maximum(rim[box], step(1.0), out=rim[box])
    np.maximum(core[box], step(core_edge), out=core[box])


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)
