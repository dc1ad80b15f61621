"""FLOPs of one training step or one denoising call, counted on the meta device.

``torch.utils.flop_counter.FlopCounterMode`` counts the matrix work (convolutions,
matmuls, attention) that a call dispatches; elementwise ops and norms are left out, as in
every model-FLOPs-utilisation figure. Counting on ``meta`` tensors needs no memory and no
accelerator, so the same numbers come out on the CPU of a laptop and on the GPU that runs
the timed steps. The count is the model's own work: recomputation by gradient
checkpointing is not in it (the usual MFU convention), so a checkpointed step at the same
speed does more hardware work than its TFLOP/s say.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ldm_core.config import Config
from ldm_core.models import build_autoencoder, build_unet

META = torch.device("meta")


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs that ``fn()`` dispatches (a multiply-add counts as two)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def autoencoder_step_flops(cfg: Config, batch: int) -> int:
    """One generator forward + backward of the autoencoder at ``data.shape`` (L1 + KL).

    The discriminator's steps, which join after ``train.autoencoder.adv_start_step``, are
    not included: the figure is divided by the generator-only step time.
    """
    with META:
        ae = build_autoencoder(cfg, use_checkpoint=False)
        x = torch.randn(batch, 1, *cfg.data.shape)

    def step() -> None:
        recon, z_mu, z_sigma = ae(x)
        kl = (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2))).mean()
        ((recon - x).abs().mean() + kl).backward()

    return count_flops(step)


def unet_step_flops(cfg: Config, batch: int) -> int:
    """One UNet forward + backward on a batch of latents with an MSE loss."""
    with META:
        unet = build_unet(cfg)
        z = torch.randn(batch, *cfg.latent_shape)
        t = torch.zeros(batch, dtype=torch.long)
    return count_flops(lambda: F.mse_loss(unet(z, timesteps=t), z).backward())


def unet_forward_flops(cfg: Config, batch: int) -> int:
    """One UNet forward (one denoising step of a sampler) at ``batch`` latents."""
    with META:
        unet = build_unet(cfg).eval()
        z = torch.randn(batch, *cfg.latent_shape)
        t = torch.zeros(batch, dtype=torch.long)

    def forward() -> None:
        with torch.no_grad():
            unet(z, timesteps=t)

    return count_flops(forward)


def tflops_per_s(flops: int, seconds: float) -> float:
    """Achieved TFLOP/s to 4 significant digits (a CPU dry run's figures are tiny but not
    zero); 0.0 when nothing was timed."""
    return float(f"{flops / seconds / 1e12:.4g}") if seconds > 0 else 0.0
