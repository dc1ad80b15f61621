"""The exponential moving average of a model's weights: what the diffusion stage ships."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model's weights (what the sampler uses).

    ``decay`` warms up as ``min(decay, (1 + n) / (10 + n))`` so that early averages are not
    dominated by the random initialisation in short runs.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        for name, shadow in self.model.state_dict().items():
            value = current[name].detach()
            if shadow.dtype.is_floating_point:
                shadow.lerp_(value.to(shadow.dtype), 1.0 - d)
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
