"""The sampler table: which objective takes which sampler, decided once; uniform adapters."""

from __future__ import annotations

import itertools

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from ldm_core import samplers
from ldm_core.bundle import load
from ldm_core.config import ConfigError, load_config
from ldm_core.errors import LdmError
from ldm_core.sample import generate
from ldm_core.samplers import (
    ALL_SAMPLERS,
    OBJECTIVES,
    SAMPLERS_BY_OBJECTIVE,
    TRAINING_SAMPLER,
    build_sampler,
    samplers_for,
    training_scheduler,
)
from tests.harness.configs import NO_SNR, serve_config
from tests.harness.data import random_bundle

PAIRS = list(itertools.product(OBJECTIVES, ALL_SAMPLERS))


def _config(objective: str, *extra: str):
    """A serve-sized config trained with ``objective``, set to sample with a sampler it fits."""
    return serve_config(
        f"model.scheduler.objective={objective}",
        f"sampling.sampler={samplers_for(objective)[0]}",
        NO_SNR,
        *extra,
    )


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {
        objective: load(random_bundle(root / objective, _config(objective)), device="cpu")
        for objective in OBJECTIVES
    }


def test_the_table_covers_every_sampler_and_objective():
    assert set(itertools.chain(*SAMPLERS_BY_OBJECTIVE.values())) == set(ALL_SAMPLERS)
    assert set(TRAINING_SAMPLER) == set(OBJECTIVES)
    for objective, sampler in TRAINING_SAMPLER.items():
        assert sampler in samplers_for(objective)


@pytest.mark.parametrize("objective, sampler", PAIRS)
def test_allowed_pairs_sample_and_refused_pairs_name_the_objective(bundles, objective, sampler):
    bundle = bundles[objective]
    if sampler in SAMPLERS_BY_OBJECTIVE[objective]:
        x = generate(bundle, [1, 2], sampler=sampler, steps=2)
        assert x.shape == (2, 1, 16, 16, 16) and torch.isfinite(x).all()
        return
    with pytest.raises(LdmError, match=r"cannot sample .*model\.scheduler\.objective"):
        generate(bundle, [1], sampler=sampler, steps=2)
    with pytest.raises(ConfigError) as info:
        _config(objective, f"sampling.sampler={sampler}")
    message = str(info.value)
    assert message.startswith("sampling.sampler:") and "model.scheduler.objective" in message


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_every_adapter_steps_through_the_same_calls(sampler):
    objective = next(o for o in OBJECTIVES if sampler in samplers_for(o))
    adapter = build_sampler(_config(objective), sampler, eta=1.0)
    adapter.set_timesteps(3)
    timesteps = adapter.timesteps
    assert len(timesteps) == 3 and all(isinstance(t, int) for t in timesteps)
    assert timesteps == sorted(timesteps, reverse=True)  # from noisiest to clean
    x = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    for t in timesteps:
        model_output = 0.1 * x
        x = adapter.step(model_output, t, x, gens)
        assert x.shape == (2, 3, 4, 4, 4) and torch.isfinite(x).all()


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_a_row_steps_the_same_alone_or_in_a_batch(sampler):
    """Step noise follows each row's own generator, so a seed is its own sample."""
    objective = next(o for o in OBJECTIVES if sampler in samplers_for(o))
    cfg = _config(objective)
    x = torch.randn(3, 3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    out = torch.randn(3, 3, 4, 4, 4, generator=torch.Generator().manual_seed(2))

    def first_step(rows: slice, seeds: list[int]) -> torch.Tensor:
        adapter = build_sampler(cfg, sampler, eta=1.0)
        adapter.set_timesteps(4)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return adapter.step(out[rows], adapter.timesteps[0], x[rows], gens)

    batch = first_step(slice(0, 3), [10, 11, 12])
    alone = first_step(slice(1, 2), [11])
    assert torch.equal(batch[1:2], alone)


@pytest.mark.parametrize(
    "sampler, eta, batched",
    [("ddim", 0.0, True), ("ddim", 1.0, False), ("ddpm", 0.0, False), ("rflow", 0.0, True)],
)
def test_steps_that_draw_no_noise_update_the_batch_in_one_call(sampler, eta, batched):
    """A deterministic step is one scheduler call for the whole batch, and gives every row
    bit for bit what stepping it alone gives (float32, CPU), through all timesteps."""
    objective = next(o for o in OBJECTIVES if sampler in samplers_for(o))
    cfg = _config(objective)
    x0 = torch.randn(3, 3, 4, 4, 4, generator=torch.Generator().manual_seed(1))

    def run(rows: slice, seeds: list[int]) -> tuple[torch.Tensor, int]:
        adapter = build_sampler(cfg, sampler, eta=eta)
        assert adapter.batched is batched
        calls = 0
        step = adapter.scheduler.step

        def counted(*args, **kwargs):
            nonlocal calls
            calls += 1
            return step(*args, **kwargs)

        adapter.scheduler.step = counted
        adapter.set_timesteps(5)
        x = x0[rows]
        for t in adapter.timesteps:
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            x = adapter.step(torch.sin(3.0 * x), t, x, gens)  # a nonlinear stand-in model
        return x, calls

    batch, batch_calls = run(slice(0, 3), [10, 11, 12])
    for j in range(3):
        alone, _ = run(slice(j, j + 1), [10 + j])
        assert torch.equal(batch[j : j + 1], alone)
    assert batch_calls == 5 * (1 if batched else 3)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_stochastic_steps_need_one_generator_per_row(sampler):
    adapter = build_sampler(_config("ddpm"), sampler, eta=1.0)
    adapter.set_timesteps(2)
    x = torch.zeros(2, 3, 4, 4, 4)
    with pytest.raises(LdmError, match="1 generators for a batch of 2"):
        adapter.step(x, adapter.timesteps[0], x, [torch.Generator()])


def test_rflow_lands_on_clean_data_even_when_rounded_timesteps_repeat():
    """Euler steps with a constant velocity must add up to exactly t0 / T of it, which only
    holds if each step goes to the next timestep in the list, repeats included (MONAI keeps
    timesteps as float16, so above 2048 neighbours round to the same value)."""
    cfg = _config("rflow", "model.scheduler.num_train_timesteps=2100")
    adapter = build_sampler(cfg, "rflow")
    adapter.set_timesteps(2000)
    timesteps = adapter.timesteps
    assert len(set(timesteps)) < len(timesteps), timesteps[:8]  # the case this test is about
    x0 = torch.zeros(1, 1, 2, 2, 2)
    velocity = torch.ones_like(x0)
    x = x0
    for t in timesteps:
        x = adapter.step(velocity, t, x, [torch.Generator()])
    assert torch.allclose(x, x0 + velocity * timesteps[0] / 2100, atol=1e-4)


def test_rflow_refuses_steps_out_of_order():
    adapter = build_sampler(_config("rflow"), "rflow")
    adapter.set_timesteps(3)
    x = torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(LdmError, match="not the next"):
        adapter.step(x, adapter.timesteps[1], x, [torch.Generator()])


@pytest.mark.parametrize(
    "objective, scheduler_type", [("ddpm", DDPMScheduler), ("rflow", RFlowScheduler)]
)
def test_training_scheduler_follows_the_objective(objective, scheduler_type):
    assert type(training_scheduler(_config(objective))) is scheduler_type


def test_unknown_names_are_refused_by_name():
    with pytest.raises(LdmError, match="sampler 'euler' is not one of ddim, ddpm, rflow"):
        build_sampler(_config("ddpm"), "euler")
    with pytest.raises(LdmError, match="model.scheduler.objective: 'flow' is not one of"):
        samplers_for("flow")


def test_config_choices_come_from_the_table():
    for dotted, names in (
        ("sampling.sampler", ALL_SAMPLERS),
        ("model.scheduler.objective", OBJECTIVES),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(overrides=[f"{dotted}=nothing"])
        assert f"is not one of {', '.join(names)}" in str(info.value)


def test_editing_the_table_is_the_only_edit_needed(monkeypatch):
    """Which samplers fit an objective is read from the table at every use: config
    validation and sampling follow an edit of it, with nothing else changed."""
    monkeypatch.setitem(samplers.SAMPLERS_BY_OBJECTIVE, "ddpm", ("ddim",))
    with pytest.raises(ConfigError, match="sampling.sampler: 'ddpm' cannot sample"):
        _config("ddpm", "sampling.sampler=ddpm")
    with pytest.raises(LdmError, match="use one of ddim$"):
        build_sampler(_config("ddpm"), "ddpm")
    monkeypatch.setitem(samplers.SAMPLERS_BY_OBJECTIVE, "rflow", ("rflow", "ddim"))
    assert _config("rflow", "sampling.sampler=ddim").sampling.sampler == "ddim"


CLEAN_CASES = [
    ("ddim", "epsilon"),
    ("ddim", "v_prediction"),
    ("ddim", "sample"),
    ("ddpm", "epsilon"),
    ("ddpm", "v_prediction"),
    ("rflow", "epsilon"),  # rectified flow predicts a velocity whatever prediction_type says
]


def _adapter(sampler: str, prediction: str):
    objective = next(o for o in OBJECTIVES if sampler in samplers_for(o))
    cfg = _config(objective, f"model.scheduler.prediction_type={prediction}")
    adapter = build_sampler(cfg, sampler, eta=0.0)
    adapter.set_timesteps(5)
    return adapter


def _reported_clean(adapter, model_output, t, sample):
    """The clean-latent estimate MONAI's own step returns next to the new sample."""
    if adapter.name == "rflow":
        return adapter.scheduler.step(model_output, t, sample)[1]
    if adapter.name == "ddim":
        return adapter.scheduler.step(model_output, t, sample, eta=0.0)[1]
    return adapter.scheduler.step(model_output, t, sample, generator=torch.Generator())[1]


@pytest.mark.parametrize("sampler, prediction", CLEAN_CASES)
def test_the_clean_estimate_is_the_schedulers_own_and_inverts(sampler, prediction):
    adapter = _adapter(sampler, prediction)
    gen = torch.Generator().manual_seed(3)
    for t in adapter.timesteps:
        x = 2 * torch.randn(2, 3, 4, 4, 4, generator=gen)
        out = torch.randn(2, 3, 4, 4, 4, generator=gen)
        clean = adapter.to_clean(out, t, x)
        torch.testing.assert_close(clean, _reported_clean(adapter, out, t, x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(adapter.from_clean(clean, t, x), out, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sampler, prediction", CLEAN_CASES)
def test_clamping_bounds_the_clean_estimate_per_channel_and_leaves_the_rest(sampler, prediction):
    adapter = _adapter(sampler, prediction)
    low = torch.tensor([-1.0, -0.5, 0.0]).view(1, 3, 1, 1, 1)
    high = torch.tensor([1.0, 0.5, 2.0]).view(1, 3, 1, 1, 1)
    gen = torch.Generator().manual_seed(4)
    t = adapter.timesteps[1]
    x = torch.randn(2, 3, 4, 4, 4, generator=gen)
    out = 3 * torch.randn(2, 3, 4, 4, 4, generator=gen)
    before = adapter.to_clean(out, t, x)
    outside = (before < low) | (before > high)
    assert outside.any() and (~outside).any()
    clamped = adapter.clamp_clean(out, t, x, low, high)
    after = adapter.to_clean(clamped, t, x)
    assert (after >= low - 1e-4).all() and (after <= high + 1e-4).all()
    torch.testing.assert_close(after[~outside], before[~outside], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(clamped[~outside], out[~outside], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_caps_the_clean_latent_loss_at_gamma_times_its_error(prediction):
    """Whatever the UNet regresses, the weighted loss equals min(SNR, gamma) times the squared
    error of the clean latent it implies (Hang et al. 2023, eq. 7)."""
    from ldm_core.models import min_snr_weight

    adapter = _adapter("ddpm", prediction)
    gen = torch.Generator().manual_seed(5)
    timesteps = torch.tensor([1, 50, 300, 700, 999])
    weight = min_snr_weight(adapter.scheduler, timesteps, prediction, gamma=5.0)
    alpha_bar = adapter.scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    assert snr[0] > 5 > snr[-1]  # both sides of the cap are exercised
    for i, t in enumerate(timesteps.tolist()):
        x = torch.randn(1, 3, 4, 4, 4, generator=gen)
        target, pred = (torch.randn(1, 3, 4, 4, 4, generator=gen) for _ in range(2))
        clean_error = (adapter.to_clean(pred, t, x) - adapter.to_clean(target, t, x)).pow(2).mean()
        weighted = weight[i] * (pred - target).pow(2).mean()
        torch.testing.assert_close(
            weighted, snr[i].clamp(max=5.0) * clean_error, rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_noised_latents_are_the_training_forward_process(objective):
    """Where a truncated reverse process starts: the clean latent noised to t exactly as the
    training scheduler noises it (MONAI's add_noise), at both ends and in between."""
    cfg = _config(objective)
    adapter = build_sampler(cfg, samplers_for(objective)[0])
    trainer = training_scheduler(cfg)
    gen = torch.Generator().manual_seed(5)
    clean, noise = (torch.randn(2, 3, 4, 4, 4, generator=gen) for _ in range(2))
    for t in (1, 400, cfg.model.scheduler.num_train_timesteps - 1):
        expected = trainer.add_noise(clean, noise, torch.tensor([t, t]))
        torch.testing.assert_close(adapter.noised(clean, noise, t), expected)


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 10, 100])
def test_a_truncated_run_spreads_its_steps_below_the_start(sampler, steps):
    """steps counts the UNet's calls with or without truncation: the run keeps that many
    timesteps, all at or below truncate_at, noisiest first and none twice, the first near
    it; at 0 the whole schedule's choice is untouched."""
    objective = next(o for o in OBJECTIVES if sampler in samplers_for(o))
    adapter = build_sampler(_config(objective), sampler)
    adapter.set_timesteps(steps)
    whole = adapter.timesteps
    adapter.set_timesteps(steps, truncate_at=0)
    assert adapter.timesteps == whole
    adapter.set_timesteps(steps, truncate_at=600)
    kept = adapter.timesteps
    assert len(kept) == steps
    assert kept == sorted(set(kept), reverse=True) and kept[0] <= 600
    if steps >= 10:
        assert kept[0] >= 600 - 600 / steps


def test_a_truncated_rflow_run_steps_from_its_first_kept_timestep_to_clean_data():
    """Rectified flow counts its steps: after truncation the count starts at the first kept
    timestep, and constant-velocity Euler steps from there add up to t0 / T of it."""
    adapter = build_sampler(_config("rflow"), "rflow")
    adapter.set_timesteps(10, truncate_at=450)
    first = adapter.timesteps[0]
    x = torch.zeros(1, 1, 2, 2, 2)
    for t in adapter.timesteps:
        x = adapter.step(torch.ones_like(x), t, x, [torch.Generator()])
    assert torch.allclose(x, torch.full_like(x, first / 1000), atol=1e-4)
    # rectified flow never chooses timestep 0: a start below its lowest choice is refused
    with pytest.raises(
        LdmError,
        match=r"truncate_at: 1 is below every one of the 500 chosen timesteps \(the lowest is 2\)",
    ):
        adapter.set_timesteps(1, truncate_at=1)
