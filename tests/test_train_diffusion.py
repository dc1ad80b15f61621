"""Diffusion stage: the latent cache is built once, reused and invalidated correctly, and
the UNet learns on it; outputs form a bundle with the autoencoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_core import bundle
from ldm_core.data.preprocessed import VolumeDataset
from ldm_core.errors import LdmError
from ldm_core.models import build_autoencoder, build_unet
from ldm_core.samplers import training_scheduler
from ldm_core.train.diffusion import (
    latent_space,
    load_autoencoder,
    prepare_latents,
    train_diffusion,
    validate,
)
from ldm_core.train.distributed import DistEnv
from tests.harness.configs import tiny_config
from tests.harness.data import fake_autoencoder_run, make_cache


def dm_config(*extra: str):
    return tiny_config(
        "train.threads=1",
        "train.diffusion.batch_size=3",
        "train.log_every=1",
        "train.val_every=1000",
        "train.checkpoint_every=1000",
        *extra,
    )


def test_diffusion_loss_falls_on_cached_latents_and_outputs_bundle(tmp_path):
    data = make_cache(tmp_path / "data", n_train=3, n_val=1)
    cfg = dm_config(
        "train.diffusion.steps=40",
        "train.diffusion.lr=0.001",
        "train.val_every=5",
        "train.diffusion.ema_decay=0.9",
    )
    ae_dir = fake_autoencoder_run(tmp_path / "ae", cfg)
    run = train_diffusion(cfg, data, ae_dir, tmp_path / "dm")

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in metrics if m["split"] == "val"]
    assert [m["step"] for m in val] == list(range(5, 45, 5))
    assert val[-1]["raw"] < 0.7 * val[0]["raw"], val
    assert val[-1]["loss"] < val[0]["loss"]

    final = torch.load(run / "unet.pt", weights_only=True)
    assert final["steps"] == 40 and final["config"] == cfg.to_dict()
    last = torch.load(run / "checkpoints" / "ckpt-00000040.pt", weights_only=True)
    for name, value in final["state_dict"].items():  # unet.pt ships the EMA weights
        torch.testing.assert_close(value, last["ema"]["model"][name])
    assert any(not torch.equal(v, last["model"][k]) for k, v in final["state_dict"].items())
    build_unet(cfg).load_state_dict(final["state_dict"])
    latents = np.load(run / "latents" / "train.npy")  # the scaled latents it trained on
    low, high = latents.min(axis=(0, 2, 3, 4)), latents.max(axis=(0, 2, 3, 4))
    assert (low < high).all()
    np.testing.assert_allclose(final["latent_range"], [low, high], rtol=1e-6)

    b = bundle.load(bundle.build_bundle(ae_dir, run, tmp_path / "bundle"), device="cpu")
    assert b.scale_factor == pytest.approx(1.7)
    assert b.meta["latent_range"] == final["latent_range"]
    np.testing.assert_allclose(b.latent_range[1].flatten(), high, rtol=1e-6)
    np.testing.assert_allclose(b.affine, json.loads((data / "manifest.json").read_text())["affine"])
    # the training latents' Gaussian, for truncated sampling: their mean, components (none
    # of 3 subjects: at most N // 4), per-voxel variance accounted for; in the bundle as in
    # unet.pt
    prior = final["latent_prior"]
    np.testing.assert_allclose(prior["mean"], latents.mean(0), rtol=1e-5, atol=1e-6)
    assert prior["components"].shape == (len(latents) // 4, *latents.shape[1:])
    explained = prior["components"].pow(2).sum(0) + prior["residual_var"]
    np.testing.assert_allclose(explained, latents.var(0, ddof=1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.latent_prior["components"], prior["components"])

    stamp = (run / "unet.pt").stat().st_mtime_ns
    assert train_diffusion(cfg, data, ae_dir, run) == run  # finished: returns at once
    assert (run / "unet.pt").stat().st_mtime_ns == stamp


def test_a_run_trained_on_part_of_the_schedule_is_not_reused_for_the_whole(tmp_path):
    """train.diffusion.truncate_at decides what the weights can do: a finished run trained
    on 0..600 is refused to a config that would sample the whole schedule, naming the field."""
    data = make_cache(tmp_path / "data", n_train=3, n_val=1)
    part = dm_config(
        "train.diffusion.steps=2", "train.diffusion.truncate_at=600", "sampling.truncate_at=600"
    )
    ae_dir = fake_autoencoder_run(tmp_path / "ae", part)
    run = train_diffusion(part, data, ae_dir, tmp_path / "dm")
    assert (
        torch.load(run / "unet.pt", weights_only=True)["config"]["train"]["diffusion"][
            "truncate_at"
        ]
        == 600
    )
    with pytest.raises(LdmError, match=r"train.diffusion.truncate_at: checkpoint 600, config 0"):
        train_diffusion(dm_config("train.diffusion.steps=2"), data, ae_dir, run)


def test_standardised_channels_are_recorded_and_sampled_back_to_the_autoencoders_space(
    tmp_path,
):
    data = make_cache(tmp_path / "data", n_train=3, n_val=1)
    cfg = dm_config("train.diffusion.steps=2", "train.diffusion.standardise_channels=true")
    ae_dir = fake_autoencoder_run(tmp_path / "ae", cfg)
    run = train_diffusion(cfg, data, ae_dir, tmp_path / "dm")

    final = torch.load(run / "unet.pt", weights_only=True)
    scaled = np.load(run / "latents" / "train.npy").astype(np.float64)
    mean, std = scaled.mean(axis=(0, 2, 3, 4)), scaled.std(axis=(0, 2, 3, 4))
    assert np.ptp(std) > 0.01  # the channels differ, so one scale factor could not do this
    np.testing.assert_allclose(final["latent_moments"], [mean, std], rtol=1e-6)
    unit = (scaled - mean.reshape(1, -1, 1, 1, 1)) / std.reshape(1, -1, 1, 1, 1)
    low, high = unit.min(axis=(0, 2, 3, 4)), unit.max(axis=(0, 2, 3, 4))
    np.testing.assert_allclose(final["latent_range"], [low, high], rtol=1e-5)

    b = bundle.load(bundle.build_bundle(ae_dir, run, tmp_path / "bundle"), device="cpu")
    assert b.meta["latent_moments"] == final["latent_moments"]
    np.testing.assert_allclose(b.latent_moments[1].flatten(), std, rtol=1e-6)
    # the prior lives where the UNet samples: in the standardised space
    np.testing.assert_allclose(b.latent_prior["mean"], unit.mean(0), rtol=1e-4, atol=1e-5)

    plain = train_diffusion(dm_config("train.diffusion.steps=2"), data, ae_dir, tmp_path / "p")
    assert torch.load(plain / "unet.pt", weights_only=True)["latent_moments"] is None
    built = bundle.build_bundle(ae_dir, plain, tmp_path / "plain-bundle")
    assert "latent_moments" not in json.loads((built / "bundle.json").read_text())
    assert bundle.load(built, device="cpu").latent_moments is None

    # A run of one latent space is neither reused nor resumed in the other.
    with pytest.raises(LdmError, match=r"train.diffusion.standardise_channels: checkpoint F"):
        train_diffusion(cfg, data, ae_dir, plain)
    final["latent_moments"][1][0] = 0.0
    torch.save(final, run / "unet.pt")
    with pytest.raises(LdmError, match=r"dm/unet.pt: latent_moments: every std must be positive"):
        bundle.build_bundle(ae_dir, run, tmp_path / "bad-bundle")


def test_validation_latents_are_standardised_with_the_training_moments():
    torch.manual_seed(0)
    spread = torch.tensor([0.5, 2.0, 1.0]).view(1, 3, 1, 1, 1)
    raw = {"train": torch.randn(4, 3, 2, 3, 2) * spread + 1.0, "val": torch.randn(2, 3, 2, 3, 2)}
    copy = {split: z.clone() for split, z in raw.items()}
    env = DistEnv()
    data, moments = latent_space(copy, True, env)
    mean, std = (torch.tensor(m, dtype=torch.float32).view(1, 3, 1, 1, 1) for m in moments)
    torch.testing.assert_close(data["val"], (raw["val"] - mean) / std)
    torch.testing.assert_close(
        data["train"].mean(dim=(0, 2, 3, 4)), torch.zeros(3), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(data["train"].std(dim=(0, 2, 3, 4), correction=0), torch.ones(3))
    untouched, none = latent_space({s: z.clone() for s, z in raw.items()}, False, env)
    assert none is None and torch.equal(untouched["val"], raw["val"])


def test_latent_cache_is_reused_and_invalidated(tmp_path, caplog):
    cfg = dm_config()
    data = make_cache(tmp_path / "data", n_train=2, n_val=1)
    out = tmp_path / "dm"
    ae_dir = fake_autoencoder_run(tmp_path / "ae", cfg, seed=0)

    def prepare(data_dir: Path) -> dict[str, torch.Tensor]:
        from ldm_core.data.preprocessed import read_manifest

        manifest = read_manifest(data_dir)
        state = load_autoencoder(ae_dir / "autoencoder.pt", cfg, manifest)
        return prepare_latents(
            cfg, data_dir, manifest, ae_dir / "autoencoder.pt", state, out, DistEnv()
        )

    index = out / "latents" / "cache.json"
    first = prepare(data)
    assert first["train"].shape == (2, *cfg.latent_shape) and first["val"].shape == (
        1,
        *cfg.latent_shape,
    )
    # The cache holds posterior means times the scale factor.
    model = build_autoencoder(cfg)
    model.load_state_dict(torch.load(ae_dir / "autoencoder.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        mu = model.eval().encode(VolumeDataset(data, "train")[1][None])[0][0]
    torch.testing.assert_close(first["train"][1], mu * 1.7, rtol=1e-4, atol=1e-5)

    stamp = index.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="ldm_core.train.diffusion"):
        again = prepare(data)
    assert index.stat().st_mtime_ns == stamp and "reusing latent cache" in caplog.text
    assert torch.equal(again["train"], first["train"])

    fake_autoencoder_run(ae_dir, cfg, seed=1)  # a retrained autoencoder
    key_before = json.loads(index.read_text())["key"]
    killed_write = out / "latents" / ".train.npy.k1ll3d_0.tmp"  # an earlier build's leftover
    killed_write.write_bytes(b"half of the latents")
    retrained = prepare(data)
    assert json.loads(index.read_text())["key"] != key_before
    assert not killed_write.exists()
    assert not torch.allclose(retrained["train"], first["train"])

    other = make_cache(tmp_path / "data2", n_train=3, n_val=0, seed=5)  # re-preprocessed data
    changed = prepare(other)
    assert changed["train"].shape[0] == 3 and "val" not in changed
    assert not (out / "latents" / "val.npy").exists()
    assert json.loads(index.read_text())["dataset_hash"] == "blobs-5-3-0-False"


def test_diffusion_refuses_an_autoencoder_of_another_architecture(tmp_path):
    data = make_cache(tmp_path / "data", n_train=1, n_val=0)
    ae_dir = fake_autoencoder_run(tmp_path / "ae", dm_config())
    other = dm_config("model.autoencoder.channels=[16,16]")
    with pytest.raises(
        LdmError, match=r"autoencoder.pt: was trained with a different architecture.*channels"
    ):
        train_diffusion(other, data, ae_dir, tmp_path / "dm")
    with pytest.raises(LdmError, match="train the autoencoder first"):
        train_diffusion(dm_config(), data, tmp_path / "missing", tmp_path / "dm")


@pytest.mark.parametrize("training", [True, False])
def test_validation_leaves_the_unet_in_the_mode_it_found(training):
    cfg = dm_config()
    unet = build_unet(cfg).train(training)
    val = torch.randn(2, *cfg.latent_shape)
    validate(unet, val, training_scheduler(cfg), cfg, DistEnv())
    assert {m.training for m in unet.modules()} == {training}


def test_block_checkpointing_keeps_gradients_and_parameter_names():
    from ldm_core.train.model_setup import enable_block_checkpointing

    cfg = dm_config()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    plain = build_unet(cfg)
    checkpointed = build_unet(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    enable_block_checkpointing(
        [*checkpointed.down_blocks, checkpointed.middle_block, *checkpointed.up_blocks]
    )
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    z = torch.randn(1, *cfg.latent_shape)
    t = torch.tensor([500])
    for model in (plain, checkpointed):
        model(z, timesteps=t).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_grad_scaler_only_for_fp16():
    from ldm_core.train.precision import make_scaler

    cpu = torch.device("cpu")
    assert make_scaler(cpu, "fp16").is_enabled()
    assert not make_scaler(cpu, "bf16").is_enabled() and not make_scaler(cpu, "none").is_enabled()


def test_bf16_autocast_with_checkpointing_and_channels_last_trains(tmp_path):
    """CPU bf16 (fp16 on a CPU works too but is emulated and slow; GPUs take that path)."""
    data = make_cache(tmp_path / "data", n_train=2, n_val=0)
    cfg = dm_config(
        "train.amp=bf16",
        "train.diffusion.steps=2",
        "train.gradient_checkpointing=true",
        "train.channels_last=true",
    )
    run = train_diffusion(cfg, data, fake_autoencoder_run(tmp_path / "ae", cfg), tmp_path / "dm")
    state = torch.load(run / "checkpoints" / "ckpt-00000002.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "scaler", "guard", "rng", "config", "step"} <= set(state)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(loss is not None and np.isfinite(loss) for loss in losses)


def test_each_step_runs_at_the_scheduled_learning_rate(tmp_path):
    # Warm-up over 2 steps, then the full rate once and a half cosine over the last 2.
    data = make_cache(tmp_path / "data", n_train=3, n_val=0)
    cfg = dm_config(
        "train.diffusion.steps=4",
        "train.diffusion.lr=0.001",
        "train.diffusion.lr_warmup_steps=2",
        "train.diffusion.lr_decay=cosine",
    )
    run = train_diffusion(cfg, data, fake_autoencoder_run(tmp_path / "ae", cfg), tmp_path / "dm")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == pytest.approx([0.0005, 0.001, 0.001, 0.0005])
    state = torch.load(run / "checkpoints" / "ckpt-00000004.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0005)


def test_min_snr_weighting_trains_and_is_refused_where_undefined(tmp_path):
    from ldm_core.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.diffusion.snr_gamma: .*ddpm objective"):
        dm_config(
            "model.scheduler.objective=rflow",
            "sampling.sampler=rflow",
            "train.diffusion.snr_gamma=5",
        )
    with pytest.raises(ConfigError, match=r"train.diffusion.snr_gamma: must be >= 0"):
        dm_config("train.diffusion.snr_gamma=-1")
    data = make_cache(tmp_path / "data", n_train=3, n_val=1)
    losses = {}
    for gamma in (0.0, 5.0):
        cfg = dm_config("train.diffusion.steps=3", f"train.diffusion.snr_gamma={gamma}")
        ae_dir = fake_autoencoder_run(tmp_path / f"ae{gamma}", cfg)
        run = train_diffusion(cfg, data, ae_dir, tmp_path / f"dm{gamma}")
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[gamma] = [m["loss"] for m in metrics if m["split"] == "train"]
    assert all(np.isfinite(losses[5.0])) and len(losses[5.0]) == 3
    assert losses[5.0][0] < losses[0.0][0]  # same batch and noise: capped weights only lower it


def test_a_resumed_run_removes_what_a_killed_write_left(tmp_path, caplog):
    """A SIGKILL mid-save leaves ``atomic_write``'s temporary file in ``checkpoints/`` (seen:
    a 5 MB ``.ckpt-00000010.pt.*.tmp`` after a run killed 20 times); the resumed run removes
    it, and nothing that is not one."""
    data = make_cache(tmp_path / "data", n_train=2, n_val=0)
    ae_dir = fake_autoencoder_run(tmp_path / "ae", dm_config())
    out = tmp_path / "dm"
    train_diffusion(dm_config("train.diffusion.steps=1"), data, ae_dir, out)
    checkpoints = out / "checkpoints"
    left = checkpoints / ".ckpt-00000002.pt.k1ll3d_0.tmp"
    left.write_bytes(b"half of a checkpoint")
    (checkpoints / "notes.txt").write_bytes(b"a user's file")

    with caplog.at_level("INFO"):
        train_diffusion(dm_config("train.diffusion.steps=2"), data, ae_dir, out)

    assert "resuming diffusion training" in caplog.text and str(left) in caplog.text
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "ckpt-00000001.pt",
        "ckpt-00000002.pt",
        "notes.txt",
    ]
