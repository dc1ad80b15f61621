"""Sampling: deterministic by seed, right shape, NIfTI with the bundle's affine, PNG preview."""

from __future__ import annotations

import gzip
import io
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_core import latent_prior
from ldm_core.bundle import config_for, load
from ldm_core.cli import main
from ldm_core.config import ConfigError
from ldm_core.errors import LdmError
from ldm_core.sample import decode, denoise, generate, prepare, to_nifti_bytes, triptych
from ldm_core.samplers import build_sampler
from tests.harness.configs import NO_SNR, tiny_config
from tests.harness.data import random_bundle


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "b"
    random_bundle(path, tiny_config(), seed=1)
    return load(path, device="cpu")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_seed_same_volume_alone_or_batched(tiny_bundle, sampler):
    batch = generate(tiny_bundle, [5, 6], sampler=sampler, steps=4)
    alone = generate(tiny_bundle, [6], sampler=sampler, steps=4)
    again = generate(tiny_bundle, [5, 6], sampler=sampler, steps=4)
    assert batch.shape == (2, 1, 32, 32, 32) and batch.dtype == torch.float32
    assert torch.equal(batch, again)
    assert torch.allclose(batch[1], alone[0], atol=1e-4)
    assert not torch.allclose(batch[0], batch[1])
    assert batch.min() >= 0 and batch.max() <= 1


def test_ddim_eta_noise_follows_the_seed(tiny_bundle):
    a = generate(tiny_bundle, [3], sampler="ddim", steps=3, eta=1.0)
    b = generate(tiny_bundle, [3], sampler="ddim", steps=3, eta=1.0)
    c = generate(tiny_bundle, [3], sampler="ddim", steps=3, eta=0.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_progress_and_bad_arguments(tiny_bundle):
    seen = []
    generate(tiny_bundle, [0], steps=3, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(LdmError, match="steps must be between 1 and 1000"):
        generate(tiny_bundle, [0], steps=0)
    with pytest.raises(LdmError, match="is not one of"):
        generate(tiny_bundle, [0], sampler="euler")
    with pytest.raises(LdmError, match="cannot sample"):
        generate(tiny_bundle, [0], sampler="rflow")


def test_rflow_model_samples(tmp_path):
    cfg = tiny_config("model.scheduler.objective=rflow", "sampling.sampler=rflow", NO_SNR)
    b = load(random_bundle(tmp_path / "rf", cfg), device="cpu")
    x = generate(b, [1], sampler="rflow", steps=3)
    assert x.shape == (1, 1, 32, 32, 32) and torch.isfinite(x).all()


def test_nifti_carries_affine_and_spacing():
    affine = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
    vol = torch.rand(1, 8, 10, 12)
    img = nib.Nifti1Image.from_bytes(gzip.decompress(to_nifti_bytes(vol, affine)))
    assert img.shape == (8, 10, 12)
    assert np.allclose(img.affine, affine)
    assert img.header.get_zooms() == (2.0, 2.0, 2.0)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert np.allclose(img.get_fdata(), vol[0].numpy(), atol=1e-6)


def test_triptych_orients_views():
    vol = np.zeros((10, 12, 14), dtype=np.float32)
    vol[:, -1, :] = 1.0  # the most anterior coronal plane
    image = triptych(vol)
    assert image.shape == (14, 10 + 2 + 10 + 2 + 12 + 2)
    axial = image[:, :10]
    assert axial[0, :].min() == 255 and axial[-1, :].max() == 0  # anterior is up


def test_cli_sample_writes_nifti_and_png(tmp_path, capsys):
    cfg = tiny_config()
    random_bundle(tmp_path / "b", cfg)
    rc = main(
        [
            "sample",
            "--bundle",
            str(tmp_path / "b"),
            "--output",
            str(tmp_path / "out"),
            "--num",
            "2",
            "--seed",
            "10",
            "--steps",
            "2",
        ]
    )
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "sample_0010.nii.gz",
        "sample_0010.png",
        "sample_0011.nii.gz",
        "sample_0011.png",
    ]
    img = nib.load(tmp_path / "out" / "sample_0010.nii.gz")
    assert img.shape == (32, 32, 32)
    assert np.allclose(img.affine, np.diag([6.0, 6.0, 6.0, 1.0]))
    assert (
        Image.open(io.BytesIO((tmp_path / "out" / "sample_0010.png").read_bytes())).format == "PNG"
    )


def test_cli_reports_one_line_errors(tmp_path, capsys):
    rc = main(["sample", "--bundle", str(tmp_path / "none"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1] == f"ldm sample: error: {tmp_path / 'none'}: bundle directory not found"
    assert "Traceback" not in "\n".join(err)


def test_rflow_seed_gives_the_same_volume_alone_or_batched(tmp_path):
    cfg = tiny_config("model.scheduler.objective=rflow", "sampling.sampler=rflow", NO_SNR)
    b = load(random_bundle(tmp_path / "rf", cfg, seed=2), device="cpu")
    batch = generate(b, [5, 6], sampler="rflow", steps=3)
    alone = generate(b, [6], sampler="rflow", steps=3)
    assert torch.allclose(batch[1], alone[0], atol=1e-4)
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samples_end_inside_the_training_latents_range_when_clamped(tmp_path, sampler):
    """The last step lands on the clean estimate, so clamped samples stay in the recorded
    per-channel range; the same untrained UNet unclamped leaves it."""
    bounds = [[-0.05, -0.02, 0.0], [0.05, 0.02, 0.01]]
    low, high = (torch.tensor(b).view(1, 3, 1, 1, 1) for b in bounds)
    drawn = {}
    for clamp in (True, False):
        cfg = tiny_config(f"sampling.clamp_to_latent_range={str(clamp).lower()}")
        b = load(random_bundle(tmp_path / str(clamp), cfg, seed=2, latent_range=bounds), "cpu")
        drawn[clamp] = denoise(b, [0, 1], sampler=sampler, steps=4, eta=1.0)
    assert ((drawn[True] >= low - 1e-5) & (drawn[True] <= high + 1e-5)).all()
    assert ((drawn[False] < low) | (drawn[False] > high)).float().mean() > 0.5


def test_a_standardised_unet_is_sampled_back_into_the_autoencoders_latent_space(tmp_path):
    """The UNet denoises in its standardised space; denoise returns ``x * std + mean`` per
    channel, what decode's division by the scale factor expects."""
    cfg = tiny_config("sampling.clamp_to_latent_range=false")
    moments = [[0.5, -1.0, 0.0], [0.6, 1.5, 0.4]]
    plain = load(random_bundle(tmp_path / "plain", cfg, seed=3), "cpu")
    standardised = load(random_bundle(tmp_path / "std", cfg, seed=3, latent_moments=moments), "cpu")
    unit = denoise(plain, [0, 1], sampler="ddim", steps=3, eta=0.0)
    back = denoise(standardised, [0, 1], sampler="ddim", steps=3, eta=0.0)
    mean, std = (torch.tensor(m).view(1, 3, 1, 1, 1) for m in moments)
    torch.testing.assert_close(back, unit * std + mean)
    # decode takes the autoencoder's latents as they are: the mapping happens once.
    torch.testing.assert_close(
        generate(standardised, [0, 1], sampler="ddim", steps=3, eta=0.0),
        decode(plain, unit * std + mean),
    )


def test_a_standardised_unet_is_clamped_in_its_own_space(tmp_path):
    """latent_range bounds the UNet's standardised latents: clamped samples end inside the
    range mapped back through the moments."""
    bounds = [[-0.05, -0.02, 0.0], [0.05, 0.02, 0.01]]
    moments = [[0.5, -1.0, 0.0], [0.6, 1.5, 0.4]]
    cfg = tiny_config("sampling.clamp_to_latent_range=true")
    path = random_bundle(tmp_path / "b", cfg, seed=2, latent_range=bounds, latent_moments=moments)
    drawn = denoise(load(path, "cpu"), [0, 1], sampler="ddim", steps=4, eta=1.0)
    mean, std = (torch.tensor(m).view(1, 3, 1, 1, 1) for m in moments)
    low, high = (torch.tensor(b).view(1, 3, 1, 1, 1) * std + mean for b in bounds)
    assert ((drawn >= low - 1e-5) & (drawn <= high + 1e-5)).all()


def test_the_starting_noise_is_scaled_by_the_bundles_initial_noise_scale(tmp_path):
    """With the UNet's output convolution zeroed, deterministic DDIM only rescales its start
    (each step multiplies the latent by a ratio of the schedule's alphas), so a bundle
    sampling at initial_noise_scale 0.9 returns exactly 0.9 x what the same weights at 1.0
    return, for the same seeds."""
    drawn = {}
    for scale in (1.0, 0.9):
        cfg = tiny_config(
            "sampling.clamp_to_latent_range=false", f"sampling.initial_noise_scale={scale}"
        )
        b = load(random_bundle(tmp_path / str(scale), cfg, seed=4), "cpu")
        assert b.config.sampling.initial_noise_scale == scale  # carried in the bundle
        torch.nn.init.zeros_(b.unet.out[-1].conv.weight)
        torch.nn.init.zeros_(b.unet.out[-1].conv.bias)
        drawn[scale] = denoise(b, [0, 1], sampler="ddim", steps=3, eta=0.0)
    assert drawn[1.0].abs().mean() > 0.1
    torch.testing.assert_close(drawn[0.9], 0.9 * drawn[1.0])


def test_a_truncated_run_starts_from_the_bundles_prior_noised_to_its_first_timestep(tmp_path):
    """With the UNet's output zeroed, each deterministic DDIM step only multiplies the
    latent by a ratio of the schedule's alphas, so what a run returns is one constant times
    where it started: sqrt(ab_t0) x0 + sqrt(1 - ab_t0) noise, with t0 the first timestep at
    or below truncate_at, x0 the seed's draw from the bundle's prior and noise the seed's
    starting noise. The constant undoes sqrt(ab_t0), up to the schedule's rounding."""
    cfg = tiny_config("sampling.clamp_to_latent_range=false", "sampling.truncate_at=605")
    g = torch.Generator().manual_seed(0)
    shape = tuple(cfg.latent_shape)
    prior = {
        "mean": torch.randn(shape, generator=g),
        "components": torch.randn(1, *shape, generator=g),
        "residual_var": torch.zeros(shape),
    }
    b = load(random_bundle(tmp_path / "b", cfg, seed=5, latent_prior=prior), "cpu")
    torch.testing.assert_close(b.latent_prior["components"], prior["components"])
    torch.nn.init.zeros_(b.unet.out[-1].conv.weight)
    torch.nn.init.zeros_(b.unet.out[-1].conv.bias)
    seeds = [3, 8]
    drawn = denoise(b, seeds, sampler="ddim", steps=100, eta=0.0)

    reference = build_sampler(cfg, "ddim", eta=0.0)
    reference.set_timesteps(100, truncate_at=605)
    first = reference.timesteps[0]
    assert 590 < first <= 605 and len(reference.timesteps) == 100
    alpha_bar = float(reference.scheduler.alphas_cumprod[first])
    starts = []
    for s in seeds:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(s))
        clean = latent_prior.draw(prior, [s])[0]
        starts.append(alpha_bar**0.5 * clean + (1 - alpha_bar) ** 0.5 * noise)
    start = torch.stack(starts)
    factor = float((drawn * start).sum() / start.pow(2).sum())
    assert factor == pytest.approx(alpha_bar**-0.5, rel=0.05)
    torch.testing.assert_close(drawn, factor * start, rtol=1e-4, atol=1e-4)


def test_truncation_without_a_prior_is_refused_when_the_bundle_loads(tmp_path):
    cfg = tiny_config("sampling.truncate_at=600")
    path = random_bundle(tmp_path / "b", cfg)
    with pytest.raises(
        LdmError, match=r"b/config.yaml: sampling.truncate_at is 600 but .* no latent_prior.pt"
    ):
        load(path, "cpu")


def test_a_bundle_trained_on_part_of_the_schedule_refuses_a_config_edited_to_leave_it(
    tmp_path,
):
    """A bundle's config.yaml is read as written; one whose UNet learnt 0..600 but whose
    sampling was edited to start above it is refused on load and by the sample and serve
    verbs' config, naming the file, instead of sampling from timesteps the UNet never saw."""
    cfg = tiny_config("train.diffusion.truncate_at=600", "sampling.truncate_at=600")
    prior = latent_prior.fit(torch.randn(8, *cfg.latent_shape), components=2)
    path = random_bundle(tmp_path / "b", cfg, latent_prior=prior)
    assert load(path, "cpu").config.train.diffusion.truncate_at == 600
    text = (path / "config.yaml").read_text()
    edited = re.sub(r"(?m)^  truncate_at: 600$", "  truncate_at: 0", text)  # sampling's
    assert edited.count("truncate_at: 600") == 1  # train.diffusion's stays
    (path / "config.yaml").write_text(edited)
    words = r"sampling.truncate_at: the UNet is trained on timesteps 0..600 only"
    with pytest.raises(LdmError, match=rf"b/config.yaml: {words}"):
        load(path, "cpu")
    with pytest.raises(ConfigError, match=rf"b/config.yaml: {words}"):
        config_for(path)


def test_a_truncated_bundle_warms_up_and_counts_its_steps_as_unet_calls(tmp_path):
    """steps counts the UNet's calls with or without truncation, down to one: the server's
    one-step warm-up works, and a run asked for 5 steps calls the UNet 5 times."""
    cfg = tiny_config("sampling.truncate_at=600")
    prior = latent_prior.fit(torch.randn(8, *cfg.latent_shape), components=2)
    b = load(random_bundle(tmp_path / "b", cfg, latent_prior=prior), "cpu")
    assert prepare(b, compile=False, batch_sizes=(1,)) >= 0
    seen: list[tuple[int, int]] = []
    for sampler in ("ddim", "ddpm"):
        denoise(b, [0], sampler=sampler, steps=5, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)] * 2
