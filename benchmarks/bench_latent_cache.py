"""Diffusion training step on cached latents vs encoding every batch (the MONAI tutorial way).

Same models, shapes, batch and process. The encode-every-step variant runs the frozen
autoencoder's encoder (no grad) on each image batch before the same UNet step; the cached
variant reads latents that were encoded once. Also reported: the one-off cost of building
the cache per volume, and after how many steps it has paid for itself. Usage:

    .venv/bin/python -m benchmarks.bench_latent_cache [--preset tiny-cpu] [--steps 5] [--batch N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import record
from ldm_core.config import load_config
from ldm_core.models import (
    build_autoencoder,
    build_unet,
    diffusion_training_example,
)
from ldm_core.samplers import training_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument(
        "--steps", type=int, default=5, help="timed steps per variant (after one warm-up)"
    )
    parser.add_argument(
        "--batch", type=int, default=0, help="default: the preset's diffusion batch size"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(preset=args.preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or cfg.train.diffusion.batch_size
    torch.manual_seed(0)
    ae = build_autoencoder(cfg, use_checkpoint=False).to(device).eval().requires_grad_(False)
    unet = build_unet(cfg).to(device).train()
    scheduler = training_scheduler(cfg)
    optimizer = torch.optim.Adam(unet.parameters(), lr=cfg.train.diffusion.lr)
    images = torch.rand(batch, 1, *cfg.data.shape, device=device)
    with torch.no_grad():
        cached = ae.encode(images)[0]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def unet_step(z: torch.Tensor) -> None:
        noisy, timesteps, target = diffusion_training_example(cfg, scheduler, z)
        loss = F.mse_loss(unet(noisy, timesteps=timesteps), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def encode_step() -> None:
        with torch.no_grad():
            z = ae.encode(images)[0]
        unet_step(z)

    def per_step(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    # Interleave so that a load change on a shared machine hits both variants alike.
    cached_s = per_step(lambda: unet_step(cached))
    encode_s = per_step(encode_step)
    cached_s = min(cached_s, per_step(lambda: unet_step(cached)))
    encode_s = min(encode_s, per_step(encode_step))
    encode_only = max(encode_s - cached_s, 0.0)
    ratio = encode_s / cached_s
    record(
        "latent_cache",
        {
            "preset": args.preset,
            "image_shape": list(cfg.data.shape),
            "latent_shape": list(cfg.latent_shape),
            "batch": batch,
            "timed_steps": args.steps,
            "cached_step_seconds": round(cached_s, 4),
            "encode_every_step_seconds": round(encode_s, 4),
            "encode_over_cached": round(ratio, 2),
            "cache_build_seconds_per_volume": round(encode_only / batch, 4),
            "cuda": device.type == "cuda",
            "load_avg_1m": round(os.getloadavg()[0], 2),  # a shared machine skews both variants
        },
        summary=f"diffusion step {cached_s:.3f} s on cached latents vs {encode_s:.3f} s encoding "
        f"every batch: cache {ratio:.1f}x faster (batch {batch}, {args.preset})",
    )


if __name__ == "__main__":
    main()
