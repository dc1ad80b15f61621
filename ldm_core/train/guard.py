"""The non-finite loss guard: a NaN/Inf step is skipped, a run of them stops training."""

from __future__ import annotations

import logging

import torch

from ldm_core.errors import LdmError

log = logging.getLogger(__name__)


class NonFiniteGuard:
    """Counts NaN/Inf losses; a step with one is skipped, too many in a row stop the run.

    A single non-finite loss (an fp16 overflow, one bad batch) is survivable; a run of
    them means training has diverged, and carrying on would only burn compute and save
    garbage checkpoints.
    """

    def __init__(self, max_in_row: int, stage: str) -> None:
        self.max_in_row = max_in_row
        self.stage = stage
        self.in_row = 0
        self.total = 0

    def record(self, finite: bool, step: int) -> bool:
        """Count one step's verdict; returns ``finite`` (False means: skip this step)."""
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        log.warning(
            "%s step %d: non-finite loss, step skipped (%d in a row, %d in total)",
            self.stage,
            step,
            self.in_row,
            self.total,
        )
        return False

    def check(self, step: int) -> None:
        """Raise LdmError once ``max_in_row`` non-finite losses came in a row."""
        if self.in_row >= self.max_in_row:
            raise LdmError(
                f"{self.stage}: loss was NaN/Inf for {self.in_row} steps in a row "
                f"(train.max_nonfinite={self.max_in_row}) at step {step}; training diverged. "
                "Try a lower learning rate (train.*.lr), full precision (train.amp=none), "
                "gradient clipping (train.grad_clip=1.0), and check the input data for NaNs"
            )

    def state_dict(self) -> dict[str, int]:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_row = int(state.get("in_row", 0))
        self.total = int(state.get("total", 0))


def is_finite(loss: torch.Tensor) -> bool:
    return bool(torch.isfinite(loss.detach()).all())
