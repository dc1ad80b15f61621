"""The parts of ``benchmarks/gpu_check.sh``, one process each, and the report that joins them.

Each part calls the project's own entry points (download, preprocess, the two trainers,
bundle, sampling) at a GPU preset's full architecture and configured batch sizes; only the
schedule is shortened (steps, validation and checkpoint cadence, an adversarial phase that
starts within the run so the discriminator and its SyncBatchNorm are exercised). A part
writes one JSON file; a part that fails writes its error instead, and one that is killed
by its timeout writes nothing, which the report turns into an error naming the timeout.

``--dry-run`` keeps the flow and shrinks the shapes and channels to the tiny-cpu scale,
runs on the CPU with gloo instead of nccl, and turns torch.compile off (on two busy CPU
cores compiling the two networks alone takes minutes); the report says so.

    python -m benchmarks.gpu_check prepare --work DIR --out parts/prepare.json [--dry-run]
    python -m benchmarks.gpu_check train-ae --preset gpu-16g --work DIR --out FILE
    python -m benchmarks.gpu_check train-diffusion --preset gpu-16g --work DIR --out FILE
    python -m benchmarks.gpu_check sample --preset gpu-16g --work DIR --out FILE
    python -m benchmarks.gpu_check report --parts DIR --out FILE [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine
from benchmarks.probe import WARMUP_STEPS, TrainingProbe

GPU_PRESETS = ("gpu-16g", "gpu-32g", "multi-gpu")
SUBJECTS = 8
"""Enough subjects that every preset trains at its configured batch size (at most 8)."""
DRY_RUN_SUBJECTS = 4
"""The dry run's cohort: the diffusion batches of 8 shrink to 4 (the loader keeps a short
batch), and generating and preprocessing it fits the CPU's time budget."""
SAMPLE_SEEDS = ((0,), (0, 1, 2, 3))
DDIM_STEPS = 50
DRY_RUN_DDIM_STEPS = 5
"""The dry run's sampler steps: 50 UNet calls at batch 4 take about 20 s on a busy 2-core CPU."""
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- configs


def schedule_overrides(dry_run: bool) -> list[str]:
    """The only settings changed on the GPU: how long and how often, not what."""
    ae_steps, adv_from, diff_steps = (8, 5, 8) if dry_run else (24, 16, 30)
    return [
        f"train.autoencoder.steps={ae_steps}",
        f"train.autoencoder.adv_start_step={adv_from}",
        f"train.diffusion.steps={diff_steps}",
        "train.val_every=100000",
        "train.checkpoint_every=100000",
        "train.log_every=10",
        "data.val_fraction=0.0",
    ]


def dry_run_overrides(preset: str) -> list[str]:
    """Tiny-cpu-scale shapes and channels; levels, blocks, attention, checkpointing, SyncBN and
    batch sizes stay the preset's. Mixed precision is off: CPUs without bf16 units run fp16
    and bf16 3D convolutions about 25x slower than fp32 (measured here)."""
    from ldm_core.config import PRESETS

    train = PRESETS[preset].get("train", {})
    out = [
        "train.device=cpu",
        "train.amp=none",
        "train.compile=false",
        "data.num_workers=0",
        "data.shape=[32,32,32]",
        "data.spacing=[6.0,6.0,6.0]",
        "model.autoencoder.channels=[4,8,8]",
        "model.autoencoder.norm_num_groups=4",
        "model.unet.channels=[8,16,16]",
        "model.unet.norm_num_groups=4",
        "model.unet.num_head_channels=8",
    ]
    if train.get("ddp_backend") == "nccl":
        out.append("train.ddp_backend=gloo")
    return out


def config_for(preset: str, dry_run: bool) -> Any:
    from ldm_core.config import load_config

    extra = dry_run_overrides(preset) if dry_run else []
    return load_config(preset=preset, overrides=[*schedule_overrides(dry_run), *extra])


# --------------------------------------------------------------------------- measuring


def _device_of(cfg: Any) -> torch.device:
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """``max_memory_allocated`` since the last :func:`reset_peak`; None off CUDA."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` with the device synchronized before and after."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


# --------------------------------------------------------------------------- parts


def part_prepare(args: argparse.Namespace) -> dict[str, Any]:
    """One demo cohort, preprocessed at each GPU preset's data settings."""
    from ldm_core.data.download import download
    from ldm_core.data.preprocess import preprocess

    work = Path(args.work)
    raw = work / "raw"
    subjects = DRY_RUN_SUBJECTS if args.dry_run else SUBJECTS
    seconds, _ = timed(
        lambda: download("demo", raw, config_for(GPU_PRESETS[0], args.dry_run), subjects), CPU
    )
    out: dict[str, Any] = {"subjects": subjects, "download_s": round(seconds, 2), "presets": {}}
    for preset in GPU_PRESETS:
        cfg = config_for(preset, args.dry_run)
        start = time.perf_counter()
        preprocess(raw, work / preset / "cache", cfg)
        out["presets"][preset] = {
            "shape": list(cfg.data.shape),
            "preprocess_s": round(time.perf_counter() - start, 2),
        }
    return out


def _train(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    """Train one stage under the probe; its step FLOPs are counted after, on meta tensors."""
    from benchmarks import flops
    from ldm_core.train.autoencoder import train_autoencoder
    from ldm_core.train.diffusion import train_diffusion

    cfg = config_for(args.preset, args.dry_run)
    root = Path(args.work) / args.preset
    device = _device_of(cfg)
    reset_peak(device)
    with TrainingProbe(device) as probe:
        if stage == "autoencoder":
            seconds, _ = timed(lambda: train_autoencoder(cfg, root / "cache", root / "ae"), device)
        else:
            seconds, _ = timed(
                lambda: train_diffusion(cfg, root / "cache", root / "ae", root / "diffusion"),
                device,
            )
    seen = probe.summary()
    if stage == "autoencoder":
        batch = cfg.train.autoencoder.batch_size
        step_flops = flops.autoencoder_step_flops(cfg, batch)
    else:
        batch = cfg.train.diffusion.batch_size
        step_flops = flops.unet_step_flops(cfg, batch)
    return {
        "stage": stage,
        "batch_size": batch,
        "image_shape": list(cfg.data.shape),
        "latent_shape": list(cfg.latent_shape),
        "seconds": round(seconds, 2),
        **{k: v for k, v in seen.items() if k != "paths"},
        "flops_per_step": step_flops,
        "tflops": flops.tflops_per_s(step_flops, seen["step_s"] or 0.0),
        "peak_memory_gib": peak_gib(device),
        "paths": seen["paths"],
    }


def part_train_ae(args: argparse.Namespace) -> dict[str, Any]:
    return _train(args, "autoencoder")


def part_train_diffusion(args: argparse.Namespace) -> dict[str, Any]:
    return _train(args, "diffusion")


def _measure_sampling(
    bundle: Any, device: torch.device, seeds: Sequence[int], steps: int
) -> dict[str, Any]:
    from benchmarks import flops
    from ldm_core.sample import denoise, generate

    reset_peak(device)
    total, _ = timed(lambda: generate(bundle, list(seeds), "ddim", steps), device)
    denoise_s, _ = timed(lambda: denoise(bundle, list(seeds), "ddim", steps), device)
    unet_flops = steps * flops.unet_forward_flops(bundle.config, len(seeds))
    return {
        "seeds": len(seeds),
        "seconds": round(total, 3),
        "samples_per_s": round(len(seeds) / total, 4),
        "denoise_s": round(denoise_s, 3),
        "denoise_tflops": flops.tflops_per_s(unet_flops, denoise_s),
        "unet_forward_flops": unet_flops // steps,
        "peak_memory_gib": peak_gib(device),
    }


def part_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Bundle the two runs, then DDIM-50 (dry run: 5) for 1 and 4 seeds, ours and the
    tutorial loop."""
    from benchmarks.reference import tutorial_ddim
    from ldm_core.bundle import build_bundle, load
    from ldm_core.sample import prepare

    root = Path(args.work) / args.preset
    bundle_s, path = timed(
        lambda: build_bundle(root / "ae", root / "diffusion", root / "bundle"), CPU
    )
    bundle = load(path)
    device = bundle.device
    # Warm-up (kernels, cuDNN autotuning, allocator, the UNet's compilation for each batch
    # size): timed, since a server pays it once per replica. The dry run does not compile
    # (minutes of C++ builds on a busy CPU).
    warmup_s = prepare(
        bundle, compile=not args.dry_run, batch_sizes=[len(seeds) for seeds in SAMPLE_SEEDS]
    )
    steps = DRY_RUN_DDIM_STEPS if args.dry_run else DDIM_STEPS
    ours = [_measure_sampling(bundle, device, seeds, steps) for seeds in SAMPLE_SEEDS]
    reference = [tutorial_ddim(path, len(seeds), steps) for seeds in SAMPLE_SEEDS]
    for mine, ref in zip(ours, reference):
        mine["reference_over_ours"] = round(ref["seconds"] / mine["seconds"], 3)
    return {
        "bundle_s": round(bundle_s, 2),
        "warmup_s": round(warmup_s, 2),
        "device": str(device),
        "sampler": f"ddim-{steps}",
        "ours": ours,
        "reference": reference,
        "paths": sampling_paths(bundle),
        "tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        },
    }


def sampling_paths(bundle: Any) -> dict[str, Any]:
    """Which of the fast sampling paths ``generate`` takes on this bundle and device: the
    autocast precision ``auto`` resolves to, whether the DDIM step is one batched call,
    whether the UNet is compiled, and how many attention blocks use PyTorch's
    scaled-dot-product kernels (MONAI's ``use_flash_attention``) out of all of them."""
    from ldm_core.sample import autocast_dtype
    from ldm_core.samplers import build_sampler

    dtype = autocast_dtype("auto", bundle.device)
    attention = [
        m
        for net in (bundle.unet, bundle.autoencoder)
        for m in net.modules()
        if hasattr(m, "use_flash_attention")
    ]
    return {
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "batched_step": build_sampler(bundle.config, "ddim").batched,
        "unet_compiled": hasattr(bundle.unet, "_orig_mod"),
        "sdpa_attention": sum(bool(m.use_flash_attention) for m in attention),
        "attention_blocks": len(attention),
    }


PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "prepare": part_prepare,
    "train-ae": part_train_ae,
    "train-diffusion": part_train_diffusion,
    "sample": part_sample,
}


def run_part(args: argparse.Namespace) -> int:
    """Run one part and write its JSON (rank 0 only under torchrun); 1 when it failed."""
    start = time.perf_counter()
    try:
        result = PARTS[args.part](args)
        status = 0
    except Exception as e:  # a part's failure is data for the report, not a crash
        traceback.print_exc()
        result, status = {"error": f"{type(e).__name__}: {e}"}, 1
    result["wall_s"] = round(time.perf_counter() - start, 2)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return status


# --------------------------------------------------------------------------- report

TIMING = (
    f"seconds per step: median interval between the model's optimizer steps, CUDA synchronized "
    f"at each, after the first {WARMUP_STEPS} intervals (compile, cuDNN autotuning, allocator "
    "growth and one profiled iteration); the autoencoder's figure covers generator-only steps, "
    "its steps with the discriminator are reported beside it. TFLOP/s: FlopCounterMode FLOPs "
    "of one step (model FLOPs, no checkpoint recomputation) over that time. Sampling: DDIM-50 "
    "end to end after a warm-up (one step and a decode, and the UNet's compilation on a GPU) at "
    "each batch size; reference_over_ours is the tutorial-semantics fp32 loop's seconds over ours."
)


LOG_TAIL_LINES = 15
"""Lines of a failed part's log kept in the report (the logs themselves may be lost with
the machine)."""


def _read_part(parts: Path, name: str) -> dict[str, Any]:
    """A part's JSON, or an error from the exit status the shell recorded beside it."""
    result_file, rc_file = parts / f"{name}.json", parts / f"{name}.rc"
    rc = int(rc_file.read_text().split()[0]) if rc_file.exists() else None
    budget_file = parts / f"{name}.budget"
    budget = budget_file.read_text().strip() if budget_file.exists() else "?"
    if result_file.exists():
        result = json.loads(result_file.read_text())
        if rc not in (0, None) and "error" not in result:
            result["error"] = f"exited with status {rc} after writing its result"
    elif rc in (124, 137):
        result = {"error": f"timed out: killed after its budget of {budget} s"}
    elif rc is None:
        result = {"error": "not run: the whole check's time budget was spent before it"}
    else:
        result = {"error": f"exited with status {rc} without a result; see {name}.log"}
    result["budget_s"] = budget
    log = parts / f"{name}.log"
    if "error" in result and log.exists():
        result["log_tail"] = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return result


def report(parts: Path, names: Sequence[str], dry_run: bool) -> dict[str, Any]:
    """One JSON object: every part by preset, the parts that failed, and how it was timed."""
    results = {name: _read_part(parts, name) for name in names}
    presets: dict[str, dict[str, Any]] = {}
    for name, result in results.items():
        if "." in name:
            preset, part = name.split(".", 1)
            presets.setdefault(preset, {})[part] = result
    notes = [TIMING]
    if dry_run:
        notes.append(
            "dry run on CPU: shapes and channels at the tiny-cpu scale, gloo instead of nccl, "
            "fp32 (CPU fp16/bf16 3D convolutions are ~25x slower than fp32), torch.compile off "
            "(compiling both networks on 2 busy CPU cores takes minutes), no data-loader "
            f"workers, {DRY_RUN_SUBJECTS} subjects, DDIM-{DRY_RUN_DDIM_STEPS}; figures here are "
            "not GPU figures"
        )
    return {
        "dry_run": dry_run,
        "overrides": schedule_overrides(dry_run),
        "prepare": results.get("prepare", {}),
        "presets": presets,
        "failed": sorted(name for name, r in results.items() if "error" in r),
        "notes": notes,
    }


def summary_line(result: dict[str, Any]) -> str:
    """The README table's one-line summary: per preset, step times and DDIM-50 x1."""
    cells = []
    for preset, parts in result["presets"].items():
        ae = parts.get("train-ae", {}).get("step_s")
        unet = parts.get("train-diffusion", {}).get("step_s")
        sampling = parts.get("sample", {}).get("ours", [{}])[0]
        cells.append(
            f"{preset}: AE {ae} s/step, UNet {unet} s/step, DDIM-50 x1 "
            f"{sampling.get('seconds')} s ({sampling.get('reference_over_ours')}x the tutorial)"
        )
    failed = f"; FAILED {', '.join(result['failed'])}" if result["failed"] else ""
    return "; ".join(cells) + (" [dry run]" if result["dry_run"] else "") + failed


def write_report(args: argparse.Namespace) -> int:
    from benchmarks.common import HERE, record

    result = report(Path(args.parts), args.names, args.dry_run)
    result["wall_s"] = args.wall_s
    if args.out:
        entry = {"benchmark": "gpu_check", "date": time.strftime("%Y-%m-%d %H:%M"), **result}
        entry["machine"] = machine()
        print(json.dumps(entry, indent=2))
        out = Path(args.out)
    else:
        entry = record("gpu_check", result, summary_line(result))
        out = HERE / "results" / f"gpu_check-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entry, indent=2) + "\n")
    print(f"gpu_check: wrote {out}", file=sys.stderr)
    return 1 if result["failed"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    for name in PARTS:
        p = sub.add_parser(name)
        p.add_argument("--work", required=True, help="scratch directory shared by the parts")
        p.add_argument("--out", required=True, help="this part's JSON file")
        p.add_argument("--preset", choices=GPU_PRESETS, default=GPU_PRESETS[0])
        p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("report")
    p.add_argument("--parts", required=True, help="directory of the parts' JSON and .rc files")
    p.add_argument("--names", nargs="+", required=True, help="parts expected, in order")
    p.add_argument("--out", default="", help="write here instead of benchmarks/results/")
    p.add_argument("--wall-s", type=float, default=None)
    p.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.part == "report":
        return write_report(args)
    return run_part(args)


if __name__ == "__main__":
    sys.exit(main())
