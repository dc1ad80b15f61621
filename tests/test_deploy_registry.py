"""The deploy stage with lineage and the Model Registry: upload to S3, register, roll out the
InferenceService through an emulated Kubernetes API and KServe, smoke-test a real local model
server, then read the lineage back from the InferenceService (``ldm lineage --isvc``).

The pieces are the harness's: kmock's emulated API (tests/harness/kube.py), FakeKServe
(tests/harness/fake_kserve.py), moto's S3 server, and the spec-checked Model Registry
(tests/harness/model_registry.py)."""

from __future__ import annotations

import json

import kubernetes
import pytest

from ldm_core import bundle as bundle_mod
from ldm_core import lineage, registry
from ldm_core.cli import main
from ldm_core.deploy import deploy, deploy_kserve, stop_local
from ldm_core.kube import isvc_build, isvc_lineage
from tests.harness import crdcheck
from tests.harness.configs import serve_config
from tests.harness.data import random_bundle
from tests.harness.fake_kserve import NAME, NS, SERVED, FakeKServe
from tests.harness.kube import KubeApi
from tests.harness.model_registry import model_registry
from tests.harness.s3 import make_bucket, s3_env, s3_server

RUN = {"run_id": "9d1c", "run_name": "brain-ldm-2026-12-07", "pipeline_name": "brain-ldm"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A bundle and a real local model server answering from it (where smoke inferences land)."""
    root = tmp_path_factory.mktemp("registry-deploy")
    bundle = random_bundle(root / "bundle", serve_config())
    result = deploy(serve_config(), bundle, backend="local", state_dir=root / "state")
    try:
        yield bundle, result["url"]
    finally:
        stop_local(result)


@pytest.fixture
def cluster(monkeypatch, served):
    """S3, the Kubernetes API and KServe; yields a deploy function taking the config."""
    bundle, url = served
    with s3_server() as endpoint, KubeApi(SERVED) as api:
        s3_env(monkeypatch, endpoint)
        bucket = make_bucket(endpoint)
        with FakeKServe(api, latest_url=url, address_url=url) as kserve:

            def run(cfg, **settings):
                return deploy_kserve(
                    cfg,
                    bundle,
                    storage_prefix=f"s3://{bucket}/bundles",
                    api_host=api.url,
                    timeout_s=30,
                    poll_s=0.05,
                    smoke_url=url,
                    create_runtime=True,  # the ServingRuntime manifests/base installs
                    **settings,
                )

            yield run, api, kserve, bundle


def _stored(api) -> dict:
    return kubernetes.client.CustomObjectsApi(api.client("inspector")).get_namespaced_custom_object(
        isvc_build.GROUP, isvc_build.ISVC_VERSION, NS, isvc_build.ISVC_PLURAL, NAME
    )


def _evaluation(bundle, tmp_path):
    record = lineage.with_evaluation(bundle_mod.lineage(bundle), {"mmd": 0.1}, {"passed": True})
    lineage.write(tmp_path, record)
    return tmp_path


def test_a_registered_deploy_labels_the_revision_it_rolls_out_and_reads_back(cluster, tmp_path):
    run, api, kserve, bundle = cluster
    with model_registry("v0.3.4") as mr:
        cfg = serve_config(
            f"cluster.namespace={NS}", "registry.enabled=true", f"registry.url={mr.url}"
        )
        result = run(cfg, evaluation_dir=_evaluation(bundle, tmp_path), run=RUN)
        version = next(iter(mr.store.versions.values()))
    assert mr.violations == []
    assert result["action"] == "created" and result["smoke"]["ok"]
    outcome = result["lineage"]["registry"]
    assert outcome["status"] == "registered" and "deployment_update" not in outcome
    obj = _stored(api)
    crdcheck.validate(obj)
    labels, annotations = obj["metadata"]["labels"], obj["metadata"]["annotations"]
    assert labels[registry.REGISTERED_MODEL_ID_LABEL] == outcome["registered_model"]["id"]
    assert (
        labels[registry.MODEL_VERSION_ID_LABEL] == outcome["model_version"]["id"] == version["id"]
    )
    assert annotations[registry.URL_ANNOTATION] == mr.url  # a loopback URL is no Service name
    assert list(kserve.revision_uri) == [f"{NAME}-predictor-00001"]  # one write, one revision
    # the version knows where it serves, and the InferenceService what it serves
    props = version["customProperties"]
    assert props["deployment.revision"]["string_value"] == result["revision"]
    assert props["deployment.storage_uri"]["string_value"] == result["storage_uri"]
    read = isvc_lineage.read(NAME, NS, api_host=api.url)
    assert read["run"] == RUN and read["evaluation"]["metrics"] == {"mmd": 0.1}
    assert read["bundle"]["digest"] == bundle_mod.digest(bundle) == result["bundle_sha256"]
    assert read["deployment"]["storage_uri"] == result["storage_uri"]
    assert read["deployment"]["revision"] == result["revision"]
    assert read["registry"]["model_version_id"] == version["id"]
    assert result["lineage"]["deployment"]["storage_uri"] == result["storage_uri"]


def test_a_registry_that_is_down_leaves_the_deploy_standing_and_says_why(cluster):
    run, api, kserve, bundle = cluster
    with model_registry("v0.2.15.3") as mr:
        mr.down()
        cfg = serve_config(
            f"cluster.namespace={NS}", "registry.enabled=true", f"registry.url={mr.url}"
        )
        result = run(cfg)
    assert result["action"] == "created" and result["smoke"]["ok"]
    outcome = result["lineage"]["registry"]
    assert outcome["status"] == "failed" and "HTTP 503" in outcome["error"]
    obj = _stored(api)
    assert not any(key.startswith(registry.LABEL_PREFIX) for key in obj["metadata"]["labels"])
    assert lineage.ANNOTATION in obj["metadata"]["annotations"]
    assert (
        isvc_lineage.read(NAME, NS, api_host=api.url)["bundle"]["digest"] == result["bundle_sha256"]
    )


def test_without_the_registry_the_inferenceservice_still_carries_the_lineage(
    cluster, monkeypatch, capsys
):
    run, api, kserve, bundle = cluster
    result = run(serve_config(f"cluster.namespace={NS}"))
    assert "registry" not in result["lineage"]
    obj = _stored(api)
    record = lineage.from_annotation(obj["metadata"]["annotations"][lineage.ANNOTATION], "isvc")
    assert record == {k: v for k, v in result["lineage"].items() if k != "deployment"}
    assert (
        isvc_lineage.read(NAME, NS, api_host=api.url)["deployment"]["url"] == obj["status"]["url"]
    )
    # ``ldm lineage --isvc`` reads the same through the kubeconfig's API
    monkeypatch.setattr(isvc_lineage, "api_client", lambda *a: api.client("ldm-cli"))
    assert main(["lineage", "--isvc", NAME, "--namespace", NS, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == isvc_lineage.read(NAME, NS, api_host=api.url)
