"""Evaluation figures (PNG) and the self-contained HTML / Markdown reports."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import torch
from PIL import Image

from ldm_core.figures import (
    intensity_histograms,
    loss_series,
    mid_slices,
    read_metrics_jsonl,
    real_vs_generated,
    training_curves,
    view_grid,
    write_reports,
)


def _image(png: bytes) -> Image.Image:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(png))


def _write_log(path, records, tail: str = "") -> None:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n" + tail)


def test_curves_read_train_and_val_and_survive_a_torn_last_line(tmp_path, caplog):
    records = [{"step": s, "split": "train", "loss": 2.0 / s, "lr": 1e-4} for s in range(1, 31)]
    records += [{"step": s, "split": "val", "loss": 3.0 / s} for s in (30, 10, 20)]
    ae = tmp_path / "ae.jsonl"
    _write_log(ae, records, tail='{"step": 31, "spl')
    parsed = read_metrics_jsonl(ae)
    assert len(parsed) == 33
    assert "ae.jsonl:34: not valid JSON" in caplog.text
    assert loss_series(parsed, "val") == ([10, 20, 30], [0.3, 0.15, 0.1])
    assert len(loss_series(parsed, "train")[0]) == 30

    diff = tmp_path / "diff.jsonl"
    _write_log(diff, [{"step": s, "split": "train", "loss": 0.5} for s in range(5)])
    one = _image(training_curves({"autoencoder": ae}))
    two = _image(
        training_curves({"autoencoder": ae, "diffusion": diff, "missing": tmp_path / "nope.jsonl"})
    )
    assert two.width > 2 * one.width  # one panel per run, the missing run included (empty)


def test_views_are_oriented_anterior_and_superior_up():
    vol = np.zeros((20, 24, 16), dtype=np.float32)
    vol[:, 20:, :] = 1.0  # anterior slab (high y)
    axial, coronal, sagittal = (img for img, _ in mid_slices(vol, (1.0, 1.0, 1.0)))
    assert axial.shape == (24, 20) and axial[:4].min() == 1.0 and axial[-4:].max() == 0.0
    assert sagittal.shape == (16, 24) and sagittal[:, -4:].min() == 1.0  # anterior to the right
    top = np.zeros_like(vol)
    top[:, :, 12:] = 1.0  # superior slab (high z)
    _, coronal, _ = (img for img, _ in mid_slices(top, (1.0, 1.0, 1.0)))
    assert coronal[:4].min() == 1.0 and coronal[-4:].max() == 0.0
    aspects = [a for _, a in mid_slices(vol, (1.0, 2.0, 3.0))]
    assert aspects == [2.0, 3.0, 1.5]


def test_grids_and_histograms_render():
    vols = torch.rand(3, 1, 16, 20, 12)
    grid = _image(view_grid(vols, (2.0, 2.0, 2.0), title="samples"))
    single = _image(view_grid(vols[:1], (2.0, 2.0, 2.0)))
    assert grid.height > 2 * single.height  # one row per volume
    side = _image(real_vs_generated(vols, vols.flip(0), (2.0, 2.0, 2.0), rows=2))
    assert side.width > grid.width  # six columns
    hist = np.full(100, 0.01)
    assert _image(intensity_histograms(hist, hist[::-1], 0.1)).width > 0


def test_reports_embed_every_figure_and_escape_text(tmp_path):
    png = view_grid(torch.rand(1, 1, 8, 8, 8), (1.0, 1.0, 1.0))
    metrics = {"mmd": 0.5, "mask_dice": 0.25}
    verdict = {"passed": False, "reasons": ["mask_dice=0.25 but <threshold> requires at least 0.5"]}
    html_path, md_path = write_reports(
        tmp_path,
        metrics,
        verdict,
        {"samples": png, "curves": png},
        {"bundle": "b&c"},
        {"mmd": "relative MMD"},
    )
    page = html_path.read_text()
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == 2 and base64.b64decode(uris[0]) == png
    assert (
        "FAILED" in page
        and "&lt;threshold&gt;" in page
        and "b&amp;c" in page
        and "relative MMD" in page
    )
    md = md_path.read_text()
    assert (
        md.count("![") == 2 and "| `mask_dice` | 0.25 |" in md and "**Quality gate: FAILED**" in md
    )
    assert not list(tmp_path.glob("*.tmp"))
