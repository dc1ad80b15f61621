"""The training latents' Gaussian (ldm_core.latent_prior): what it keeps of the latents'
statistics, what its draws reproduce, and how a bad prior is refused."""

from __future__ import annotations

import pytest
import torch

from ldm_core import latent_prior
from ldm_core.errors import LdmError

SHAPE = (2, 2, 3, 2)  # C, d, h, w: 24 voxels


def _latents(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` latents that vary mostly along two whole-latent directions (as subjects differ
    in size and position), plus a little independent noise per voxel."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(SHAPE, generator=g)
    directions = torch.randn(2, *SHAPE, generator=g)
    weights = torch.randn(n, 2, generator=g) * torch.tensor([3.0, 1.5])
    noise = 0.1 * torch.randn(n, *SHAPE, generator=g)
    return mean + torch.tensordot(weights, directions, dims=1) + noise


def _covariance(z: torch.Tensor) -> torch.Tensor:
    flat = z.double().flatten(1)
    return torch.cov(flat.T)


def test_the_fit_keeps_the_mean_and_every_voxels_variance_and_the_leading_covariance():
    train = _latents(40)
    prior = latent_prior.fit(train, components=2)
    torch.testing.assert_close(prior["mean"], train.mean(0))
    assert prior["components"].shape == (2, *SHAPE)
    # per voxel, components and residual add up to the training variance exactly
    explained = prior["components"].pow(2).sum(0) + prior["residual_var"]
    torch.testing.assert_close(explained, train.var(0), rtol=1e-4, atol=1e-6)
    # the two components carry the two directions the latents vary along: the covariance
    # they imply is the training covariance up to the per-voxel noise (0.1^2)
    low_rank = prior["components"].flatten(1).double()
    error = (low_rank.T @ low_rank - _covariance(train)).abs().max()
    assert error < 0.05 < _covariance(train).abs().max()


def test_a_cohort_keeps_at_most_a_quarter_of_its_size_in_components():
    """With all N - 1 components the prior would span every subject's deviation (each
    training latent could be rebuilt from it); the fit keeps N // 4, whatever is asked."""
    assert latent_prior.fit(_latents(40), components=30)["components"].shape[0] == 10
    assert latent_prior.fit(_latents(5), components=8)["components"].shape[0] == 1
    small = latent_prior.fit(_latents(3), components=2)
    assert small["components"].shape == (0, *SHAPE)
    torch.testing.assert_close(small["residual_var"], _latents(3).var(0), rtol=1e-4, atol=1e-6)


def test_the_components_are_the_leading_principal_directions_in_order():
    """The Gram-matrix route gives what an SVD of the deviations gives: the same directions
    (up to sign), strongest first, scaled by their standard deviations."""
    train = _latents(40)
    prior = latent_prior.fit(train, components=3)
    deviations = (train - train.mean(0)).flatten(1).double()
    _, singular, directions = torch.linalg.svd(deviations, full_matrices=False)
    expected = singular[:3, None] * directions[:3] / 39**0.5
    got = prior["components"].flatten(1).double()
    signs = torch.sign((got * expected).sum(1, keepdim=True))
    torch.testing.assert_close(got * signs, expected, rtol=1e-4, atol=1e-4)


def test_draws_follow_the_fitted_gaussian_and_repeat_per_seed():
    train = _latents(40)
    prior = latent_prior.fit(train, components=2)
    drawn = latent_prior.draw(prior, range(4000))
    assert drawn.shape == (4000, *SHAPE)
    low_rank = prior["components"].flatten(1).double()
    model = low_rank.T @ low_rank + torch.diag(prior["residual_var"].flatten().double())
    assert (drawn.mean(0) - prior["mean"]).abs().max() < 0.15  # std up to 3.3: 3 sigma of 4000
    assert (_covariance(drawn) - model).abs().max() < 0.1 * model.abs().max()
    torch.testing.assert_close(latent_prior.draw(prior, [7, 3]), drawn[[7, 3]])


def test_the_mean_alone_draws_the_mean_plus_per_voxel_noise():
    train = _latents(10)
    prior = latent_prior.fit(train, components=0)
    assert prior["components"].shape == (0, *SHAPE)
    torch.testing.assert_close(prior["residual_var"], train.var(0), rtol=1e-4, atol=1e-6)
    drawn = latent_prior.draw(prior, [0, 1])
    spread = (drawn - prior["mean"]) / prior["residual_var"].sqrt()
    assert spread.abs().max() < 5 and 0.5 < float(spread.std()) < 1.5
    assert not torch.allclose(drawn[0], drawn[1])


def test_a_seeds_draw_repeats_no_torch_stream_the_sampler_seeds():
    """The sampler seeds torch generators with the seed (starting noise) and seed + 1 (step
    noise); a prior draw must not replay either for any nearby seed, or consecutive samples
    would share their randomness."""
    prior = latent_prior.fit(_latents(10), components=0)
    drawn = latent_prior.draw(prior, [5])[0]
    unit = ((drawn - prior["mean"]) / prior["residual_var"].sqrt()).flatten()
    for seed in range(12):
        stream = torch.randn(64, generator=torch.Generator().manual_seed(seed))
        for offset in range(0, 40):
            window = stream[offset : offset + len(unit)]
            assert not torch.allclose(unit[: len(window)], window, atol=1e-4)


def test_fewer_than_two_latents_or_negative_components_are_refused():
    with pytest.raises(
        LdmError, match=r"at least 2 training latents .* got shape \(1, 2, 2, 3, 2\)"
    ):
        latent_prior.fit(_latents(1), components=2)
    with pytest.raises(LdmError, match="prior_components: must be >= 0, got -1"):
        latent_prior.fit(_latents(4), components=-1)


def _good() -> dict[str, torch.Tensor]:
    return latent_prior.fit(_latents(6), components=2)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.pop("residual_var"), "where.pt: missing residual_var"),
        (
            lambda p: p.update(mean=p["mean"][:1]),
            r"mean has shape \(1, 2, 3, 2\), the latents are \(2, 2, 3, 2\)",
        ),
        (
            lambda p: p.update(components=p["components"][0]),
            r"components has shape \(2, 2, 3, 2\), expected \[k, 2, 2, 3, 2\]",
        ),
        (
            lambda p: p.update(residual_var=-p["residual_var"] - 1),
            "residual_var has negative values",
        ),
        (
            lambda p: p["mean"].view(-1).__setitem__(0, float("nan")),
            "mean has values that are not finite",
        ),
        (lambda p: p.update(mean=p["mean"].long()), "mean must be a float tensor, got Tensor"),
        (lambda p: p.update(mean=[0.0]), "mean must be a float tensor, got list"),
    ],
)
def test_a_bad_prior_is_refused_naming_where_and_what(change, message):
    prior = _good()
    change(prior)
    with pytest.raises(LdmError, match=message):
        latent_prior.checked(prior, SHAPE, "where.pt")


def test_a_good_prior_passes_the_check_as_float32():
    prior = {k: v.double() for k, v in _good().items()}
    checked = latent_prior.checked(prior, SHAPE, "where.pt")
    assert all(v.dtype == torch.float32 for v in checked.values())
    torch.testing.assert_close(checked["mean"], prior["mean"].float())
