"""Sampling a trained model: the decode undoes training's latent scaling, a model overfit on
one volume samples it back, bf16 stays within its stated tolerance of float32, and a seed gives
the same volume alone or in a batch.

A random bundle cannot tell these apart (its samples are noise whatever the code does), so
this module trains one: an autoencoder left at its random initialisation (a fixed, smooth
encoder/decoder is all the test needs), the scale factor and the latents from the training
code (:func:`compute_scale_factor`, :func:`encode_split`), and a UNet overfit on the one latent
with the training objective's own noising (:func:`diffusion_training_example`).
"""

from __future__ import annotations

import pytest
import torch

from ldm_core import bundle as bundle_io
from ldm_core.bundle import Bundle
from ldm_core.data.preprocessed import VolumeDataset
from ldm_core.models import build_autoencoder, build_unet, diffusion_training_example
from ldm_core.sample import BF16_TOLERANCE, decode, generate
from ldm_core.samplers import training_scheduler
from ldm_core.train.autoencoder import compute_scale_factor
from ldm_core.train.distributed import DistEnv
from ldm_core.train.latents import encode_split
from tests.harness.configs import tiny_config
from tests.harness.data import make_cache

STEPS = 10
"""DDIM steps of every sample here."""


def _overfit_unet(cfg, latent: torch.Tensor, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    unet = build_unet(cfg)
    scheduler = training_scheduler(cfg)
    optimizer = torch.optim.Adam(unet.parameters(), lr=5e-3)
    batch = latent.expand(2, *latent.shape[1:])
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        noisy, t, target = diffusion_training_example(cfg, scheduler, batch, generator=gen)
        loss = torch.nn.functional.mse_loss(unet(noisy, timesteps=t), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return unet.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Bundle, torch.Tensor, torch.Tensor]:
    """A bundle whose UNet has seen one volume, that volume's training latent (scaled, as
    the latent cache holds it), and the volume as the autoencoder reconstructs it."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("overfit")
    cfg = tiny_config(
        "model.unet.channels=[8,8]",
        "model.scheduler.prediction_type=sample",
        "model.unet.attention_levels=[false,true]",
        "model.unet.norm_num_groups=8",
        "train.autoencoder.batch_size=1",
    )
    data = make_cache(root / "cache", n_train=1, n_val=0)
    torch.manual_seed(1)
    ae = build_autoencoder(cfg, use_checkpoint=False).eval()
    scale_factor = compute_scale_factor(ae, VolumeDataset(data, "train"), cfg, DistEnv())
    latent = torch.from_numpy(encode_split(ae, data, "train", scale_factor, DistEnv().device, 1))
    unet = _overfit_unet(cfg, latent, steps=150)
    affine = torch.eye(4).numpy()
    path = bundle_io.save(root / "b", cfg, ae.state_dict(), unet.state_dict(), scale_factor, affine)
    volume = VolumeDataset(data, "train")[0][None]
    with torch.no_grad():  # the volume as the autoencoder reconstructs it, no scaling involved
        target = ae.decode_stage_2_outputs(ae.encode(volume)[0]).clamp(0, 1)
    return bundle_io.load(path, device="cpu"), latent, target


def test_decode_undoes_the_training_scale(trained):
    """The latent cache holds ``z * scale_factor``; decoding it must give the autoencoder's
    own reconstruction back (a decode that multiplies again is off by scale_factor**2)."""
    bundle, latent, target = trained
    assert abs(bundle.scale_factor - 1.0) > 0.5  # a real scale factor, not the identity
    assert torch.allclose(decode(bundle, latent, precision="fp32"), target, atol=1e-5)


@pytest.fixture(scope="module")
def samples(trained) -> dict[str, torch.Tensor]:
    """Seeds 0 and 1 in one batch, and seed 1 alone, in each precision (sampled once)."""
    bundle, _, _ = trained
    out = {}
    for precision in ("fp32", "bf16"):
        out[precision] = generate(bundle, [0, 1], steps=STEPS, precision=precision)
        out[f"{precision}-alone"] = generate(bundle, [1], steps=STEPS, precision=precision)
    return out


def test_a_model_overfit_on_one_volume_samples_it(trained, samples):
    _, _, target = trained
    baseline = (target - target.mean()).abs().mean()  # the error of a flat grey volume
    for sample in samples["fp32"]:
        assert (sample - target[0]).abs().mean() < 0.5 * baseline


def test_bf16_matches_fp32_within_the_stated_tolerance(samples):
    fp32, bf16 = samples["fp32"], samples["bf16"]
    assert not torch.equal(fp32, bf16)  # autocast did run
    assert (fp32 - bf16).abs().mean() < BF16_TOLERANCE.mean
    assert (fp32 - bf16).abs().max() < BF16_TOLERANCE.max


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_seed_gives_the_same_volume_alone_or_in_a_batch(samples, precision):
    """The scheduler step is exact per row (tests/test_samplers.py); what remains is the
    UNet's batched convolutions, which round differently from single ones."""
    diff = (samples[precision][1] - samples[f"{precision}-alone"][0]).abs()
    if precision == "fp32":
        assert diff.max() < 1e-4
    else:
        assert diff.mean() < BF16_TOLERANCE.mean and diff.max() < BF16_TOLERANCE.max
