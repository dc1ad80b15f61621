"""Score a model bundle against the real images it was trained on, and gate deployment.

Generated volumes are compared with the real cache on complementary questions, because no
single number catches every failure of a generative model:

- **diversity** — mean MS-SSIM over pairs of generated volumes beside the same figure over
  pairs of real volumes (Pinaya et al. 2022). A collapsed model (every sample alike) scores
  well above the real figure; noise or unstructured output scores far below it.
- **MMD** — MONAI's unbiased maximum mean discrepancy between the generated and the real
  set, reported relative to the MMD of an all-blank set: 0 = same distribution of voxels,
  1 = no closer to the data than an empty volume. Relative, so one threshold holds for
  every image size and intensity scale.
- **intensity histogram distance** — Wasserstein-1 between the intensity distributions of
  brain voxels (real vs generated), in units of the [0, 1] intensity range: catches
  washed-out or over-contrasted tissue that shape metrics miss.
- **brain-mask overlap** — each generated volume thresholded into a foreground mask, Dice
  against the majority mask of the real set: catches blank, shifted or misplaced brains.
- **detail** — :func:`ldm_core.measures.detail` (mean gradient magnitude over the Otsu
  foreground) of the generated volumes over that of the real set: smooth blobs score low,
  noise and voxel-shuffled textures high; both fail the gate.
- **memorisation** — each generated volume's highest correlation with any real volume,
  taken on deviations from the real set's mean image (what is individual to a subject): a
  copy of a training subject scores 1, distinct subjects far less.
- **FID-3D** — only when ``evaluation.fid_weights`` names a feature extractor (never
  downloaded): a TorchScript file mapping ``[N, 1, D, H, W]`` to features, or a MONAI 3D
  ResNet state dict (e.g. MedicalNet weights).

Beside them, the autoencoder's reconstructions of the cache's validation volumes (SSIM,
PSNR, detail ratio) show the ceiling of sample quality: samples are decoded by the same
autoencoder, so they cannot be sharper than its reconstructions.

``gate`` turns the metrics into a deploy / do-not-deploy verdict with one reason per
failing check. ``evaluate`` runs everything and writes ``metrics.json``, figures, an HTML
and a Markdown report and a few NIfTI samples.
"""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import MMDMetric, MultiScaleSSIMMetric, PSNRMetric, SSIMMetric
from monai.networks.nets import ResNet

from ldm_core import figures, measures
from ldm_core.config import Config, EvaluationConfig
from ldm_core.data.preprocessed import read_manifest, subjects
from ldm_core.errors import LdmError
from ldm_core.io import (
    AUTOENCODER_PT,
    MANIFEST_JSON,
    METRICS_JSON,
    METRICS_JSONL,
    UNET_PT,
    atomic_write_bytes,
    atomic_write_json,
)
from ldm_core.samplers import samplers_for

log = logging.getLogger(__name__)

MASK_THRESHOLD = measures.FOREGROUND_THRESHOLD
"""Foreground threshold on the cache's [0, 1] intensity scale (the served-output monitor's
too). Preprocessing maps the background to 0 and tissue well above 0.1, so this separates
brain from background on real volumes; generated volumes get the same rule."""
HIST_BINS = 100
MAX_REAL = 32
"""Real volumes used at most (evenly spaced over the cache): bounds memory and time on big
cohorts while keeping the reference statistics stable."""
MAX_PAIRS = 64
"""MS-SSIM pairs per set at most (28 for the default 8 samples)."""
MAX_RECONSTRUCTED = 8
"""Validation volumes reconstructed by the autoencoder at most (SSIM of 3D volumes is slow
on a CPU)."""
NUM_NIFTI = 3
"""Generated samples written as NIfTI next to the report."""
GENERATE_BATCH = 4
FEATURE_BATCH = 4

METRIC_DOCS = {
    "num_generated": "generated volumes scored",
    "num_real": "real volumes compared with (train and val subjects)",
    "out_of_range_fraction": "fraction of generated voxels outside [0, 1] before clipping",
    "ms_ssim_generated": "mean MS-SSIM between pairs of generated volumes (lower = more diverse)",
    "ms_ssim_real": "mean MS-SSIM between pairs of real volumes (the diversity to match)",
    "ms_ssim_ratio": "ms_ssim_generated / ms_ssim_real: about 1 is right, >1 collapsed, near 0 unstructured",
    "ms_ssim_scales": "MS-SSIM scales used for this image size",
    "ms_ssim_kernel": "MS-SSIM window (voxels) used for this image size",
    "mmd": "MMD(generated, real) / MMD(blank, real): 0 = same voxel distribution, 1 = as far as empty volumes",
    "mmd_per_voxel": "MONAI MMD between generated and real volumes, divided by the voxel count",
    "hist_distance": "Wasserstein-1 between brain-voxel intensity histograms, in units of the [0, 1] range",
    "mask_dice": "mean Dice of generated brain masks against the real majority mask",
    "mask_dice_min": "worst generated sample's mask Dice",
    "mask_dice_real": "mean Dice of real brain masks against their majority mask (what is achievable)",
    "detail_ratio": "mean detail (gradient magnitude over the Otsu foreground) of generated over real volumes: 1 = as detailed, low = blurred, high = noisy",
    "nn_correlation": "worst generated sample's highest correlation with a real volume, on deviations from the real mean image: 1 = a copy",
    "nn_correlation_real": "highest such correlation between two distinct real volumes (what different subjects reach)",
    "recon_ssim": "SSIM of the autoencoder's reconstructions of the validation volumes (1 = exact)",
    "recon_psnr": "PSNR (dB, data range 1) of the autoencoder's reconstructions of the validation volumes",
    "recon_detail_ratio": "detail of the reconstructions over that of their validation volumes: the ceiling of detail_ratio",
    "num_reconstructed": "validation volumes reconstructed by the autoencoder",
    "fid": "Frechet distance between extractor features of generated and real volumes (lower = closer)",
}

STANDARD_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale exponents of Wang et al. 2003, finest scale first."""


# --------------------------------------------------------------------------- MS-SSIM


@dataclass(frozen=True)
class MsSsimSettings:
    """Scales and window of MS-SSIM for one image shape."""

    weights: tuple[float, ...]
    kernel_size: int
    kernel_sigma: float = 1.5


def ms_ssim_settings(shape: Sequence[int]) -> MsSsimSettings:
    """Choose scales and kernel so that MS-SSIM is defined on ``shape``.

    MONAI's MS-SSIM halves the image once per scale and convolves without padding, so the
    window must fit the coarsest scale (``size // 2 ** (scales - 1) >= kernel``), and MONAI
    also insists on ``size // (scales - 1) ** 2 > kernel - 1`` on every axis. The standard
    5 scales with an 11-voxel window need more than 160 voxels per axis; our volumes have
    32-128. Scales matter more than window width for telling brains apart (the coarse
    scales see the global shape), so this keeps as many scales as fit with a window of 11,
    9, 7 or 5 voxels (sigma 1.5 as standard; 3 only if nothing else fits: a 3-voxel window
    is nearly a box filter), and truncates the standard weights to the kept scales,
    renormalised to sum to 1 so the value stays in [0, 1]. E.g. 48x64x48 -> 4 scales,
    window 5; 32^3 -> 3 scales, window 7; 80x96x80 -> 5 scales, window 5.
    """
    smallest = min(int(s) for s in shape)
    for kernels in ((11, 9, 7, 5), (3,)):
        for scales in range(len(STANDARD_MS_SSIM_WEIGHTS), 0, -1):
            for kernel in kernels:
                coarsest = smallest // 2 ** (scales - 1)
                if coarsest >= kernel and smallest // max(1, scales - 1) ** 2 > kernel - 1:
                    raw = STANDARD_MS_SSIM_WEIGHTS[:scales]
                    total = sum(raw)
                    return MsSsimSettings(tuple(w / total for w in raw), kernel)
    raise LdmError(
        f"volumes of shape {tuple(shape)} are too small for MS-SSIM (need >= 3 voxels per axis)"
    )


def _pairs(n: int, limit: int) -> list[tuple[int, int]]:
    """All index pairs, or ``limit`` of them evenly spread so every volume takes part."""
    every = list(itertools.combinations(range(n), 2))
    if len(every) <= limit:
        return every
    picks = np.linspace(0, len(every) - 1, limit).round().astype(int)
    return [every[i] for i in picks]


def pairwise_ms_ssim(
    volumes: torch.Tensor, settings: MsSsimSettings, max_pairs: int = MAX_PAIRS
) -> float:
    """Mean MS-SSIM over distinct pairs of ``volumes`` ``[N, 1, D, H, W]`` (N >= 2)."""
    if volumes.shape[0] < 2:
        raise LdmError(f"MS-SSIM diversity needs at least 2 volumes, got {volumes.shape[0]}")
    metric = MultiScaleSSIMMetric(
        spatial_dims=3,
        data_range=1.0,
        kernel_size=settings.kernel_size,
        kernel_sigma=settings.kernel_sigma,
        weights=settings.weights,
        reduction="none",
    )
    scores = []
    pairs = _pairs(volumes.shape[0], max_pairs)
    for start in range(0, len(pairs), 8):
        chunk = pairs[start : start + 8]
        a = volumes[[i for i, _ in chunk]]
        b = volumes[[j for _, j in chunk]]
        scores.append(metric(a, b).flatten())
    return float(torch.cat(scores).mean())


# --------------------------------------------------------------------------- MMD


def _chunk_starts(total: int, size: int) -> list[int]:
    """Starts of the fewest ``size``-long windows that cover ``range(total)``, spread evenly."""
    count = math.ceil(total / size)
    return sorted({int(round(x)) for x in np.linspace(0, total - size, count)})


def _chunked_mmd(real: torch.Tensor, other: torch.Tensor) -> float:
    """Mean of MONAI's MMD over equal-sized chunks of both sets.

    ``MMDMetric`` needs two sets of the same size; when there are more real volumes than
    generated ones (or the reverse), the larger set is covered by windows of the smaller
    size (overlapping if the sizes do not divide), each window pair gives an unbiased
    estimate, and the estimates are averaged, so every volume takes part.
    """
    size = min(real.shape[0], other.shape[0])
    if size < 2:
        raise LdmError(
            f"MMD needs at least 2 volumes per set, got {real.shape[0]} and {other.shape[0]}"
        )
    metric = MMDMetric()
    values = [
        float(metric(real[i : i + size], other[j : j + size]))
        for i in _chunk_starts(real.shape[0], size)
        for j in _chunk_starts(other.shape[0], size)
    ]
    return float(np.mean(values))


def mmd(real: torch.Tensor, generated: torch.Tensor) -> tuple[float, float]:
    """``(relative, per_voxel)`` MMD between real and generated volumes.

    With MONAI's identity mapping the MMD is a linear-kernel estimate, i.e. the squared
    distance between the two sets' mean images; ``per_voxel`` divides it by the voxel
    count. ``relative`` divides it by the MMD between the real set and blank volumes, so a
    blank model scores exactly 1 and a perfect one about 0, on any image size.
    """
    voxels = real[0].numel()
    scale = 1.0 / math.sqrt(voxels)
    per_voxel = _chunked_mmd(real * scale, generated * scale)
    blank = _chunked_mmd(
        real * scale, torch.zeros_like(real[: max(2, min(real.shape[0], generated.shape[0]))])
    )
    if blank <= 0:
        raise LdmError("the real volumes are blank (their mean image is zero); cannot score MMD")
    return per_voxel / blank, per_voxel


# --------------------------------------------------------------------------- intensities, masks


def foreground(volumes: torch.Tensor, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Boolean brain masks ``[N, D, H, W]`` by intensity threshold."""
    return volumes[:, 0] > threshold


def intensity_histogram(
    volumes: torch.Tensor, threshold: float = MASK_THRESHOLD, bins: int = HIST_BINS
) -> np.ndarray:
    """Normalised histogram of foreground intensities pooled over the set (zeros if none)."""
    values = volumes[:, 0][foreground(volumes, threshold)].clamp(0.0, 1.0)
    counts = torch.histc(values.float(), bins=bins, min=0.0, max=1.0).double().cpu().numpy()
    total = counts.sum()
    return counts / total if total > 0 else counts


def histogram_distance(real_hist: np.ndarray, generated_hist: np.ndarray) -> float:
    """Wasserstein-1 distance between two normalised histograms on [0, 1].

    It is the area between the two cumulative distributions; 0 for equal histograms, at
    most 1. A set with no foreground at all has no intensity distribution to compare and
    gets the maximum, 1.
    """
    if real_hist.sum() == 0 or generated_hist.sum() == 0:
        return 1.0
    width = 1.0 / len(real_hist)
    return float(np.abs(np.cumsum(real_hist) - np.cumsum(generated_hist)).sum() * width)


def reference_mask(real: torch.Tensor, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Majority brain mask of the real set: voxels that are foreground in at least half."""
    mask = foreground(real, threshold).float().mean(0) >= 0.5
    if not mask.any():
        raise LdmError(
            f"the real volumes have no voxel above {threshold} in most subjects; cannot build a brain mask"
        )
    return mask


def mask_dice(
    volumes: torch.Tensor, reference: torch.Tensor, threshold: float = MASK_THRESHOLD
) -> torch.Tensor:
    """Dice of each volume's foreground mask against ``reference`` ``[D, H, W]``."""
    masks = foreground(volumes, threshold).flatten(1).float()
    ref = reference.flatten().float()
    overlap = (masks * ref).sum(1)
    return 2 * overlap / (masks.sum(1) + ref.sum())


# --------------------------------------------------------------------------- memorisation


def nearest_real_correlation(volumes: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """For each of ``volumes`` ``[N, 1, D, H, W]``, its highest correlation with any of
    ``real``, both taken as deviations from the real set's mean image.

    Every brain shares the population's anatomy, so whole volumes of distinct subjects
    correlate almost as well as copies do (0.82-0.89 on the 16-subject demo cohort). The
    deviation from the mean image is what is individual to a subject (its shape, lesions,
    bias field): there distinct subjects correlate far less and a copy still exactly 1. A
    volume equal to the mean image deviates nowhere and copies nobody: 0.
    """
    mean = real.mean(0, keepdim=True)

    def unit_deviations(x: torch.Tensor) -> torch.Tensor:
        d = (x - mean).flatten(1).float()
        d = d - d.mean(1, keepdim=True)
        norm = d.norm(dim=1, keepdim=True)
        return torch.where(norm > 1e-6, d / norm.clamp(min=1e-6), torch.zeros_like(d))

    return (unit_deviations(volumes) @ unit_deviations(real).T).max(1).values


def real_nearest_correlation(real: torch.Tensor) -> float:
    """What distinct subjects reach: the highest :func:`nearest_real_correlation` of a real
    volume held out against the others, as a generated volume is scored against them all
    (leaving it in the mean would bias the figure low by about ``1 / (N - 1)``)."""
    everyone = torch.arange(real.shape[0])
    return max(
        float(nearest_real_correlation(real[i : i + 1], real[everyone != i]).max())
        for i in range(real.shape[0])
    )


# --------------------------------------------------------------------------- reconstructions


@torch.no_grad()
def reconstruct(
    autoencoder: torch.nn.Module, volumes: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The autoencoder's reconstructions of ``volumes`` (from the latent means, as training's
    latents are), clipped to [0, 1], on the CPU.

    Samples are decoded by this autoencoder, so its reconstructions bound what sampling can
    reach: a blurry reconstruction means a detail ratio the diffusion model cannot fix.
    """
    recons = []
    for start in range(0, volumes.shape[0], GENERATE_BATCH):
        batch = volumes[start : start + GENERATE_BATCH].to(device)
        recons.append(autoencoder.reconstruct(batch).float().clamp(0.0, 1.0).cpu())
    return torch.cat(recons)


def reconstruction_quality(volumes: torch.Tensor, recons: torch.Tensor) -> dict[str, float]:
    """SSIM, PSNR (MONAI's metrics, data range 1) and detail ratio of reconstructions
    ``recons`` of ``volumes`` (both ``[N, 1, D, H, W]`` in [0, 1])."""
    volumes = volumes.float().cpu()
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0, reduction="mean")(recons, volumes)
    psnr = PSNRMetric(max_val=1.0, reduction="mean")(recons, volumes)
    return {
        "recon_ssim": float(ssim.mean()),
        "recon_psnr": float(psnr.mean()),
        "recon_detail_ratio": measures.detail_ratio(recons.numpy(), volumes.numpy()),
        "num_reconstructed": float(volumes.shape[0]),
    }


# --------------------------------------------------------------------------- FID


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, F]``.

    The same quantity as ``monai.metrics.FIDMetric`` (float64 means, unbiased covariances,
    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``). The trace of the
    matrix square root is taken from the eigenvalues of the symmetric ``S_a^(1/2) S_b
    S_a^(1/2)``, which has the same spectrum as ``S_a S_b`` but stays real and stable when
    the covariances are singular, as they are with fewer samples than features.
    """
    a = features_a.double().flatten(1)
    b = features_b.double().flatten(1)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise LdmError(
            f"FID needs at least 2 feature vectors per set, got {a.shape[0]} and {b.shape[0]}"
        )
    if a.shape[1] != b.shape[1]:
        raise LdmError(f"FID feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = (
        torch.cov(a.T).reshape(a.shape[1], a.shape[1]),
        torch.cov(b.T).reshape(b.shape[1], b.shape[1]),
    )
    eval_a, evec_a = torch.linalg.eigh(cov_a)
    sqrt_a = (evec_a * eval_a.clamp(min=0).sqrt()) @ evec_a.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu_a - mu_b
    value = diff.dot(diff) + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    return float(value.clamp(min=0))


FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


def _resnet_from_state_dict(state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """A MONAI 3D ResNet (no classifier head) whose shape is read off its state dict.

    Depth (blocks per stage), block type (a ``conv3`` means bottleneck), stage widths,
    input channels, first kernel size and shortcut type are all in the weights. The first
    convolution's stride is not; 2 is what MedicalNet, the usual source of such weights,
    uses. A ``module.`` prefix (DataParallel) is dropped and head weights (``fc``,
    ``conv_seg``) are ignored.
    """
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.ndim != 5:
        raise LdmError(f"{source}: not a 3D ResNet state dict (no 5-D 'conv1.weight')")
    layers, planes = [], []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")}
        if not blocks:
            raise LdmError(f"{source}: not a ResNet state dict (no 'layer{stage}.*' weights)")
        layers.append(max(blocks) + 1)
        planes.append(int(state[f"layer{stage}.0.conv1.weight"].shape[0]))
    has_downsample_conv = any(".downsample.0.weight" in k for k in state)
    net = ResNet(
        block="bottleneck" if any(".conv3." in k for k in state) else "basic",
        layers=layers,
        block_inplanes=planes,
        spatial_dims=3,
        n_input_channels=int(conv1.shape[1]),
        conv1_t_size=tuple(int(s) for s in conv1.shape[2:]),
        conv1_t_stride=2,
        shortcut_type="B" if has_downsample_conv else "A",
        feed_forward=False,
        bias_downsample=any(".downsample.0.bias" in k for k in state),
    )
    wanted = net.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise LdmError(f"{source}: ResNet weights incomplete, missing {', '.join(missing[:3])}")
    mismatched = [k for k in wanted if state[k].shape != wanted[k].shape]
    if mismatched:
        raise LdmError(
            f"{source}: ResNet weight {mismatched[0]} has shape {tuple(state[mismatched[0]].shape)}, "
            f"expected {tuple(wanted[mismatched[0]].shape)}"
        )
    net.load_state_dict({k: state[k] for k in wanted})

    class _Standardised(torch.nn.Module):
        """MedicalNet saw volumes standardised over their brain voxels; do the same."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = (x > MASK_THRESHOLD).float()
            count = mask.flatten(1).sum(1).clamp(min=1).view(-1, 1, 1, 1, 1)
            mean = (x * mask).flatten(1).sum(1).view(-1, 1, 1, 1, 1) / count
            var = (((x - mean) * mask) ** 2).flatten(1).sum(1).view(-1, 1, 1, 1, 1) / count
            return self.inner((x - mean) / var.sqrt().clamp(min=1e-6))

    return _Standardised(net)


def load_feature_extractor(uri: str, cfg: Config, device: torch.device) -> torch.nn.Module:
    """Load the FID feature network named by ``evaluation.fid_weights`` (path, file:// or s3://).

    TorchScript archives are tried first (any architecture, its own preprocessing inside);
    otherwise the file must be a state dict of a MONAI 3D ResNet (bare, or under a
    ``state_dict`` key). Nothing is ever fetched from a model hub.
    """
    from ldm_core import storage

    with tempfile.TemporaryDirectory(prefix="ldm-fid-") as tmp:
        if storage.is_remote(uri):
            path = storage.download_file(uri, Path(tmp) / "fid_weights.pt", cfg.storage)
        else:
            path = storage.local_path(uri)
        if not path.is_file():
            raise LdmError(f"evaluation.fid_weights: {uri} not found")
        try:
            module = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError):
            module = None
        if module is None:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a foreign file raises many types
                raise LdmError(
                    f"evaluation.fid_weights: {uri} is neither a TorchScript file nor a state dict "
                    f"({type(e).__name__}: {e})"
                ) from None
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict):
                raise LdmError(
                    f"evaluation.fid_weights: {uri} holds a {type(obj).__name__}, not a state dict"
                )
            module = _resnet_from_state_dict(obj, f"evaluation.fid_weights: {uri}").to(device)
    return module.eval()


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor, volumes: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Features ``[N, F]``: the extractor's output, spatially averaged if it is a map."""
    out = []
    for start in range(0, volumes.shape[0], FEATURE_BATCH):
        feats = extractor(volumes[start : start + FEATURE_BATCH].to(device))
        if not isinstance(feats, torch.Tensor):
            raise LdmError(
                f"the FID feature extractor returned {type(feats).__name__}, expected a tensor"
            )
        if feats.ndim > 2:
            feats = feats.flatten(2).mean(2)
        out.append(feats.float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- all metrics


def compute_metrics(
    real: torch.Tensor,
    generated: torch.Tensor,
    extractor: FeatureExtractor | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Every metric of generated vs real volumes (both ``[N, 1, D, H, W]`` on [0, 1]),
    computed on ``device`` (the model's: 3D MS-SSIM of large volumes is slow on a CPU)."""
    if real.shape[1:] != generated.shape[1:]:
        raise LdmError(
            f"real volumes are {tuple(real.shape[1:])} but generated ones {tuple(generated.shape[1:])}"
        )
    dev = device or torch.device("cpu")
    real, generated = real.to(dev), generated.to(dev)
    metrics: dict[str, float] = {
        "num_generated": float(generated.shape[0]),
        "num_real": float(real.shape[0]),
    }
    metrics["out_of_range_fraction"] = float(((generated < 0) | (generated > 1)).float().mean())
    generated = generated.clamp(0.0, 1.0)

    settings = ms_ssim_settings(real.shape[2:])
    with _timed(
        f"MS-SSIM diversity ({len(settings.weights)} scales, window {settings.kernel_size})"
    ):
        metrics["ms_ssim_generated"] = pairwise_ms_ssim(generated, settings)
        metrics["ms_ssim_real"] = pairwise_ms_ssim(real, settings)
        metrics["ms_ssim_ratio"] = metrics["ms_ssim_generated"] / max(metrics["ms_ssim_real"], 1e-8)
        metrics["ms_ssim_scales"] = float(len(settings.weights))
        metrics["ms_ssim_kernel"] = float(settings.kernel_size)
    with _timed("MMD"):
        metrics["mmd"], metrics["mmd_per_voxel"] = mmd(real, generated)
    with _timed("intensity histogram distance"):
        metrics["hist_distance"] = histogram_distance(
            intensity_histogram(real), intensity_histogram(generated)
        )
    with _timed("brain-mask overlap"):
        ref = reference_mask(real)
        dice = mask_dice(generated, ref)
        metrics["mask_dice"] = float(dice.mean())
        metrics["mask_dice_min"] = float(dice.min())
        metrics["mask_dice_real"] = float(mask_dice(real, ref).mean())
    with _timed("detail and memorisation"):
        metrics["detail_ratio"] = measures.detail_ratio(generated.cpu().numpy(), real.cpu().numpy())
        metrics["nn_correlation"] = float(nearest_real_correlation(generated, real).max())
        metrics["nn_correlation_real"] = real_nearest_correlation(real)
    if extractor is not None:
        with _timed("FID-3D"):
            metrics["fid"] = frechet_distance(
                extract_features(extractor, generated, dev), extract_features(extractor, real, dev)
            )
    return metrics


@contextmanager
def _timed(what: str) -> Iterator[None]:
    """Log which metric is being computed and how long it took."""
    log.info("computing %s", what)
    start = time.perf_counter()
    yield
    log.info("%s done in %.1f s", what, time.perf_counter() - start)


# --------------------------------------------------------------------------- gate


def gate(metrics: dict[str, float], ecfg: EvaluationConfig) -> tuple[bool, list[str]]:
    """Deploy or not: every threshold of ``ecfg`` checked, one reason per failing check.

    A metric that is missing or not a finite number fails its check (a broken evaluation
    must never let a model through).
    """
    checks = [
        ("ms_ssim_ratio", ">=", "gate_min_ms_ssim_ratio"),
        ("ms_ssim_ratio", "<=", "gate_max_ms_ssim_ratio"),
        ("mmd", "<=", "gate_max_mmd"),
        ("mask_dice", ">=", "gate_min_mask_dice"),
        ("hist_distance", "<=", "gate_max_hist_distance"),
        ("detail_ratio", ">=", "gate_min_detail_ratio"),
        ("detail_ratio", "<=", "gate_max_detail_ratio"),
        ("nn_correlation", "<=", "gate_max_nn_correlation"),
    ]
    reasons = []
    for key, op, field in checks:
        threshold = getattr(ecfg, field)
        field_name = f"evaluation.{field}"
        value = metrics.get(key)
        if value is None or not math.isfinite(value):
            reasons.append(
                f"{key} is {value!r}, not a number; cannot check {field_name}={threshold}"
            )
            continue
        ok = value >= threshold if op == ">=" else value <= threshold
        if not ok:
            need = "at least" if op == ">=" else "at most"
            reasons.append(f"{key}={value:.4g} but {field_name} requires {need} {threshold:g}")
    return not reasons, reasons


# --------------------------------------------------------------------------- the stage


def load_real(
    data_dir: str | Path, expected_shape: Sequence[int], limit: int = MAX_REAL
) -> tuple[torch.Tensor, list[str]]:
    """Real volumes of the cache (train and val subjects alike; at most ``limit``, evenly
    spaced), checked against the shape the model generates. Returns volumes and their ids."""
    root = Path(data_dir)
    manifest = read_manifest(root)
    shape = tuple(int(s) for s in manifest["shape"])
    if shape != tuple(int(s) for s in expected_shape):
        raise LdmError(
            f"{root / MANIFEST_JSON}: images are {shape} but the bundle generates {tuple(expected_shape)} "
            "(bundle.json image_shape); evaluate against the cache the model was trained on"
        )
    usable = subjects(manifest)
    usable = [s for s in usable if s.get("split") in ("train", "val")]
    if len(usable) < 2:
        raise LdmError(
            f"{root / MANIFEST_JSON}: needs at least 2 usable train/val subjects to compare with, "
            f"found {len(usable)}"
        )
    usable = _evenly(usable, limit)
    return _read_volumes(root, usable, shape), [str(s["id"]) for s in usable]


def load_validation(data_dir: str | Path, limit: int = MAX_RECONSTRUCTED) -> torch.Tensor | None:
    """The cache's validation volumes (at most ``limit``, evenly spaced), or None if it has
    none. Call after :func:`load_real`, which checks the cache's shape against the bundle."""
    root = Path(data_dir)
    manifest = read_manifest(root)
    usable = _evenly(subjects(manifest, "val"), limit)
    if not usable:
        return None
    return _read_volumes(root, usable, tuple(int(s) for s in manifest["shape"]))


def _evenly(items: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """``items``, or ``limit`` of them evenly spaced when there are more."""
    if len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def _read_volumes(root: Path, items: list[dict[str, Any]], shape: tuple[int, ...]) -> torch.Tensor:
    """The cache's volumes of ``items`` as one float32 tensor ``[N, 1, *shape]``."""
    volumes = []
    for item in items:
        path = root / item["file"]
        try:
            array = np.load(path)
        except (OSError, ValueError) as e:
            raise LdmError(f"{path}: cannot read volume of subject {item['id']} ({e})") from None
        if array.shape != (1, *shape):
            raise LdmError(f"{path}: shape {array.shape}, manifest says {(1, *shape)}")
        volumes.append(torch.from_numpy(array.astype(np.float32)))
    return torch.stack(volumes)


def _generate(bundle: Any, num: int, sampler: str, steps: int) -> torch.Tensor:
    from tqdm import tqdm

    from ldm_core.sample import generate

    out = []
    with tqdm(total=num, desc=f"generating ({sampler}, {steps} steps)", unit="sample") as bar:
        for start in range(0, num, GENERATE_BATCH):
            seeds = list(range(start, min(num, start + GENERATE_BATCH)))
            out.append(generate(bundle, seeds, sampler=sampler, steps=steps))
            bar.update(len(seeds))
    return torch.cat(out)


def _training_runs(training_logs: Sequence[Path]) -> dict[str, Path]:
    """Label each training log (a run dir or a metrics.jsonl file) by its stage."""
    runs: dict[str, Path] = {}
    for entry in training_logs:
        entry = Path(entry)
        path = entry / METRICS_JSONL if entry.is_dir() else entry
        run_dir = path.parent
        if (run_dir / AUTOENCODER_PT).exists():
            label = "autoencoder"
        elif (run_dir / UNET_PT).exists():
            label = "diffusion"
        else:
            label = run_dir.name
        if label in runs:
            label = f"{label} ({run_dir})"
        runs[label] = path
    return runs


def _sampler(cfg: Config, bundle: Any) -> str:
    """``sampling.sampler``, or the bundle's own when the configured one cannot sample a
    model of the bundle's training objective (an evaluation must not fail on that)."""
    sampler = cfg.sampling.sampler
    objective = bundle.config.model.scheduler.objective
    if sampler in samplers_for(objective):
        return sampler
    log.warning(
        "sampling.sampler=%s cannot sample this bundle (trained with objective %s); using the "
        "bundle's own sampler %s",
        sampler,
        objective,
        bundle.config.sampling.sampler,
    )
    return str(bundle.config.sampling.sampler)


def _draw_figures(
    real: torch.Tensor,
    generated: torch.Tensor,
    spacing: Sequence[float],
    training_logs: Sequence[Path],
    reconstructed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, bytes]:
    """The report's pictures as PNG bytes, by name; ``generated`` already clipped to [0, 1].
    ``reconstructed`` is (validation volumes, the autoencoder's reconstructions of them)."""
    spacing = tuple(float(s) for s in spacing)
    images = {
        "samples": figures.view_grid(generated, spacing, title="Generated samples"),
        "real_vs_generated": figures.real_vs_generated(real, generated, spacing),
        "intensity_histograms": figures.intensity_histograms(
            intensity_histogram(real), intensity_histogram(generated), MASK_THRESHOLD
        ),
    }
    if reconstructed is not None:
        images["real_vs_reconstructed"] = figures.real_vs_generated(
            *reconstructed, spacing, right="reconstructed"
        )
    runs = _training_runs(training_logs)
    if runs:
        images["training_curves"] = figures.training_curves(runs)
    return images


def _write_files(
    out: Path, images: dict[str, bytes], generated: torch.Tensor, affine: np.ndarray
) -> tuple[list[Path], list[Path]]:
    """Write ``figures/<name>.png`` and the first :data:`NUM_NIFTI` samples as
    ``samples/sample_<seed>.nii.gz`` (with the bundle's affine); returns both lists."""
    from ldm_core.sample import to_nifti_bytes

    figure_paths = [
        atomic_write_bytes(out / "figures" / f"{name}.png", png) for name, png in images.items()
    ]
    sample_paths = [
        atomic_write_bytes(
            out / "samples" / f"sample_{seed:04d}.nii.gz", to_nifti_bytes(volume, affine)
        )
        for seed, volume in list(enumerate(generated))[:NUM_NIFTI]
    ]
    return figure_paths, sample_paths


def evaluate(
    cfg: Config,
    bundle_dir: str | Path,
    data_dir: str | Path,
    output_dir: str | Path,
    training_logs: Sequence[Path] = (),
) -> dict[str, Any]:
    """The ``ldm evaluate`` verb: generate, score, gate, and write the evaluation outputs.

    ``output_dir`` receives ``metrics.json`` (written last: its presence means a finished
    evaluation), ``figures/*.png``, ``report.html`` and ``report.md`` (PNGs embedded, for
    the Kubeflow UI) and ``samples/*.nii.gz`` with the bundle's affine. ``training_logs``
    are run directories (or ``metrics.jsonl`` files) whose loss curves go in the report.
    Returns the content of ``metrics.json`` plus ``files`` (paths written).
    """
    from ldm_core.bundle import load

    ecfg = cfg.evaluation
    if ecfg.num_samples < 2:
        raise LdmError(
            f"evaluation.num_samples: at least 2 are needed to score diversity, got {ecfg.num_samples}"
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_JSON).unlink(missing_ok=True)  # a stale verdict must not outlive a failed re-run
    log.info("loading bundle %s", bundle_dir)
    bundle = load(bundle_dir, device=cfg.train.device)
    log.info("loading real volumes from %s", data_dir)
    real, real_ids = load_real(data_dir, bundle.image_shape)
    log.info("%d real volumes; generating %d samples", len(real_ids), ecfg.num_samples)
    sampler = _sampler(cfg, bundle)
    generated = _generate(bundle, ecfg.num_samples, sampler, ecfg.steps)

    extractor = None
    if ecfg.fid_weights:
        log.info("loading FID feature extractor %s", ecfg.fid_weights)
        extractor = load_feature_extractor(ecfg.fid_weights, cfg, bundle.device)
    metrics = compute_metrics(real, generated, extractor, bundle.device)
    validation = load_validation(data_dir)
    recons = None
    if validation is None:
        log.warning("%s has no validation subjects: reconstruction quality not measured", data_dir)
    else:
        with _timed(f"reconstruction quality ({validation.shape[0]} validation volumes)"):
            recons = reconstruct(bundle.autoencoder, validation, bundle.device)
            metrics.update(reconstruction_quality(validation, recons))
    passed, reasons = gate(metrics, ecfg)
    log.info("quality gate %s%s", "passed" if passed else "FAILED: ", "; ".join(reasons))

    log.info("writing figures and reports")
    clipped = generated.clamp(0.0, 1.0)
    reconstructed = None if recons is None else (validation, recons)
    images = _draw_figures(real, clipped, bundle.spacing, training_logs, reconstructed)
    figure_paths, sample_paths = _write_files(out, images, clipped, bundle.affine)
    verdict = {"passed": passed, "reasons": reasons}
    context = {
        "bundle": str(bundle_dir),
        "data": str(data_dir),
        "sampler": sampler,
        "steps": ecfg.steps,
        "fid_weights": ecfg.fid_weights or "(not given: FID not computed)",
    }
    html, md = figures.write_reports(out, metrics, verdict, images, context, METRIC_DOCS)

    result: dict[str, Any] = {**metrics, "gate": verdict}
    atomic_write_json(out / METRICS_JSON, result)
    log.info("wrote %s", out / METRICS_JSON)
    result["files"] = {
        "metrics": str(out / METRICS_JSON),
        "report_html": str(html),
        "report_md": str(md),
        "figures": [str(p) for p in figure_paths],
        "samples": [str(p) for p in sample_paths],
    }
    return result
