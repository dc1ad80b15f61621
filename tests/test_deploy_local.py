"""Deploy stage, local backend: a detached model server on loopback, smoke-tested over HTTP."""

from __future__ import annotations

import base64
import gzip
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from ldm_core import bundle as bundle_mod
from ldm_core.deploy import deploy, stop_local
from ldm_core.errors import DeployError
from ldm_core.smoke import DeployedBundle, SmokeTestError, smoke_check
from tests.harness.configs import MODEL, serve_config
from tests.harness.data import random_bundle
from tests.harness.kserve import Answer, model_server, nan_model_server


def _running(pid: int) -> bool:
    try:
        return b"ldm_core.serve" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_deploy_serves_answers_restarts_and_stops(tmp_path):
    cfg = serve_config()
    bundle = random_bundle(tmp_path / "bundle", cfg)
    state = tmp_path / "state"
    first = deploy(cfg, bundle, backend="local", state_dir=state, ready_timeout_s=240)
    try:
        assert first["backend"] == "local" and first["model_name"] == MODEL
        assert first["url"].startswith("http://127.0.0.1:")
        assert first["infer_url"] == f"{first['url']}/v2/models/{MODEL}/infer"
        assert first["smoke"]["ok"] and first["smoke"]["shape"] == [1, 1, 16, 16, 16]
        assert (state / "serve.pid").read_text().strip() == str(first["pid"])
        assert json.loads((state / "deployment.json").read_text())["url"] == first["url"]
        r = httpx.post(
            f"{first['url']}/v1/models/{MODEL}:predict",
            json={"instances": [{"seed": 1}], "parameters": {"steps": 2}},
            timeout=60,
        )
        assert r.status_code == 200
        img = nib.Nifti1Image.from_bytes(
            gzip.decompress(base64.b64decode(r.json()["predictions"][0]["nifti"]))
        )
        assert img.shape == (16, 16, 16)

        # Deploying again into the same state dir replaces the old server.
        second = deploy(
            cfg,
            bundle,
            backend="local",
            state_dir=state,
            model_name="brain-ldm-v2",
            ready_timeout_s=240,
        )
        assert second["pid"] != first["pid"] and not _running(first["pid"])
        assert (
            httpx.get(f"{second['url']}/v2/models/brain-ldm-v2/ready", timeout=10).status_code
            == 200
        )
    finally:
        stop_local(state)
    assert not _running(second["pid"])
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{second['url']}/v2/health/live", timeout=5)
    assert stop_local(state) is False  # nothing left to stop


def test_a_server_that_dies_while_starting_is_reported_with_its_log(tmp_path):
    cfg = serve_config()
    bundle = random_bundle(tmp_path / "bundle", cfg)
    (Path(bundle) / "autoencoder.pt").write_bytes(b"truncated")
    with pytest.raises(DeployError, match="exited before it was ready") as info:
        deploy(cfg, bundle, backend="local", state_dir=tmp_path / "state", ready_timeout_s=240)
    assert "autoencoder.pt" in str(info.value)  # the log tail says why
    assert not (tmp_path / "state" / "serve.pid").exists()


@pytest.mark.parametrize(
    "backend,settings,message",
    [
        ("local", {"prot": 1}, "prot: not a setting of the local backend"),
        ("docker", {}, "backend: 'docker'"),
        ("kserve", {"name": "x"}, "storage_prefix"),
    ],
)
def test_bad_settings_are_named(tmp_path, backend, settings, message):
    cfg = serve_config()
    bundle = random_bundle(tmp_path / "bundle", cfg)
    with pytest.raises(DeployError, match=message):
        deploy(cfg, bundle, backend=backend, **settings)


def test_a_directory_without_a_bundle_is_refused_before_starting_anything(tmp_path):
    with pytest.raises(DeployError, match="not a model bundle"):
        deploy(serve_config(), tmp_path, backend="local", state_dir=tmp_path / "state")
    assert not (tmp_path / "state" / "serve.pid").exists()


def test_smoke_check_rejects_wrong_answers():
    with nan_model_server(MODEL) as url:
        with pytest.raises(SmokeTestError, match="non-finite"):
            smoke_check(url, MODEL)
    with pytest.raises(SmokeTestError, match="HTTP|ConnectError"):
        smoke_check(f"http://127.0.0.1:{_closed_port()}", MODEL, timeout_s=5)


DEPLOYED = DeployedBundle(
    digest="d" * 64,
    image_shape=(6, 5, 4),
    affine=np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]]),
)
"""The bundle a deploy step just rolled out (an LPS-oriented 2 mm grid, not identity)."""
RIGHT = Answer(shape=(6, 5, 4), affine=DEPLOYED.affine.tolist(), digest=DEPLOYED.digest)


@pytest.mark.parametrize(
    "answer",
    [
        RIGHT,
        replace(RIGHT, digest_in=("metadata",)),
        replace(RIGHT, digest_in=("answer",)),
    ],
    ids=["digest-everywhere", "digest-in-metadata", "digest-in-answer"],
)
def test_smoke_check_passes_the_deployed_bundle(answer):
    with model_server(MODEL, answer) as url:
        result = smoke_check(url, MODEL, bundle=DEPLOYED, timeout_s=10)
    assert result["shape"] == [1, 1, 6, 5, 4] and result["bundle_digest"] == DEPLOYED.digest


@pytest.mark.parametrize(
    "answer, message",
    [
        # Another bundle's grid, and the metadata agrees with it: only the bundle can tell.
        (replace(RIGHT, shape=(4, 5, 6)), r"image_shape is \[6, 5, 4\]: the server runs another"),
        # A volume that is not what the server's own metadata announces.
        (replace(RIGHT, metadata_shape=(6, 5, 5)), r"metadata says \[1, 1, 6, 5, 5\]"),
        # Finite, invertible, and still the wrong orientation (identity: RAS, not LPS).
        (replace(RIGHT, affine=np.eye(4).tolist()), "differs from the deployed bundle's"),
        # The right geometry from another bundle (the previous revision's weights).
        (replace(RIGHT, digest="e" * 64), f"bundle_digest is {'e' * 64}.*{DEPLOYED.digest}"),
        # A server that reports no digest is older than this deploy step: not trusted.
        (replace(RIGHT, digest=None), "bundle_digest is missing.*older than this deploy step"),
    ],
    ids=["shape", "metadata-shape", "affine", "digest", "no-digest"],
)
def test_smoke_check_refuses_an_answer_from_another_bundle(answer, message):
    with model_server(MODEL, answer) as url:
        with pytest.raises(SmokeTestError, match=message):
            smoke_check(url, MODEL, bundle=DEPLOYED, timeout_s=10)


def test_deployed_bundle_is_read_from_the_bundle_itself(tmp_path):
    cfg = serve_config()
    bundle = random_bundle(tmp_path / "bundle", cfg)
    deployed = DeployedBundle.read(bundle)
    info = json.loads((bundle / "bundle.json").read_text())
    assert deployed.digest == bundle_mod.digest(bundle)
    assert list(deployed.image_shape) == info["image_shape"] == list(cfg.data.shape)
    assert np.array_equal(deployed.affine, np.asarray(info["affine"]))
    (bundle / "bundle.json").write_text("{}")
    with pytest.raises(DeployError, match="bundle.json: no usable image_shape/affine"):
        DeployedBundle.read(bundle)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stop_local_leaves_unrelated_processes_alone(tmp_path):
    # A stale pid file naming a process that is not a model server (this test process).
    state = tmp_path / "state"
    state.mkdir()
    (state / "serve.pid").write_text(f"{os.getpid()}\n")
    assert stop_local(state) is False
    assert not (state / "serve.pid").exists()
