"""A Gaussian fitted to the training latents, to start sampling part-way down the schedule.

Sampling normally starts from pure noise at the schedule's last timestep. A small UNet that
predicts the noise is ill-conditioned there: the clean latent it implies is
``(x_t - sigma * noise) / alpha`` with ``alpha`` near 0.01, so a few percent of error in the
noise becomes a clean-latent estimate several times the latent's own size, and the first
steps are built on it (benchmarks/README.md, "Quality preset", seventh round). Where
``alpha`` is larger (0.22 at t = 600 of the presets' schedule) the same error costs little,
and the forward process's marginal is still close to a Gaussian: the clean latent's spread
is a few percent of a noisy sample's variance. So the sampler can start there, from the
training latents' Gaussian noised to that timestep (``sampling.truncate_at``), and leave
the noisy end out (truncated diffusion, Zheng et al. 2023).

The Gaussian is the latents' per-voxel mean, a few principal components of their
deviations (the ways whole subjects differ together: size, position, rotation) and a
per-voxel variance for the rest. The mean alone gives samples all of one shape; with eight
components their spread is back near the real volumes' (benchmarks/README.md, "Quality
preset", eighth round). Only these aggregates are stored, never a subject's latent: a
bundle leaves the training site, and the decoder would turn a stored latent back into that
subject's image. The components of a small cohort still lean towards single subjects: with
16 of 51, samples came nearer their nearest training subject than real subjects are to
theirs, which is why the count stays small and the gate's memorisation check stays on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ldm_core.errors import LdmError

DRAW_STREAM = 0x1A7E
"""The second key of a prior draw's NumPy generator (the first is the seed)."""

KEYS = ("mean", "components", "residual_var")
"""The tensors of a prior: ``mean`` ``[C, d, h, w]``; ``components`` ``[k, C, d, h, w]``,
each a principal direction times its standard deviation; ``residual_var`` ``[C, d, h, w]``,
the per-voxel variance the components leave unexplained."""


def fit(train: torch.Tensor, components: int) -> dict[str, torch.Tensor]:
    """The Gaussian of the training latents ``[N, C, d, h, w]`` (in the space the UNet
    samples in) with at most ``components`` principal components, and never more than N // 4
    (with all N - 1, the components would span every subject's deviation and each training
    latent could be rebuilt from them), in float32 on the CPU.

    The components come from the N x N Gram matrix of the deviations rather than an SVD of
    the N x voxels matrix: the same directions, at the cost of one more N x voxels product.
    """
    if train.dim() != 5 or train.shape[0] < 2:
        raise LdmError(
            "the latent prior needs at least 2 training latents [N, C, d, h, w], "
            f"got shape {tuple(train.shape)}"
        )
    if components < 0:
        raise LdmError(f"train.diffusion.prior_components: must be >= 0, got {components}")
    z = train.cpu().double()
    n = z.shape[0]
    mean = z.mean(0)
    deviations = (z - mean).flatten(1)
    k = min(components, n // 4)
    # eigh returns ascending eigenvalues; the last k vectors weight the subjects into the
    # leading directions, scaled here by their standard deviations
    _, vectors = torch.linalg.eigh(deviations @ deviations.T)
    scaled = (vectors[:, n - k :].flip(1).T @ deviations) / (n - 1) ** 0.5
    variance = deviations.pow(2).sum(0) / (n - 1)
    residual = (variance - scaled.pow(2).sum(0)).clamp(min=0)
    return {
        "mean": mean.float(),
        "components": scaled.view(k, *mean.shape).float(),
        "residual_var": residual.view(mean.shape).float(),
    }


def checked(
    prior: Mapping[str, object], latent_shape: Sequence[int], where: str
) -> dict[str, torch.Tensor]:
    """``prior`` as its three finite float tensors, shaped for ``latent_shape``; an error
    naming ``where`` otherwise."""
    missing = [k for k in KEYS if k not in prior]
    if missing:
        raise LdmError(f"{where}: missing {', '.join(missing)}")
    shape = tuple(int(s) for s in latent_shape)
    out = {}
    for key in KEYS:
        value = prior[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise LdmError(f"{where}: {key} must be a float tensor, got {type(value).__name__}")
        if not torch.isfinite(value).all():
            raise LdmError(f"{where}: {key} has values that are not finite")
        out[key] = value.float()
    for key in ("mean", "residual_var"):
        if tuple(out[key].shape) != shape:
            raise LdmError(
                f"{where}: {key} has shape {tuple(out[key].shape)}, the latents are {shape}"
            )
    if tuple(out["components"].shape[1:]) != shape or out["components"].dim() != len(shape) + 1:
        raise LdmError(
            f"{where}: components has shape {tuple(out['components'].shape)}, expected "
            f"[k, {', '.join(map(str, shape))}]"
        )
    if (out["residual_var"] < 0).any():
        raise LdmError(f"{where}: residual_var has negative values")
    return out


def draw(prior: Mapping[str, torch.Tensor], seeds: Sequence[int]) -> torch.Tensor:
    """One clean latent per seed from the prior, ``[N, C, d, h, w]`` float32 on the CPU: the
    mean, plus the components weighted by standard normals, plus per-voxel noise of the
    residual variance. The normals come from NumPy's generator keyed by ``(seed,
    DRAW_STREAM)``, a stream apart from every torch generator the sampler seeds (the
    starting noise with the seed, the step noise with seed + 1), so no seed's draw repeats
    another's noise; the same seed draws the same latent on any device."""
    mean, components = prior["mean"], prior["components"]
    residual_sd = prior["residual_var"].sqrt()
    rows = []
    for seed in seeds:
        rng = np.random.default_rng([int(seed), DRAW_STREAM])
        weights = torch.from_numpy(rng.standard_normal(components.shape[0], dtype=np.float32))
        rest = torch.from_numpy(rng.standard_normal(tuple(mean.shape), dtype=np.float32))
        rows.append(mean + torch.tensordot(weights, components, dims=1) + residual_sd * rest)
    return torch.stack(rows)
