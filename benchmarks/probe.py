"""Watch a training run from outside: step times and which fast paths really ran.

The trainers (``ldm_core.train``) are called as black boxes, so that the check measures
the code users run and not a copy of its loop. The probe sees them only through public
PyTorch hooks:

- a global optimizer step hook is the step clock: the first optimizer that steps is the
  model's (the autoencoder's generator comes before its discriminator), and a second one
  (the discriminator) marks when the adversarial phase starts. On CUDA each boundary is
  synchronized, so an interval is one whole iteration of device work;
- after the first step, the live objects are read (``gc``): the model that owns the
  optimizer's parameters, its DDP / ``torch.compile`` wrappers, GradScalers,
  SyncBatchNorm layers, the weights' memory format and the process group's backend;
- the next call of the training module is caught by a one-shot global forward pre-hook,
  which reads the autocast state and dtype in force and the input's memory format, and
  whether that call went through a compiled module;
- the iteration after that runs under the CPU profiler, which counts convolutions forward
  and backward (more forwards than backwards means activations were recomputed: gradient
  checkpointing ran) and sees whether a GradScaler unscaled gradients.

An fp16 step whose gradients overflowed is skipped by the GradScaler without an
optimizer step, so one interval then spans two iterations: the median interval is robust
to that, to a stray recompile and to a slow checkpoint save.
"""

from __future__ import annotations

import gc
import statistics
import time
import warnings
import weakref
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile

WARMUP_STEPS = 3
"""Intervals left out of the timing: compile, cuDNN autotuning, allocator growth, and the
profiled iteration (the second interval)."""
_PROFILED_STEP = 2
"""Profiling runs from the 2nd to the 3rd optimizer step of the model (inside warm-up)."""
_CHANNELS_LAST = torch.channels_last_3d


def _is_compiled(module: object) -> bool:
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def _unwrap(module: nn.Module) -> nn.Module:
    """The module under any ``torch.compile`` and DDP wrappers."""
    while True:
        if _is_compiled(module):
            module = module._orig_mod  # type: ignore[attr-defined]
        elif isinstance(module, DistributedDataParallel):
            module = module.module
        else:
            return module


def _live(kind: type) -> list[Any]:
    """Every live object of ``kind``. ``isinstance`` on some deprecated torch aliases warns;
    those warnings are about the scan, not the run, so they are silenced here. Weak proxies
    are skipped: ``isinstance`` reads a proxy's referent, and raises once that is gone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return [
            o for o in gc.get_objects() if type(o) not in weakref.ProxyTypes and isinstance(o, kind)
        ]


def owner_of(param: torch.Tensor, modules: list[nn.Module]) -> nn.Module | None:
    """The largest unwrapped module whose first parameter is ``param`` (the model root:
    optimizers are built from ``model.parameters()``, which starts at the first layer)."""
    best, best_size = None, -1
    for m in modules:
        if _is_compiled(m) or isinstance(m, DistributedDataParallel):
            continue
        if next(m.parameters(), None) is not param:
            continue
        size = sum(p.numel() for p in m.parameters())
        if size > best_size:
            best, best_size = m, size
    return best


def model_paths(model: nn.Module, modules: list[nn.Module]) -> dict[str, Any]:
    """Facts about the trained model read from the live objects around it."""
    wrappers = [m for m in modules if m is not model and _unwrap(m) is model]
    weights = [p for p in model.parameters() if p.dim() == 5]
    scalers = _live(torch.amp.GradScaler)
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    return {
        "model": type(model).__name__,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "ddp": any(isinstance(w, DistributedDataParallel) for w in wrappers),
        "ddp_backend": backend,
        "compile_wrapped": any(_is_compiled(w) for w in wrappers),
        "channels_last_weights": bool(weights)
        and all(p.is_contiguous(memory_format=_CHANNELS_LAST) for p in weights)
        and not all(p.is_contiguous() for p in weights),
        "grad_scaler_enabled": any(s.is_enabled() for s in scalers),
        "sync_batchnorm": any(isinstance(m, nn.SyncBatchNorm) for m in modules),
    }


def profile_paths(events: Any) -> dict[str, Any]:
    """What one profiled iteration did, from ``profile.key_averages()``."""
    counts = {e.key: e.count for e in events}
    forward = counts.get("aten::convolution", 0)
    backward = counts.get("aten::convolution_backward", 0)
    return {
        "conv_forward_calls": forward,
        "conv_backward_calls": backward,
        "gradient_checkpointing": forward > backward > 0,
        "grad_scaler_unscaled": counts.get("aten::_amp_foreach_non_finite_check_and_unscale_", 0)
        > 0,
        "compiled_region_ran": any("Compiled" in key for key in counts),
    }


class TrainingProbe:
    """Context manager around one training call; :meth:`summary` reports what it saw.

    Args:
        device: the device the trainer uses (CUDA boundaries are synchronized on it).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.main: torch.optim.Optimizer | None = None
        self.second_from: int | None = None
        self.paths: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._profiler: profile | None = None

    def __enter__(self) -> TrainingProbe:
        hook = register_optimizer_step_post_hook(self._on_step)
        self._handles.append(hook)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.main is None:
            self.main = optimizer
        if optimizer is not self.main:
            if self.second_from is None:
                self.second_from = len(self.times)
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        n = len(self.times)
        if n == 1:
            self._read_objects(optimizer)
        elif n == _PROFILED_STEP:
            self._profiler = profile(activities=[ProfilerActivity.CPU])
            self._profiler.start()
        elif n == _PROFILED_STEP + 1 and self._profiler is not None:
            self._profiler.stop()
            self.paths.update(profile_paths(self._profiler.key_averages()))
            self._profiler = None

    def _read_objects(self, optimizer: torch.optim.Optimizer) -> None:
        modules = _live(nn.Module)
        first = optimizer.param_groups[0]["params"][0]
        model = owner_of(first, modules)
        if model is not None:
            self.paths.update(model_paths(model, modules))
        self._handles.append(nn.modules.module.register_module_forward_pre_hook(self._on_call))

    def _on_call(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Reads the first module call after the first step: the training module's."""
        self._handles.pop().remove()
        kind = self.device.type
        enabled = torch.is_autocast_enabled(kind)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.paths.update(
            called=type(module).__name__,
            compiled_call=_is_compiled(module),
            autocast=enabled,
            amp_dtype=str(torch.get_autocast_dtype(kind)).replace("torch.", "")
            if enabled
            else "float32",
            channels_last_input=x is not None
            and x.dim() == 5
            and x.is_contiguous(memory_format=_CHANNELS_LAST)
            and not x.is_contiguous(),
        )

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]

    def summary(self) -> dict[str, Any]:
        """Median seconds per step after warm-up (and, when a second optimizer joined, per
        step of the phase with it), plus the paths seen."""
        gaps = self.intervals()
        join = self.second_from
        if join is None:
            main, second = gaps[WARMUP_STEPS:], []
        else:
            # The interval that ends at step ``join`` holds the first forward through the
            # second model, the next one its first step: neither is a clean sample.
            main, second = gaps[WARMUP_STEPS : max(WARMUP_STEPS, join - 2)], gaps[join:]
        out: dict[str, Any] = {
            "optimizer_steps": len(self.times),
            "timed_steps": len(main),
            "step_s": round(statistics.median(main), 5) if main else None,
            "step_s_mean": round(statistics.fmean(main), 5) if main else None,
            "warmup_s": round(sum(gaps[:WARMUP_STEPS]), 3),
            "paths": dict(self.paths),
        }
        if join is not None:
            out["second_optimizer_from_step"] = join
            out["with_second_optimizer_step_s"] = (
                round(statistics.median(second), 5) if second else None
            )
        return out
