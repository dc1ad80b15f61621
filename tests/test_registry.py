"""Registering a bundle in the Kubeflow Model Registry, with the registry's own Python client,
against a REST server held to the OpenAPI spec of each release Kubeflow installs
(tests/harness/model_registry.py): v0.2.15.3 (1.10.0), v0.2.19 (1.10.2), v0.3.4 (1.11.0)."""

from __future__ import annotations

import httpx
import pytest

from ldm_core import lineage, registry
from ldm_core.config import ConfigError, load_config
from tests.harness.configs import serve_config
from tests.harness.fake_kserve import closed_url
from tests.harness.model_registry import VERSIONS, model_registry

DIGEST = "5e" * 32
URI = "s3://models/bundles/brain-ldm/" + DIGEST[:16]


def _record(digest: str = DIGEST) -> dict:
    record = lineage.for_bundle(
        serve_config(),
        bundle_digest=digest,
        dataset_hash="d" * 64,
        checkpoints={"autoencoder": {"sha256": "a" * 64, "steps": 7}},
        package_versions={"torch": "2.13.0"},
    )
    metrics = {"mmd": 0.12, "mask_dice": 0.81}
    return lineage.with_evaluation(record, metrics, {"passed": True, "reasons": []})


def _cfg(url: str, *extra: str):
    return serve_config("registry.enabled=true", f"registry.url={url}", *extra)


def _register(cfg, record=None):
    return registry.register(cfg, record or _record(), URI, model_format="brain-ldm")


@pytest.mark.parametrize("version", VERSIONS)
def test_a_bundle_becomes_a_version_with_its_artifact_and_lineage(version):
    with model_registry(version) as server:
        outcome = _register(_cfg(server.url, "registry.author=ci-bot"))
        store = server.store
    assert server.violations == []
    assert outcome["status"] == "registered" and outcome["reused"] is False
    model = store.models[outcome["registered_model"]["id"]]
    assert (model["name"], model["owner"]) == ("brain-ldm", "ci-bot")
    found = store.versions[outcome["model_version"]["id"]]
    assert (found["name"], found["author"]) == (DIGEST[:16], "ci-bot")
    assert found["registeredModelId"] == model["id"]
    props = found["customProperties"]
    assert props["bundle.digest"]["string_value"] == DIGEST
    assert props["data.dataset_hash"]["string_value"] == "d" * 64
    assert props["checkpoints.autoencoder.sha256"]["string_value"] == "a" * 64
    assert props["evaluation.metrics.mmd"]["double_value"] == pytest.approx(0.12)
    assert props["evaluation.gate.passed"]["bool_value"] is True
    assert not any(key.startswith("run.") for key in props)  # nothing known is not stored
    artifact = store.artifacts[outcome["model_artifact"]["id"]]
    assert store.artifacts_of[found["id"]] == [artifact["id"]]
    assert (artifact["uri"], artifact["artifactType"]) == (URI, "model-artifact")
    assert (artifact["modelFormatName"], artifact["modelFormatVersion"]) == ("brain-ldm", "1")


@pytest.mark.parametrize("version", VERSIONS)
def test_the_same_bundle_again_is_the_same_version_brought_up_to_date(version):
    with model_registry(version) as server:
        cfg = _cfg(server.url)
        first = _register(cfg)
        second = _register(cfg, lineage.with_run(_record(), {"run_id": "r-2"}))
        stored = server.store.versions[first["model_version"]["id"]]
    assert server.violations == []
    assert second["reused"] is True
    assert second["model_version"] == first["model_version"]
    assert len(server.store.versions) == 1 and len(server.store.artifacts) == 1
    assert stored["customProperties"]["run.run_id"]["string_value"] == "r-2"


def test_a_version_name_that_holds_another_bundle_is_refused():
    with model_registry("v0.3.4") as server:
        cfg = _cfg(server.url)
        _register(cfg)
        other = DIGEST[:16] + "0" * 48  # the same first 16 characters, another bundle
        with pytest.raises(registry.RegistryError, match=f"holds bundle {DIGEST}, not {other}"):
            _register(cfg, _record(other))
    assert server.violations == []


@pytest.mark.parametrize("version", VERSIONS)
def test_a_name_registered_meanwhile_is_the_servers_409_named_in_the_outcome(version):
    """Another deploy registers the model between our lookup and our create: the server's
    duplicate-name answer is a clear failure, and the deploy goes on without the registry."""
    with model_registry(version) as server:
        cfg = _cfg(server.url)
        server.before(
            "POST", "/registered_models", lambda: server.store.create_model({"name": "brain-ldm"})
        )
        outcome = registry.before_rollout(cfg, _record(), URI, "brain-ldm")
    assert server.violations == []
    assert outcome["status"] == "failed" and outcome["url"] == server.url
    # The server's message, the same whatever the release puts in the body's code.
    assert "HTTP 409: registered model with name brain-ldm already exists" in outcome["error"]
    assert f"Model Registry at {server.url}: register brain-ldm:{DIGEST[:16]}" in outcome["error"]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_registry_that_is_down_or_not_there_is_a_failed_outcome_not_an_exception(version):
    with model_registry(version) as server:
        server.down()  # its store is unreachable: 503 from v0.2.x's ML Metadata, 500 from v0.3.4
        down = registry.before_rollout(_cfg(server.url), _record(), URI, "brain-ldm")
    assert server.violations == []
    status = 500 if version == "v0.3.4" else 503
    assert down["status"] == "failed" and f"connect failed: HTTP {status}: " in down["error"]
    nowhere = closed_url()
    gone = registry.before_rollout(_cfg(nowhere), _record(), URI, "brain-ldm")
    assert (
        gone["status"] == "failed"
        and f"Model Registry at {nowhere}: connect failed" in gone["error"]
    )
    assert registry.before_rollout(serve_config(), _record(), URI, "brain-ldm") is None  # off


def test_tls_without_a_token_is_refused_before_anything_is_sent(tmp_path):
    cfg = _cfg("https://model-registry.example.com:443", f"registry.token_file={tmp_path / 'no'}")
    with pytest.raises(registry.RegistryError, match="registry.token_file: .* cannot be read"):
        registry.connect(cfg)


@pytest.mark.parametrize(
    "url, labels, annotations",
    [
        (
            "http://model-registry-service.kubeflow.svc.cluster.local:8080",
            {registry.NAME_LABEL: "model-registry-service", registry.NAMESPACE_LABEL: "kubeflow"},
            {},
        ),
        (
            "https://registry.example.com:443",
            {},
            {registry.URL_ANNOTATION: "https://registry.example.com:443"},
        ),
    ],
)
def test_the_labels_are_those_the_registrys_controller_reads(url, labels, annotations):
    """kubeflow/model-registry v0.3.4 pkg/inferenceservice-controller/controller.go: the
    registered model's id label is what makes it act; the registry is the Service named by
    the name and namespace labels, or the URL annotation."""
    outcome = {
        "status": "registered",
        "registered_model": {"id": "4"},
        "model_version": {"id": "9"},
    }
    found_labels, found_annotations = registry.labels(_cfg(url), outcome)
    ids = {
        "modelregistry.kubeflow.org/registered-model-id": "4",
        "modelregistry.kubeflow.org/model-version-id": "9",
    }
    assert found_labels == {**ids, **labels} and found_annotations == annotations
    assert registry.labels(_cfg(url), {"status": "failed"}) == ({}, {})


@pytest.mark.parametrize(
    "overrides, fault",
    [
        (["registry.enabled=true"], "registry.url: required when registry.enabled"),
        (
            ["registry.enabled=true", "registry.url=model-registry:8080"],
            "needs http:// or https://",
        ),
        (["registry.enabled=true", "registry.url=http://mr.kubeflow.svc"], "a host and a port"),
        (
            ["registry.enabled=true", "registry.url=http://mr:8080/api/model_registry/v1alpha3"],
            "has a path",
        ),
        (["registry.enabled=true", "registry.url=http://mr:8080", "registry.author= "], "author"),
        (
            ["registry.enabled=true", "registry.url=http://mr:8080", "registry.ca_file=/ca.pem"],
            "registry.ca_file: set, but registry.url 'http://mr:8080' is not https",
        ),
    ],
)
def test_registry_settings_are_checked_only_when_it_is_on(overrides, fault):
    with pytest.raises(ConfigError, match=fault):
        load_config(None, overrides=overrides)
    load_config(None, overrides=[o.replace("enabled=true", "enabled=false") for o in overrides])


@pytest.mark.parametrize("version", VERSIONS)
def test_the_test_server_answers_errors_as_the_release_does(version):
    """The server's own errors, each checked against the spec's Error body: v0.2.x fills
    only its message (internal/server/openapi/helpers.go ``ErrorResponse``, v0.2.15.3 and
    v0.2.19 lines 27-31: the code goes out empty), v0.3.4 its code with the status text."""
    base = "/api/model_registry/v1alpha3"
    with model_registry(version) as server, httpx.Client(base_url=server.url) as http:
        assert http.post(f"{base}/registered_models", json={"name": "m"}).status_code == 201
        duplicate = http.post(f"{base}/registered_models", json={"name": "m"})
        missing = http.get(f"{base}/registered_models/99")
        not_found = http.get(f"{base}/registered_model", params={"name": "nope"})
        assert server.violations == []
        unknown = http.post(f"{base}/registered_models", json={"name": "n", "colour": "red"})
    coded = version == "v0.3.4"
    assert (duplicate.status_code, duplicate.json()["code"]) == (409, "Conflict" if coded else "")
    assert (missing.status_code, missing.json()["code"]) == (404, "Not Found" if coded else "")
    assert (
        not_found.status_code == 404 and "no registered models found" in not_found.json()["message"]
    )
    assert (unknown.status_code, unknown.json()["message"]) == (400, 'json: unknown field "colour"')
    assert server.violations == ['createRegisteredModel: 400 json: unknown field "colour"']


def test_a_field_only_newer_releases_know_is_refused_by_the_oldest():
    """RegisteredModelCreate gained ``language`` after v0.2.15.3: the old server refuses it,
    which is why the client's requests are checked against every release."""
    base = "/api/model_registry/v1alpha3"
    body = {"name": "m", "language": ["en"]}
    for version, status in (("v0.2.15.3", 400), ("v0.3.4", 201)):
        with model_registry(version) as server, httpx.Client(base_url=server.url) as http:
            assert http.post(f"{base}/registered_models", json=body).status_code == status
