"""Autoencoder stage: it learns, writes the promised outputs, guards against NaNs and
refuses to resume a different architecture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_core.data.preprocessed import read_manifest, subjects
from ldm_core.errors import LdmError
from ldm_core.models import build_autoencoder
from ldm_core.train import autoencoder as ae_mod
from ldm_core.train.autoencoder import train_autoencoder
from ldm_core.train.distributed import DistEnv
from tests.harness.configs import ae_config
from tests.harness.data import make_cache, make_demo_cache

SHAPE = (32, 32, 32)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_autoencoder_overfits_one_demo_volume_and_writes_outputs(tmp_path):
    data = make_demo_cache(tmp_path, n_subjects=2, shape=SHAPE)
    assert len(subjects(read_manifest(data), "train")) == 1
    cfg = ae_config(
        "train.autoencoder.steps=30", "train.autoencoder.lr=0.003", "train.val_every=15"
    )
    run = train_autoencoder(cfg, data, tmp_path / "ae")

    train = [m for m in read_metrics(run) if m["split"] == "train"]
    first, last = train[0]["l1"], np.mean([m["l1"] for m in train[-5:]])
    assert last < 0.35 * first, (first, last)
    assert {"step", "split", "loss", "time", "kl", "samples_per_s"} <= set(train[-1])
    assert [m["step"] for m in read_metrics(run) if m["split"] == "val"] == [15, 30]

    final = torch.load(run / "autoencoder.pt", weights_only=True)
    assert final["steps"] == 30 and final["config"] == cfg.to_dict()
    assert 0 < final["scale_factor"] < 1e3
    build_autoencoder(cfg).load_state_dict(final["state_dict"])
    geometry = json.loads((run / "data_geometry.json").read_text())
    manifest = read_manifest(data)
    for key in ("affine", "shape", "spacing", "dataset_hash"):
        assert geometry[key] == manifest[key]
    assert (run / "config.yaml").exists()
    assert list((run / "tensorboard").iterdir())


def test_scale_factor_is_one_over_std_of_all_training_latents(tmp_path):
    data = make_cache(tmp_path / "data", n_train=3)
    cfg = ae_config("train.autoencoder.batch_size=2")
    torch.manual_seed(0)
    model = build_autoencoder(cfg).eval()
    dataset = ae_mod.VolumeDataset(data, "train")
    with torch.no_grad():
        z = torch.cat([model.encode(dataset[i][None])[0] for i in range(len(dataset))])
    expected = 1.0 / z.double().std(unbiased=False).item()
    got = ae_mod.compute_scale_factor(model, dataset, cfg, DistEnv())
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("training", [True, False])
def test_validation_and_scale_factor_leave_the_model_in_the_mode_they_found(tmp_path, training):
    """Both run mid-training or after it: the caller's train/eval mode must survive them."""
    data = make_cache(tmp_path / "data", n_train=1, n_val=1)
    cfg = ae_config()
    model = build_autoencoder(cfg).train(training)
    ae_mod.validate(model, ae_mod.VolumeDataset(data, "val"), cfg, DistEnv())
    assert {m.training for m in model.modules()} == {training}
    ae_mod.compute_scale_factor(model, ae_mod.VolumeDataset(data, "train"), cfg, DistEnv())
    assert {m.training for m in model.modules()} == {training}


def test_perceptual_and_adversarial_terms_join(tmp_path):
    data = make_cache(tmp_path / "data", n_train=2, n_val=0)
    features = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU())
    weights = tmp_path / "features.pt"
    torch.jit.save(torch.jit.trace(features, torch.zeros(1, 1, *SHAPE)), str(weights))
    cfg = ae_config(
        "train.autoencoder.steps=3",
        "train.autoencoder.adv_start_step=1",
        "train.autoencoder.perceptual_weight=0.1",
        f"train.autoencoder.perceptual_weights=file://{weights}",
    )
    run = train_autoencoder(cfg, data, tmp_path / "ae")
    train = [m for m in read_metrics(run) if m["split"] == "train"]
    assert "g_adv" not in train[0] and "perceptual" in train[0]
    assert {"g_adv", "d_loss", "perceptual"} <= set(train[-1])
    state = torch.load(run / "checkpoints" / "ckpt-00000003.pt", weights_only=True)
    assert {"discriminator", "disc_optimizer", "disc_scaler"} <= set(state)


def test_perceptual_weights_must_be_a_torchscript_file(tmp_path):
    data = make_cache(tmp_path / "data", n_train=1, n_val=0)
    bad = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, bad)
    cfg = ae_config(
        "train.autoencoder.perceptual_weight=0.1", f"train.autoencoder.perceptual_weights={bad}"
    )
    with pytest.raises(LdmError, match="perceptual_weights.*TorchScript"):
        train_autoencoder(cfg, data, tmp_path / "ae")


def test_nan_guard_stops_after_k_nonfinite_losses_in_a_row(tmp_path):
    data = make_cache(tmp_path / "data", n_train=1, n_val=0, nan=True)
    cfg = ae_config("train.autoencoder.steps=20", "train.max_nonfinite=3")
    with pytest.raises(LdmError, match=r"NaN/Inf for 3 steps in a row.*lr.*train.amp=none"):
        train_autoencoder(cfg, data, tmp_path / "ae")
    skipped = [m for m in read_metrics(tmp_path / "ae") if m["split"] == "train"]
    assert [m["nonfinite_total"] for m in skipped] == [1, 2, 3]
    assert all(m["loss"] is None for m in skipped)  # strict JSON: null, never NaN
    assert not (tmp_path / "ae" / "autoencoder.pt").exists()


def test_finished_run_is_idempotent_and_other_architecture_is_refused(tmp_path):
    data = make_cache(tmp_path / "data", n_train=1, n_val=0)
    cfg = ae_config("train.autoencoder.steps=2")
    run = train_autoencoder(cfg, data, tmp_path / "ae")
    stamp = (run / "autoencoder.pt").stat().st_mtime_ns
    assert train_autoencoder(cfg, data, run) == run
    assert (run / "autoencoder.pt").stat().st_mtime_ns == stamp

    wider = ae_config("train.autoencoder.steps=2", "model.autoencoder.channels=[16,16]")
    with pytest.raises(LdmError, match=r"different architecture.*model.autoencoder.channels"):
        train_autoencoder(wider, data, run)


def test_the_generator_follows_the_schedule_and_the_discriminator_keeps_its_rate(tmp_path):
    data = make_cache(tmp_path / "data", n_train=2, n_val=0)
    cfg = ae_config(
        "train.autoencoder.steps=4",
        "train.autoencoder.lr=0.002",
        "train.autoencoder.lr_warmup_steps=2",
        "train.autoencoder.lr_decay=cosine",
        "train.autoencoder.adv_start_step=1",
        "train.autoencoder.adv_weight=0.01",
        "train.autoencoder.disc_lr=0.0005",
    )
    run = train_autoencoder(cfg, data, tmp_path / "ae")
    assert [m["lr"] for m in read_metrics(run)] == pytest.approx([0.001, 0.002, 0.002, 0.001])
    state = torch.load(run / "checkpoints" / "ckpt-00000004.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)
    assert state["disc_optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0005)


def test_training_starts_from_the_configured_posterior_sigma(tmp_path):
    """train.autoencoder.initial_sigma sets where the posterior's sigma starts (MONAI's
    initialisation gives about 1), and the first step trains from there: a one-step run's
    encoder gives sigma near 0.05 where the default's stays near 1."""
    data = make_cache(tmp_path / "data", n_train=1, n_val=0)
    x = torch.rand(1, 1, *SHAPE, generator=torch.Generator().manual_seed(0))
    sigmas = {}
    for start in (1.0, 0.05):
        cfg = ae_config("train.autoencoder.steps=1", f"train.autoencoder.initial_sigma={start}")
        run = train_autoencoder(cfg, data, tmp_path / f"ae-{start}")
        ae = build_autoencoder(cfg, use_checkpoint=False)
        ae.load_state_dict(torch.load(run / "autoencoder.pt", weights_only=False)["state_dict"])
        with torch.no_grad():
            sigmas[start] = float(ae.eval().encode(x)[1].mean())
    assert 0.6 < sigmas[1.0] < 1.6
    assert 0.02 < sigmas[0.05] < 0.12


def test_channels_last_changes_the_memory_layout_not_the_training(tmp_path):
    """tiny-cpu trains channels-last for speed; the same seed must give the same losses and
    model as the default layout, discriminator included, and the weights must load into a
    model of the default layout (what the bundle and the server build)."""
    data = make_cache(tmp_path / "data", n_train=2, n_val=0)
    common = ("train.autoencoder.steps=3", "train.autoencoder.adv_start_step=1")
    runs = {
        layout: train_autoencoder(
            ae_config(*common, f"train.channels_last={layout}"), data, tmp_path / layout
        )
        for layout in ("true", "false")
    }
    losses = {k: [m["loss"] for m in read_metrics(run)] for k, run in runs.items()}
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    finals = {k: torch.load(run / "autoencoder.pt", weights_only=True) for k, run in runs.items()}
    conv = next(v for v in finals["true"]["state_dict"].values() if v.dim() == 5)
    assert conv.is_contiguous(memory_format=torch.channels_last_3d)
    # Adam turns rounding-level gradient differences of near-zero gradients into whole
    # steps of single weights, so the models are compared by what they compute.
    x = torch.rand(1, 1, *SHAPE, generator=torch.Generator().manual_seed(0))
    recon = {}
    for layout, final in finals.items():
        model = build_autoencoder(ae_config()).eval()
        model.load_state_dict(final["state_dict"])
        assert next(p for p in model.parameters() if p.dim() == 5).is_contiguous()
        with torch.no_grad():
            recon[layout] = model.decode(model.encode(x)[0])
    torch.testing.assert_close(recon["true"], recon["false"], rtol=0, atol=1e-3)


def test_gradient_difference_tells_a_softened_edge_from_an_error_l1_scores_the_same():
    edge = torch.zeros(1, 1, 8, 8, 8)
    edge[..., 4:] = 1.0
    ramp = edge.clone()
    ramp[..., 3], ramp[..., 4] = 1 / 3, 2 / 3  # the same edge spread over three voxels
    offset = edge + 1 / 12  # every voxel a little off, the edge intact
    l1 = [(v - edge).abs().mean() for v in (ramp, offset)]
    assert l1[0] == pytest.approx(l1[1])
    assert ae_mod.gradient_difference(offset, edge) == pytest.approx(0.0, abs=1e-7)
    # Along the edge's normal the step of 1 became three steps of 1/3: |1/3| + |1/3 - 1| +
    # |1/3| over 7 differences, averaged with the two axes along which nothing changed.
    assert ae_mod.gradient_difference(ramp, edge) == pytest.approx(4 / 21 / 3)


@pytest.mark.parametrize(
    ("term", "weight_field", "weight"),
    [("gradient", "gradient_weight", 1.0), ("spectral", "spectral_weight", 10.0)],
)
def test_optional_loss_term_is_logged_and_trains_when_weighted(
    tmp_path, term, weight_field, weight
):
    data = make_cache(tmp_path / "data", n_train=2, n_val=0)
    cfg = ae_config("train.autoencoder.steps=2", f"train.autoencoder.{weight_field}={weight}")
    train = [m for m in read_metrics(train_autoencoder(cfg, data, tmp_path / "ae"))]
    assert all(m[term] > 0 for m in train)
    assert all(m["loss"] > m["l1"] + weight * m[term] * 0.99 for m in train)
