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
    unet.pt                      {"state_dict" (EMA), "config", "steps"} (when finished)
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

from ldm_core import io
from ldm_core.config import Config
from ldm_core.data.cache import read_manifest
from ldm_core.errors import LdmError
from ldm_core.io import AUTOENCODER_PT, CHECKPOINT_DIR, UNET_PT
from ldm_core.models import (
    build_autoencoder,
    build_scheduler,
    build_unet,
    diffusion_training_example,
    load_weights,
)
from ldm_core.train import checkpoint as ckpt
from ldm_core.train import distributed, latents, loop
from ldm_core.train.distributed import DistEnv

log = logging.getLogger(__name__)

STAGE = "diffusion"
_ARCH = ("model.unet", "model.scheduler", "model.autoencoder")


def train_diffusion(
    cfg: Config, data_dir: str | Path, autoencoder_dir: str | Path, output_dir: str | Path
) -> Path:
    """Train (or resume, or skip if finished) the latent UNet; returns the run directory."""
    data_dir, ae_dir, out = Path(data_dir), Path(autoencoder_dir), Path(output_dir)
    if finished(cfg, out):
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


def finished(cfg: Config, out: Path) -> bool:
    """True when ``out`` holds a final UNet of this architecture with enough steps."""
    final = out / UNET_PT
    if not final.exists():
        return False
    saved = ckpt.load(final)
    for section in _ARCH:
        ckpt.check_same_architecture(saved.get("config", {}), cfg.to_dict(), section, final)
    return int(saved.get("steps", 0)) >= cfg.train.diffusion.steps


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
    tc = cfg.train.diffusion
    device = env.device
    loop.seed_everything(cfg.train.seed)
    objective_sampler = "rflow" if cfg.model.scheduler.objective == "rflow" else "ddpm"
    scheduler = build_scheduler(cfg, objective_sampler)

    loader = loop.make_loader(
        TensorDataset(data["train"]),
        tc.batch_size,
        env.world_size,
        env.rank,
        cfg.train.seed,
        shuffle=True,
    )
    unet = loop.prepare_model(build_unet(cfg), cfg, device)
    if cfg.train.gradient_checkpointing:
        loop.enable_block_checkpointing([*unet.down_blocks, unet.middle_block, *unet.up_blocks])
    optimizer = torch.optim.Adam(unet.parameters(), lr=tc.lr)
    scaler = loop.make_scaler(device, cfg.train.amp)
    ema = loop.EMA(unet, tc.ema_decay)
    guard = loop.NonFiniteGuard(cfg.train.max_nonfinite, STAGE)

    # Identical weights come from the shared seed above; from here on each rank draws its
    # own noise (and, for diffusion, timesteps), or the ranks would duplicate each other's.
    loop.seed_everything(cfg.train.seed + env.rank)
    manager = ckpt.CheckpointManager(out / CHECKPOINT_DIR, cfg.train.keep_checkpoints)
    step = 0
    state = ckpt.resume(manager, env, device)
    if state is not None:
        parts = {
            "model": unet,
            "ema": ema,
            "optimizer": optimizer,
            "scaler": scaler,
            "guard": guard,
        }
        step = ckpt.restore(
            state, parts, cfg=cfg.to_dict(), arch_sections=_ARCH, env=env, seed=cfg.train.seed
        )
        log.info(
            "resuming diffusion training from %s (step %d of %d)", state["path"], step, tc.steps
        )
        del state

    unet_train = loop.for_training(unet, cfg, env.distributed, device)

    if env.is_main:
        loop.write_run_files(cfg, manifest, out)
    metrics = loop.MetricsLog(
        out, STAGE, tc.steps, step, env.is_main, batch_size=tc.batch_size * env.world_size
    )

    def save_checkpoint(at: int) -> None:
        rng = distributed.gather_object(env, ckpt.rng_state())
        if env.is_main:
            manager.save(
                {
                    "model": unet.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "guard": guard.state_dict(),
                    "rng": rng,
                    "config": cfg.to_dict(),
                },
                at,
            )
        distributed.barrier(env)

    batches = loop.batches(loader, step)
    unet_train.train()
    try:
        while step < tc.steps:
            (z,) = next(batches)
            z = loop.to_input(z, cfg, device)
            with loop.autocast(device, cfg.train.amp):
                noisy, timesteps, target = diffusion_training_example(cfg, scheduler, z)
                pred = unet_train(noisy, timesteps=timesteps)
                loss = F.mse_loss(pred.float(), target.float())
            finite = not distributed.any_rank(env, not loop.is_finite(loss))
            if not guard.record(finite, step + 1):
                metrics.log(step + 1, "train", float("nan"), nonfinite_total=guard.total)
                guard.check(step + 1)
                continue
            grad_norm = loop.optimizer_step(
                loss, optimizer, scaler, list(unet.parameters()), cfg.train.grad_clip
            )
            step += 1
            if step > tc.ema_start_step:
                ema.update(unet)
            else:
                ema.model.load_state_dict(unet.state_dict())

            if step % cfg.train.log_every == 0 or step == tc.steps:
                speed = metrics.progress(step, loss.item())
                metrics.log(step, "train", loss.item(), grad_norm=grad_norm, **speed)
            if "val" in data and (step % cfg.train.val_every == 0 or step == tc.steps):
                val_ema = validate(ema.model, data["val"], scheduler, cfg, env)
                val_raw = validate(unet, data["val"], scheduler, cfg, env)
                metrics.log(step, "val", val_ema, raw=val_raw)
                unet_train.train()
            if step % cfg.train.checkpoint_every == 0 or step == tc.steps:
                save_checkpoint(step)
    finally:
        metrics.close()

    distributed.check_replicas(env, ema.model, STAGE)
    if env.is_main:
        ckpt.atomic_save(
            {"state_dict": ema.model.state_dict(), "config": cfg.to_dict(), "steps": step},
            out / UNET_PT,
        )
        log.info("diffusion finished: %d steps -> %s", step, out / UNET_PT)
    distributed.barrier(env)


@torch.no_grad()
def validate(
    model: nn.Module, val: torch.Tensor, scheduler: Any, cfg: Config, env: DistEnv
) -> float:
    """Denoising loss on the validation latents with fixed noise and timesteps.

    The RNG is forked and seeded, so successive validations compare like with like and the
    training RNG stream is untouched (a resumed run stays on the same trajectory).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)
    shard = val[env.rank :: env.world_size]
    batch = cfg.train.diffusion.batch_size
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed + 1)
        for start in range(0, shard.shape[0], batch):
            z = loop.to_input(shard[start : start + batch], cfg, env.device)
            with loop.autocast(env.device, cfg.train.amp):
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
    model.train(was_training)
    return float(totals[0] / totals[1].clamp(min=1))
