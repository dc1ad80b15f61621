"""Diffusion stage: train the latent UNet on cached latents (``ldm train-diffusion``).

The frozen autoencoder encodes the data once into ``latents/`` (see
:mod:`ldm_core.train.latents`); the UNet then learns to denoise those latents under the
configured noise schedule (DDPM by default, rectified flow optional). An EMA of the
weights is kept and is what ships: it samples noticeably better than the raw weights of a
short run.

Output directory::

    checkpoints/ckpt-<step>.pt   resumable state (UNet, EMA, optimizer, scaler, RNG, ...)
    latents/                     the latent cache
    metrics.jsonl, tensorboard/  curves
    unet.pt                      {"state_dict" (EMA), "config", "steps", "latent_range",
                                  "latent_moments", "latent_prior"} (when finished)
    config.yaml, data_geometry.json
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ldm_core import io, latent_prior
from ldm_core.config import Config
from ldm_core.data.preprocessed import read_manifest
from ldm_core.errors import LdmError
from ldm_core.io import AUTOENCODER_PT, UNET_PT
from ldm_core.models import (
    build_autoencoder,
    build_unet,
    diffusion_training_example,
    load_weights,
    min_snr_weight,
)
from ldm_core.samplers import training_scheduler
from ldm_core.train import checkpoint as ckpt
from ldm_core.train import distributed, latents, loop
from ldm_core.train.distributed import DistEnv
from ldm_core.train.ema import EMA
from ldm_core.train.guard import NonFiniteGuard
from ldm_core.train.loader import make_loader, to_input
from ldm_core.train.metrics_log import MetricsLog
from ldm_core.train.model_setup import (
    enable_block_checkpointing,
    evaluating,
    for_training,
    prepare_model,
)
from ldm_core.train.optim import LrSchedule, adam, optimizer_step
from ldm_core.train.precision import autocast, make_scaler

log = logging.getLogger(__name__)

STAGE = "diffusion"
_ARCH = (
    "model.unet",
    "model.scheduler",
    "model.autoencoder",
    # The latent space the UNet learns in: a run resumed or reused in the other would mix two.
    "train.diffusion.standardise_channels",
    # The timesteps it learns: a run trained on part of the schedule cannot sample the rest.
    "train.diffusion.truncate_at",
)


def train_diffusion(
    cfg: Config, data_dir: str | Path, autoencoder_dir: str | Path, output_dir: str | Path
) -> Path:
    """Train (or resume, or skip if finished) the latent UNet; returns the run directory."""
    data_dir, ae_dir, out = Path(data_dir), Path(autoencoder_dir), Path(output_dir)
    if ckpt.finished(out / UNET_PT, cfg, _ARCH, cfg.train.diffusion.steps):
        log.info(
            "%s: finished diffusion run with %d steps found; nothing to do",
            out,
            cfg.train.diffusion.steps,
        )
        return out
    manifest = read_manifest(data_dir)
    ae_file = ae_dir / AUTOENCODER_PT
    ae_state = load_autoencoder(ae_file, cfg, manifest)
    loop.configure_threads(cfg)
    env = distributed.init(cfg)
    try:
        data = prepare_latents(cfg, data_dir, manifest, ae_file, ae_state, out, env)
        _run(cfg, manifest, data, out, env)
    finally:
        distributed.shutdown(env)
    return out


def load_autoencoder(path: Path, cfg: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """The finished autoencoder, checked against this run's config and data."""
    if not path.exists():
        raise LdmError(f"{path}: not found; train the autoencoder first (ldm train-autoencoder)")
    state = ckpt.load(path)
    for key in ("state_dict", "scale_factor", "config"):
        if key not in state:
            raise LdmError(f"{path}: missing {key!r}; is it a finished autoencoder run?")
    ckpt.check_same_architecture(state["config"], cfg.to_dict(), "model.autoencoder", path)
    if list(manifest["shape"]) != list(cfg.data.shape):
        raise LdmError(
            f"data.shape: config says {list(cfg.data.shape)} but the cache holds volumes of "
            f"{list(manifest['shape'])}; use the same data settings as 'ldm preprocess'"
        )
    return state


def prepare_latents(
    cfg: Config,
    data_dir: Path,
    manifest: dict[str, Any],
    ae_file: Path,
    ae_state: dict[str, Any],
    out: Path,
    env: DistEnv,
) -> dict[str, torch.Tensor]:
    """Reuse or (on rank 0) rebuild the latent cache; every rank then reads it."""
    root = out / latents.LATENT_DIR
    ae_sha = io.sha256_file(ae_file)
    key = latents.cache_key(ae_sha, manifest, cfg)
    if env.is_main:
        if latents.is_current(root, key):
            log.info("reusing latent cache %s", root)
        else:
            log.info("encoding the dataset into latent cache %s", root)
            ae = build_autoencoder(cfg, use_checkpoint=False)
            load_weights(ae, ae_state["state_dict"], str(ae_file))
            latents.build(
                root,
                key,
                ae.to(env.device),
                data_dir,
                manifest,
                float(ae_state["scale_factor"]),
                env.device,
                cfg.train.autoencoder.batch_size,
                provenance={"autoencoder_sha256": ae_sha, "dataset_hash": manifest["dataset_hash"]},
            )
            del ae
    distributed.barrier(env)
    return latents.load(root)


def _run(
    cfg: Config, manifest: dict[str, Any], data: dict[str, torch.Tensor], out: Path, env: DistEnv
) -> None:
    """One rank's part of the stage: models, resume, the shared loop, the final EMA UNet."""
    tc = cfg.train.diffusion
    data, moments = latent_space(data, tc.standardise_channels, env)
    loop.seed_everything(cfg.train.seed)
    scheduler = training_scheduler(cfg)
    loader = make_loader(
        TensorDataset(data["train"]),
        tc.batch_size,
        env.world_size,
        env.rank,
        cfg.train.seed,
        shuffle=True,
        pin_memory=env.device.type == "cuda",
    )
    parts = _build(cfg, env)

    run = loop.Run(STAGE, out, cfg, env, tc.steps)
    start = loop.begin(run, parts, manifest, arch_sections=_ARCH)
    step_fn = _step_fn(cfg, env, parts, scheduler)
    validate = _validate_fn(parts, data["val"], scheduler, cfg, env) if "val" in data else None
    step = loop.train(run, step_fn, loader, parts, start=start, validate=validate)

    ema = parts["ema"]
    distributed.check_replicas(env, ema.model, STAGE)
    if env.is_main:
        ckpt.atomic_save(
            {
                "state_dict": ema.model.state_dict(),
                "config": cfg.to_dict(),
                "steps": step,
                "latent_range": latent_range(data["train"]),
                "latent_moments": moments,
                "latent_prior": _prior(data["train"], tc.prior_components),
            },
            out / UNET_PT,
        )
        log.info("diffusion finished: %d steps -> %s", step, out / UNET_PT)
    distributed.barrier(env)


def _prior(train: torch.Tensor, components: int) -> dict[str, torch.Tensor] | None:
    """The training latents' Gaussian for truncated sampling (:mod:`ldm_core.latent_prior`),
    or None (with a warning) when one training latent gives no spread to fit."""
    if len(train) < 2:
        log.warning(
            "one training latent: no latent prior recorded, so the bundle cannot sample with "
            "sampling.truncate_at"
        )
        return None
    return latent_prior.fit(train, components)


def latent_space(
    data: dict[str, torch.Tensor], standardise_channels: bool, env: DistEnv
) -> tuple[dict[str, torch.Tensor], list[list[float]] | None]:
    """The splits of the latent cache in the space the UNet learns in, and the per-channel
    moments that map them there (None when they are used as cached).

    With ``standardise_channels`` every split is shifted and scaled, in place, by the
    training split's moments, so validation is scored in the space training runs in. The
    moments come from the cache alone, so a resumed run and every DDP rank get the same.
    """
    if not standardise_channels:
        return data, None
    moments = channel_moments(data["train"])
    if env.is_main:
        log.info("standardising latent channels: mean %s, std %s", *moments)
    shape = (1, -1, 1, 1, 1)
    for z in data.values():
        mean, std = (torch.tensor(m, dtype=z.dtype).view(shape) for m in moments)
        z.sub_(mean).div_(std)
    return data, moments


def channel_moments(train: torch.Tensor) -> list[list[float]]:
    """Per channel, the mean and standard deviation of the (scaled) training latents
    ``[N, C, d, h, w]``, accumulated in float64 one channel at a time: ``[mean, std]``, one
    list of C floats each (``train.diffusion.standardise_channels``)."""
    mean, std = [], []
    for c in range(train.shape[1]):
        channel = train[:, c].double()
        mean.append(float(channel.mean()))
        std.append(float(channel.std(correction=0)))
    if min(std) <= 0:
        raise LdmError(
            f"train.diffusion.standardise_channels: latent channel {std.index(min(std))} is "
            f"constant over the training latents (latents/train.npy, stds {std}); it cannot "
            "be scaled to unit variance"
        )
    return [mean, std]


def latent_range(train: torch.Tensor) -> list[list[float]]:
    """Per channel, the lowest and highest value of the training latents ``[N, C, d, h, w]``
    as the UNet sees them (scaled, and standardised when ``standardise_channels``): the
    bounds that sampling may clamp its clean-latent estimates to
    (``sampling.clamp_to_latent_range``). Returns ``[low, high]``, one list of C floats each."""
    per_channel = train.float().transpose(0, 1).flatten(1)
    return [per_channel.amin(1).tolist(), per_channel.amax(1).tolist()]


def _build(cfg: Config, env: DistEnv) -> dict[str, Any]:
    """The UNet, its EMA, optimizer and scaler, and the NaN guard: what a checkpoint holds."""
    unet = prepare_model(build_unet(cfg), cfg, env.device)
    if cfg.train.gradient_checkpointing:
        enable_block_checkpointing([*unet.down_blocks, unet.middle_block, *unet.up_blocks])
    optimizer = adam(unet.parameters(), cfg.train.diffusion.lr, env.device)
    return {
        "model": unet,
        "ema": EMA(unet, cfg.train.diffusion.ema_decay),
        "optimizer": optimizer,
        "scaler": make_scaler(env.device, cfg.train.amp),
        "guard": NonFiniteGuard(cfg.train.max_nonfinite, STAGE),
    }


def _step_fn(cfg: Config, env: DistEnv, parts: dict[str, Any], scheduler: Any) -> loop.StepFn:
    """The denoising step: noise a batch of latents at random timesteps, regress the
    scheduler's target at the scheduled learning rate, then move the EMA (a plain copy until
    ``ema_start_step``)."""
    tc, device = cfg.train.diffusion, env.device
    unet, ema = parts["model"], parts["ema"]
    optimizer, scaler = parts["optimizer"], parts["scaler"]
    unet_train = for_training(unet, cfg, env.distributed, device)
    unet_train.train()
    schedule = LrSchedule(tc.lr, tc.steps, tc.lr_warmup_steps, tc.lr_decay)

    def step(batch: list[torch.Tensor], at: int) -> loop.Step:
        (z,) = batch
        z = to_input(z, cfg, device)
        with autocast(device, cfg.train.amp):
            noisy, timesteps, target = diffusion_training_example(cfg, scheduler, z)
            pred = unet_train(noisy, timesteps=timesteps)
            if tc.snr_gamma > 0:
                per_example = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
                weight = min_snr_weight(
                    scheduler, timesteps, cfg.model.scheduler.prediction_type, tc.snr_gamma
                )
                loss = (weight * per_example).mean()
            else:
                loss = F.mse_loss(pred.float(), target.float())

        def update() -> loop.Scalars:
            lr = schedule.apply(optimizer, at)
            grad_norm = optimizer_step(
                loss, optimizer, scaler, list(unet.parameters()), cfg.train.grad_clip
            )
            if at > tc.ema_start_step:
                ema.update(unet)
            else:
                ema.model.load_state_dict(unet.state_dict())
            return {"grad_norm": grad_norm, "lr": lr}

        return loop.Step(loss, update)

    return step


def _validate_fn(
    parts: dict[str, Any], val: torch.Tensor, scheduler: Any, cfg: Config, env: DistEnv
) -> loop.ValidateFn:
    """Validation loss of the EMA weights (what ships) and, as ``raw``, of the trained ones."""

    def run(step: int, metrics: MetricsLog) -> None:
        val_ema = validate(parts["ema"].model, val, scheduler, cfg, env)
        val_raw = validate(parts["model"], val, scheduler, cfg, env)
        metrics.log(step, "val", val_ema, raw=val_raw)

    return run


@torch.no_grad()
def validate(
    model: nn.Module, val: torch.Tensor, scheduler: Any, cfg: Config, env: DistEnv
) -> float:
    """Denoising loss on the validation latents with fixed noise and timesteps.

    The RNG is forked and seeded, so successive validations compare like with like and the
    training RNG stream is untouched (a resumed run stays on the same trajectory). The
    model is left in the mode it was in.
    """
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)
    shard = val[env.rank :: env.world_size]
    batch = cfg.train.diffusion.batch_size
    fork = torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else [])
    with fork, evaluating(model):
        torch.manual_seed(cfg.train.seed + 1)
        for start in range(0, shard.shape[0], batch):
            z = to_input(shard[start : start + batch], cfg, env.device)
            with autocast(env.device, cfg.train.amp):
                noisy, timesteps, target = diffusion_training_example(cfg, scheduler, z)
                pred = model(noisy, timesteps=timesteps)
            err = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
            totals += torch.stack(
                [
                    err.double().sum(),
                    torch.tensor(float(z.shape[0]), dtype=torch.float64, device=env.device),
                ]
            )
    distributed.all_reduce_sum(env, totals)
    return float(totals[0] / totals[1].clamp(min=1))
