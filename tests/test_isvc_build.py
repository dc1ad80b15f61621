"""The InferenceService and ServingRuntime the deploy stage builds from the run's config:
valid against the real CRD schemas and admission rules, and in agreement with the manifests
that ship the predictor's identity and the runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ldm_core.config import load_config
from ldm_core.kube import isvc_build
from tests.harness import crdcheck

NS = "brain-ldm"
NAME = "brain-ldm"
URI = "s3://models/brain-ldm/aaaa"
MANIFESTS = Path(__file__).parents[1] / "manifests" / "base"


def _isvc(*overrides: str, **deploy: Any) -> dict[str, Any]:
    """The InferenceService of the default config with ``overrides``, for one deploy."""
    cfg = load_config(overrides=list(overrides))
    return isvc_build.build_inference_service(
        cfg, name=NAME, namespace=NS, storage_uri=URI, **deploy
    )


def test_every_emitted_object_passes_the_crd_schema_and_admission_rules():
    runtime_mode = _isvc(
        "cluster.predictor.gpus=1",
        "serving.max_replicas=3",
        "serving.request_timeout_s=870",
        bundle_digest="ab" * 32,
    )
    custom = _isvc(
        "cluster.serving_image=registry.local/brain-ldm-serving:1",
        "serving.model_name=brain-ldm-x",
        runtime=None,
    )
    canary = _isvc(canary_percent=10)
    runtime = isvc_build.build_serving_runtime(load_config(), namespace=NS)
    for obj in (runtime_mode, custom, canary, runtime):
        crdcheck.validate(obj)

    pred = runtime_mode["spec"]["predictor"]
    # The ingress waits 30 s past the server's own limit, so the server's 504 comes first.
    assert pred["serviceAccountName"] == "serving" and pred["timeout"] == 900
    assert (pred["minReplicas"], pred["maxReplicas"]) == (1, 3)
    assert (
        pred["model"]["modelFormat"]["name"] == "brain-ldm"
        and pred["model"]["runtime"] == "brain-ldm"
    )
    assert pred["model"]["storageUri"] == URI
    assert pred["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": isvc_build.BUNDLE_DIGEST_ENV, "value": "ab" * 32} in pred["model"]["env"]
    assert "args" not in pred["model"]  # the default model name needs no extra args
    assert runtime_mode["metadata"]["annotations"]["serving.kserve.io/enable-tag-routing"] == "true"
    container = custom["spec"]["predictor"]["containers"][0]
    assert container["name"] == "kserve-container"
    assert container["image"] == "registry.local/brain-ldm-serving:1"
    assert {"name": "STORAGE_URI", "value": URI} in container["env"]
    assert container["args"][container["args"].index("--model-name") + 1] == "brain-ldm-x"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10

    # The config refuses minReplicas > maxReplicas itself; the validator must still see it.
    bad = _isvc()
    bad["spec"]["predictor"].update(minReplicas=3, maxReplicas=1)
    with pytest.raises(crdcheck.InvalidResource):  # the validator does catch bad objects
        crdcheck.validate(bad)


def test_the_predictor_identity_in_manifests_finds_s3_and_carries_no_credentials():
    """The predictor runs as the config's ``cluster.serving_service_account``; the manifests
    ship it listing the S3 secret whose serving.kserve.io/s3-* annotations tell KServe's
    storage initializer where the bundle is, and the secret's template holds placeholders
    only."""
    secret = yaml.safe_load((MANIFESTS / "s3-secret.template.yaml").read_text())
    accounts = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all((MANIFESTS / "serviceaccounts.yaml").read_text())
        if d
    }
    ann = secret["metadata"]["annotations"]
    assert ann["serving.kserve.io/s3-endpoint"] == "minio-service.kubeflow:9000"
    assert (
        ann["serving.kserve.io/s3-usehttps"] == "0"
        and ann["serving.kserve.io/s3-region"] == "us-east-1"
    )
    data = secret["stringData"]
    assert all(
        data[k].startswith("REPLACE_WITH_") for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    )
    # The one key that is no credential: Kubeflow's in-cluster MinIO, plain HTTP.
    assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT"}
    assert data["S3_ENDPOINT"] == "http://" + ann["serving.kserve.io/s3-endpoint"]
    sa = accounts[_isvc()["spec"]["predictor"]["serviceAccountName"]]
    assert sa["secrets"] == [{"name": secret["metadata"]["name"]}]
    assert sa["automountServiceAccountToken"] is False


def test_runtime_builder_agrees_with_the_checked_in_manifest():
    manifest = MANIFESTS / "servingruntime.yaml"
    if not manifest.exists():
        pytest.skip("manifests/base/servingruntime.yaml not present")
    shipped = yaml.safe_load(manifest.read_text())
    built = isvc_build.build_serving_runtime(load_config())
    assert built["metadata"]["name"] == shipped["metadata"]["name"]
    assert (
        built["spec"]["supportedModelFormats"][0]["name"]
        == shipped["spec"]["supportedModelFormats"][0]["name"]
    )
    a, b = built["spec"]["containers"][0], shipped["spec"]["containers"][0]
    for key in ("name", "image", "command", "args", "ports", "readinessProbe"):
        assert a[key] == b[key], key
