"""Evaluation metrics (``ldm_core.metrics``, ``ldm_core.fid``), the quality gate
(``ldm_core.gate``) and the ``evaluate`` stage end to end."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import FIDMetric, MultiScaleSSIMMetric
from monai.networks.nets import resnet10

from ldm_core.bundle import load
from ldm_core.config import EvaluationConfig
from ldm_core.data.preprocessed import write_manifest
from ldm_core.errors import LdmError
from ldm_core.evaluate import evaluate, load_real
from ldm_core.fid import extract_features, frechet_distance, load_feature_extractor
from ldm_core.gate import gate
from ldm_core.metrics import (
    METRIC_DOCS,
    _chunk_starts,
    compute_metrics,
    histogram_distance,
    intensity_histogram,
    mask_dice,
    mmd,
    ms_ssim_settings,
    pairwise_ms_ssim,
    reconstruct,
    reconstruction_quality,
    reference_mask,
)
from tests.harness.configs import tiny_config
from tests.harness.data import make_demo_cache, random_bundle

SHAPE = (32, 32, 32)


def phantoms(
    n: int, seed: int = 0, shape: tuple[int, int, int] = SHAPE, vary: bool = True
) -> torch.Tensor:
    """Brain-like volumes ``[n, 1, *shape]`` on [0, 1]: a textured ellipsoid of tissue with
    darker ventricles, each subject slightly shifted, resized and re-contrasted."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, s) for s in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    out = []
    for _ in range(n):
        jitter = (torch.rand(7, generator=g) - 0.5) if vary else torch.zeros(7)
        cx, cy, cz = (jitter[:3] * 0.12).tolist()
        rx, ry, rz = (0.72 + jitter[3:6] * 0.1).tolist()
        r = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2
        tissue = (0.55 + 0.15 * torch.cos(6 * x + 4 * y) * torch.sin(5 * z)) * (1 + 0.3 * jitter[6])
        vent = ((x - cx) / 0.15) ** 2 + ((y - cy) / 0.3) ** 2 + ((z - cz) / 0.2) ** 2 < 1
        vol = torch.where(r < 1, tissue, torch.zeros(()))
        vol = torch.where(vent, 0.2 * torch.ones(()), vol)
        out.append(vol.clamp(0, 1))
    return torch.stack(out)[:, None].float()


def noise(n: int, seed: int = 1, shape: tuple[int, int, int] = SHAPE) -> torch.Tensor:
    return torch.rand((n, 1, *shape), generator=torch.Generator().manual_seed(seed))


def write_cache(root: Path, volumes: torch.Tensor, splits: list[str] | None = None) -> Path:
    """A preprocessed cache (manifest + float16 npy) holding ``volumes``."""
    (root / "volumes").mkdir(parents=True)
    splits = splits or ["val" if i % 4 == 3 else "train" for i in range(len(volumes))]
    entries = []
    for i, (vol, split) in enumerate(zip(volumes, splits)):
        np.save(root / "volumes" / f"s{i}.npy", vol.numpy().astype(np.float16))
        entries.append(
            {
                "id": f"s{i}",
                "source": f"s{i}.nii.gz",
                "sha256": "0" * 64,
                "split": split,
                "file": f"volumes/s{i}.npy",
                "status": "ok",
                "reason": "",
            }
        )
    shape = list(volumes.shape[2:])
    write_manifest(
        root,
        {
            "format": 1,
            "shape": shape,
            "spacing": [6.0] * 3,
            "affine": np.diag([6.0, 6.0, 6.0, 1.0]).tolist(),
            "subjects": entries,
            "dataset_hash": "test",
        },
    )
    return root


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    "shape, scales, kernel",
    [((32, 32, 32), 3, 7), ((48, 64, 48), 4, 5), ((80, 96, 80), 5, 5), ((16, 16, 16), 2, 7)],
)
def test_ms_ssim_settings_make_monai_ms_ssim_work_on_small_volumes(shape, scales, kernel):
    settings = ms_ssim_settings(shape)
    assert (len(settings.weights), settings.kernel_size) == (scales, kernel)
    assert sum(settings.weights) == pytest.approx(1.0)
    with pytest.raises(ValueError):  # MONAI's defaults refuse these shapes
        MultiScaleSSIMMetric(spatial_dims=3)(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape))
    if max(shape) > 64:
        return  # the settings are the point; bigger volumes only cost time here
    vols = phantoms(3, shape=shape)
    assert pairwise_ms_ssim(torch.cat([vols[:1], vols[:1]]), settings) == pytest.approx(
        1.0, abs=1e-5
    )
    similar = pairwise_ms_ssim(vols, settings)
    unrelated = pairwise_ms_ssim(noise(3, shape=shape), settings)
    assert 0.5 < similar < 1.0
    assert unrelated < 0.5


def test_identical_sets_score_as_identical():
    real = phantoms(6)
    m = compute_metrics(real, real.clone())
    # MONAI's unbiased estimator is slightly negative when both sets are the very same volumes
    assert abs(m["mmd"]) < 0.05
    assert m["hist_distance"] == pytest.approx(0.0, abs=1e-9)
    assert m["ms_ssim_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert m["mask_dice"] == pytest.approx(m["mask_dice_real"])
    same = phantoms(4, vary=False)
    assert mask_dice(same, reference_mask(same)).tolist() == pytest.approx([1.0] * 4)


def test_noise_blank_and_shift_score_far_from_real():
    real = phantoms(6)
    m = compute_metrics(real, noise(6))
    assert m["mmd"] > 1.0
    assert m["mask_dice"] < 0.5
    assert m["hist_distance"] > 0.1
    assert m["ms_ssim_ratio"] < 0.5
    blank = torch.zeros_like(real)
    assert mmd(real, blank)[0] == pytest.approx(1.0)
    assert histogram_distance(intensity_histogram(real), intensity_histogram(blank)) == 1.0
    assert mask_dice(blank, reference_mask(real)).max() == 0.0
    shifted = torch.roll(real, 8, dims=2)
    assert mask_dice(shifted, reference_mask(real)).mean() < 0.75
    darker = real * 0.5
    assert histogram_distance(intensity_histogram(real), intensity_histogram(darker)) > 0.15


def test_mmd_uses_every_volume_when_set_sizes_differ():
    real = phantoms(8)
    assert abs(mmd(real, phantoms(3, seed=5))[0]) < 0.05
    assert mmd(real, noise(3))[0] > 1.0
    # 7 real vs 3 generated: windows 0-2, 2-4, 4-6 cover every real volume
    assert (
        _chunk_starts(7, 3) == [0, 2, 4]
        and _chunk_starts(16, 8) == [0, 8]
        and _chunk_starts(10, 6) == [0, 4]
    )
    generated = phantoms(3, seed=5)
    assert mmd(real[:7], generated) != mmd(real[:6], generated)


# --------------------------------------------------------------------------- reconstructions


class _Halving(torch.nn.Module):
    """An "autoencoder" whose reconstruction is the input at half intensity."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x


class _Exact(torch.nn.Module):
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1e-4


def test_reconstruction_quality_uses_the_unit_data_range():
    vols = phantoms(3)
    half = reconstruction_quality(vols, reconstruct(_Halving(), vols, torch.device("cpu")))
    mse = float(((0.5 * vols) ** 2).flatten(1).mean(1).log10().mean())
    assert half["recon_psnr"] == pytest.approx(-10 * mse, rel=1e-4)  # 10 log10(1 / MSE)
    assert half["recon_detail_ratio"] == pytest.approx(1.0)  # detail ignores the scale
    assert half["recon_ssim"] < 0.9 and half["num_reconstructed"] == 3.0
    exact = reconstruction_quality(vols, reconstruct(_Exact(), vols, torch.device("cpu")))
    assert exact["recon_ssim"] == pytest.approx(1.0, abs=1e-3) and exact["recon_psnr"] > 60


# --------------------------------------------------------------------------- FID


def test_frechet_distance_matches_monai_fid():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=g)
    b = torch.randn(40, 6, generator=g) * 1.5 + 0.3
    expected = float(FIDMetric()(a, b))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # fewer samples than features: singular covariances, still finite and ~0 for equal sets
    few = torch.randn(4, 32, generator=g)
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-8)


class _TinyExtractor(torch.nn.Module):
    """A fixed random conv net: [N,1,D,H,W] -> feature maps (pooled by the caller)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 8, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def test_fid_with_a_torchscript_extractor(tmp_path):
    path = tmp_path / "extractor.pt"
    torch.jit.script(_TinyExtractor()).save(str(path))
    extractor = load_feature_extractor(str(path), tiny_config(), torch.device("cpu"))
    real = phantoms(6)
    feats = extract_features(extractor, real, torch.device("cpu"))
    assert feats.shape == (6, 8)
    same = compute_metrics(real, real.clone(), extractor)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    brighter = extract_features(extractor, (real + 0.3).clamp(0, 1), torch.device("cpu"))
    assert frechet_distance(brighter, feats) > 1e-3


def test_fid_with_a_monai_resnet_state_dict(tmp_path):
    net = resnet10(
        spatial_dims=3,
        n_input_channels=1,
        feed_forward=False,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
    )
    path = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    extractor = load_feature_extractor(f"file://{path}", tiny_config(), torch.device("cpu"))
    feats = extract_features(extractor, phantoms(2), torch.device("cpu"))
    assert feats.shape == (2, 512) and torch.isfinite(feats).all()


def test_fid_weights_errors_name_the_file(tmp_path):
    cfg = tiny_config()
    with pytest.raises(LdmError, match="fid_weights.*missing.pt.*not found"):
        load_feature_extractor(str(tmp_path / "missing.pt"), cfg, torch.device("cpu"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(LdmError, match="junk.pt"):
        load_feature_extractor(str(junk), cfg, torch.device("cpu"))
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3, 3)}, other)
    with pytest.raises(LdmError, match="other.pt.*not a 3D ResNet"):
        load_feature_extractor(str(other), cfg, torch.device("cpu"))


# --------------------------------------------------------------------------- gate

RECOMMENDED = EvaluationConfig(
    gate_min_ms_ssim_ratio=0.5,
    gate_max_mmd=0.3,
    gate_min_mask_dice=0.7,
    gate_max_hist_distance=0.25,
)


@pytest.fixture(scope="module")
def scored() -> dict[str, dict[str, float]]:
    """Metrics of an ideal model (other subjects of the real population), noise and blank."""
    real = phantoms(6)
    return {
        "ideal": compute_metrics(real, phantoms(6, seed=7)),
        "noise": compute_metrics(real, noise(6)),
        "blank": compute_metrics(real, torch.zeros_like(real)),
    }


@pytest.mark.parametrize("ecfg", [EvaluationConfig(), RECOMMENDED], ids=["defaults", "recommended"])
def test_gate_passes_an_ideal_model_and_fails_noise_and_blank(scored, ecfg):
    passed, reasons = gate(scored["ideal"], ecfg)
    assert passed, reasons
    passed, reasons = gate(scored["noise"], ecfg)
    assert not passed
    assert any(r.startswith("mask_dice=") and "evaluation.gate_min_mask_dice" in r for r in reasons)
    assert any(r.startswith("mmd=") and f"at most {ecfg.gate_max_mmd:g}" in r for r in reasons)
    passed, reasons = gate(scored["blank"], ecfg)
    assert not passed
    assert any(r.startswith("hist_distance=1 ") for r in reasons)


def test_gate_fails_when_a_metric_is_missing_or_nan():
    base = {"ms_ssim_ratio": 1.0, "mmd": 0.0, "mask_dice": 0.9, "hist_distance": 0.01}
    base |= {"detail_ratio": 1.0, "nn_correlation": 0.3}
    assert gate(base, EvaluationConfig()) == (True, [])
    passed, reasons = gate({**base, "mmd": float("nan")}, EvaluationConfig())
    assert not passed and reasons[0].startswith("mmd is nan")
    passed, reasons = gate({k: v for k, v in base.items() if k != "mask_dice"}, EvaluationConfig())
    assert not passed and "mask_dice is None" in reasons[0]


# --------------------------------------------------------------------------- the stage


def test_load_real_checks_shape_and_subject_count(tmp_path):
    cache = write_cache(tmp_path / "c", phantoms(5))
    volumes, ids = load_real(cache, SHAPE)
    assert volumes.shape == (5, 1, *SHAPE) and ids == [f"s{i}" for i in range(5)]
    assert load_real(cache, SHAPE, limit=3)[1] == ["s0", "s2", "s4"]
    with pytest.raises(
        LdmError,
        match=r"manifest.json: images are \(32, 32, 32\) but the bundle generates \(48, 64, 48\)",
    ):
        load_real(cache, (48, 64, 48))
    lonely = write_cache(tmp_path / "l", phantoms(2), splits=["train", "test"])
    with pytest.raises(
        LdmError, match="manifest.json: needs at least 2 usable train/val subjects.*found 1"
    ):
        load_real(lonely, SHAPE)


def test_evaluate_end_to_end_on_a_random_bundle(tmp_path):
    cfg = tiny_config("evaluation.num_samples=3", "evaluation.steps=2")
    bundle_dir = random_bundle(tmp_path / "bundle", cfg)
    cache = make_demo_cache(tmp_path, n_subjects=4, shape=SHAPE)
    ae_run, diff_run = tmp_path / "ae", tmp_path / "diff"
    for run, ckpt in ((ae_run, "autoencoder.pt"), (diff_run, "unet.pt")):
        run.mkdir()
        (run / ckpt).write_bytes(b"")
        lines = [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 20)]
        lines += [{"step": s, "split": "val", "loss": 1.2 / s} for s in (5, 10, 15)]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")

    out = tmp_path / "eval"
    result = evaluate(cfg, bundle_dir, cache, out, training_logs=[ae_run, diff_run])

    written = json.loads((out / "metrics.json").read_text())
    assert written["gate"] == result["gate"]
    assert isinstance(written["gate"]["passed"], bool)
    assert (written["gate"]["passed"], written["gate"]["reasons"]) == gate(written, cfg.evaluation)
    floats = {k: v for k, v in written.items() if k != "gate"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in floats.values())
    assert {"ms_ssim_ratio", "mmd", "hist_distance", "mask_dice"} <= set(floats)
    assert {"detail_ratio", "nn_correlation", "nn_correlation_real"} <= set(floats)
    # the demo cache of 4 subjects holds one validation subject: the autoencoder's ceiling
    assert floats["num_reconstructed"] == 1.0 and 0 < floats["recon_ssim"] < 1
    assert {"recon_psnr", "recon_detail_ratio"} <= set(floats)
    # FLAIR (the default channel): the lesion report, real volumes' share measured
    assert 0 < floats["lesion_share_real"] <= 1 and 0 <= floats["lesion_share_generated"] <= 1
    # 4 real volumes are too few to draw the ventricle region: no ventricle figures
    assert not any(k.startswith(("ventricle_", "recon_ventricle_")) for k in floats)
    assert set(floats) - {"fid"} <= set(METRIC_DOCS)
    assert all(f"| `{k}` |" in (out / "report.md").read_text() for k in floats)
    assert "fid" not in floats and floats["num_generated"] == 3.0 and floats["num_real"] == 4.0
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert names == [
        "intensity_histograms.png",
        "real_vs_generated.png",
        "real_vs_reconstructed.png",
        "samples.png",
        "training_curves.png",
    ]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "Quality gate" in html
    assert (out / "report.md").read_text().count("](data:image/png;base64,") == 5
    samples = sorted((out / "samples").glob("*.nii.gz"))
    assert len(samples) == 3
    img = nib.load(samples[0])
    assert img.shape == SHAPE
    np.testing.assert_allclose(img.affine, load(bundle_dir).affine)


def test_evaluate_refuses_a_cache_of_another_shape(tmp_path):
    cfg = tiny_config()
    bundle_dir = random_bundle(tmp_path / "bundle", cfg)
    cache = write_cache(tmp_path / "c", phantoms(3, shape=(32, 32, 16)))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text('{"gate": {"passed": true, "reasons": []}}')
    with pytest.raises(
        LdmError, match=r"images are \(32, 32, 16\) but the bundle generates \(32, 32, 32\)"
    ):
        evaluate(cfg, bundle_dir, cache, tmp_path / "out")
    assert not (tmp_path / "out" / "metrics.json").exists()
