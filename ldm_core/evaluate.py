"""The ``ldm evaluate`` verb: score a model bundle against the real images it was trained
on, and gate deployment.

It generates samples from the bundle, compares them with the real cache
(:func:`ldm_core.metrics.compute_metrics`, FID when configured: :mod:`ldm_core.fid`),
measures the autoencoder's reconstructions of the validation volumes, applies the quality
gate (:func:`ldm_core.gate.gate`) and writes ``metrics.json``, figures, an HTML and a
Markdown report and a few NIfTI samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm_core import figures, lineage
from ldm_core.config import Config
from ldm_core.data.preprocessed import read_manifest, subjects
from ldm_core.errors import LdmError
from ldm_core.fid import load_feature_extractor
from ldm_core.gate import gate
from ldm_core.io import (
    AUTOENCODER_PT,
    LINEAGE_JSON,
    MANIFEST_JSON,
    METRICS_JSON,
    METRICS_JSONL,
    UNET_PT,
    atomic_write_bytes,
    atomic_write_json,
)
from ldm_core.metrics import (
    MASK_THRESHOLD,
    METRIC_DOCS,
    compute_metrics,
    intensity_histogram,
    lesion_metrics,
    reconstruct,
    reconstruction_quality,
    timed,
    ventricle_metrics,
)
from ldm_core.samplers import samplers_for

log = logging.getLogger(__name__)

MAX_REAL = 32
"""Real volumes used at most (evenly spaced over the cache): bounds memory and time on big
cohorts while keeping the reference statistics stable."""
MAX_RECONSTRUCTED = 8
"""Validation volumes reconstructed by the autoencoder at most (SSIM of 3D volumes is slow
on a CPU)."""
NUM_NIFTI = 3
"""Generated samples written as NIfTI next to the report."""
GENERATE_BATCH = 4
"""Seeds per call of the sampler."""


def load_real(
    data_dir: str | Path, expected_shape: Sequence[int], limit: int = MAX_REAL
) -> tuple[torch.Tensor, list[str]]:
    """Real volumes of the cache (train and val subjects alike; at most ``limit``, evenly
    spaced), checked against the shape the model generates. Returns volumes and their ids."""
    root = Path(data_dir)
    manifest = read_manifest(root)
    shape = tuple(int(s) for s in manifest["shape"])
    if shape != tuple(int(s) for s in expected_shape):
        raise LdmError(
            f"{root / MANIFEST_JSON}: images are {shape} but the bundle generates {tuple(expected_shape)} "
            "(bundle.json image_shape); evaluate against the cache the model was trained on"
        )
    usable = subjects(manifest)
    usable = [s for s in usable if s.get("split") in ("train", "val")]
    if len(usable) < 2:
        raise LdmError(
            f"{root / MANIFEST_JSON}: needs at least 2 usable train/val subjects to compare with, "
            f"found {len(usable)}"
        )
    usable = _evenly(usable, limit)
    return _read_volumes(root, usable, shape), [str(s["id"]) for s in usable]


def load_validation(data_dir: str | Path, limit: int = MAX_RECONSTRUCTED) -> torch.Tensor | None:
    """The cache's validation volumes (at most ``limit``, evenly spaced), or None if it has
    none. Call after :func:`load_real`, which checks the cache's shape against the bundle."""
    root = Path(data_dir)
    manifest = read_manifest(root)
    usable = _evenly(subjects(manifest, "val"), limit)
    if not usable:
        return None
    return _read_volumes(root, usable, tuple(int(s) for s in manifest["shape"]))


def _evenly(items: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """``items``, or ``limit`` of them evenly spaced when there are more."""
    if len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def _read_volumes(root: Path, items: list[dict[str, Any]], shape: tuple[int, ...]) -> torch.Tensor:
    """The cache's volumes of ``items`` as one float32 tensor ``[N, 1, *shape]``."""
    volumes = []
    for item in items:
        path = root / item["file"]
        try:
            array = np.load(path)
        except (OSError, ValueError) as e:
            raise LdmError(f"{path}: cannot read volume of subject {item['id']} ({e})") from None
        if array.shape != (1, *shape):
            raise LdmError(f"{path}: shape {array.shape}, manifest says {(1, *shape)}")
        volumes.append(torch.from_numpy(array.astype(np.float32)))
    return torch.stack(volumes)


def _generate(bundle: Any, num: int, sampler: str, steps: int) -> torch.Tensor:
    from tqdm import tqdm

    from ldm_core.sample import generate

    out = []
    with tqdm(total=num, desc=f"generating ({sampler}, {steps} steps)", unit="sample") as bar:
        for start in range(0, num, GENERATE_BATCH):
            seeds = list(range(start, min(num, start + GENERATE_BATCH)))
            out.append(generate(bundle, seeds, sampler=sampler, steps=steps))
            bar.update(len(seeds))
    return torch.cat(out)


def _training_runs(training_logs: Sequence[Path]) -> dict[str, Path]:
    """Label each training log (a run dir or a metrics.jsonl file) by its stage."""
    runs: dict[str, Path] = {}
    for entry in training_logs:
        entry = Path(entry)
        path = entry / METRICS_JSONL if entry.is_dir() else entry
        run_dir = path.parent
        if (run_dir / AUTOENCODER_PT).exists():
            label = "autoencoder"
        elif (run_dir / UNET_PT).exists():
            label = "diffusion"
        else:
            label = run_dir.name
        if label in runs:
            label = f"{label} ({run_dir})"
        runs[label] = path
    return runs


def _sampler(cfg: Config, bundle: Any) -> str:
    """``sampling.sampler``, or the bundle's own when the configured one cannot sample a
    model of the bundle's training objective (an evaluation must not fail on that)."""
    sampler = cfg.sampling.sampler
    objective = bundle.config.model.scheduler.objective
    if sampler in samplers_for(objective):
        return sampler
    log.warning(
        "sampling.sampler=%s cannot sample this bundle (trained with objective %s); using the "
        "bundle's own sampler %s",
        sampler,
        objective,
        bundle.config.sampling.sampler,
    )
    return str(bundle.config.sampling.sampler)


def _is_flair(channel: str) -> bool:
    """Whether the configured channel is Task01's FLAIR (by name or index), the modality
    where lesions are bright and :func:`ldm_core.measures.lesion_count` applies."""
    return channel.strip().lower() in ("flair", "0")


def _draw_figures(
    real: torch.Tensor,
    generated: torch.Tensor,
    spacing: Sequence[float],
    training_logs: Sequence[Path],
    reconstructed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, bytes]:
    """The report's pictures as PNG bytes, by name; ``generated`` already clipped to [0, 1].
    ``reconstructed`` is (validation volumes, the autoencoder's reconstructions of them)."""
    spacing = tuple(float(s) for s in spacing)
    images = {
        "samples": figures.view_grid(generated, spacing, title="Generated samples"),
        "real_vs_generated": figures.real_vs_generated(real, generated, spacing),
        "intensity_histograms": figures.intensity_histograms(
            intensity_histogram(real), intensity_histogram(generated), MASK_THRESHOLD
        ),
    }
    if reconstructed is not None:
        images["real_vs_reconstructed"] = figures.real_vs_generated(
            *reconstructed, spacing, right="reconstructed"
        )
    runs = _training_runs(training_logs)
    if runs:
        images["training_curves"] = figures.training_curves(runs)
    return images


def _write_files(
    out: Path, images: dict[str, bytes], generated: torch.Tensor, affine: np.ndarray
) -> tuple[list[Path], list[Path]]:
    """Write ``figures/<name>.png`` and the first :data:`NUM_NIFTI` samples as
    ``samples/sample_<seed>.nii.gz`` (with the bundle's affine); returns both lists."""
    from ldm_core.sample import to_nifti_bytes

    figure_paths = [
        atomic_write_bytes(out / "figures" / f"{name}.png", png) for name, png in images.items()
    ]
    sample_paths = [
        atomic_write_bytes(
            out / "samples" / f"sample_{seed:04d}.nii.gz", to_nifti_bytes(volume, affine)
        )
        for seed, volume in list(enumerate(generated))[:NUM_NIFTI]
    ]
    return figure_paths, sample_paths


def _write_lineage(
    bundle_dir: str | Path, out: Path, metrics: dict[str, Any], verdict: dict[str, Any]
) -> dict[str, Any]:
    """The bundle's lineage with this evaluation added, written to ``out/lineage.json``: the
    record a deploy of this bundle reads its evaluation from."""
    from ldm_core.bundle import lineage as bundle_lineage

    record = lineage.with_evaluation(bundle_lineage(bundle_dir), metrics, verdict)
    lineage.write(out / LINEAGE_JSON, record)
    return record


def evaluate(
    cfg: Config,
    bundle_dir: str | Path,
    data_dir: str | Path,
    output_dir: str | Path,
    training_logs: Sequence[Path] = (),
) -> dict[str, Any]:
    """The ``ldm evaluate`` verb: generate, score, gate, and write the evaluation outputs.

    ``output_dir`` receives ``metrics.json`` (written last: its presence means a finished
    evaluation), ``figures/*.png``, ``report.html`` and ``report.md`` (PNGs embedded, for
    the Kubeflow UI, with the bundle's lineage), ``lineage.json`` (the bundle's record with
    this evaluation added) and ``samples/*.nii.gz`` with the bundle's affine. ``training_logs``
    are run directories (or ``metrics.jsonl`` files) whose loss curves go in the report.
    Returns the content of ``metrics.json`` plus ``files`` (paths written).
    """
    from ldm_core.bundle import load

    ecfg = cfg.evaluation
    if ecfg.num_samples < 2:
        raise LdmError(
            f"evaluation.num_samples: at least 2 are needed to score diversity, got {ecfg.num_samples}"
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_JSON).unlink(missing_ok=True)  # a stale verdict must not outlive a failed re-run
    log.info("loading bundle %s", bundle_dir)
    bundle = load(bundle_dir, device=cfg.train.device)
    log.info("loading real volumes from %s", data_dir)
    real, real_ids = load_real(data_dir, bundle.image_shape)
    log.info("%d real volumes; generating %d samples", len(real_ids), ecfg.num_samples)
    sampler = _sampler(cfg, bundle)
    generated = _generate(bundle, ecfg.num_samples, sampler, ecfg.steps)

    extractor = None
    if ecfg.fid_weights:
        log.info("loading FID feature extractor %s", ecfg.fid_weights)
        extractor = load_feature_extractor(ecfg.fid_weights, cfg, bundle.device)
    metrics = compute_metrics(real, generated, extractor, bundle.device)
    validation = load_validation(data_dir)
    recons = None
    if validation is None:
        log.warning("%s has no validation subjects: reconstruction quality not measured", data_dir)
    else:
        with timed(f"reconstruction quality ({validation.shape[0]} validation volumes)"):
            recons = reconstruct(bundle.autoencoder, validation, bundle.device)
            metrics.update(reconstruction_quality(validation, recons))
    clipped = generated.clamp(0.0, 1.0)
    reconstructed = None if recons is None else (validation, recons)
    if _is_flair(cfg.data.channel):
        metrics.update(lesion_metrics(real, clipped, reconstructed))
        metrics.update(ventricle_metrics(real, clipped, bundle.spacing, reconstructed))
    passed, reasons = gate(metrics, ecfg)
    log.info("quality gate %s%s", "passed" if passed else "FAILED: ", "; ".join(reasons))

    log.info("writing figures and reports")
    images = _draw_figures(real, clipped, bundle.spacing, training_logs, reconstructed)
    figure_paths, sample_paths = _write_files(out, images, clipped, bundle.affine)
    verdict = {"passed": passed, "reasons": reasons}
    context = {
        "bundle": str(bundle_dir),
        "data": str(data_dir),
        "sampler": sampler,
        "steps": ecfg.steps,
        "fid_weights": ecfg.fid_weights or "(not given: FID not computed)",
    }
    record = _write_lineage(bundle_dir, out, metrics, verdict)
    html, md = figures.write_reports(
        out, metrics, verdict, images, context, METRIC_DOCS, lineage.rows(record)
    )

    result: dict[str, Any] = {**metrics, "gate": verdict}
    atomic_write_json(out / METRICS_JSON, result)
    log.info("wrote %s", out / METRICS_JSON)
    result["files"] = {
        "metrics": str(out / METRICS_JSON),
        "report_html": str(html),
        "report_md": str(md),
        "lineage": str(out / LINEAGE_JSON),
        "figures": [str(p) for p in figure_paths],
        "samples": [str(p) for p in sample_paths],
    }
    return result
