"""The compiled pipeline end to end under kfp.local on tiny shapes.

Run 1 (permissive gate): every stage runs, deploy starts a real local KServe server, and
a V2 request returns a NIfTI with the training data's geometry. Run 2 (same inputs, strict
gate): the four upstream stages come from the cache, only evaluate re-runs (its gate
parameters changed), and the failed gate keeps deploy from running.

Both runs together take about a minute on an idle 2-core machine (56 s measured: six
stage subprocesses, two training subprocesses and a model server each import torch).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.run_local import infer_v2, main, run_pipeline
from tests.harness.configs import GATE_OFF_OVERRIDES, TINY_OVERRIDES

PACKAGE = Path(__file__).resolve().parents[1] / "pipelines" / "brain_ldm.yaml"
OVERRIDES = [
    *TINY_OVERRIDES,
    "train.autoencoder.steps=2",
    "train.autoencoder.batch_size=2",
    "train.diffusion.steps=2",
    "train.diffusion.batch_size=2",
    "train.val_every=2",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "sampling.steps=2",
    "serving.warmup=false",
    *GATE_OFF_OVERRIDES,
]
PERMISSIVE = {
    "gate_min_ms_ssim_ratio": 0.0,
    "gate_max_mmd": 1e9,
    "gate_min_mask_dice": 0.0,
    "gate_max_hist_distance": 1e9,
}
STRICT = {**PERMISSIVE, "gate_min_mask_dice": 1.01}  # no model reaches a Dice above 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from ldm_core.deploy import stop_local

    out = tmp_path_factory.mktemp("pipeline")
    common = dict(
        subjects=4,
        overrides=OVERRIDES,
        nproc=1,
        backend="local",
        eval_samples=2,
        eval_steps=2,
        package=PACKAGE,
    )
    first = run_pipeline(out, gate=PERMISSIVE, **common)
    try:
        served = (
            infer_v2(first.deployment["endpoint"], first.deployment["model_name"], seed=3)
            if first.deployment
            else None
        )
    finally:
        if first.deployment:
            stop_local(first.deployment)
    second = run_pipeline(out, gate=STRICT, **common)
    return first, second, served


def test_every_stage_runs_and_the_served_model_answers(runs):
    first, _, served = runs
    assert first.stages == {
        "download": "ran",
        "preprocess": "ran",
        "train-autoencoder": "ran",
        "train-diffusion": "ran",
        "evaluate": "ran",
        "deploy": "ran",
    }
    assert first.gate_passed
    # Metrics: metrics.json, and the same scalars in the KFP Metrics artifact.
    for key in ("ms_ssim_ratio", "mmd", "mask_dice", "hist_distance"):
        assert np.isfinite(first.metrics[key]), key
    assert "<img" in first.report.read_text()
    assert list((first.evaluation / "samples").glob("*.nii.gz"))
    # The deployed server answered a real V2 request with a NIfTI of the trained geometry.
    assert first.deployment["backend"] == "local" and first.deployment["smoke"]
    # Its lineage names the run and carries the evaluation that gated it (kfp.local resolves
    # the run placeholders, as KFP backends from 2.5 do).
    record = first.deployment["lineage"]
    assert record["run"]["run_id"] and record["run"]["pipeline_name"] == "brain-ldm"
    assert record["evaluation"]["gate"]["passed"] is True
    assert record["evaluation"]["metrics"]["mask_dice"] == first.metrics["mask_dice"]
    img = nib.Nifti1Image.from_bytes(gzip.decompress(served))
    bundle = json.loads((first.bundle / "bundle.json").read_text())
    assert img.shape[-3:] == (32, 32, 32)
    np.testing.assert_allclose(img.affine, np.asarray(bundle["affine"]), atol=1e-4)


def test_unchanged_stages_come_from_the_cache_and_the_gate_blocks_deploy(runs):
    first, second, _ = runs
    assert second.stages == {
        "download": "cached",
        "preprocess": "cached",
        "train-autoencoder": "cached",
        "train-diffusion": "cached",
        "evaluate": "ran",
        "deploy": "skipped",
    }
    assert not second.gate_passed
    assert second.deployment is None
    assert second.bundle == first.bundle  # the cached artifact itself, not a copy
    verdict = json.loads((second.evaluation / "metrics.json").read_text())["gate"]
    assert not verdict["passed"]
    assert any("gate_min_mask_dice" in reason for reason in verdict["reasons"])


def test_a_bad_override_fails_in_one_line_before_any_stage_runs(tmp_path, capsys):
    rc = main(["--output", str(tmp_path / "out"), "--set", "train.autoencoder.stepz=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err == "run_local: error: train.autoencoder.stepz: unknown key (did you mean 'steps'?)"
    assert not (tmp_path / "out").exists()


def test_progress_lines_follow_kfp_local_task_events():
    """The stage states come from kfp.local's own log records (colours and all)."""
    import io
    import logging

    from pipelines.run_local import _Progress

    stream = io.StringIO()
    progress = _Progress(stream)

    def log(message: str) -> None:
        progress.filter(logging.LogRecord("root", logging.INFO, __file__, 0, message, None, None))

    log("Executing task \x1b[96m'download'\x1b[0m")
    log("Task \x1b[96m'download'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m")
    log("Task preprocess cache hit (key=0123456789ab); skipping execution.")
    log("Executing task \x1b[96m'train-autoencoder'\x1b[0m")
    log("Task \x1b[96m'train-autoencoder'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m")
    log("Skipping conditional task condition-1 (condition evaluated to False)")
    log("Task 'not-a-stage' finished with status SUCCESS")
    assert progress.states == {
        "download": "ran",
        "preprocess": "cached",
        "train-autoencoder": "failed",
        "deploy": "skipped",
    }
    lines = stream.getvalue().splitlines()
    assert "[1/6] download: done in" in lines[1]
    assert "[2/6] preprocess: reused from the cache" in lines[2]
    assert "[3/6] train-autoencoder: FAILED" in lines[4]
    assert lines[5].endswith("[6/6] deploy: skipped (condition evaluated to False)")


def test_the_report_prints_the_gate_model_and_lesion_figures_and_the_verdict(runs, capsys):
    """What ``make demo`` prints at the end of a run whose gate failed: the gate's metrics,
    the autoencoder's and the lesion figures on a line of their own, and the reasons."""
    from pipelines.run_local import _report

    _, second, _ = runs
    assert _report(second, second.evaluation.parent, keep_serving=False) == 2
    out = capsys.readouterr().out
    assert f"mask_dice={second.metrics['mask_dice']:.4g}" in out
    assert f"detail_ratio={second.metrics['detail_ratio']:.4g}" in out
    assert f"recon_ssim={second.metrics['recon_ssim']:.4g}" in out
    assert f"lesion_share_real={second.metrics['lesion_share_real']:.4g}" in out
    assert "Quality gate FAILED" in out and "gate_min_mask_dice" in out
