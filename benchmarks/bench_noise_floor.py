"""How close can any autoencoder's reconstructions come to the demo cohort's volumes?

The demo generator adds Rician noise to every subject, and an autoencoder, which
reconstructs anatomy, not noise, is scored against the noisy volume. Its best possible
reconstruction is the subject without its noise. This script generates the same subjects
twice (``ldm_core.data.demo.make_subject`` with and without noise: one random stream, so
they differ by the noise alone), preprocesses both with a preset's data settings, and scores
the noise-free volumes as reconstructions of the noisy ones, with the measures ``ldm
evaluate`` uses (``ldm_core.metrics.reconstruction_quality``): the ceiling of ``recon_ssim``
and ``recon_psnr`` on this cohort.

Usage::

    .venv/bin/python -m benchmarks.bench_noise_floor --work DIR [--preset quality-cpu]
        [--subjects N] [--split val]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.bench_anatomy import split_volumes
from benchmarks.common import record
from ldm_core.config import PRESETS, load_config
from ldm_core.data import demo
from ldm_core.data.preprocess import preprocess
from ldm_core.metrics import reconstruction_quality


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="directory for both cohorts")
    parser.add_argument("--preset", default="quality-cpu", choices=sorted(PRESETS))
    parser.add_argument("--subjects", type=int, default=0, help="default: data.demo_subjects")
    parser.add_argument("--seed", type=int, default=0, help="demo generator seed")
    parser.add_argument("--split", default="val", choices=["train", "val"])
    args = parser.parse_args(argv)

    cfg = load_config(preset=args.preset)
    n = args.subjects or cfg.data.demo_subjects
    caches = {}
    t0 = time.perf_counter()
    for name, noise in (("noisy", True), ("noise_free", False)):
        raw = demo.generate_cohort(args.work / name / "raw", n, seed=args.seed, noise=noise)
        caches[name] = preprocess(raw, args.work / name / "cache", cfg, skip_bad=False)
    noisy = split_volumes(caches["noisy"], args.split)
    clean = split_volumes(caches["noise_free"], args.split)
    ceiling = reconstruction_quality(noisy, clean)
    result = {
        "preset": args.preset,
        "subjects": n,
        "seed": args.seed,
        "split": args.split,
        "shape": list(cfg.data.shape),
        "spacing_mm": list(cfg.data.spacing),
        "ceiling_recon_ssim": round(ceiling["recon_ssim"], 4),
        "ceiling_recon_psnr": round(ceiling["recon_psnr"], 2),
        "ceiling_recon_detail_ratio": round(ceiling["recon_detail_ratio"], 4),
        "volumes": int(ceiling["num_reconstructed"]),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    summary = (
        f"noise floor of {n} demo subjects ({args.split}, {args.preset} data): a perfect "
        f"denoising autoencoder scores SSIM {result['ceiling_recon_ssim']:.3f}, PSNR "
        f"{result['ceiling_recon_psnr']:.1f} dB, detail {result['ceiling_recon_detail_ratio']:.2f}"
    )
    record("noise_floor", result, summary=summary)


if __name__ == "__main__":
    main()
