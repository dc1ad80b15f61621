"""Generate volumes from a bundle: denoise latents, decode, write NIfTI and PNG previews.

Each sample is determined by its seed alone: its starting noise and every stochastic
sampler step draw from a generator seeded with it, so sample ``seed=7`` is the same
whether it is generated alone or in a batch (up to float rounding of batched convs).
DDIM with 50 steps is the default: about 20x faster end to end than DDPM-1000 here
(benchmarks/bench_sampling.py).

Speed on a GPU comes from three switches, each measured by ``benchmarks/gpu_check.py``:
``precision`` (the UNet and the decoder under bf16 autocast where the card has bf16, TF32 for
the remaining float32 matmuls and convolutions), the scheduler stepping the whole batch at
once (:mod:`ldm_core.samplers`), and :func:`prepare`, which compiles the UNet for the
bundle's fixed latent shape and pays the compile cost at warm-up rather than on a request.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from ldm_core import latent_prior
from ldm_core.bundle import Bundle, load
from ldm_core.errors import LdmError
from ldm_core.io import atomic_write_bytes
from ldm_core.samplers import Sampler, build_sampler

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
"""Called as ``progress(step_done, total_steps)`` after every denoising step."""

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
"""Choices of a sampling precision: ``auto`` is bf16 on a CUDA device that supports it and
float32 anywhere else (CPU bf16 is slower than float32 on most CPUs, so auto never picks it)."""


@dataclass(frozen=True)
class Tolerance:
    """Largest voxel differences (images in [0, 1]) accepted between two samples of a seed."""

    mean: float
    max: float


BF16_TOLERANCE = Tolerance(mean=0.02, max=0.2)
"""bf16 against float32, same seed; tests/test_sample_trained.py holds a trained tiny model
(DDIM-10) to it. bf16 keeps 8 bits of mantissa (relative error ~4e-3 per op); on that model
the largest voxel difference measured 0.07-0.10, at the edges of the decoded volume."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``precision`` means on ``device``; None runs float32.

    An explicit ``bf16`` is honoured on any device (CPU autocast supports it, which is how
    the tests compare it with float32); ``auto`` asks the CUDA device whether it has bf16.
    """
    if precision not in PRECISIONS:
        raise LdmError(f"sampling precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@contextlib.contextmanager
def _precision(precision: str, device: torch.device) -> Iterator[None]:
    """Run the block under autocast for ``precision``; on CUDA, let float32 matmuls and
    convolutions that autocast leaves in float32 use TF32 (the previous setting is restored,
    so a caller's own choice survives)."""
    dtype = autocast_dtype(precision, device)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    if device.type != "cuda":
        with autocast:
            yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with autocast:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def _initial_noise(bundle: Bundle, gens: list[torch.Generator]) -> torch.Tensor:
    """Latent-shaped Gaussian noise per seed, drawn on the CPU, times the bundle's
    ``sampling.initial_noise_scale``."""
    shape = tuple(bundle.latent_shape)
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return (noise * bundle.config.sampling.initial_noise_scale).to(bundle.device)


def _prior_start(
    bundle: Bundle, scheduler: Sampler, noise: torch.Tensor, seeds: Sequence[int], t: int
) -> torch.Tensor:
    """Where a truncated reverse process starts (``sampling.truncate_at``): clean latents
    drawn from the bundle's latent prior, noised to the first kept timestep ``t`` with the
    seeds' starting ``noise``. The prior is drawn on the CPU from generators of its own
    (:func:`ldm_core.latent_prior.draw`), so a seed gives the same start on any device."""
    if bundle.latent_prior is None:
        raise LdmError(
            f"sampling.truncate_at is {bundle.config.sampling.truncate_at} but the bundle has no "
            "latent_prior.pt (built before the prior was recorded); set sampling.truncate_at: 0"
        )
    clean = latent_prior.draw(bundle.latent_prior, seeds).to(bundle.device)
    return scheduler.noised(clean, noise, t)


@torch.no_grad()
def denoise(
    bundle: Bundle,
    seeds: Sequence[int],
    sampler: str = "ddim",
    steps: int = 50,
    eta: float | None = None,
    progress: ProgressFn | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """Run the reverse process from seeded noise; returns scaled latents ``[N, C, d, h, w]``.

    Which sampler runs is the adapter's business (:mod:`ldm_core.samplers`): this loop is
    the same for all of them. ``eta`` defaults to the bundle's ``sampling.eta`` (DDIM only).
    Only the UNet runs under ``precision``'s autocast: the latents and the scheduler's update
    stay float32, so rounding does not compound across steps. With the bundle's
    ``sampling.clamp_to_latent_range`` and a recorded ``latent_range``, each step's
    clean-latent estimate is clamped to the training latents' range first. A UNet trained on
    per-channel standardised latents (the bundle's ``latent_moments``) denoises in that space;
    its result is mapped back to the autoencoder's scaled latents before it is returned.
    """
    scheduler = build_sampler(bundle.config, sampler, eta=eta)
    if not seeds:
        raise LdmError("at least one seed is needed")
    total_t = bundle.config.model.scheduler.num_train_timesteps
    if not 1 <= steps <= total_t:
        raise LdmError(f"steps must be between 1 and {total_t}, got {steps}")
    truncate_at = bundle.config.sampling.truncate_at
    scheduler.set_timesteps(steps, device=bundle.device, truncate_at=truncate_at)
    timesteps = scheduler.timesteps
    x = _initial_noise(bundle, _generators(seeds))
    if truncate_at:
        x = _prior_start(bundle, scheduler, x, seeds, timesteps[0])
    # Step noise (DDPM, DDIM with eta > 0) is drawn on the model's device, from its own
    # per-seed generators; the starting noise is drawn on the CPU so a seed gives the same
    # start on any device.
    gens = [torch.Generator(device=bundle.device).manual_seed(int(s) + 1) for s in seeds]
    bounds = bundle.latent_range if bundle.config.sampling.clamp_to_latent_range else None
    for i, t in enumerate(timesteps):
        t_batch = torch.full((len(seeds),), t, device=bundle.device, dtype=torch.long)
        with _precision(precision, bundle.device):
            model_output = bundle.unet(x, timesteps=t_batch).float()
        if bounds is not None:
            model_output = scheduler.clamp_clean(model_output, t, x, *bounds)
        x = scheduler.step(model_output, t, x, gens)
        if progress is not None:
            progress(i + 1, len(timesteps))
    if bundle.latent_moments is not None:
        mean, std = bundle.latent_moments
        x = x * std + mean
    return x


@torch.no_grad()
def decode(bundle: Bundle, latents: torch.Tensor, precision: str = "auto") -> torch.Tensor:
    """Scaled latents -> images ``[N, 1, D, H, W]`` clipped to the training range [0, 1].

    Training multiplied the encoder's latents by ``scale_factor`` (unit variance over all
    channels together), so decoding divides by it first; :func:`denoise` has already undone
    a per-channel standardisation (``latent_moments``).
    """
    with _precision(precision, bundle.device):
        images = bundle.autoencoder.decode_stage_2_outputs(latents / bundle.scale_factor)
    return images.float().clamp_(0.0, 1.0)


def generate(
    bundle: Bundle,
    seeds: Sequence[int],
    sampler: str = "ddim",
    steps: int = 50,
    eta: float | None = None,
    progress: ProgressFn | None = None,
    precision: str = "auto",
    decode_groups: Sequence[int] | None = None,
) -> torch.Tensor:
    """One volume per seed: ``[N, 1, D, H, W]`` float32 on the CPU.

    ``decode_groups`` (sizes of consecutive runs of ``seeds``, summing to N) decodes each run
    as its own batch after one shared denoising loop. Serving batches several requests into
    one loop this way: each request's latents then reach the decoder as they would if it had
    run alone, and the decoder's full-resolution activations stay the size of one request's
    (on the 2-core CPU, demo bundle, one noisy measurement: 0.4 s per volume at batch 1,
    0.9 s at batch 8).
    """
    groups = [len(seeds)] if decode_groups is None else [int(n) for n in decode_groups]
    if decode_groups is not None and (sum(groups) != len(seeds) or min(groups, default=0) < 1):
        raise LdmError(f"decode_groups {groups} do not split {len(seeds)} seeds into runs")
    latents = denoise(
        bundle, seeds, sampler=sampler, steps=steps, eta=eta, progress=progress, precision=precision
    )
    parts = [decode(bundle, part, precision=precision).cpu() for part in latents.split(groups)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def prepare(
    bundle: Bundle,
    compile: bool = True,
    batch_sizes: Sequence[int] = (1,),
    sampler: str | None = None,
    precision: str = "auto",
    backend: str = "inductor",
) -> float:
    """Make ``bundle`` ready to answer fast; returns the seconds it took (the warm-up cost).

    With ``compile``, ``bundle.unet`` is replaced by ``torch.compile(unet, dynamic=False)``:
    the latent shape of a bundle never changes, so one static graph per batch size serves
    every request. Compilation happens lazily on the first call, so a one-step sample and a
    decode run for each of ``batch_sizes`` (the batch sizes the caller will ask for; each
    is its own graph) to pay that cost here, not on the first request. Weights are shared
    with the uncompiled module. Calling it again does not compile twice.
    ``backend`` is torch.compile's (``eager`` checks the plumbing without a C++ compiler).
    """
    start = time.perf_counter()
    if compile and not hasattr(bundle.unet, "_orig_mod"):  # torch.compile's wrapper has it
        bundle.unet = torch.compile(bundle.unet, dynamic=False, backend=backend)  # type: ignore[assignment]
    name = sampler or bundle.config.sampling.sampler
    for n in batch_sizes:
        generate(bundle, list(range(n)), sampler=name, steps=1, precision=precision)
    if bundle.device.type == "cuda":
        torch.cuda.synchronize(bundle.device)
    seconds = time.perf_counter() - start
    log.info("warm-up (compile=%s, batch sizes %s): %.1f s", compile, list(batch_sizes), seconds)
    return seconds


def to_nifti_bytes(volume: torch.Tensor | np.ndarray, affine: np.ndarray) -> bytes:
    """A gzip-compressed NIfTI-1 file of one volume (``[1, D, H, W]`` or ``[D, H, W]``),
    carrying the training data's affine so viewers show it in the right place and size."""
    array = volume.numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 4:
        array = array[0]
    if array.ndim != 3:
        raise LdmError(f"expected one 3D volume, got shape {array.shape}")
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _to_uint8(slice2d: np.ndarray) -> np.ndarray:
    return (np.clip(slice2d, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def triptych(volume: torch.Tensor | np.ndarray) -> np.ndarray:
    """Axial, coronal and sagittal mid-slices side by side as a uint8 image.

    The volume is in RAS voxel order (x: right, y: anterior, z: superior), as
    preprocessing leaves it; slices are rotated so that anterior/superior point up.
    """
    array = volume.numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim == 4:
        array = array[0]
    x, y, z = (s // 2 for s in array.shape)
    views = [
        np.rot90(array[:, :, z]),  # axial: x across, y up
        np.rot90(array[:, y, :]),  # coronal: x across, z up
        np.rot90(array[x, :, :]),  # sagittal: y across, z up
    ]
    height = max(v.shape[0] for v in views)
    padded = [np.pad(v, ((0, height - v.shape[0]), (0, 2))) for v in views]
    return _to_uint8(np.concatenate(padded, axis=1))


def triptych_png(volume: torch.Tensor | np.ndarray, zoom: int = 3) -> bytes:
    """PNG bytes of :func:`triptych`, enlarged ``zoom`` times (nearest neighbour)."""
    image = triptych(volume)
    if zoom > 1:
        image = np.kron(image, np.ones((zoom, zoom), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def sample_to_dir(
    bundle_dir: str | Path,
    output_dir: str | Path,
    num: int,
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 50,
    compile: bool = False,
    precision: str = "auto",
) -> list[Path]:
    """The ``ldm sample`` verb: ``num`` samples (seeds ``seed..seed+num-1``) as NIfTI + PNG.

    ``compile`` compiles the UNet for this batch first (see :func:`prepare`); it pays off
    from a few dozen steps on a GPU.
    """
    from tqdm import tqdm

    if num < 1:
        raise LdmError(f"--num must be at least 1, got {num}")
    bundle = load(bundle_dir)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(seed, seed + num))
    if compile:
        seconds = prepare(bundle, batch_sizes=(num,), sampler=sampler, precision=precision)
        log.info("compiled the UNet for %d seeds in %.1f s", num, seconds)
    with tqdm(total=steps, desc=f"{sampler} x{num}", unit="step") as bar:
        volumes = generate(
            bundle,
            seeds,
            sampler=sampler,
            steps=steps,
            progress=lambda i, n: bar.update(1),
            precision=precision,
        )
    paths: list[Path] = []
    for s, vol in zip(seeds, volumes):
        nii = out / f"sample_{s:04d}.nii.gz"
        png = out / f"sample_{s:04d}.png"
        atomic_write_bytes(nii, to_nifti_bytes(vol, bundle.affine))
        atomic_write_bytes(png, triptych_png(vol))
        paths += [nii, png]
    log.info("wrote %d samples to %s", num, out)
    return paths
