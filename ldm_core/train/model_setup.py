"""A model made ready for training: device and memory layout (``train.channels_last``),
activation checkpointing (``train.gradient_checkpointing``), the DDP and ``torch.compile``
wrappers a training step calls (``train.compile``), and eval mode for validation."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from ldm_core.config import Config

log = logging.getLogger(__name__)


def enable_block_checkpointing(blocks: Sequence[nn.Module]) -> None:
    """Recompute each block's activations in backward instead of storing them.

    The forward is replaced per instance, so parameter names (and checkpoints) do not
    change. Used for networks without a built-in switch (the diffusion UNet).
    """
    for block in blocks:
        original = block.forward

        def forward(
            *args: Any, _orig: Any = original, _block: nn.Module = block, **kwargs: Any
        ) -> Any:
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_orig, *args, use_reentrant=False, **kwargs)
            return _orig(*args, **kwargs)

        block.forward = functools.update_wrapper(forward, original)  # type: ignore[method-assign]


def prepare_model(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Move to the device; channels-last-3d memory layout when ``train.channels_last``."""
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def for_training(
    model: nn.Module, cfg: Config, distributed: bool, device: torch.device, compile: bool = True
) -> nn.Module:
    """The module a training step calls: wrapped in DDP when several processes train,
    then compiled when ``train.compile`` (and ``compile``). Weights stay those of ``model``."""
    if distributed:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return maybe_compile(model, cfg) if compile else model


def maybe_compile(model: nn.Module, cfg: Config) -> nn.Module:
    """``torch.compile`` when ``train.compile``; the uncompiled module keeps the weights."""
    if not cfg.train.compile:
        return model
    log.info("compiling %s with torch.compile (the first steps are slow)", type(model).__name__)
    return torch.compile(model)  # type: ignore[return-value]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block, then back to the mode ``model`` was in.

    Validation runs in the middle of training: a helper that left the model in eval mode
    would make every caller remember to switch it back.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
