"""The training reference in bundle.json: ``ldm bundle --data`` stores the training
volumes' mean output measures, and the server exports them on /metrics beside the served
volumes' own, so the drift alert has something to compare with."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from ldm_core import bundle as bundle_io
from ldm_core import measures
from ldm_core.cli import main
from ldm_core.data.preprocessed import read_manifest
from ldm_core.errors import LdmError
from ldm_core.models import build_unet
from tests.harness.configs import MODEL, serve_config
from tests.harness.data import fake_autoencoder_run, make_cache
from tests.harness.serving import model_server, v2


def _runs(tmp_path: Path, cache: Path) -> tuple[Path, Path]:
    """Finished-looking autoencoder and diffusion runs (untrained weights) on ``cache``."""
    cfg = serve_config()
    ae_dir = fake_autoencoder_run(tmp_path / "ae", cfg)
    diff_dir = tmp_path / "diffusion"
    diff_dir.mkdir()
    torch.manual_seed(0)
    unet = {"state_dict": build_unet(cfg).state_dict(), "config": cfg.to_dict(), "steps": 3}
    torch.save(unet, diff_dir / "unet.pt")
    manifest = read_manifest(cache)
    geometry = {k: manifest[k] for k in ("affine", "shape", "spacing", "dataset_hash")}
    (diff_dir / "data_geometry.json").write_text(json.dumps(geometry))
    return ae_dir, diff_dir


def _expected(cache: Path) -> dict[str, float]:
    """The mean of measures.summarise over the cache's training volumes, read independently."""
    manifest = read_manifest(cache)
    rows = [
        measures.summarise(np.load(cache / s["file"]).astype(np.float32))
        for s in manifest["subjects"]
        if s["split"] == "train"
    ]
    return {m: float(np.mean([r[m] for r in rows])) for m in measures.MEASURES}


def test_ldm_bundle_with_data_stores_the_training_reference(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache", n_train=3, n_val=1)
    ae_dir, diff_dir = _runs(tmp_path, cache)
    argv = ["bundle", "--autoencoder", str(ae_dir), "--diffusion", str(diff_dir)]
    assert main([*argv, "--output", str(tmp_path / "b"), "--data", str(cache)]) == 0
    info = json.loads((tmp_path / "b" / "bundle.json").read_text())
    expected = _expected(cache)
    assert info["reference"] == pytest.approx(expected, rel=1e-6)
    everyone = measures.reference(
        np.load(cache / s["file"]).astype(np.float32) for s in read_manifest(cache)["subjects"]
    )
    assert everyone["detail"] != pytest.approx(expected["detail"], rel=1e-6)  # val left out
    assert main([*argv, "--output", str(tmp_path / "plain")]) == 0
    assert "reference" not in json.loads((tmp_path / "plain" / "bundle.json").read_text())


def test_a_cache_other_than_the_training_one_is_refused(tmp_path):
    cache = make_cache(tmp_path / "cache")
    ae_dir, diff_dir = _runs(tmp_path, cache)
    other = make_cache(tmp_path / "other", seed=5)
    with pytest.raises(LdmError, match=r"other: dataset_hash 'blobs-5-3-1-False' is not the"):
        bundle_io.build_bundle(ae_dir, diff_dir, tmp_path / "b", data_dir=other)


def test_the_server_exports_the_bundles_training_reference(tmp_path):
    """A bundle built with its training data, served for real: /metrics carries the
    reference gauges the drift rule compares the served volumes' histograms with."""
    cache = make_cache(tmp_path / "cache", n_train=3, n_val=1)
    ae_dir, diff_dir = _runs(tmp_path, cache)
    bundle = bundle_io.build_bundle(ae_dir, diff_dir, tmp_path / "b", data_dir=cache)
    with model_server(bundle, tmp_path / "serve.log", "--device", "cpu") as server:
        body = {**v2([1], steps=2), "outputs": [{"name": "volume"}]}
        r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=120)
        assert r.status_code == 200, r.text
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
    exported = {
        dict(s.labels)["measure"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "ldm_output_reference"
    }
    assert exported == pytest.approx(_expected(cache), rel=1e-6)
    assert "no_output_reference" not in (tmp_path / "serve.log").read_text()
