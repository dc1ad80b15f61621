"""Models: legacy monai-generative weights load; schedulers respect the training objective."""

from __future__ import annotations

import warnings

import pytest
import torch

from ldm_core.errors import LdmError
from ldm_core.models import (
    build_autoencoder,
    build_unet,
    diffusion_training_example,
    load_weights,
)
from ldm_core.samplers import build_sampler, training_scheduler
from tests.harness.configs import NO_SNR, tiny_config


def _legacy_modules():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from generative.networks.nets import AutoencoderKL, DiffusionModelUNet
    return AutoencoderKL, DiffusionModelUNet


def test_monai_generative_autoencoder_weights_load():
    OldAE, _ = _legacy_modules()
    cfg = tiny_config()
    a = cfg.model.autoencoder
    torch.manual_seed(3)
    old = OldAE(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        num_channels=a.channels,
        latent_channels=a.latent_channels,
        num_res_blocks=a.num_res_blocks,
        norm_num_groups=a.norm_num_groups,
        attention_levels=a.attention_levels,
        with_encoder_nonlocal_attn=True,
        with_decoder_nonlocal_attn=True,
    ).eval()
    # The legacy layout differs in the non-local attention blocks: exercise that mapping.
    cfg = tiny_config(
        "model.autoencoder.with_encoder_nonlocal_attn=true",
        "model.autoencoder.with_decoder_nonlocal_attn=true",
    )
    new = build_autoencoder(cfg).eval()
    with pytest.raises(RuntimeError):
        new.load_state_dict(old.state_dict(), strict=True)
    load_weights(new, old.state_dict(), "legacy-ae.pt")
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(old.encode(x)[0], new.encode(x)[0], atol=1e-5)  # posterior means
        z = torch.randn(1, 3, 16, 16, 16)
        assert torch.allclose(
            old.decode_stage_2_outputs(z), new.decode_stage_2_outputs(z), atol=1e-5
        )


def test_monai_generative_unet_weights_load():
    _, OldUNet = _legacy_modules()
    cfg = tiny_config()
    u = cfg.model.unet
    torch.manual_seed(4)
    old = OldUNet(
        spatial_dims=3,
        in_channels=3,
        out_channels=3,
        num_channels=u.channels,
        attention_levels=u.attention_levels,
        num_res_blocks=u.num_res_blocks,
        num_head_channels=u.num_head_channels,
        norm_num_groups=u.norm_num_groups,
    ).eval()
    new = build_unet(cfg).eval()
    load_weights(new, old.state_dict(), "legacy-unet.pt")
    x, t = torch.randn(2, 3, 16, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.allclose(old(x, timesteps=t), new(x, timesteps=t), atol=1e-5)


def test_weights_of_another_architecture_are_refused_by_name():
    small = build_autoencoder(tiny_config())
    wider = build_autoencoder(tiny_config("model.autoencoder.channels=[8,24]"))
    with pytest.raises(LdmError, match="other.pt: weights fit neither AutoencoderKL"):
        load_weights(wider, small.state_dict(), "other.pt")


def test_sampler_must_match_objective():
    ddpm_cfg = tiny_config()
    rflow_cfg = tiny_config("model.scheduler.objective=rflow", "sampling.sampler=rflow", NO_SNR)
    assert type(build_sampler(ddpm_cfg, "ddim").scheduler).__name__ == "DDIMScheduler"
    assert type(build_sampler(rflow_cfg, "rflow").scheduler).__name__ == "RFlowScheduler"
    assert type(training_scheduler(ddpm_cfg)).__name__ == "DDPMScheduler"
    assert type(training_scheduler(rflow_cfg)).__name__ == "RFlowScheduler"
    with pytest.raises(LdmError, match="cannot sample a model trained with the 'ddpm'"):
        build_sampler(ddpm_cfg, "rflow")
    with pytest.raises(LdmError, match="use one of rflow"):
        build_sampler(rflow_cfg, "ddpm")


@pytest.mark.parametrize("objective", ["ddpm", "rflow"])
def test_training_example_targets(objective):
    extra = (
        ["model.scheduler.objective=rflow", "sampling.sampler=rflow", NO_SNR]
        if objective == "rflow"
        else []
    )
    cfg = tiny_config(*extra)
    sched = training_scheduler(cfg)
    x0 = torch.randn(4, 3, 16, 16, 16)
    g = torch.Generator().manual_seed(0)
    noisy, t, target = diffusion_training_example(cfg, sched, x0, generator=g)
    assert noisy.shape == x0.shape and target.shape == x0.shape and t.shape == (4,)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    if objective == "ddpm":
        assert torch.equal(target, noise)  # epsilon prediction: the target is the noise drawn
    else:
        assert torch.allclose(target, x0 - noise)  # velocity from noise to data


def test_training_timesteps_cover_the_trained_range_only():
    """The whole schedule by default; 0..train.diffusion.truncate_at when it is set, both
    ends included (the sampler's first step may land on it), whatever sampling starts at."""
    x0 = torch.zeros(4000, 1, 1, 1, 1)
    for overrides, highest in (((), 999), (("train.diffusion.truncate_at=600",), 600)):
        cfg = tiny_config(*overrides, f"sampling.truncate_at={450 if overrides else 0}")
        g = torch.Generator().manual_seed(0)
        _, t, _ = diffusion_training_example(cfg, training_scheduler(cfg), x0, generator=g)
        assert (int(t.min()), int(t.max())) == (0, highest)
        assert abs(float(t.float().mean()) - highest / 2) < 0.05 * highest  # uniform


def test_sdpa_attention_keeps_checkpoints_loading():
    """build_* turn on MONAI's scaled-dot-product attention; a checkpoint saved from the
    explicit attention (MONAI's default, what bundles before it hold) has the same keys,
    loads strictly, and computes the same function."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    cfg = tiny_config(
        "model.autoencoder.attention_levels=[false,true]",
        "model.autoencoder.with_decoder_nonlocal_attn=true",
    )
    u, a = cfg.model.unet, cfg.model.autoencoder
    torch.manual_seed(5)
    old_unet = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=3,
        out_channels=3,
        channels=u.channels,
        attention_levels=u.attention_levels,
        num_res_blocks=u.num_res_blocks,
        num_head_channels=u.num_head_channels,
        norm_num_groups=u.norm_num_groups,
    ).eval()
    old_ae = AutoencoderKL(
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
    ).eval()
    new_unet, new_ae = build_unet(cfg).eval(), build_autoencoder(cfg).eval()
    attention = [m for m in new_unet.modules() if hasattr(m, "use_flash_attention")]
    attention += [m for m in new_ae.modules() if hasattr(m, "use_flash_attention")]
    assert attention and all(m.use_flash_attention for m in attention)
    for old, new in ((old_unet, new_unet), (old_ae, new_ae)):
        assert list(old.state_dict()) == list(new.state_dict())
        new.load_state_dict(old.state_dict(), strict=True)
    x, t = torch.randn(2, 3, 16, 16, 16), torch.tensor([10, 500])
    z = torch.randn(1, 3, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(old_unet(x, timesteps=t), new_unet(x, timesteps=t), atol=1e-5)
        assert torch.allclose(
            old_ae.decode_stage_2_outputs(z), new_ae.decode_stage_2_outputs(z), atol=1e-5
        )


def test_v_prediction_targets_the_velocity_of_the_noise_schedule():
    # Salimans & Ho 2022: v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0 (tiny-cpu's default).
    cfg = tiny_config("model.scheduler.prediction_type=v_prediction")
    sched = training_scheduler(cfg)
    x0 = torch.randn(4, 3, 16, 16, 16)
    noisy, t, target = diffusion_training_example(
        cfg, sched, x0, generator=torch.Generator().manual_seed(0)
    )
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(target, abar.sqrt() * noise - (1 - abar).sqrt() * x0)
    torch.testing.assert_close(noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
