"""Mixed precision (``train.amp``): the autocast context of the forward pass and the
gradient scaler fp16 needs."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def amp_dtype(amp: str) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context for the forward pass (``train.amp``), or a no-op for none."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16: bf16 has fp32's range and needs no loss scaling."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")
