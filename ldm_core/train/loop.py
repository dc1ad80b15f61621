"""The training loop both stages share: a trainer's steps run from a start step to the
last, with the non-finite guard, logging, validation and checkpoints at their cadence.

A trainer writes only what is its own (models, losses, validation, final artefact) and a
step function; :func:`train` runs the steps, as MONAI's engines run a trainer's
``_iteration``. The pieces it is built from live beside it, one module each: precision
(autocast, gradient scaler), optim (Adam, the optimizer step, the learning-rate schedule),
model_setup (device, layout, checkpointing, DDP, compile), guard (the non-finite loss
guard), ema, loader (sharded, resumable batches) and metrics_log (metrics.jsonl,
TensorBoard, progress bar).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ldm_core import io
from ldm_core.config import Config
from ldm_core.train import checkpoint as ckpt
from ldm_core.train import distributed
from ldm_core.train.distributed import DistEnv
from ldm_core.train.guard import NonFiniteGuard, is_finite
from ldm_core.train.loader import batches
from ldm_core.train.metrics_log import MetricsLog

log = logging.getLogger(__name__)


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
        loader: the training batches (:func:`ldm_core.train.loader.make_loader`).
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


# --------------------------------------------------------------------------- set-up of a run


def configure_threads(cfg: Config) -> None:
    """Apply ``train.threads`` (0 keeps torch's default, which OMP_NUM_THREADS sets under torchrun)."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initial weights without a broadcast."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def write_run_files(cfg: Config, manifest: dict[str, Any], run_dir: Path) -> None:
    """``config.yaml`` and the cache's geometry (affine, shape, spacing, dataset hash).

    The geometry travels with the models so that generated NIfTI files carry the
    orientation and voxel size of the training data, not an identity affine.
    """
    io.atomic_write_text(run_dir / io.CONFIG_YAML, cfg.to_yaml())
    geometry = {key: manifest[key] for key in ("affine", "shape", "spacing", "dataset_hash")}
    io.atomic_write_json(run_dir / io.GEOMETRY_JSON, geometry)
