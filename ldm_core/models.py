"""Networks of the LDM, built from the config (MONAI core modules), and their weights.

The autoencoder compresses a volume ``[1, D, H, W]`` to a latent ``[C, D/f, H/f, W/f]``;
the UNet learns to denoise latents (Rombach et al. 2022; Pinaya et al. 2022). Everything
here is architecture: training loops live in ``ldm_core.train``, the noise schedulers and
which objective takes which sampler in ``ldm_core.samplers``, and sampling in
``ldm_core.sample``, so serving and evaluation can build a model without training code.

Attention in both networks runs through ``torch.nn.functional.scaled_dot_product_attention``
(MONAI's ``use_flash_attention``), which dispatches to the flash or memory-efficient kernels
on a GPU and to the fused math kernel on a CPU. MONAI allows it wherever attention weights
are not saved and no relative position embedding is used (neither is, here). It changes no
parameter: the state-dict keys are those of the explicit attention, so checkpoints saved
before it load unchanged (tests/test_models.py holds that).
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from monai.networks.schedulers import RFlowScheduler, Scheduler

from ldm_core.config import Config
from ldm_core.errors import LdmError

log = logging.getLogger(__name__)


def build_autoencoder(cfg: Config, use_checkpoint: bool | None = None) -> AutoencoderKL:
    """The KL-regularised autoencoder for single-channel volumes."""
    a = cfg.model.autoencoder
    return AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=a.channels,
        latent_channels=a.latent_channels,
        num_res_blocks=a.num_res_blocks,
        norm_num_groups=a.norm_num_groups,
        attention_levels=a.attention_levels,
        with_encoder_nonlocal_attn=a.with_encoder_nonlocal_attn,
        with_decoder_nonlocal_attn=a.with_decoder_nonlocal_attn,
        use_checkpoint=cfg.train.gradient_checkpointing
        if use_checkpoint is None
        else use_checkpoint,
        use_flash_attention=True,
    )


def build_unet(cfg: Config) -> DiffusionModelUNet:
    """The denoising UNet; its input and output are latents."""
    u = cfg.model.unet
    latent_channels = cfg.model.autoencoder.latent_channels
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=latent_channels,
        out_channels=latent_channels,
        channels=u.channels,
        attention_levels=u.attention_levels,
        num_res_blocks=u.num_res_blocks,
        num_head_channels=u.num_head_channels,
        norm_num_groups=u.norm_num_groups,
        use_flash_attention=True,
    )


def min_snr_weight(
    scheduler: Scheduler, timesteps: torch.Tensor, prediction_type: str, gamma: float
) -> torch.Tensor:
    """Per-example loss weights of min-SNR-gamma (Hang et al. 2023), one per timestep.

    The weight caps each timestep's signal-to-noise ratio at ``gamma`` in the loss on the
    clean latent, then converts to the target the UNet regresses: divided by SNR for noise
    prediction, by SNR + 1 for v-prediction, unchanged for the clean latent itself. Nearly
    clean timesteps, easy and numerous, then stop dominating the gradient.
    """
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    capped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return capped / snr
    if prediction_type == "v_prediction":
        return capped / (snr + 1)
    return capped


def build_discriminator(cfg: Config, channels: int = 32, num_layers: int = 3) -> PatchDiscriminator:
    """Patch discriminator for the autoencoder's adversarial loss (it has BatchNorm, which is
    why ``train.sync_bn`` exists)."""
    return PatchDiscriminator(
        spatial_dims=3,
        num_layers_d=num_layers,
        channels=channels,
        in_channels=1,
        out_channels=1,
    )


def diffusion_training_example(
    cfg: Config,
    scheduler: Scheduler,
    latents: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise a batch of clean latents for one training step.

    Returns ``(noisy, timesteps, target)``: the UNet sees ``noisy`` at ``timesteps`` (for
    ``ddpm``, drawn uniformly from the whole schedule or from 0..``train.diffusion.truncate_at``;
    for ``rflow``, from its scheduler's own distribution) and
    is regressed onto ``target`` (noise, velocity or the clean latent for ``ddpm``
    depending on ``prediction_type``; the velocity ``x0 - noise`` for ``rflow``).
    """
    noise = torch.randn(
        latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
    )
    s = cfg.model.scheduler
    if s.objective == "rflow":
        assert isinstance(scheduler, RFlowScheduler)
        timesteps = scheduler.sample_timesteps(latents)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        return noisy, timesteps, latents - noise
    truncate_at = cfg.train.diffusion.truncate_at
    highest = truncate_at if truncate_at else s.num_train_timesteps - 1
    timesteps = torch.randint(
        0, highest + 1, (latents.shape[0],), device=latents.device, generator=generator
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if s.prediction_type == "epsilon":
        target = noise
    elif s.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = latents
    return noisy, timesteps, target


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights saved by this project or by the monai-generative package.

    monai-generative (the predecessor of MONAI's generative modules) names some layers
    differently; MONAI's ``load_old_state_dict`` maps them. Anything else that does not
    fit raises LdmError naming ``source``.
    """
    try:
        model.load_state_dict(state_dict, strict=True)
        return
    except RuntimeError as strict_error:
        legacy = getattr(model, "load_old_state_dict", None)
        if legacy is None:
            raise LdmError(
                f"{source}: weights do not fit {type(model).__name__}: {strict_error}"
            ) from None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # MONAI prints its key report
            legacy(dict(state_dict))
    except Exception as e:  # MONAI raises several types on a mismatch
        raise LdmError(
            f"{source}: weights fit neither {type(model).__name__} nor its monai-generative "
            f"layout ({type(e).__name__}: {e}); was it trained with another architecture config?"
        ) from None
    if isinstance(model, AutoencoderKL):
        _bypass_unused_legacy_projections(model, state_dict)
    log.info("%s: loaded a monai-generative (legacy) state dict", source)


@torch.no_grad()
def _bypass_unused_legacy_projections(
    model: AutoencoderKL, state_dict: dict[str, torch.Tensor]
) -> None:
    """monai-generative 0.2.3's autoencoder attention defines ``proj_attn`` but never applies
    it; MONAI's mapping moves it into ``out_proj``, which MONAI does apply. To reproduce
    the legacy network's outputs, those output projections become the identity."""
    modules = dict(model.named_modules())
    for key in state_dict:
        if not key.endswith(".proj_attn.weight"):
            continue
        out_proj = modules.get(key[: -len(".proj_attn.weight")] + ".attn.out_proj")
        if isinstance(out_proj, torch.nn.Linear):
            out_proj.weight.copy_(torch.eye(out_proj.weight.shape[0]))
            if out_proj.bias is not None:
                out_proj.bias.zero_()
