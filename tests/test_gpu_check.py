"""benchmarks/gpu_check.sh: the FLOP counting and the training probe it relies on (fast),
and its whole dry run on the CPU (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from benchmarks import flops
from benchmarks import probe as probe_module
from benchmarks.gpu_check import GPU_PRESETS, sampling_paths
from benchmarks.probe import WARMUP_STEPS, TrainingProbe
from benchmarks.reference import tutorial_ddim
from ldm_core import latent_prior
from ldm_core.bundle import load
from ldm_core.sample import generate, prepare
from tests.harness.configs import tiny_config
from tests.harness.data import random_bundle

REPO = Path(__file__).resolve().parents[1]


def test_conv_net_flops_match_a_hand_count():
    net = nn.Sequential(
        nn.Conv3d(2, 4, kernel_size=3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv3d(4, 1, kernel_size=1, bias=False),
    )
    x = torch.randn(1, 2, 4, 4, 4)
    # conv1: 4 x 4^3 outputs, each 2 x 27 multiply-adds; conv2: 4^3 outputs of 4 each.
    conv1, conv2 = 2 * (4 * 64) * (2 * 27), 2 * 64 * 4
    assert flops.count_flops(lambda: net(x)) == conv1 + conv2
    # Backward: conv2 needs its input's and its weight's gradients, conv1 only its weight's
    # (x does not require grad); each costs what the forward did.
    expected = (conv1 + conv2) + (2 * conv2 + conv1)
    assert flops.count_flops(lambda: net(x).sum().backward()) == expected


def test_unet_flops_scale_with_the_batch_and_training_costs_more_than_inference():
    cfg = tiny_config()
    one = flops.unet_forward_flops(cfg, 1)
    assert one > 0
    assert flops.unet_forward_flops(cfg, 4) == 4 * one
    assert flops.unet_step_flops(cfg, 1) > 2 * one
    assert flops.autoencoder_step_flops(cfg, 1) > 0
    assert flops.tflops_per_s(2 * 10**12, 2.0) == 1.0
    assert flops.tflops_per_s(10**12, 0.0) == 0.0


def _train(steps: int, second_from: int | None, recompute: bool) -> dict:
    """A toy loop shaped like the trainers': model step, then optionally a second optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 1, 1))
    other = nn.Conv3d(1, 1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    other_opt = torch.optim.SGD(other.parameters(), lr=1e-3)
    x = torch.randn(2, 1, 6, 6, 6)
    with TrainingProbe(torch.device("cpu")) as probe:
        for step in range(steps):
            out = checkpoint(model, x, use_reentrant=False) if recompute else model(x)
            opt.zero_grad()
            out.pow(2).mean().backward()
            opt.step()
            if second_from is not None and step >= second_from:
                other_opt.zero_grad()
                other(x).mean().backward()
                other_opt.step()
    return probe.summary()


def test_probe_times_steps_and_reads_the_paths_that_ran():
    seen = _train(steps=12, second_from=None, recompute=False)
    assert seen["optimizer_steps"] == 12
    assert seen["timed_steps"] == 11 - WARMUP_STEPS
    assert seen["step_s"] > 0
    paths = seen["paths"]
    assert paths["model"] == "Sequential"
    assert paths["called"] == "Sequential"
    assert paths["amp_dtype"] == "float32"
    assert paths["gradient_checkpointing"] is False
    assert paths["conv_forward_calls"] == paths["conv_backward_calls"] == 2
    assert paths["ddp"] is False and paths["compile_wrapped"] is False
    assert "second_optimizer_from_step" not in seen


def test_probe_sees_recomputation_and_splits_off_the_second_optimizers_phase():
    seen = _train(steps=14, second_from=8, recompute=True)
    assert seen["paths"]["gradient_checkpointing"] is True
    assert seen["second_optimizer_from_step"] == 9
    # Steps 4..7 are timed alone; the first two intervals around the join are dropped.
    assert seen["timed_steps"] == 9 - 2 - WARMUP_STEPS
    assert seen["with_second_optimizer_step_s"] > 0


def test_sampling_paths_report_what_generate_runs(tmp_path):
    """The check records the fast sampling paths as they are on the loaded bundle; prepare()
    compiles the UNet (torch.compile's eager backend here: the plumbing without a C++
    build) and the compiled UNet samples what the plain one does."""
    b = load(random_bundle(tmp_path / "b", tiny_config("sampling.eta=0"), seed=3), device="cpu")
    before = sampling_paths(b)
    assert before == {
        "precision": "fp32",  # auto on a CPU
        "batched_step": True,  # DDIM at eta 0 (the GPU presets'; tiny-cpu's 1 steps per seed)
        "unet_compiled": False,
        "sdpa_attention": before["attention_blocks"],
        "attention_blocks": before["attention_blocks"],
    }
    assert before["attention_blocks"] > 0  # tiny_config has UNet attention at level 2
    plain = generate(b, [1, 2], steps=2)
    assert prepare(b, batch_sizes=(2,), backend="eager") > 0
    assert sampling_paths(b)["unet_compiled"] is True
    assert torch.allclose(generate(b, [1, 2], steps=2), plain, atol=1e-5)


@pytest.mark.slow
def test_dry_run_reports_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    # The check's own budget is for an idle machine; a shared test runner gets three times it.
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out), "--budget-scale", "3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    assert proc.returncode == 0, json.dumps(result, indent=1)[-4000:]
    assert result["dry_run"] is True and result["failed"] == []
    assert result["prepare"]["download_s"] > 0
    assert set(result["presets"]) == set(GPU_PRESETS)
    for preset, parts in result["presets"].items():
        assert set(parts) == {"train-ae", "train-diffusion", "sample"}, preset
        for stage in ("train-ae", "train-diffusion"):
            part = parts[stage]
            for key in ("step_s", "tflops", "flops_per_step", "seconds"):
                assert part[key] > 0, (preset, stage, key)
            assert part["peak_memory_gib"] is None  # no CUDA here
            flags = {k: v for k, v in part["paths"].items() if not k.endswith(("_calls", "_m"))}
            for key in (
                "ddp",
                "compile_wrapped",
                "compiled_call",
                "channels_last_weights",
                "channels_last_input",
                "grad_scaler_enabled",
                "grad_scaler_unscaled",
                "gradient_checkpointing",
                "sync_batchnorm",
                "autocast",
            ):
                assert isinstance(flags[key], bool), (preset, stage, key)
        sample = parts["sample"]
        for run in (*sample["ours"], *sample["reference"]):
            assert run["seconds"] > 0 and run["samples_per_s"] > 0
        assert [r["seeds"] for r in sample["ours"]] == [1, 4]
        assert sample["paths"]["batched_step"] is True and sample["paths"]["precision"] == "fp32"
        assert sample["paths"]["unet_compiled"] is False  # the dry run does not compile
        assert all(r["denoise_tflops"] > 0 and r["reference_over_ours"] > 0 for r in sample["ours"])
    # The presets' own switches show through (dry-run shapes, CPU): checkpointing where the
    # preset asks for it, the discriminator's phase in the autoencoder runs.
    assert result["presets"]["gpu-16g"]["train-ae"]["paths"]["gradient_checkpointing"] is True
    assert result["presets"]["gpu-32g"]["train-ae"]["paths"]["gradient_checkpointing"] is False
    assert result["presets"]["multi-gpu"]["train-ae"]["with_second_optimizer_step_s"] > 0


def test_the_object_scan_survives_weak_proxies_whose_referent_is_gone():
    """A dead ``weakref.proxy`` anywhere in the process (libraries leave them) made the scan
    raise ReferenceError mid-training; it is skipped, and live modules are still found."""

    class Gone:
        pass

    target = Gone()
    dead = [weakref.proxy(target)]
    del target
    model = nn.Linear(2, 2)
    assert any(m is model for m in probe_module._live(nn.Module))
    assert dead  # the dead proxy stayed reachable during the scan


def test_the_tutorial_baseline_refuses_a_bundle_that_starts_part_way(tmp_path):
    """The baseline loop samples the whole schedule; timed against a bundle that starts at
    sampling.truncate_at, ours would be faster by skipping steps, not by being faster."""
    cfg = tiny_config("sampling.truncate_at=600")
    prior = latent_prior.fit(torch.randn(3, *cfg.latent_shape), components=1)
    path = random_bundle(tmp_path / "b", cfg, latent_prior=prior)
    with pytest.raises(ValueError, match="sampling.truncate_at is 600; the tutorial baseline"):
        tutorial_ddim(path, num=1, steps=2)
