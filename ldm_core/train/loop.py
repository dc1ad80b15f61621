"""The training loop both stages share, and its pieces: threads and seeds, mixed precision,
the non-finite loss guard, EMA weights, and the metrics log (metrics.jsonl + TensorBoard +
progress bar).

A trainer writes only what is its own (models, losses, validation, final artefact) and a
step function; :func:`train` runs the steps, as MONAI's engines run a trainer's
``_iteration``. The trainers stay readable because every cross-cutting concern lives here
once.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ldm_core import io
from ldm_core.config import Config
from ldm_core.errors import LdmError
from ldm_core.train import checkpoint as ckpt
from ldm_core.train import distributed
from ldm_core.train.distributed import DistEnv

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- process setup


def configure_threads(cfg: Config) -> None:
    """Apply ``train.threads`` (0 keeps torch's default, which OMP_NUM_THREADS sets under torchrun)."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initial weights without a broadcast."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- precision


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


# --------------------------------------------------------------------------- learning rate


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


# --------------------------------------------------------------------------- model options


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


def adam(params: Iterable[nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam, fused into one kernel per step on CUDA (PyTorch's ``fused=True``) instead of a
    loop of elementwise kernels per parameter; the foreach/for-loop path elsewhere, which keeps
    CPU results bit-identical to before. The flag travels in the optimizer's state dict."""
    return torch.optim.Adam(params, lr=lr, fused=True if device.type == "cuda" else None)


def to_input(x: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    """A batch on ``device``; the copy does not block the host when the batch is pinned."""
    x = x.to(device, non_blocking=True)
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


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


# --------------------------------------------------------------------------- NaN guard


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


# --------------------------------------------------------------------------- EMA


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


# --------------------------------------------------------------------------- data


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    shuffle: bool,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader that gives each rank its own shard (DistributedSampler) in every case.

    Using the sampler even for one process keeps the batch order a pure function of
    (seed, epoch), which is what makes a resumed run see the same data as an uninterrupted one.
    ``pin_memory`` (for a CUDA device) puts batches in page-locked memory, so
    :func:`to_input`'s non-blocking copy overlaps the previous step's kernels; it changes no
    value.
    """
    sampler = DistributedSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=shuffle and len(dataset) >= world_size,
    )
    per_rank = len(sampler)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=shuffle and per_rank >= batch_size,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def batches(loader: DataLoader, start_step: int) -> Iterator[torch.Tensor]:
    """Endless batches, resuming at the epoch (and position in it) where ``start_step`` lies."""
    per_epoch = len(loader)
    if per_epoch == 0:
        raise LdmError("training set gives no batches; lower the batch size or add subjects")
    epoch, skip = divmod(start_step, per_epoch)
    sampler = loader.sampler
    while True:
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if skip and i < skip:
                continue
            yield batch
        skip = 0
        epoch += 1


# --------------------------------------------------------------------------- logging


class MetricsLog:
    """Rank 0's record of a run: ``metrics.jsonl``, TensorBoard and a tqdm progress bar.

    Each metrics line is ``{"step", "split" ("train"|"val"), "loss", <named floats>, "time"}``;
    a step skipped for a non-finite loss has ``"loss": null`` and ``"nonfinite_total"``.
    On resume, lines past the resumed step are dropped (they belong to work that is redone),
    and TensorBoard is purged from that step on, so curves never double back.
    Other ranks get an inert instance, so callers need no rank checks.
    """

    def __init__(
        self,
        run_dir: Path,
        stage: str,
        total_steps: int,
        start_step: int,
        enabled: bool,
        batch_size: int = 1,
    ) -> None:
        self.enabled = enabled
        self.batch_size = batch_size
        self.start = time.time()
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self.path = run_dir / io.METRICS_JSONL
        self.writer = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        self.file = open(self.path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=stage,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def _truncate(self, start_step: int) -> None:
        """Keep the lines up to ``start_step`` (replacing the file whole: a kill mid-way
        must not lose the curves of the steps that stay)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= start_step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        io.atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def log(self, step: int, split: str, loss: float, **scalars: float | torch.Tensor) -> None:
        if not self.enabled:
            return
        # A skipped (non-finite) step is logged with "loss": null: NaN is not valid JSON.
        value = float(loss)
        record: dict[str, Any] = {
            "step": step,
            "split": split,
            "loss": value if math.isfinite(value) else None,
        }
        record.update({k: _value(v) for k, v in scalars.items()})
        record["time"] = round(time.time() - self.start, 3)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        assert self.writer is not None
        for key, scalar in record.items():
            if (
                key not in ("step", "split", "time")
                and scalar is not None
                and math.isfinite(scalar)
            ):
                self.writer.add_scalar(f"{split}/{key}", scalar, step)

    def progress(self, step: int, loss: float) -> dict[str, float]:
        """Advance the bar to ``step``; returns the throughput since the last call."""
        now = time.perf_counter()
        done = step - self._last_step
        rate = done / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        stats = {"steps_per_s": rate, "samples_per_s": rate * self.batch_size}
        if self.bar is not None:
            self.bar.update(done)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{stats['samples_per_s']:.2f}")
        return stats

    def image(self, tag: str, volume: torch.Tensor, step: int) -> None:
        """Mid-slices (axial, coronal, sagittal) of a [1, D, H, W] volume, side by side."""
        if not self.enabled or self.writer is None:
            return
        v = volume.detach().float().cpu()[0]
        d, h, w = v.shape
        slices = [v[d // 2], v[:, h // 2], v[:, :, w // 2]]
        height = max(s.shape[0] for s in slices)
        padded = [torch.nn.functional.pad(s, (0, 0, 0, height - s.shape[0])) for s in slices]
        img = torch.cat(padded, dim=1).clamp(0, 1)
        self.writer.add_image(tag, img.unsqueeze(0), step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.file.close()


def _value(scalar: float | torch.Tensor) -> float:
    # .item(), not float(): a loss term still attached to its graph is read without a warning.
    return float(scalar.item() if isinstance(scalar, torch.Tensor) else scalar)


# --------------------------------------------------------------------------- run directory


def write_run_files(cfg: Config, manifest: dict[str, Any], run_dir: Path) -> None:
    """``config.yaml`` and the cache's geometry (affine, shape, spacing, dataset hash).

    The geometry travels with the models so that generated NIfTI files carry the
    orientation and voxel size of the training data, not an identity affine.
    """
    io.atomic_write_text(run_dir / io.CONFIG_YAML, cfg.to_yaml())
    geometry = {key: manifest[key] for key in ("affine", "shape", "spacing", "dataset_hash")}
    io.atomic_write_json(run_dir / io.GEOMETRY_JSON, geometry)


# --------------------------------------------------------------------------- the loop

Scalars = dict[str, float | torch.Tensor]
"""Named values to log with a step (tensors are read only on the steps that are logged)."""


@dataclass(frozen=True)
class Step:
    """One training step, computed up to its loss and not further.

    The loop checks ``loss`` on every rank before anything changes; only when it is finite
    on all of them does it call ``update`` (backward, optimizer steps, EMA) and log the
    scalars that returns, in their order. A skipped step therefore leaves weights,
    optimizer and scaler exactly as they were.
    """

    loss: torch.Tensor
    update: Callable[[], Scalars]


@dataclass(frozen=True)
class Run:
    """Which stage trains, where, with which config, on which rank, up to which step.

    What :func:`train` needs besides the trainer's own pieces; a trainer makes one at the
    top and reads the same fields for its final model.
    """

    stage: str
    out: Path
    cfg: Config
    env: DistEnv
    steps: int

    @property
    def checkpoints(self) -> ckpt.CheckpointManager:
        """The run directory's ``checkpoints/`` (``train.keep_checkpoints`` kept)."""
        return ckpt.CheckpointManager(self.out / io.CHECKPOINT_DIR, self.cfg.train.keep_checkpoints)


StepFn = Callable[[Any, int], Step]
"""``step_fn(batch, step)``: a trainer's step ``step`` (1-based, as logged) on ``batch``."""

ValidateFn = Callable[[int, MetricsLog], None]
"""``validate(step, metrics)``: evaluate after ``step`` and log to ``metrics``. Every rank
calls it (validation sums over ranks); ``metrics`` writes only on rank 0."""


def begin(
    run: Run,
    parts: dict[str, Any],
    manifest: dict[str, Any],
    *,
    arch_sections: Sequence[str],
    optional: Collection[str] = (),
) -> int:
    """Start or resume ``run`` once its models are built; return the step to start from.

    Gives this rank its own RNG stream, puts ``parts`` back from the newest checkpoint if
    there is one (:func:`checkpoint.resume`; ``arch_sections`` and ``optional`` as there),
    and writes the run files on rank 0. Rank 0, the one writer of the run directory, first
    removes the temporary files a killed run's writes left in it and in ``checkpoints/``
    (:func:`ldm_core.io.sweep_temporaries`): each can be as large as a checkpoint. Build the
    models before (from the shared seed, so every rank starts from the same weights) and
    wrap them for DDP after (DDP starts from the restored weights).
    """
    cfg, env = run.cfg, run.env
    if env.is_main:
        for directory in (run.out, run.checkpoints.dir):
            io.sweep_temporaries(directory)
    # Identical weights come from the shared seed; from here on each rank draws its own
    # noise (and, for diffusion, timesteps), or the ranks would duplicate each other's.
    seed_everything(cfg.train.seed + env.rank)
    start = ckpt.resume(
        run.checkpoints,
        parts,
        stage=run.stage,
        total_steps=run.steps,
        cfg=cfg,
        arch_sections=arch_sections,
        env=env,
        optional=optional,
    )
    if env.is_main:
        write_run_files(cfg, manifest, run.out)
    return start


def train(
    run: Run,
    step_fn: StepFn,
    loader: DataLoader,
    parts: dict[str, Any],
    *,
    start: int,
    validate: ValidateFn | None = None,
) -> int:
    """Run steps ``start + 1`` to ``run.steps`` of one stage; return the last step done.

    The loop owns what both trainers share: the data position (resumed at ``start``), the
    step counter, skipping a step whose loss is NaN/Inf on any rank (logged with a null
    loss; ``parts["guard"]``, the run's :class:`NonFiniteGuard`, stops a diverged run), and
    the cadence of logging (``train.log_every``), validation (``train.val_every``) and
    checkpoints of ``parts`` (``train.checkpoint_every``), each also at the last step.

    Args:
        run: the stage, run directory (``metrics.jsonl``, ``tensorboard/``, checkpoints),
            config and rank (every rank runs the loop), and the step to train up to.
        step_fn: the trainer's step; see :class:`Step`.
        loader: the training batches (:func:`make_loader`).
        parts: what a checkpoint holds, as :func:`checkpoint.save` takes it.
        start: steps already done (a resumed checkpoint's step, else 0).
        validate: called at the validation cadence; None when there is no validation data.
    """
    cfg, env, total = run.cfg, run.env, run.steps
    guard: NonFiniteGuard = parts["guard"]
    batch_size = (loader.batch_size or 1) * env.world_size
    metrics = MetricsLog(run.out, run.stage, total, start, env.is_main, batch_size=batch_size)
    data = batches(loader, start)
    step = start
    try:
        while step < total:
            taken = step_fn(next(data), step + 1)
            finite = not distributed.any_rank(env, not is_finite(taken.loss))
            if not guard.record(finite, step + 1):
                metrics.log(step + 1, "train", float("nan"), nonfinite_total=guard.total)
                guard.check(step + 1)
                continue
            scalars = taken.update()
            step += 1
            if _due(step, cfg.train.log_every, total):
                loss = taken.loss.item()
                speed = metrics.progress(step, loss)
                metrics.log(step, "train", loss, **scalars, **speed)
            if validate is not None and _due(step, cfg.train.val_every, total):
                validate(step, metrics)
            if _due(step, cfg.train.checkpoint_every, total):
                ckpt.save(run.checkpoints, step, parts, cfg=cfg, env=env)
    finally:
        metrics.close()
    return step


def _due(step: int, every: int, total: int) -> bool:
    return step % every == 0 or step == total
