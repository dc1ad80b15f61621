"""The optimizer: Adam (fused on CUDA), one backward-and-update step with the gradient
scaler and clipping, and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


def adam(params: Iterable[nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam, fused into one kernel per step on CUDA (PyTorch's ``fused=True``) instead of a
    loop of elementwise kernels per parameter; the foreach/for-loop path elsewhere, which keeps
    CPU results bit-identical to before. The flag travels in the optimizer's state dict."""
    return torch.optim.Adam(params, lr=lr, fused=True if device.type == "cuda" else None)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: Sequence[nn.Parameter],
    grad_clip: float,
) -> float:
    """Backward, unscale, clip and step; returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.linalg.vector_norm(
            torch.stack([p.grad.detach().norm() for p in params if p.grad is not None])
        )
    scaler.step(optimizer)
    scaler.update()
    return float(norm)


@dataclass(frozen=True)
class LrSchedule:
    """The learning rate as a pure function of the step: linear warm-up, then constant or
    half-cosine decay to zero at ``total``.

    A short run from scratch needs both ends: a warm-up, because Adam's first updates (its
    second-moment estimate still tiny) are the largest and at a high rate would scatter a
    freshly initialised network; and a decay, because the last steps at the full rate leave
    the weights bouncing around the minimum instead of settling in it. Being a function of
    the step alone, it needs no state in a checkpoint: a resumed run sets the same rates. A
    warm-up as long as the run (a smoke test's few steps) only warms up.
    """

    base: float
    total: int
    warmup: int = 0
    decay: str = "constant"

    def at(self, step: int) -> float:
        """Rate for optimizer step ``step`` (1-based, as the loop counts)."""
        if step <= self.warmup:
            return self.base * step / self.warmup
        if self.decay == "constant" or self.total <= self.warmup:
            return self.base
        # The first step after the warm-up runs at the full rate, the last one just above zero.
        progress = min(1.0, (step - self.warmup - 1) / (self.total - self.warmup))
        return self.base * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group of ``optimizer`` to the rate of ``step``; return it."""
        lr = self.at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
