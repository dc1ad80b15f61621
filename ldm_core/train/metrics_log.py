"""Rank 0's record of a training run: ``metrics.jsonl``, TensorBoard and a progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ldm_core import io


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
