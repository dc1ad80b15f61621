"""Model bundle: packs training outputs, loads in one call, refuses what does not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldm_core import bundle as bundle_mod
from ldm_core.errors import LdmError
from ldm_core.models import build_autoencoder, build_unet
from tests.harness.configs import tiny_config
from tests.harness.data import random_bundle


def _fake_runs(tmp_path, cfg, ae_cfg=None):
    """Run directories shaped like the training stages' outputs."""
    ae_dir, diff_dir = tmp_path / "ae", tmp_path / "diff"
    ae_dir.mkdir()
    diff_dir.mkdir()
    ae_cfg = ae_cfg or cfg
    torch.save(
        {
            "state_dict": build_autoencoder(ae_cfg).state_dict(),
            "scale_factor": 0.8,
            "config": ae_cfg.to_dict(),
            "steps": 11,
        },
        ae_dir / "autoencoder.pt",
    )
    torch.save(
        {"state_dict": build_unet(cfg).state_dict(), "config": cfg.to_dict(), "steps": 22},
        diff_dir / "unet.pt",
    )
    affine = np.array([[-6.0, 0, 0, 90], [0, 6.0, 0, -126], [0, 0, 6.0, -72], [0, 0, 0, 1]])
    (diff_dir / "data_geometry.json").write_text(
        json.dumps(
            {
                "affine": affine.tolist(),
                "shape": list(cfg.data.shape),
                "spacing": list(cfg.data.spacing),
                "dataset_hash": "abc",
            }
        )
    )
    return ae_dir, diff_dir, affine


def test_build_and_load_round_trip(tmp_path):
    cfg = tiny_config()
    ae_dir, diff_dir, affine = _fake_runs(tmp_path, cfg)
    out = bundle_mod.build_bundle(ae_dir, diff_dir, tmp_path / "bundle")
    assert sorted(p.name for p in out.iterdir()) == [
        "autoencoder.pt",
        "bundle.json",
        "config.yaml",
        "lineage.json",
        "unet.pt",
    ]
    b = bundle_mod.load(out, device="cpu")
    assert b.scale_factor == pytest.approx(0.8)
    assert np.allclose(b.affine, affine)
    assert b.image_shape == (32, 32, 32) and b.latent_shape == (3, 16, 16, 16)
    assert b.meta["training_steps"] == {"autoencoder": 11, "diffusion": 22}
    assert b.meta["dataset_hash"] == "abc" and b.meta["objective"] == "ddpm"
    assert "torch" in b.meta["package_versions"]
    assert not b.unet.training and not any(p.requires_grad for p in b.unet.parameters())
    assert b.config == cfg


def test_mismatched_autoencoder_is_refused(tmp_path):
    cfg = tiny_config()
    other = tiny_config("model.autoencoder.latent_channels=4")
    ae_dir, diff_dir, _ = _fake_runs(tmp_path, cfg, ae_cfg=other)
    with pytest.raises(LdmError, match="different autoencoder architecture"):
        bundle_mod.build_bundle(ae_dir, diff_dir, tmp_path / "bundle")


def test_unfinished_run_is_named(tmp_path):
    cfg = tiny_config()
    ae_dir, diff_dir, _ = _fake_runs(tmp_path, cfg)
    (diff_dir / "unet.pt").unlink()
    with pytest.raises(LdmError, match=r"unet.pt: not found"):
        bundle_mod.build_bundle(ae_dir, diff_dir, tmp_path / "bundle")


def test_corrupt_files_are_named(tmp_path):
    cfg = tiny_config()
    path = random_bundle(tmp_path / "b", cfg)
    data = (path / "unet.pt").read_bytes()
    (path / "unet.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LdmError, match=r"unet.pt: cannot be read"):
        bundle_mod.load(path)
    (path / "bundle.json").write_text("{")
    with pytest.raises(LdmError, match=r"bundle.json: not valid JSON"):
        bundle_mod.load(path)
    with pytest.raises(LdmError, match="bundle directory not found"):
        bundle_mod.load(tmp_path / "missing")


def test_future_format_is_refused(tmp_path):
    path = random_bundle(tmp_path / "b", tiny_config())
    info = json.loads((path / "bundle.json").read_text())
    info["format_version"] = 99
    (path / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(LdmError, match="format_version 99, this version reads 1 and 2"):
        bundle_mod.load(path)


def test_a_standardised_bundle_is_written_as_a_format_older_readers_refuse(tmp_path):
    """Only a bundle with latent moments needs the reader that maps them back: it is format 2,
    one without stays 1, and a file whose number and moments disagree is refused."""
    plain = random_bundle(tmp_path / "plain", tiny_config())
    moments = [[0.0, 1.0, 2.0], [1.0, 0.5, 2.0]]
    standardised = random_bundle(tmp_path / "std", tiny_config(), latent_moments=moments)
    info = {p.name: json.loads((p / "bundle.json").read_text()) for p in (plain, standardised)}
    assert (info["plain"]["format_version"], info["std"]["format_version"]) == (1, 2)
    assert bundle_mod.load(standardised).latent_moments[0].flatten().tolist() == moments[0]
    (standardised / "bundle.json").write_text(json.dumps(info["std"] | {"format_version": 1}))
    with pytest.raises(LdmError, match="format_version 1 with latent_moments"):
        bundle_mod.load(standardised)
    (plain / "bundle.json").write_text(json.dumps(info["plain"] | {"format_version": 2}))
    with pytest.raises(LdmError, match="format_version 2 without latent_moments"):
        bundle_mod.load(plain)


def test_save_replaces_atomically(tmp_path):
    cfg = tiny_config()
    path = random_bundle(tmp_path / "b", cfg, scale_factor=1.0)
    random_bundle(tmp_path / "b", cfg, scale_factor=2.0)
    assert bundle_mod.load(path).scale_factor == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp dirs left behind


@pytest.mark.parametrize(
    "field, value, fault",
    [
        ("latent_range", [[0.0, 0.0], [1.0, 1.0]], r"expected 3 values in each of \[low, high\]"),
        ("latent_range", [[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]], "low <= high"),
        ("latent_range", [[0.0, 0.0, "x"], [1.0, 1.0, 1.0]], "lists of numbers"),
        ("latent_range", [[0.0, 0.0, 0.0], [1.0, 1.0, float("inf")]], "finite"),
        ("latent_moments", [[0.0, 0.0], [1.0, 1.0]], r"expected 3 values in each of \[mean, std\]"),
        ("latent_moments", [[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]], "every std must be positive"),
        ("latent_moments", [[float("nan"), 0.0, 0.0], [1.0, 1.0, 1.0]], "finite"),
    ],
)
def test_bad_per_channel_latent_values_name_the_file_and_field(tmp_path, field, value, fault):
    good = {"latent_range": [[-1] * 3, [1] * 3], "latent_moments": [[0] * 3, [1] * 3]}
    path = random_bundle(tmp_path / "b", tiny_config(), **good)
    info = json.loads((path / "bundle.json").read_text())
    info[field] = value
    (path / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(LdmError, match=rf"bundle.json: {field}: .*" + fault):
        bundle_mod.load(path)
    with pytest.raises(LdmError, match=rf"^{field}: .*" + fault):
        random_bundle(tmp_path / "c", tiny_config(), **(good | {field: value}))


def test_a_bundle_without_a_latent_range_loads_and_says_it_samples_unclamped(tmp_path, caplog):
    """Bundles built before the range was recorded keep working."""
    path = random_bundle(tmp_path / "b", tiny_config())
    assert "latent_range" not in json.loads((path / "bundle.json").read_text())
    with caplog.at_level("WARNING", logger="ldm_core.bundle"):
        b = bundle_mod.load(path, device="cpu")
    assert b.latent_range is None
    assert "no latent_range" in caplog.text and "unclamped" in caplog.text
    caplog.clear()
    off = random_bundle(tmp_path / "off", tiny_config("sampling.clamp_to_latent_range=false"))
    with caplog.at_level("WARNING", logger="ldm_core.bundle"):
        bundle_mod.load(off, device="cpu")
    assert "latent_range" not in caplog.text


def _prior(cfg) -> dict[str, torch.Tensor]:
    shape = tuple(cfg.latent_shape)
    g = torch.Generator().manual_seed(1)
    return {
        "mean": torch.randn(shape, generator=g),
        "components": torch.randn(2, *shape, generator=g),
        "residual_var": torch.rand(shape, generator=g),
    }


def test_the_latent_prior_travels_in_its_own_file_and_changes_the_digest(tmp_path):
    """A bundle with a prior has latent_prior.pt (its format number unchanged: a bundle
    sampled without truncation needs nothing new), loads it as saved, and is a different
    bundle by its digest."""
    cfg = tiny_config()
    prior = _prior(cfg)
    plain = random_bundle(tmp_path / "plain", cfg)
    with_prior = random_bundle(tmp_path / "prior", cfg, latent_prior=prior)
    assert not (plain / "latent_prior.pt").exists()
    assert bundle_mod.load(plain).latent_prior is None
    loaded = bundle_mod.load(with_prior).latent_prior
    assert set(loaded) == set(prior)
    for key, value in prior.items():
        torch.testing.assert_close(loaded[key], value)
    assert json.loads((with_prior / "bundle.json").read_text())["format_version"] == 1
    assert bundle_mod.digest(plain) != bundle_mod.digest(with_prior)


def test_a_bad_latent_prior_names_its_file(tmp_path):
    cfg = tiny_config()
    path = random_bundle(tmp_path / "b", cfg, latent_prior=_prior(cfg))
    short = _prior(cfg) | {"mean": torch.zeros(3, 2, 2, 2)}
    torch.save(short, path / "latent_prior.pt")
    with pytest.raises(LdmError, match=r"b/latent_prior.pt: mean has shape \(3, 2, 2, 2\)"):
        bundle_mod.load(path)
    (path / "latent_prior.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LdmError, match=r"b/latent_prior.pt: cannot be read as a checkpoint"):
        bundle_mod.load(path)
    with pytest.raises(LdmError, match=r"^latent_prior: mean has shape"):
        random_bundle(tmp_path / "c", cfg, latent_prior=short)
