"""DDIM-50 vs DDPM-1000: end-to-end time to generate one volume with the tiny-cpu models.

Same untrained bundle, same seed, same process: the ratio is what matters (the denoising
cost per step does not depend on the weights). Usage:

    .venv/bin/python -m benchmarks.bench_sampling [--preset tiny-cpu] [--ddpm-steps 1000]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from benchmarks.common import record, timed
from ldm_core.bundle import load
from ldm_core.config import load_config
from ldm_core.sample import generate
from tests.harness.data import random_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    args = parser.parse_args()

    cfg = load_config(preset=args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load(random_bundle(f"{tmp}/b", cfg), device="auto")
        generate(bundle, [0], sampler="ddim", steps=2)  # warm-up (allocations, kernels)
        ddim_s, _ = timed(generate, bundle, [0], sampler="ddim", steps=args.ddim_steps)
        ddpm_s, _ = timed(generate, bundle, [0], sampler="ddpm", steps=args.ddpm_steps)
    ratio = ddpm_s / ddim_s
    record(
        "sampling",
        {
            "preset": args.preset,
            "image_shape": list(cfg.data.shape),
            "latent_shape": list(cfg.latent_shape),
            "ddim_steps": args.ddim_steps,
            "ddpm_steps": args.ddpm_steps,
            "ddim_seconds": round(ddim_s, 3),
            "ddpm_seconds": round(ddpm_s, 3),
            "ddpm_over_ddim": round(ratio, 2),
            "cuda": torch.cuda.is_available(),
        },
        summary=f"DDIM-{args.ddim_steps} {ddim_s:.2f} s vs DDPM-{args.ddpm_steps} {ddpm_s:.2f} s: "
        f"DDIM {ratio:.1f}x faster ({args.preset})",
    )


if __name__ == "__main__":
    main()
