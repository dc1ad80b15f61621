"""The baseline that faster sampling is measured against: MONAI's tutorial semantics.

The MONAI generative tutorials sample a latent diffusion model with a plain loop: fp32
models, MONAI's ``DDIMScheduler`` stepping the whole batch with one call, then the
autoencoder's ``decode_stage_2_outputs`` on the latents divided by the scale factor. This
module runs that loop on a bundle's own weights, read from its files rather than from
``ldm_core.bundle.load``, so that whatever the project's loader does later (casting,
compiling) cannot leak into the baseline. Same GPU, same process, same architecture:
``ours / reference`` is then a fair ratio.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.networks.schedulers import DDIMScheduler

from ldm_core.config import from_dict
from ldm_core.io import AUTOENCODER_PT, BUNDLE_JSON, CONFIG_YAML, UNET_PT
from ldm_core.models import build_autoencoder, build_unet, load_weights


def load_fp32(bundle_dir: Path, device: torch.device) -> tuple[Any, Any, Any, Any]:
    """(config, autoencoder, unet, to_autoencoder) of a bundle, fp32 in eval mode on
    ``device``; ``to_autoencoder`` maps the UNet's latents to the autoencoder's (undoes the
    per-channel ``latent_moments`` of a format-2 bundle, divides by the scale factor)."""
    cfg = from_dict(yaml.safe_load((bundle_dir / CONFIG_YAML).read_text()))
    info = json.loads((bundle_dir / BUNDLE_JSON).read_text())
    ae = build_autoencoder(cfg, use_checkpoint=False)
    unet = build_unet(cfg)
    for model, name in ((ae, AUTOENCODER_PT), (unet, UNET_PT)):
        state = torch.load(bundle_dir / name, map_location="cpu", weights_only=True)
        load_weights(model, state, str(bundle_dir / name))
    scale_factor = float(info["scale_factor"])
    mean, std = (
        torch.tensor(m, device=device).view(1, -1, 1, 1, 1)
        for m in info.get("latent_moments", [[0.0], [1.0]])
    )

    def to_autoencoder(x: torch.Tensor) -> torch.Tensor:
        return (x * std + mean) / scale_factor

    return cfg, ae.to(device).eval(), unet.to(device).eval(), to_autoencoder


@torch.no_grad()
def tutorial_ddim(bundle_dir: Path, num: int, steps: int) -> dict[str, Any]:
    """Time ``num`` samples end to end (noise, ``steps`` DDIM steps, decode, to CPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, ae, unet, to_autoencoder = load_fp32(Path(bundle_dir), device)
    if cfg.sampling.truncate_at:
        # ours would run fewer steps than the tutorial loop's whole schedule
        raise ValueError(
            f"{bundle_dir}: sampling.truncate_at is {cfg.sampling.truncate_at}; the tutorial "
            "baseline samples the whole schedule, so times would not compare"
        )
    s = cfg.model.scheduler
    scheduler = DDIMScheduler(
        num_train_timesteps=s.num_train_timesteps,
        schedule=s.schedule,
        beta_start=s.beta_start,
        beta_end=s.beta_end,
        prediction_type=s.prediction_type,
        clip_sample=False,
    )
    generator = torch.Generator(device="cpu").manual_seed(0)

    def run(k: int) -> torch.Tensor:
        x = torch.randn((num, *cfg.latent_shape), generator=generator).to(device)
        scheduler.set_timesteps(k, device=device)
        for t in scheduler.timesteps:
            out = unet(x, timesteps=torch.full((num,), int(t), device=device, dtype=torch.long))
            x, _ = scheduler.step(out, int(t), x)
        return ae.decode_stage_2_outputs(to_autoencoder(x)).cpu()

    run(2)  # warm-up: kernels, cuDNN autotuning, allocator
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run(steps)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "seeds": num,
        "seconds": round(seconds, 3),
        "samples_per_s": round(num / seconds, 4),
        "peak_memory_gib": None if peak is None else round(peak, 3),
        "semantics": "MONAI tutorial: fp32, DDIMScheduler on the whole batch, decode",
    }
