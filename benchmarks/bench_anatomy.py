"""Does the demo model learn anatomy, and what does its training cost?

Trains a candidate, a preset (``--preset``, tiny-cpu unless named) plus ``--set`` overrides,
on a preprocessed demo cache with the project's own trainers, then measures where blur
comes from:

- the autoencoder's reconstructions, scored as ``ldm evaluate`` scores them (SSIM, PSNR and
  the detail ratio, ``ldm_core.measures.detail_ratio``, against the same volumes): of the
  validation volumes (``recon_*``) and of the training volumes (``recon_train_*``, the
  ceiling of any sample, since samples are decoded by this autoencoder);
- lesions: how many validation volumes keep their lesions through the autoencoder
  (``ldm_core.metrics.lesions_kept``, ``ldm evaluate``'s own count, on each volume and on its reconstruction);
- samples as ``ldm evaluate`` draws them (``evaluation.num_samples`` seeds from 0 in batches
  of 4, the configured sampler at ``evaluation.steps``), scored by the same
  ``ldm_core.metrics.compute_metrics`` against the same real volumes, with the candidate's
  gate verdict, and the share of samples with a lesion beside the real cohort's share;
- training cost: wall seconds of each stage (noisy on a shared machine) and, the figure to
  compare, the per-step time of the candidate's and of the reference preset's model shapes
  (tiny-cpu before the demo-anatomy rounds of benchmarks/README.md), measured back to back
  in this process and multiplied by their step counts.

Usage::

    .venv/bin/python -m benchmarks.bench_anatomy --data CACHE --work DIR [--preset NAME]
        [--set key=value ...] [--autoencoder DIR | --autoencoder-only] [--png FILE] [--label NAME]
    .venv/bin/python -m benchmarks.bench_anatomy --time-only [--preset NAME] [--set key=value ...]

``--autoencoder`` reuses a finished autoencoder run (diffusion-only experiments);
``--autoencoder-only`` trains and scores the autoencoder alone. ``--png`` writes axial
mid-slices: validation volumes, their reconstructions, then the samples, 8 a row.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss

from benchmarks.common import record
from ldm_core import bundle as bundles
from ldm_core import evaluate, metrics
from ldm_core.config import DEFAULT_PRESET, PRESETS, Config, from_dict, load_config
from ldm_core.data.preprocessed import VolumeDataset
from ldm_core.gate import gate
from ldm_core.io import AUTOENCODER_PT
from ldm_core.models import (
    build_autoencoder,
    build_discriminator,
    build_unet,
    diffusion_training_example,
    load_weights,
)
from ldm_core.sample import generate
from ldm_core.samplers import training_scheduler
from ldm_core.train.autoencoder import train_autoencoder
from ldm_core.train.diffusion import train_diffusion
from ldm_core.train.loader import to_input
from ldm_core.train.model_setup import prepare_model

REFERENCE = [
    "model.autoencoder.latent_channels=3",
    "model.autoencoder.channels=[16,32,32]",
    "model.autoencoder.num_res_blocks=1",
    "model.unet.channels=[32,64,64]",
    "model.unet.num_res_blocks=1",
    "model.scheduler.prediction_type=epsilon",
    "train.autoencoder.steps=120",
    "train.autoencoder.batch_size=2",
    "train.autoencoder.adv_start_step=90",
    "train.autoencoder.adv_weight=0.01",
    "train.diffusion.steps=700",
    "train.diffusion.batch_size=8",
    "train.channels_last=false",
]
"""The tiny-cpu preset before the demo-anatomy rounds (AE 120 steps with the discriminator
from step 90, UNet 700 steps at batch 8): the training cost the candidate must not exceed."""

GENERATE_BATCH = 4
"""Seeds per generate call, as ``ldm evaluate`` draws them."""
FIGURE_COLUMNS = 8

# --------------------------------------------------------------------------- cost


def _median_seconds(fn: Callable[[], None], steps: int) -> float:
    fn()  # warm-up: allocator, kernels
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_costs(cfg: Config, steps: int) -> dict[str, float]:
    """Seconds per autoencoder step without and with the discriminator, and per UNet step,
    at ``cfg``'s shapes, batch sizes and memory layout (random data: the cost does not
    depend on it)."""
    tc, cpu = cfg.train, torch.device("cpu")
    torch.manual_seed(0)
    x = to_input(torch.rand(tc.autoencoder.batch_size, 1, *cfg.data.shape), cfg, cpu)
    ae = prepare_model(build_autoencoder(cfg), cfg, cpu)
    disc = prepare_model(build_discriminator(cfg), cfg, cpu)
    opt, d_opt = torch.optim.Adam(ae.parameters()), torch.optim.Adam(disc.parameters())
    adv = PatchAdversarialLoss(criterion="least_squares")

    def ae_step(with_disc: bool) -> None:
        recon, _, _ = ae(x)
        loss = (recon - x).abs().mean()
        if with_disc:
            loss = loss + adv(disc(recon)[-1], target_is_real=True, for_discriminator=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if with_disc:
            d_loss = adv(disc(recon.detach())[-1], target_is_real=False, for_discriminator=True)
            d_loss = d_loss + adv(disc(x)[-1], target_is_real=True, for_discriminator=True)
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()

    unet = prepare_model(build_unet(cfg), cfg, cpu)
    u_opt = torch.optim.Adam(unet.parameters())
    scheduler = training_scheduler(cfg)
    z = to_input(torch.randn(tc.diffusion.batch_size, *cfg.latent_shape), cfg, cpu)

    def unet_step() -> None:
        noisy, timesteps, target = diffusion_training_example(cfg, scheduler, z)
        loss = F.mse_loss(unet(noisy, timesteps=timesteps), target)
        u_opt.zero_grad(set_to_none=True)
        loss.backward()
        u_opt.step()

    return {
        "ae": _median_seconds(lambda: ae_step(False), steps),
        "ae_disc": _median_seconds(lambda: ae_step(True), steps),
        "unet": _median_seconds(unet_step, steps),
    }


def training_seconds(cfg: Config, cost: dict[str, float]) -> float:
    """Both stages' steps priced at ``cost`` (validation and the latent cache left out)."""
    ae = cfg.train.autoencoder
    with_disc = max(0, ae.steps - ae.adv_start_step) if ae.adv_weight > 0 else 0
    return (
        (ae.steps - with_disc) * cost["ae"]
        + with_disc * cost["ae_disc"]
        + cfg.train.diffusion.steps * cost["unet"]
    )


def compare_cost(candidate: Config, steps: int) -> dict[str, Any]:
    """Reference and candidate step costs, interleaved (a load change on a shared machine
    then hits both alike), each the better of two measurements."""
    reference = load_config(overrides=REFERENCE)
    costs: dict[str, list[dict[str, float]]] = {"reference": [], "candidate": []}
    for _ in range(2):
        costs["reference"].append(step_costs(reference, steps))
        costs["candidate"].append(step_costs(candidate, steps))
    best = {name: {k: min(c[k] for c in runs) for k in runs[0]} for name, runs in costs.items()}
    ref_s = training_seconds(reference, best["reference"])
    cand_s = training_seconds(candidate, best["candidate"])
    return {
        "step_seconds": {n: {k: round(v, 4) for k, v in c.items()} for n, c in best.items()},
        "reference_train_seconds": round(ref_s, 1),
        "candidate_train_seconds": round(cand_s, 1),
        "candidate_over_reference": round(cand_s / ref_s, 3),
    }


# --------------------------------------------------------------------------- quality


def split_volumes(data: Path, split: str) -> torch.Tensor:
    """Every volume of one split of the cache, ``[N, 1, D, H, W]``."""
    volumes = VolumeDataset(data, split)
    return torch.stack([volumes[i] for i in range(len(volumes))]).float()


def reconstruction_quality(
    autoencoder: torch.nn.Module, data: Path
) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
    """SSIM, PSNR and detail ratio of the autoencoder's reconstructions, scored as ``ldm
    evaluate`` scores them: ``recon_*`` on the validation volumes (unseen anatomy),
    ``recon_train_*`` on the training volumes (what a diffusion model that learned the
    training latents could at best decode); and ``recon_lesions_kept``, the share of the
    validation volumes with a lesion whose reconstruction has one too. Also returns
    (validation volumes, their reconstructions) for the figure."""
    scores: dict[str, float] = {}
    shown: tuple[torch.Tensor, torch.Tensor] | None = None
    for split, prefix in (("train", "recon_train"), ("val", "recon")):
        x = split_volumes(data, split)
        recon = metrics.reconstruct(autoencoder, x, torch.device("cpu"))
        q = metrics.reconstruction_quality(x, recon)
        scores |= {
            f"{prefix}_ssim": round(q["recon_ssim"], 4),
            f"{prefix}_psnr": round(q["recon_psnr"], 2),
            f"{prefix}_detail_ratio": round(q["recon_detail_ratio"], 4),
        }
        shown = (x, recon)
    assert shown is not None
    x, recon = shown
    kept = metrics.lesions_kept(x, recon)
    scores["recon_lesions_kept"] = round(float(np.mean(kept)), 3) if kept else float("nan")
    scores["val_volumes_with_lesion"] = len(kept)
    return scores, shown


def sample_quality(b: bundles.Bundle, real: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """Samples drawn as ``ldm evaluate`` draws them, scored by its ``compute_metrics`` against
    ``real`` (all of them, rounded), the bundle's own gate verdict on them, the share of
    samples with a lesion beside the real volumes' share, and their ventricle contrast
    beside the real volumes' (where the real cohort's mean has ventricles)."""
    cfg = b.config
    seeds = list(range(cfg.evaluation.num_samples))
    generated = torch.cat(
        [
            generate(b, seeds[i : i + GENERATE_BATCH], cfg.sampling.sampler, cfg.evaluation.steps)
            for i in range(0, len(seeds), GENERATE_BATCH)
        ]
    )
    scores = metrics.compute_metrics(real, generated)
    passed, reasons = gate(scores, cfg.evaluation)
    result: dict[str, Any] = {k: round(v, 4) for k, v in scores.items()}
    result["sample_detail_ratio"] = result["detail_ratio"]
    lesions = metrics.lesion_metrics(real, generated.clamp(0, 1))
    result |= {
        "sample_lesion_share": round(lesions["lesion_share_generated"], 3),
        "real_lesion_share": round(lesions["lesion_share_real"], 3),
        **{
            k: round(v, 3)
            for k, v in metrics.ventricle_metrics(real, generated.clamp(0, 1), b.spacing).items()
        },
        "gate_passed": passed,
        "gate_reasons": reasons,
    }
    return result, generated


def axial_png(rows: Sequence[tuple[str, torch.Tensor]], path: Path) -> None:
    """Axial mid-slices, one named row of volumes each (``[N, 1, D, H, W]``; more than
    :data:`FIGURE_COLUMNS` continue on the next row), rotated as ``ldm_core.figures`` shows
    them."""
    from matplotlib.figure import Figure

    rows = [
        (name if start == 0 else "", volumes[start : start + FIGURE_COLUMNS])
        for name, volumes in rows
        for start in range(0, len(volumes), FIGURE_COLUMNS)
    ]
    n = max(len(volumes) for _, volumes in rows)
    fig = Figure(figsize=(1.3 * n, 1.5 * len(rows)))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (name, volumes) in enumerate(rows):
        for c in range(n):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if c < len(volumes):
                v = volumes[c, 0].numpy()
                axes[r, c].imshow(np.rot90(v[:, :, v.shape[2] // 2]), cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_ylabel(name, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


# --------------------------------------------------------------------------- main


def train(
    cfg: Config, data: Path, work: Path, autoencoder: Path | None, autoencoder_only: bool
) -> dict[str, Any]:
    """The stages with the project's trainers; returns the run directories and seconds."""
    ae_dir = autoencoder or work / "autoencoder"
    t0 = time.perf_counter()
    if autoencoder is None:
        train_autoencoder(cfg, data, ae_dir)
    run: dict[str, Any] = {
        "autoencoder_dir": ae_dir,
        "autoencoder_wall_seconds": None if autoencoder else round(time.perf_counter() - t0, 1),
    }
    if autoencoder_only:
        return run
    t1 = time.perf_counter()
    train_diffusion(cfg, data, ae_dir, work / "diffusion")
    run["diffusion_wall_seconds"] = round(time.perf_counter() - t1, 1)
    run["bundle"] = bundles.build_bundle(ae_dir, work / "diffusion", work / "bundle")
    return run


def trained_autoencoder(run_dir: Path) -> torch.nn.Module:
    """The finished autoencoder of a training run, on the CPU, in eval mode."""
    state = torch.load(run_dir / AUTOENCODER_PT, map_location="cpu", weights_only=False)
    ae = build_autoencoder(from_dict(state["config"]), use_checkpoint=False)
    load_weights(ae, state["state_dict"], str(run_dir / AUTOENCODER_PT))
    return ae.eval()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="preprocessed demo cache (ldm preprocess)")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    parser.add_argument("--work", type=Path, help="directory for the runs and the bundle")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--autoencoder", type=Path, help="reuse this finished autoencoder run")
    parser.add_argument(
        "--autoencoder-only",
        action="store_true",
        help="train and score the autoencoder alone (no diffusion model, no samples)",
    )
    parser.add_argument("--png", type=Path, help="write axial mid-slices here")
    parser.add_argument("--label", default="candidate")
    parser.add_argument("--time-only", action="store_true", help="only the step-cost ratio")
    parser.add_argument("--time-steps", type=int, default=3, help="timed steps per model")
    parser.add_argument(
        "--no-cost",
        action="store_true",
        help="skip the step-cost ratio (same shapes as a run that has it)",
    )
    args = parser.parse_args(argv)

    cfg = load_config(preset=args.preset, overrides=args.set)
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    result: dict[str, Any] = {"label": args.label, "preset": args.preset, "overrides": args.set}
    summary = f"{args.label}: "
    if not args.time_only:
        if args.data is None or args.work is None:
            parser.error("--data and --work are needed unless --time-only")
        run = train(cfg, args.data, args.work, args.autoencoder, args.autoencoder_only)
        scores, (val_x, val_recon) = reconstruction_quality(
            trained_autoencoder(run.pop("autoencoder_dir")), args.data
        )
        result |= scores
        rows = [
            ("real (val)", val_x[:FIGURE_COLUMNS]),
            ("reconstructed", val_recon[:FIGURE_COLUMNS]),
        ]
        if "bundle" in run:
            b = bundles.load(run.pop("bundle"), "cpu")
            real, _ = evaluate.load_real(args.data, b.config.data.shape)
            samples, generated = sample_quality(b, real)
            result |= samples
            rows.append(("generated", generated))
        result |= run
        if args.png:
            axial_png(rows, args.png)
    if not args.no_cost:
        result |= compare_cost(cfg, args.time_steps)
        summary += f"train cost {result['candidate_over_reference']:.2f}x the reference preset's; "
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if not args.time_only:
        summary += (
            f"recon SSIM {result['recon_ssim']:.3f}, PSNR {result['recon_psnr']:.1f}, detail "
            f"{result['recon_detail_ratio']:.2f} (train {result['recon_train_detail_ratio']:.2f})"
        )
        if "sample_detail_ratio" in result:
            summary += (
                f"; samples detail {result['sample_detail_ratio']:.2f},"
                f" Dice {result['mask_dice']:.3f}, lesions {result['sample_lesion_share']:.2f}"
                f" (real {result['real_lesion_share']:.2f}), nn {result['nn_correlation']:.2f}"
                f" (real {result['nn_correlation_real']:.2f}),"
                f" gate {'passes' if result['gate_passed'] else 'fails'}"
            )
    record("anatomy", result, summary=summary)


if __name__ == "__main__":
    main()
