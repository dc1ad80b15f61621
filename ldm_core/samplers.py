"""The one sampler table: which samplers draw from which training objective, and how.

A model trained with ``model.scheduler.objective: ddpm`` predicts noise (or v, or the clean
latent) on a DDPM noise schedule; DDPM and its fast deterministic variant DDIM sample it. A
model trained with ``objective: rflow`` predicts a velocity from noise to data; only the
rectified-flow Euler sampler fits it. :data:`SAMPLERS_BY_OBJECTIVE` says so once, and the
config's choices and validation, the CLI's ``--sampler`` choices, serving and the trainer
read it from here.

Each sampler is an adapter around a MONAI scheduler with one surface, as diffusers keeps
its schedulers swappable: ``set_timesteps(steps)``, ``timesteps`` and
``step(model_output, t, sample, generator)``. The sampling loop calls ``step`` without
asking which sampler it holds; what differs (DDIM's ``eta``, rectified flow's next
timestep, per-seed noise) stays inside the adapter.

torch and MONAI are imported where a scheduler is built or stepped, not at the top: the
config and ``ldm --help`` import this table, and MONAI's schedulers take seconds to import.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ldm_core.errors import LdmError

if TYPE_CHECKING:
    import torch
    from monai.networks.schedulers import (
        DDIMScheduler,
        DDPMScheduler,
        RFlowScheduler,
        Scheduler,
    )

    from ldm_core.config import Config


# --------------------------------------------------------------------------- the table

SAMPLERS_BY_OBJECTIVE: dict[str, tuple[str, ...]] = {
    "ddpm": ("ddim", "ddpm"),
    "rflow": ("rflow",),
}
"""Per training objective, the samplers that can draw from its models; the first is the
fallback when a configured sampler does not fit a bundle."""

TRAINING_SAMPLER: dict[str, str] = {"ddpm": "ddpm", "rflow": "rflow"}
"""Per training objective, the sampler whose scheduler noises latents during training (its
forward process and timestep distribution are the ones the objective is defined on)."""

OBJECTIVES: tuple[str, ...] = tuple(SAMPLERS_BY_OBJECTIVE)
"""Every training objective, in table order (``model.scheduler.objective``'s choices)."""


def samplers_for(objective: str) -> tuple[str, ...]:
    """Samplers that can draw from a model trained with ``objective``."""
    return SAMPLERS_BY_OBJECTIVE[_known_objective(objective)]


def _known_objective(objective: str) -> str:
    if objective not in SAMPLERS_BY_OBJECTIVE:
        raise LdmError(
            f"model.scheduler.objective: {objective!r} is not one of {', '.join(OBJECTIVES)}"
        )
    return objective


def incompatibility(objective: str, sampler: str) -> str | None:
    """Why ``sampler`` cannot draw from a model trained with ``objective``, or None if it can.

    One sentence shared by config validation and sampling, so both name the field at fault.
    """
    allowed = samplers_for(objective)
    if sampler in allowed:
        return None
    return (
        f"{sampler!r} cannot sample a model trained with the {objective!r} objective "
        f"(model.scheduler.objective); use one of {', '.join(allowed)}"
    )


# --------------------------------------------------------------------------- adapters


class Sampler(abc.ABC):
    """One reverse-process sampler over a MONAI scheduler, with a surface every sampler shares.

    Args:
        scheduler: the MONAI scheduler this adapter drives (also what training noises with,
            see :func:`training_scheduler`).
    """

    name: ClassVar[str]

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._timesteps: list[int] = []

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: Config, eta: float) -> Sampler:
        """Build the scheduler from ``cfg.model.scheduler`` and ``cfg.sampling``.

        ``eta`` is DDIM's share of fresh noise per step (0 = deterministic); samplers
        without that knob ignore it.
        """

    def set_timesteps(
        self, steps: int, device: torch.device | str | None = None, truncate_at: int = 0
    ) -> None:
        """Choose ``steps`` timesteps of the reverse process, from noisiest to clean; with
        ``truncate_at`` > 0, ``steps`` of them at or below it (sampling then starts at the
        first, from :meth:`noised` latents): see :func:`_spread`."""
        chosen = self._choose(_spread(steps, truncate_at, self.scheduler), device)
        self._timesteps = _truncated(chosen, truncate_at)[-steps:]

    def _choose(self, count: int, device: torch.device | str | None) -> list[int]:
        """``count`` timesteps over the whole schedule, noisiest first, as the scheduler
        spaces them."""
        self.scheduler.set_timesteps(count, device=device)
        return [int(t) for t in self.scheduler.timesteps]

    @property
    def batched(self) -> bool:
        """Whether :meth:`step` updates the whole batch in one scheduler call: true where a
        step draws no noise, so no per-seed generator is needed (what gpu_check records)."""
        return True

    @property
    def timesteps(self) -> list[int]:
        """The timesteps chosen by :meth:`set_timesteps`, in the order to step through them."""
        return list(self._timesteps)

    @abc.abstractmethod
    def noised(self, clean: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """The forward process: ``clean`` latents noised with ``noise`` to timestep ``t``."""

    def clamp_clean(
        self,
        model_output: torch.Tensor,
        t: int,
        sample: torch.Tensor,
        low: torch.Tensor,
        high: torch.Tensor,
    ) -> torch.Tensor:
        """``model_output`` changed so that the clean latent it implies lies in ``[low, high]``.

        A short-trained model can predict clean latents far outside anything it was trained
        on at the noisy end, and the error compounds over the steps into a volume that is no
        brain (static thresholding, Saharia et al. 2022, with per-channel bounds). The model's
        output is converted to its clean-latent estimate, clamped, and converted back, so the
        scheduler's update is untouched and every later quantity (DDIM's noise direction too)
        agrees with the clamped estimate. ``low`` and ``high`` broadcast against ``sample``.
        """
        import torch

        clean = self.to_clean(model_output, t, sample)
        return self.from_clean(torch.clamp(clean, low, high), t, sample)

    @abc.abstractmethod
    def to_clean(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """The clean latent that ``model_output`` at timestep ``t`` predicts for ``sample``."""

    @abc.abstractmethod
    def from_clean(self, clean: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """The model output that predicts ``clean`` for ``sample`` at ``t``: the inverse of
        :meth:`to_clean`."""

    @abc.abstractmethod
    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        sample: torch.Tensor,
        generator: Sequence[torch.Generator],
    ) -> torch.Tensor:
        """The batch one step less noisy.

        ``generator`` holds one generator per batch row (as diffusers accepts a list): a
        stochastic step draws row ``j``'s noise from ``generator[j]`` alone, so a seed gives
        the same sample whether it runs alone or in a batch.
        """


class _PerRowSampler(Sampler):
    """A sampler that may draw noise per step; it steps the whole batch at once when it draws
    none, and each row with that row's generator when it does.

    MONAI's DDPM and DDIM ``step`` draw their noise inside, from one generator for the whole
    tensor, so a stochastic step cannot take per-seed noise in one batched call; it costs
    elementwise work only, next to a UNet call per step. A deterministic step (DDIM at
    ``eta=0``) is elementwise over rows, so the batched call gives each row bit for bit what
    stepping it alone gives.

    Args:
        scheduler: a MONAI ``DDPMScheduler`` or ``DDIMScheduler``.
        step_options: keyword arguments of the scheduler's ``step`` (DDIM's ``eta``).
    """

    def __init__(self, scheduler: Scheduler, **step_options: Any) -> None:
        super().__init__(scheduler)
        self.step_options = step_options

    @property
    def batched(self) -> bool:
        """Ancestral steps always draw noise; DDIM overrides this."""
        return False

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        sample: torch.Tensor,
        generator: Sequence[torch.Generator],
    ) -> torch.Tensor:
        import torch

        if len(generator) != sample.shape[0]:
            raise LdmError(
                f"{self.name} step: {len(generator)} generators for a batch of {sample.shape[0]}"
            )
        if self.batched:
            return self.scheduler.step(model_output, t, sample, **self.step_options)[0]
        rows = [
            self.scheduler.step(
                model_output[j : j + 1], t, sample[j : j + 1], generator=g, **self.step_options
            )[0]
            for j, g in enumerate(generator)
        ]
        return torch.cat(rows)

    def _signal_noise(self, t: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sqrt(alpha_bar_t)`` and ``sqrt(1 - alpha_bar_t)``: the weights of the clean latent
        and of the noise in a sample at ``t``."""
        alpha_bar = self.scheduler.alphas_cumprod[int(t)].to(like.device, like.dtype)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        a, s = self._signal_noise(t, clean)
        return a * clean + s * noise

    def to_clean(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        a, s = self._signal_noise(t, sample)
        kind = self.scheduler.prediction_type
        if kind == "epsilon":
            return (sample - s * model_output) / a
        if kind == "v_prediction":
            return a * sample - s * model_output
        return model_output

    def from_clean(self, clean: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        a, s = self._signal_noise(t, sample)
        kind = self.scheduler.prediction_type
        noise = (sample - a * clean) / s
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return a * noise - s * clean
        return clean


def _beta_schedule(cfg: Config) -> dict[str, Any]:
    """The DDPM noise schedule shared by the DDPM and DDIM schedulers."""
    s = cfg.model.scheduler
    kwargs: dict[str, Any] = dict(
        num_train_timesteps=s.num_train_timesteps,
        schedule=s.schedule,
        prediction_type=s.prediction_type,
        clip_sample=cfg.sampling.clip_sample,
    )
    if s.schedule != "sigmoid_beta":  # the sigmoid schedule has fixed ends
        kwargs.update(beta_start=s.beta_start, beta_end=s.beta_end)
    return kwargs


class DDPMSampler(_PerRowSampler):
    """Ancestral DDPM sampling (Ho et al. 2020): fresh noise every step; the reference."""

    name = "ddpm"
    scheduler: DDPMScheduler

    @classmethod
    def from_config(cls, cfg: Config, eta: float) -> DDPMSampler:
        from monai.networks.schedulers import DDPMScheduler

        return cls(DDPMScheduler(**_beta_schedule(cfg)))


class DDIMSampler(_PerRowSampler):
    """DDIM (Song et al. 2021) on the DDPM schedule: few steps, deterministic at ``eta=0``
    (its step option ``eta``, from 0 to 1, is the share of fresh noise per step)."""

    name = "ddim"
    scheduler: DDIMScheduler

    @classmethod
    def from_config(cls, cfg: Config, eta: float) -> DDIMSampler:
        from monai.networks.schedulers import DDIMScheduler

        return cls(DDIMScheduler(**_beta_schedule(cfg)), eta=eta)

    @property
    def batched(self) -> bool:
        """At ``eta=0`` a DDIM step draws no noise."""
        return self.step_options["eta"] == 0.0


class RFlowSampler(Sampler):
    """Rectified-flow Euler steps along the predicted velocity (Liu et al. 2023); no noise.

    Args:
        scheduler: a MONAI ``RFlowScheduler``.
        latent_numel: voxels of one latent channel, which shifts the timesteps towards the
            noisy end for larger latents (the timestep transform).
    """

    name = "rflow"
    scheduler: RFlowScheduler

    def __init__(self, scheduler: Scheduler, latent_numel: int) -> None:
        super().__init__(scheduler)
        self.latent_numel = latent_numel
        self._next = 0

    @classmethod
    def from_config(cls, cfg: Config, eta: float) -> RFlowSampler:
        from monai.networks.schedulers import RFlowScheduler

        _, d, h, w = cfg.latent_shape
        scheduler = RFlowScheduler(
            num_train_timesteps=cfg.model.scheduler.num_train_timesteps,
            use_discrete_timesteps=True,
            sample_method="logit-normal",
            use_timestep_transform=True,
            base_img_size_numel=d * h * w,
            spatial_dim=3,
        )
        return cls(scheduler, d * h * w)

    def set_timesteps(
        self, steps: int, device: torch.device | str | None = None, truncate_at: int = 0
    ) -> None:
        super().set_timesteps(steps, device, truncate_at)
        self._next = 0

    def _choose(self, count: int, device: torch.device | str | None) -> list[int]:
        self.scheduler.set_timesteps(count, device=device, input_img_size_numel=self.latent_numel)
        return [int(t) for t in self.scheduler.timesteps]

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        fraction = int(t) / self.scheduler.num_train_timesteps
        return (1 - fraction) * clean + fraction * noise

    def to_clean(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        # MONAI's rectified flow: x_t = (1 - t/T) x_0 + (t/T) noise, velocity = x_0 - noise.
        return sample + model_output * (int(t) / self.scheduler.num_train_timesteps)

    def from_clean(self, clean: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        import torch

        fraction = int(t) / self.scheduler.num_train_timesteps
        if fraction == 0:  # nothing is left to move (sampling never steps from t = 0)
            return torch.zeros_like(sample)
        return (clean - sample) / fraction

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        sample: torch.Tensor,
        generator: Sequence[torch.Generator],
    ) -> torch.Tensor:
        # The Euler step needs the timestep it lands on. Rounded timesteps can repeat, so
        # the position is counted (as diffusers' step index) rather than looked up from t.
        if self._next >= len(self._timesteps) or self._timesteps[self._next] != int(t):
            raise LdmError(
                f"rflow step: timestep {int(t)} is not the next of {self._timesteps}; "
                "call set_timesteps and step through timesteps in order"
            )
        self._next += 1
        next_t = self._timesteps[self._next] if self._next < len(self._timesteps) else 0
        return self.scheduler.step(model_output, int(t), sample, next_t)[0]


def _spread(steps: int, truncate_at: int, scheduler: Scheduler) -> int:
    """How many timesteps to choose over the whole schedule so that at least ``steps`` of
    them fall at or below ``truncate_at`` (the noisiest extra ones are then dropped):
    ``steps`` counts the UNet's calls (what serving's ``max_steps`` and the progress bars
    count) whether or not the run is truncated, and one step still leaves one. Capped at
    the schedule's length, where the part below ``truncate_at`` holds fewer."""
    total = scheduler.num_train_timesteps
    if truncate_at <= 0:
        return steps
    return min(total, math.ceil(steps * total / (truncate_at + 1)))


def _truncated(timesteps: list[int], truncate_at: int) -> list[int]:
    """``timesteps`` (noisiest first) without those above ``truncate_at`` (0: all of them)."""
    if truncate_at <= 0:
        return timesteps
    kept = [t for t in timesteps if t <= truncate_at]
    if not kept:
        raise LdmError(
            f"sampling.truncate_at: {truncate_at} is below every one of the {len(timesteps)} "
            f"chosen timesteps (the lowest is {min(timesteps)}); raise it"
        )
    return kept


_ADAPTERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (DDIMSampler, DDPMSampler, RFlowSampler)
}

ALL_SAMPLERS: tuple[str, ...] = tuple(_ADAPTERS)
"""Every sampler, in the order help texts list them (``sampling.sampler``'s choices)."""


# --------------------------------------------------------------------------- builders


def build_sampler(cfg: Config, name: str, eta: float | None = None) -> Sampler:
    """The adapter for sampler ``name`` over the model ``cfg`` describes.

    Raises LdmError when ``name`` is no sampler, or does not fit the model's
    ``model.scheduler.objective``. ``eta`` defaults to ``cfg.sampling.eta``.
    """
    if name not in _ADAPTERS:
        raise LdmError(f"sampler {name!r} is not one of {', '.join(ALL_SAMPLERS)}")
    reason = incompatibility(cfg.model.scheduler.objective, name)
    if reason is not None:
        raise LdmError(f"sampler {reason}")
    return _ADAPTERS[name].from_config(cfg, cfg.sampling.eta if eta is None else eta)


def training_scheduler(cfg: Config) -> Scheduler:
    """The scheduler that noises latents when training with ``cfg.model.scheduler.objective``."""
    objective = _known_objective(cfg.model.scheduler.objective)
    return build_sampler(cfg, TRAINING_SAMPLER[objective]).scheduler
