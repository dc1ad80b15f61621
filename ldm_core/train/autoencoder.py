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
from pathlib import Path
from typing import Any

import torch
from monai.losses import PatchAdversarialLoss
from monai.losses.perceptual import normalize_tensor
from torch import nn

from ldm_core import storage
from ldm_core.config import Config, StorageConfig
from ldm_core.data.cache import VolumeDataset, read_manifest, subjects
from ldm_core.errors import LdmError
from ldm_core.io import AUTOENCODER_PT, CHECKPOINT_DIR
from ldm_core.models import build_autoencoder, build_discriminator
from ldm_core.train import checkpoint as ckpt
from ldm_core.train import distributed, loop
from ldm_core.train.distributed import DistEnv

log = logging.getLogger(__name__)

STAGE = "autoencoder"


def train_autoencoder(cfg: Config, data_dir: str | Path, output_dir: str | Path) -> Path:
    """Train (or resume, or skip if finished) the autoencoder; returns the run directory."""
    data_dir, out = Path(data_dir), Path(output_dir)
    if finished(cfg, out):
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


def finished(cfg: Config, out: Path) -> bool:
    """True when ``out`` holds a final autoencoder of this architecture with enough steps."""
    final = out / AUTOENCODER_PT
    if not final.exists():
        return False
    saved = ckpt.load(final)
    ckpt.check_same_architecture(saved.get("config", {}), cfg.to_dict(), "model.autoencoder", final)
    return int(saved.get("steps", 0)) >= cfg.train.autoencoder.steps


# --------------------------------------------------------------------------- losses


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, I)), summed over latent voxels, averaged over the batch."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


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
    tc = cfg.train.autoencoder
    device = env.device
    loop.seed_everything(cfg.train.seed)

    train_set = VolumeDataset(data_dir, "train")
    val_set = VolumeDataset(data_dir, "val") if subjects(manifest, "val") else None
    loader = loop.make_loader(
        train_set,
        tc.batch_size,
        env.world_size,
        env.rank,
        cfg.train.seed,
        shuffle=True,
        num_workers=cfg.data.num_workers,
    )

    ae = loop.prepare_model(build_autoencoder(cfg), cfg, device)
    optimizer = torch.optim.Adam(ae.parameters(), lr=tc.lr)
    scaler = loop.make_scaler(device, cfg.train.amp)

    use_adv = tc.adv_weight > 0 and tc.adv_start_step < tc.steps
    disc = d_opt = d_scaler = None
    if use_adv:
        disc = build_discriminator(cfg)
        if cfg.train.sync_bn and env.distributed:
            if device.type == "cuda":
                disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
            else:
                log.info(
                    "train.sync_bn: SyncBatchNorm needs CUDA; keeping per-rank BatchNorm on CPU"
                )
        disc = loop.prepare_model(disc, cfg, device)
        d_opt = torch.optim.Adam(disc.parameters(), lr=tc.disc_lr)
        d_scaler = loop.make_scaler(device, cfg.train.amp)
    perceptual = (
        load_perceptual(tc.perceptual_weights, device, cfg.storage)
        if tc.perceptual_weight > 0
        else None
    )
    adv_loss = PatchAdversarialLoss(criterion="least_squares")
    guard = loop.NonFiniteGuard(cfg.train.max_nonfinite, STAGE)

    # Identical weights come from the shared seed above; from here on each rank draws its
    # own noise (and, for diffusion, timesteps), or the ranks would duplicate each other's.
    loop.seed_everything(cfg.train.seed + env.rank)
    manager = ckpt.CheckpointManager(out / CHECKPOINT_DIR, cfg.train.keep_checkpoints)
    step = 0
    state = ckpt.resume(manager, env, device)
    if state is not None:
        parts = {"model": ae, "optimizer": optimizer, "scaler": scaler, "guard": guard}
        if disc is not None and "discriminator" in state:
            parts |= {"discriminator": disc, "disc_optimizer": d_opt, "disc_scaler": d_scaler}
        step = ckpt.restore(
            state,
            parts,
            cfg=cfg.to_dict(),
            arch_sections=("model.autoencoder",),
            env=env,
            seed=cfg.train.seed,
        )
        log.info(
            "resuming autoencoder training from %s (step %d of %d)", state["path"], step, tc.steps
        )
        del state

    ae_train = loop.for_training(ae, cfg, env.distributed, device)
    disc_train: nn.Module | None = None
    if disc is not None:
        disc_train = loop.for_training(disc, cfg, env.distributed, device, compile=False)

    if env.is_main:
        loop.write_run_files(cfg, manifest, out)
    metrics = loop.MetricsLog(
        out, STAGE, tc.steps, step, env.is_main, batch_size=tc.batch_size * env.world_size
    )

    def save_checkpoint(at: int) -> None:
        rng = distributed.gather_object(env, ckpt.rng_state())
        if env.is_main:
            state = {
                "model": ae.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "guard": guard.state_dict(),
                "rng": rng,
                "config": cfg.to_dict(),
            }
            if disc is not None:
                state.update(
                    discriminator=disc.state_dict(),
                    disc_optimizer=d_opt.state_dict(),
                    disc_scaler=d_scaler.state_dict(),
                )
            manager.save(state, at)
        distributed.barrier(env)

    data = loop.batches(loader, step)
    ae_train.train()
    try:
        while step < tc.steps:
            x = loop.to_input(next(data), cfg, device)
            adv_on = disc is not None and step >= tc.adv_start_step
            with loop.autocast(device, cfg.train.amp):
                recon, z_mu, z_sigma = ae_train(x)
                recon = recon.float()
                l1 = (recon - x).abs().mean()
                kl = kl_divergence(z_mu, z_sigma)
                g_loss = l1 + tc.kl_weight * kl
                terms = {"l1": l1, "kl": kl}
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
            finite = not distributed.any_rank(env, not loop.is_finite(g_loss))
            if not guard.record(finite, step + 1):
                metrics.log(step + 1, "train", float("nan"), nonfinite_total=guard.total)
                guard.check(step + 1)
                optimizer.zero_grad(set_to_none=True)
                continue
            grad_norm = loop.optimizer_step(
                g_loss, optimizer, scaler, list(ae.parameters()), cfg.train.grad_clip
            )
            if adv_on:
                with loop.autocast(device, cfg.train.amp):
                    fake = disc_train(recon.detach().contiguous())[-1]
                    real = disc_train(x.contiguous())[-1]
                    d_loss = 0.5 * (
                        adv_loss(fake, target_is_real=False, for_discriminator=True)
                        + adv_loss(real, target_is_real=True, for_discriminator=True)
                    )
                if not distributed.any_rank(env, not loop.is_finite(d_loss)):
                    loop.optimizer_step(
                        d_loss, d_opt, d_scaler, list(disc.parameters()), cfg.train.grad_clip
                    )
                    terms["d_loss"] = d_loss
                else:
                    log.warning(
                        "autoencoder step %d: non-finite discriminator loss; its step skipped",
                        step + 1,
                    )
            step += 1

            if step % cfg.train.log_every == 0 or step == tc.steps:
                speed = metrics.progress(step, g_loss.item())
                metrics.log(
                    step,
                    "train",
                    g_loss.item(),
                    grad_norm=grad_norm,
                    **{k: v.item() for k, v in terms.items()},
                    **speed,
                )
            if val_set is not None and (step % cfg.train.val_every == 0 or step == tc.steps):
                val_l1, example = validate(ae, val_set, cfg, env)
                metrics.log(step, "val", val_l1, l1=val_l1)
                if example is not None:
                    metrics.image("val/reconstruction", example, step)
                    metrics.image("val/input", val_set[0], step)
                ae_train.train()
            if step % cfg.train.checkpoint_every == 0 or step == tc.steps:
                save_checkpoint(step)
    finally:
        metrics.close()

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
    """
    ae.eval()
    loader = loop.make_loader(
        val_set, cfg.train.autoencoder.batch_size, env.world_size, env.rank, 0, shuffle=False
    )
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)
    example = None
    for x in loader:
        x = loop.to_input(x, cfg, env.device)
        with loop.autocast(env.device, cfg.train.amp):
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
    same as one pass over the whole set on one process.
    """
    ae.eval()
    limit = cfg.train.autoencoder.scale_factor_batches
    loader = loop.make_loader(
        train_set, cfg.train.autoencoder.batch_size, env.world_size, env.rank, 0, shuffle=False
    )
    moments = torch.zeros(3, dtype=torch.float64, device=env.device)
    for i, x in enumerate(loader):
        if limit and i >= limit:
            break
        z_mu, _ = ae.encode(loop.to_input(x, cfg, env.device))
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
