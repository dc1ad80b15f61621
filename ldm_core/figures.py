"""Figures and reports of an evaluation, for people and for the Kubeflow UI.

Everything is drawn with matplotlib's object API on the Agg canvas (no pyplot state, no
display needed, safe inside a pipeline pod) and returned as PNG bytes. The reports embed
those PNGs as base64 data URIs so that one self-contained file is all a KFP HTML or
Markdown artifact needs: the UI shows it without access to the pipeline's storage.

Volumes are ``[N, 1, D, H, W]`` in RAS voxel order (x right, y anterior, z superior, as
preprocessing leaves them); views are oriented like ``ldm_core.sample.triptych``:
anterior or superior up, patient's right on the image's right.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ldm_core.io import atomic_write_text

log = logging.getLogger(__name__)

VIEWS = ("axial", "coronal", "sagittal")
DPI = 100


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def mid_slices(volume: np.ndarray, spacing: Sequence[float]) -> list[tuple[np.ndarray, float]]:
    """Central axial, coronal and sagittal slices of a ``[D, H, W]`` volume, rotated for
    display, each with the pixel aspect (row spacing / column spacing) that keeps
    anisotropic voxels in true proportion."""
    sx, sy, sz = (float(s) for s in spacing)
    x, y, z = (s // 2 for s in volume.shape)
    return [
        (np.rot90(volume[:, :, z]), sy / sx),
        (np.rot90(volume[:, y, :]), sz / sx),
        (np.rot90(volume[x, :, :]), sz / sy),
    ]


def _show(ax: Any, image: np.ndarray, aspect: float) -> None:
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _as_numpy(volumes: torch.Tensor | np.ndarray) -> np.ndarray:
    array = (
        volumes.detach().cpu().numpy() if isinstance(volumes, torch.Tensor) else np.asarray(volumes)
    )
    if array.ndim != 5 or array.shape[1] != 1:
        raise ValueError(f"expected volumes [N, 1, D, H, W], got shape {array.shape}")
    return array[:, 0]


def view_grid(
    volumes: torch.Tensor | np.ndarray, spacing: Sequence[float], title: str = "", max_rows: int = 8
) -> bytes:
    """One row per volume, one column per view (axial, coronal, sagittal)."""
    array = _as_numpy(volumes)[:max_rows]
    rows = array.shape[0]
    height = 2.1 * rows + 0.8
    fig = Figure(figsize=(6.0, height))
    fig.subplots_adjust(top=1.0 - 0.8 / height, bottom=0.02, hspace=0.25)
    axes = fig.subplots(rows, 3, squeeze=False)
    for r, volume in enumerate(array):
        for c, (image, aspect) in enumerate(mid_slices(volume, spacing)):
            _show(axes[r, c], image, aspect)
            if r == 0:
                axes[r, c].set_title(VIEWS[c], fontsize=9)
        axes[r, 0].set_ylabel(f"#{r}", fontsize=9)
    if title:
        fig.suptitle(title, y=1.0 - 0.2 / height)
    return _png(fig)


def real_vs_generated(
    real: torch.Tensor | np.ndarray,
    generated: torch.Tensor | np.ndarray,
    spacing: Sequence[float],
    rows: int = 3,
    right: str = "generated",
) -> bytes:
    """Real volumes (left three columns) beside generated ones (right three), row by row.

    ``right`` names the right-hand volumes: ``reconstructed`` shows each real volume beside
    the autoencoder's reconstruction of it (same subject per row), the ceiling of sampling."""
    real_np, gen_np = _as_numpy(real), _as_numpy(generated)
    rows = max(1, min(rows, real_np.shape[0], gen_np.shape[0]))
    fig = Figure(figsize=(11.0, 2.1 * rows))
    axes = fig.subplots(rows, 6, squeeze=False)
    for r in range(rows):
        for block, (name, volume) in enumerate((("real", real_np[r]), (right, gen_np[r]))):
            for c, (image, aspect) in enumerate(mid_slices(volume, spacing)):
                ax = axes[r, 3 * block + c]
                _show(ax, image, aspect)
                if r == 0:
                    ax.set_title(f"{name} · {VIEWS[c]}", fontsize=9)
    fig.suptitle(f"Real (left) vs {right} (right)")
    return _png(fig)


def intensity_histograms(
    real_hist: np.ndarray, generated_hist: np.ndarray, threshold: float
) -> bytes:
    """Real and generated brain-voxel intensity histograms (normalised) on one axis."""
    bins = len(real_hist)
    centres = (np.arange(bins) + 0.5) / bins
    fig = Figure(figsize=(6.0, 3.2))
    ax = fig.subplots()
    ax.plot(centres, real_hist, label="real", color="tab:blue")
    ax.plot(centres, generated_hist, label="generated", color="tab:orange")
    ax.axvline(
        threshold, color="gray", linestyle=":", linewidth=1, label=f"mask threshold {threshold:g}"
    )
    ax.set_xlabel("intensity (cache scale)")
    ax.set_ylabel("fraction of brain voxels")
    ax.set_xlim(0.0, 1.0)
    ax.set_title("Intensity histograms of brain voxels")
    ax.legend(fontsize=8)
    return _png(fig)


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a run's ``metrics.jsonl``. Unreadable lines (e.g. the last one of a run
    killed mid-write) are skipped with a warning naming file and line, so one bad line
    does not cost the whole report; a missing file gives no records."""
    path = Path(path)
    if not path.is_file():
        log.warning("%s: no training log; its curves are left out", path)
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: not valid JSON, skipped", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def loss_series(
    records: Sequence[Mapping[str, Any]], split: str, key: str = "loss"
) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` for one split, in step order."""
    points = sorted(
        (int(r["step"]), float(r[key]))
        for r in records
        if r.get("split") == split
        and isinstance(r.get(key), int | float)
        and isinstance(r.get("step"), int)
    )
    return [p[0] for p in points], [p[1] for p in points]


def training_curves(runs: Mapping[str, str | Path]) -> bytes:
    """One panel per training run (e.g. autoencoder, diffusion): train and validation loss
    against step, on a log scale when every value is positive."""
    names = list(runs)
    fig = Figure(figsize=(5.0 * max(1, len(names)), 3.4))
    axes = fig.subplots(1, max(1, len(names)), squeeze=False)[0]
    for ax, name in zip(axes, names):
        records = read_metrics_jsonl(runs[name])
        values = []
        for split, style in (
            ("train", {"linewidth": 1.0}),
            ("val", {"marker": "o", "markersize": 3}),
        ):
            steps, losses = loss_series(records, split)
            if steps:
                ax.plot(steps, losses, label=split, **style)
                values += losses
        if values and min(values) > 0:
            ax.set_yscale("log")
        if not values:
            ax.text(0.5, 0.5, "no loss records", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=8)
        ax.set_title(f"{name}: loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    return _png(fig)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_reports(
    output_dir: str | Path,
    metrics: Mapping[str, float],
    verdict: Mapping[str, Any],
    images: Mapping[str, bytes],
    context: Mapping[str, Any],
    descriptions: Mapping[str, str] | None = None,
    lineage: Sequence[tuple[str, str]] = (),
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (PNGs embedded as data URIs) into
    ``output_dir``; returns their paths. ``lineage``: the bundle's record as ``(field,
    value)`` rows (:func:`ldm_core.lineage.rows`), shown after the metrics."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    descriptions = descriptions or {}
    status = "PASSED" if verdict.get("passed") else "FAILED"
    reasons = list(verdict.get("reasons", []))

    rows = "".join(
        f"<tr><td><code>{html.escape(k)}</code></td><td>{_fmt(v)}</td>"
        f"<td>{html.escape(descriptions.get(k, ''))}</td></tr>"
        for k, v in metrics.items()
    )
    ctx = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in context.items()
    )
    reason_html = "".join(f"<li>{html.escape(r)}</li>" for r in reasons)
    lineage_html = "".join(
        f"<tr><td><code>{html.escape(k)}</code></td><td><code>{html.escape(v)}</code></td></tr>"
        for k, v in lineage
    )
    lineage_section = (
        f"<h2>Lineage</h2><table><tr><th>field</th><th>value</th></tr>{lineage_html}</table>"
        if lineage
        else ""
    )
    imgs = "".join(
        f'<h2>{html.escape(name.replace("_", " "))}</h2><img alt="{html.escape(name)}" src="{_data_uri(png)}">'
        for name, png in images.items()
    )
    colour = "#1a7f37" if verdict.get("passed") else "#cf222e"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>brain-ldm evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1200px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
img {{ max-width: 100%; }} .gate {{ color: {colour}; font-weight: bold; }}
</style></head><body>
<h1>brain-ldm evaluation</h1>
<p>Quality gate: <span class="gate">{status}</span></p>
<ul>{reason_html}</ul>
<ul>{ctx}</ul>
<h2>Metrics</h2>
<table><tr><th>metric</th><th>value</th><th>meaning</th></tr>{rows}</table>
{lineage_section}
{imgs}
</body></html>
"""
    md_lines = ["# brain-ldm evaluation", "", f"**Quality gate: {status}**", ""]
    md_lines += [f"- {r}" for r in reasons] + ([""] if reasons else [])
    md_lines += [f"- **{k}**: {v}" for k, v in context.items()] + [""]
    md_lines += ["| metric | value | meaning |", "| --- | --- | --- |"]
    md_lines += [f"| `{k}` | {_fmt(v)} | {descriptions.get(k, '')} |" for k, v in metrics.items()]
    if lineage:
        md_lines += ["", "## Lineage", "", "| field | value |", "| --- | --- |"]
        md_lines += [f"| `{k}` | `{v}` |" for k, v in lineage]
    for name, png in images.items():
        md_lines += ["", f"## {name.replace('_', ' ')}", "", f"![{name}]({_data_uri(png)})"]
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, page)
    atomic_write_text(md_path, "\n".join(md_lines) + "\n")
    return html_path, md_path
