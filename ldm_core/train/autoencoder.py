"""Autoencoder stage: train an AutoencoderKL on the preprocessed cache (``ldm train-autoencoder``).

Losses follow Rombach et al. / Pinaya et al.: L1 reconstruction + KL toward N(0, I) (a
small weight keeps the latent smooth without blurring) + optional perceptual loss + a
patch adversarial loss that joins after a warm-up (the discriminator is useless against
an autoencoder that does not reconstruct yet). After training, the latent scale factor
(1 / std of the latents) is measured over the whole training set, because the diffusion
stage assumes unit-variance latents and one random batch is a noisy estimate.

Output directory::

    checkpoints/ckpt-<step>.pt    resumable state (kept: train.keep_checkpoints)
    metrics.jsonl, tensorboard/   curves
    autoencoder.pt                {"state_dict", "scale_factor", "config", "steps"} (when finished)
    config.yaml, data_geometry.json
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from monai.losses import JukeboxLoss, PatchAdversarialLoss
from monai.losses.perceptual import normalize_tensor
from torch import nn

from ldm_core import storage
from ldm_core.config import Config, StorageConfig
from ldm_core.data.preprocessed import VolumeDataset, read_manifest, subjects
from ldm_core.errors import LdmError
from ldm_core.io import AUTOENCODER_PT
from ldm_core.models import build_autoencoder, build_discriminator
from ldm_core.train import checkpoint as ckpt
from ldm_core.train import distributed, loop
from ldm_core.train.distributed import DistEnv
from ldm_core.train.guard import NonFiniteGuard, is_finite
from ldm_core.train.loader import make_loader, to_input
from ldm_core.train.metrics_log import MetricsLog
from ldm_core.train.model_setup import evaluating, for_training, prepare_model
from ldm_core.train.optim import LrSchedule, adam, optimizer_step
from ldm_core.train.precision import autocast, make_scaler

log = logging.getLogger(__name__)

STAGE = "autoencoder"
_ARCH = ("model.autoencoder",)
_DISC_PARTS = ("discriminator", "disc_optimizer", "disc_scaler")
"""Checkpoint parts of the adversarial loss: absent from a checkpoint written while it was off."""


def train_autoencoder(cfg: Config, data_dir: str | Path, output_dir: str | Path) -> Path:
    """Train (or resume, or skip if finished) the autoencoder; returns the run directory."""
    data_dir, out = Path(data_dir), Path(output_dir)
    if ckpt.finished(out / AUTOENCODER_PT, cfg, _ARCH, cfg.train.autoencoder.steps):
        log.info(
            "%s: finished autoencoder run with %d steps found; nothing to do",
            out,
            cfg.train.autoencoder.steps,
        )
        return out
    manifest = read_manifest(data_dir)
    loop.configure_threads(cfg)
    env = distributed.init(cfg)
    try:
        _run(cfg, data_dir, manifest, out, env)
    finally:
        distributed.shutdown(env)
    return out


# --------------------------------------------------------------------------- losses


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, I)), summed over latent voxels, averaged over the batch."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


def gradient_difference(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mathieu et al.'s gradient difference loss (ICLR 2016, alpha = 1): the L1 distance
    between the absolute finite differences of ``recon`` and ``x`` along each spatial axis.

    L1 alone is minimised by the conditional median, which at an uncertain edge is a ramp:
    reconstructions lose the voxel-scale contrast of the cortical rim and the ventricle
    walls. This term prices a softened edge directly, without a pretrained network (the
    perceptual loss needs one) or a discriminator's warm-up (the adversarial loss needs one).
    """
    terms = [
        (recon.diff(dim=d).abs() - x.diff(dim=d).abs()).abs().mean() for d in range(2, recon.dim())
    ]
    return torch.stack(terms).mean()


class FeaturePerceptualLoss(nn.Module):
    """LPIPS-style distance in the feature space of a user-supplied 3D network.

    The network is a TorchScript file (``train.autoencoder.perceptual_weights``) mapping
    ``[B, 1, D, H, W]`` to one feature map or a list of them, e.g. a MedicalNet ResNet
    exported once with ``torch.jit.trace``. TorchScript carries its own graph, so no
    model code or hub download is needed at run time (MONAI's ``PerceptualLoss`` fetches its
    networks through torch.hub, torchvision or lpips, which a hospital cluster cannot reach).
    Features are unit-normalised per voxel over channels, as in LPIPS and MONAI's MedicalNet
    similarity, then compared with a squared distance averaged over space and layers.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.eval()
        for p in self.network.parameters():  # ScriptModules lack requires_grad_()
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.network(x.float()), self.network(y.float())
        if isinstance(fx, torch.Tensor):
            fx, fy = [fx], [fy]
        terms = [
            (normalize_tensor(a) - normalize_tensor(b)).pow(2).sum(1).mean()
            for a, b in zip(fx, fy, strict=True)
        ]
        return torch.stack(terms).mean()


def load_perceptual(
    spec: str, device: torch.device, storage_cfg: StorageConfig
) -> FeaturePerceptualLoss | None:
    """The perceptual loss from a local path, file:// or s3:// URI; None when ``spec`` is empty."""
    if not spec:
        return None
    where = "train.autoencoder.perceptual_weights"
    try:
        if storage.is_remote(spec):
            path = Path(tempfile.mkdtemp(prefix="ldm-perceptual-")) / Path(spec).name
            storage.download_file(spec, path, storage_cfg)
        else:
            path = storage.local_path(spec)
    except LdmError as e:
        raise LdmError(f"{where}: {e}") from None
    if not path.is_file():
        raise LdmError(f"{where}: {spec}: file not found")
    try:
        network = torch.jit.load(str(path), map_location=device)
    except Exception as e:  # a non-TorchScript file raises several types
        raise LdmError(
            f"{where}: {spec} is not a TorchScript network ({type(e).__name__}: {e}); "
            "export the feature extractor with torch.jit.trace and torch.jit.save"
        ) from None
    log.info("perceptual loss: feature network from %s", spec)
    return FeaturePerceptualLoss(network).to(device)


# --------------------------------------------------------------------------- training


def _run(cfg: Config, data_dir: Path, manifest: dict[str, Any], out: Path, env: DistEnv) -> None:
    """One rank's part of the stage: data, models, resume, the shared loop, the final model."""
    tc = cfg.train.autoencoder
    loop.seed_everything(cfg.train.seed)
    train_set = VolumeDataset(data_dir, "train")
    val_set = VolumeDataset(data_dir, "val") if subjects(manifest, "val") else None
    loader = make_loader(
        train_set,
        tc.batch_size,
        env.world_size,
        env.rank,
        cfg.train.seed,
        shuffle=True,
        num_workers=cfg.data.num_workers,
        pin_memory=env.device.type == "cuda",
    )
    parts = _build(cfg, env)
    perceptual = (
        load_perceptual(tc.perceptual_weights, env.device, cfg.storage)
        if tc.perceptual_weight > 0
        else None
    )

    run = loop.Run(STAGE, out, cfg, env, tc.steps)
    start = loop.begin(run, parts, manifest, arch_sections=_ARCH, optional=_DISC_PARTS)
    step_fn = _step_fn(cfg, env, parts, perceptual)
    validate = None if val_set is None else _validate_fn(parts["model"], val_set, cfg, env)
    step = loop.train(run, step_fn, loader, parts, start=start, validate=validate)
    _save_final(parts["model"], train_set, cfg, env, out, step)


def set_initial_sigma(ae: nn.Module, sigma: float) -> None:
    """Start the posterior's standard deviation near ``sigma``: the encoder's log-variance
    convolution gets the bias 2 ln(sigma) (sigma = exp(log_var / 2)); its weights keep their
    random initialisation. A resumed run's checkpoint overwrites this."""
    with torch.no_grad():
        ae.quant_conv_log_sigma.conv.bias.fill_(2.0 * math.log(sigma))


def _build(cfg: Config, env: DistEnv) -> dict[str, Any]:
    """The autoencoder, its optimizer and scaler, the NaN guard and, when the adversarial
    loss will join within this run, the discriminator with its own optimizer and scaler:
    everything a checkpoint holds, in the order the shared seed initialises it."""
    tc, device = cfg.train.autoencoder, env.device
    ae = build_autoencoder(cfg)
    set_initial_sigma(ae, tc.initial_sigma)
    ae = prepare_model(ae, cfg, device)
    parts: dict[str, Any] = {
        "model": ae,
        "optimizer": adam(ae.parameters(), tc.lr, device),
        "scaler": make_scaler(device, cfg.train.amp),
        "guard": NonFiniteGuard(cfg.train.max_nonfinite, STAGE),
    }
    if tc.adv_weight > 0 and tc.adv_start_step < tc.steps:
        disc = build_discriminator(cfg)
        if cfg.train.sync_bn and env.distributed:
            if device.type == "cuda":
                disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
            else:
                log.info(
                    "train.sync_bn: SyncBatchNorm needs CUDA; keeping per-rank BatchNorm on CPU"
                )
        disc = prepare_model(disc, cfg, device)
        parts |= {
            "discriminator": disc,
            "disc_optimizer": adam(disc.parameters(), tc.disc_lr, device),
            "disc_scaler": make_scaler(device, cfg.train.amp),
        }
    return parts


def _step_fn(
    cfg: Config,
    env: DistEnv,
    parts: dict[str, Any],
    perceptual: FeaturePerceptualLoss | None,
) -> loop.StepFn:
    """The generator step: L1 + KL (+ gradient difference) (+ spectral) (+ perceptual) (+ adversarial,
    once it has joined) at the scheduled learning rate, then, with the adversarial loss on,
    one discriminator step on the same reconstructions (at its own constant ``disc_lr``)."""
    tc, device, amp = cfg.train.autoencoder, env.device, cfg.train.amp
    ae, optimizer, scaler = parts["model"], parts["optimizer"], parts["scaler"]
    disc = parts.get("discriminator")
    ae_train = for_training(ae, cfg, env.distributed, device)
    ae_train.train()
    adv_loss = PatchAdversarialLoss(criterion="least_squares")
    spectral_loss = JukeboxLoss(spatial_dims=3) if tc.spectral_weight > 0 else None
    disc_step = None if disc is None else _disc_step_fn(cfg, env, parts, adv_loss)
    schedule = LrSchedule(tc.lr, tc.steps, tc.lr_warmup_steps, tc.lr_decay)

    def step(batch: torch.Tensor, at: int) -> loop.Step:
        x = to_input(batch, cfg, device)
        adv_on = disc_step is not None and at > tc.adv_start_step
        with autocast(device, amp):
            recon, z_mu, z_sigma = ae_train(x)
            recon = recon.float()
            l1 = (recon - x).abs().mean()
            kl = kl_divergence(z_mu, z_sigma)
            g_loss = l1 + tc.kl_weight * kl
            terms = {"l1": l1, "kl": kl}
            if tc.gradient_weight > 0:
                terms["gradient"] = gradient_difference(recon, x)
                g_loss = g_loss + tc.gradient_weight * terms["gradient"]
            if spectral_loss is not None:
                terms["spectral"] = spectral_loss(recon, x)
                g_loss = g_loss + tc.spectral_weight * terms["spectral"]
            if perceptual is not None:
                terms["perceptual"] = perceptual(recon, x)
                g_loss = g_loss + tc.perceptual_weight * terms["perceptual"]
            if adv_on:
                # The generator is scored by the discriminator's current weights; the
                # discriminator itself learns only in its own step below.
                disc.requires_grad_(False)
                logits = disc(recon.contiguous())[-1]
                terms["g_adv"] = adv_loss(logits, target_is_real=True, for_discriminator=False)
                g_loss = g_loss + tc.adv_weight * terms["g_adv"]
                disc.requires_grad_(True)

        def update() -> loop.Scalars:
            lr = schedule.apply(optimizer, at)
            grad_norm = optimizer_step(
                g_loss, optimizer, scaler, list(ae.parameters()), cfg.train.grad_clip
            )
            if adv_on:
                d_loss = disc_step(x, recon, at)
                if d_loss is not None:
                    terms["d_loss"] = d_loss
            return {"grad_norm": grad_norm, "lr": lr, **terms}

        return loop.Step(g_loss, update)

    return step


def _disc_step_fn(
    cfg: Config, env: DistEnv, parts: dict[str, Any], adv_loss: PatchAdversarialLoss
) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor | None]:
    """The discriminator's step (real ``x`` vs ``recon``); returns its loss, or None when
    that was NaN/Inf on some rank and the step was skipped (the generator's step stands)."""
    device, amp = env.device, cfg.train.amp
    disc, d_opt, d_scaler = parts["discriminator"], parts["disc_optimizer"], parts["disc_scaler"]
    disc_train = for_training(disc, cfg, env.distributed, device, compile=False)

    def step(x: torch.Tensor, recon: torch.Tensor, at: int) -> torch.Tensor | None:
        with autocast(device, amp):
            fake = disc_train(recon.detach().contiguous())[-1]
            real = disc_train(x.contiguous())[-1]
            d_loss = 0.5 * (
                adv_loss(fake, target_is_real=False, for_discriminator=True)
                + adv_loss(real, target_is_real=True, for_discriminator=True)
            )
        if distributed.any_rank(env, not is_finite(d_loss)):
            log.warning("autoencoder step %d: non-finite discriminator loss; its step skipped", at)
            return None
        optimizer_step(d_loss, d_opt, d_scaler, list(disc.parameters()), cfg.train.grad_clip)
        return d_loss

    return step


def _validate_fn(
    ae: nn.Module, val_set: VolumeDataset, cfg: Config, env: DistEnv
) -> loop.ValidateFn:
    """Validation L1 in the curves, and the first volume with its reconstruction in TensorBoard."""

    def run(step: int, metrics: MetricsLog) -> None:
        val_l1, example = validate(ae, val_set, cfg, env)
        metrics.log(step, "val", val_l1, l1=val_l1)
        if example is not None:
            metrics.image("val/reconstruction", example, step)
            metrics.image("val/input", val_set[0], step)

    return run


def _save_final(
    ae: nn.Module, train_set: VolumeDataset, cfg: Config, env: DistEnv, out: Path, step: int
) -> None:
    """``autoencoder.pt``: the weights and the latent scale factor measured over the training
    set, once every rank has checked that the replicas still agree."""
    distributed.check_replicas(env, ae, STAGE)
    scale_factor = compute_scale_factor(ae, train_set, cfg, env)
    if env.is_main:
        ckpt.atomic_save(
            {
                "state_dict": ae.state_dict(),
                "scale_factor": scale_factor,
                "config": cfg.to_dict(),
                "steps": step,
            },
            out / AUTOENCODER_PT,
        )
        log.info(
            "autoencoder finished: %d steps, scale factor %.4f -> %s",
            step,
            scale_factor,
            out / AUTOENCODER_PT,
        )
    distributed.barrier(env)


@torch.no_grad()
def validate(
    ae: nn.Module, val_set: VolumeDataset, cfg: Config, env: DistEnv
) -> tuple[float, torch.Tensor | None]:
    """Mean L1 reconstruction error over the validation split (sharded across ranks).

    Returns the loss and, on rank 0, the reconstruction of the first validation volume.
    The model is left in the mode it was in.
    """
    loader = make_loader(
        val_set, cfg.train.autoencoder.batch_size, env.world_size, env.rank, 0, shuffle=False
    )
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)
    example = None
    with evaluating(ae):
        for x in loader:
            x = to_input(x, cfg, env.device)
            with autocast(env.device, cfg.train.amp):
                recon = ae.reconstruct(x).float()
            totals[0] += (recon - x).abs().flatten(1).mean(1).sum().double()
            totals[1] += x.shape[0]
            if example is None and env.is_main:
                example = recon[0]
    distributed.all_reduce_sum(env, totals)
    return float(totals[0] / totals[1]), example


@torch.no_grad()
def compute_scale_factor(
    ae: nn.Module, train_set: VolumeDataset, cfg: Config, env: DistEnv
) -> float:
    """1 / std of the posterior means over the training set (or ``scale_factor_batches`` batches).

    Moments are accumulated in float64 and summed across ranks, so the result is the
    same as one pass over the whole set on one process. The model is left in the mode it
    was in.
    """
    limit = cfg.train.autoencoder.scale_factor_batches
    loader = make_loader(
        train_set, cfg.train.autoencoder.batch_size, env.world_size, env.rank, 0, shuffle=False
    )
    moments = torch.zeros(3, dtype=torch.float64, device=env.device)
    with evaluating(ae):
        for i, x in enumerate(loader):
            if limit and i >= limit:
                break
            z_mu, _ = ae.encode(to_input(x, cfg, env.device))
            z = z_mu.double()
            moments += torch.stack(
                [
                    z.sum(),
                    z.pow(2).sum(),
                    torch.tensor(float(z.numel()), dtype=torch.float64, device=z.device),
                ]
            )
    distributed.all_reduce_sum(env, moments)
    mean = moments[0] / moments[2]
    var = moments[1] / moments[2] - mean.pow(2)
    std = math.sqrt(max(float(var), 0.0))
    if not math.isfinite(std) or std < 1e-8:
        raise LdmError(
            f"autoencoder latents have std {std:g}; the model collapsed. Retrain with a lower "
            "train.autoencoder.lr or a smaller train.autoencoder.kl_weight"
        )
    return 1.0 / std
