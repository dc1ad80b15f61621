"""Peak memory of one training step (forward, backward, Adam update) per preset: AE (+ discriminator) and UNet.

Each (preset, stage) runs in a fresh subprocess so that peaks do not mix. On a GPU the
figure is ``torch.cuda.max_memory_allocated`` at the preset's own shapes, precision and
gradient checkpointing. Without a GPU it is the process's peak RSS growth during the step
on the CPU; presets made for GPUs are then measured at a reduced image shape
(``--cpu-shape``, default 32^3) with their real architecture and batch size, and the JSON
says so. Usage:

    .venv/bin/python -m benchmarks.bench_memory [--presets tiny-cpu gpu-16g ...] [--cpu-shape 32 32 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from benchmarks.common import record
from ldm_core.config import PRESETS


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(preset: str, stage: str, cpu_shape: list[int]) -> dict:
    """One training step of ``stage`` under ``preset``, in this process."""
    import torch.nn.functional as F
    from monai.losses import PatchAdversarialLoss

    from ldm_core.config import load_config
    from ldm_core.models import (
        build_autoencoder,
        build_discriminator,
        build_unet,
        diffusion_training_example,
    )
    from ldm_core.samplers import training_scheduler
    from ldm_core.train.autoencoder import kl_divergence
    from ldm_core.train.model_setup import enable_block_checkpointing
    from ldm_core.train.precision import autocast

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    overrides = ["train.device=" + device.type]
    reduced = not cuda and preset != "tiny-cpu"
    if reduced:
        overrides.append(f"data.shape={list(cpu_shape)}")
    if not cuda:
        overrides.append("train.amp=none")
    cfg = load_config(preset=preset, overrides=overrides)
    torch.manual_seed(0)
    if stage == "autoencoder":
        batch = cfg.train.autoencoder.batch_size
        model = build_autoencoder(cfg).to(device).train()
        disc = build_discriminator(cfg).to(device).train()
        x = torch.rand(batch, 1, *cfg.data.shape, device=device)
        adv = PatchAdversarialLoss(criterion="least_squares")

        def step() -> None:
            with autocast(device, cfg.train.amp):
                recon, mu, sigma = model(x)
                loss = (
                    recon.float() - x
                ).abs().mean() + cfg.train.autoencoder.kl_weight * kl_divergence(mu, sigma)
                loss = loss + cfg.train.autoencoder.adv_weight * adv(
                    disc(recon.float())[-1], True, False
                )
            loss.backward()
            with autocast(device, cfg.train.amp):
                d = adv(disc(recon.detach().float())[-1], False, True) + adv(
                    disc(x)[-1], True, True
                )
            d.backward()
            optimizer.step()

        optimizer = torch.optim.Adam([*model.parameters(), *disc.parameters()])
        params = sum(p.numel() for p in model.parameters()) + sum(
            p.numel() for p in disc.parameters()
        )
    else:
        batch = cfg.train.diffusion.batch_size
        model = build_unet(cfg).to(device).train()
        if cfg.train.gradient_checkpointing:
            enable_block_checkpointing([*model.down_blocks, model.middle_block, *model.up_blocks])
        scheduler = training_scheduler(cfg)
        z = torch.randn(batch, *cfg.latent_shape, device=device)

        def step() -> None:
            with autocast(device, cfg.train.amp):
                noisy, t, target = diffusion_training_example(cfg, scheduler, z)
                loss = F.mse_loss(model(noisy, timesteps=t).float(), target)
            loss.backward()
            optimizer.step()

        optimizer = torch.optim.Adam(model.parameters())
        params = sum(p.numel() for p in model.parameters())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        kind = "cuda max_memory_allocated growth"
    else:
        before = _rss_mb()
        step()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
        kind = "cpu peak RSS growth"
    return {
        "preset": preset,
        "stage": stage,
        "image_shape": list(cfg.data.shape),
        "reduced_shape": reduced,
        "batch": batch,
        "amp": cfg.train.amp,
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "params_m": round(params / 1e6, 2),
        "peak_mb": round(peak_mb, 1),
        "measure": kind,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--cpu-shape", nargs=3, type=int, default=[32, 32, 32])
    parser.add_argument("--child", nargs=2, metavar=("PRESET", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.cpu_shape)))
        return

    rows = []
    for preset in args.presets:
        for stage in ("autoencoder", "diffusion"):
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.bench_memory",
                "--child",
                preset,
                stage,
                "--cpu-shape",
                *map(str, args.cpu_shape),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    cuda = torch.cuda.is_available()
    note = "" if cuda else "no GPU here: CPU RSS; GPU presets at a reduced shape"
    summary = "; ".join(
        f"{r['preset']} {'AE' if r['stage'] == 'autoencoder' else 'UNet'} {r['peak_mb']:.0f} MB"
        + (" (reduced)" if r["reduced_shape"] else "")
        for r in rows
    )
    record(
        "memory",
        {"cuda": cuda, "note": note, "load_avg_1m": round(os.getloadavg()[0], 2), "rows": rows},
        summary=f"{summary}" + (f" [{note}]" if note else ""),
    )


if __name__ == "__main__":
    main()
