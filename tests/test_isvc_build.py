"""The InferenceService and ServingRuntime the deploy stage builds from the run's config:
valid against the real CRD schemas and admission rules, and in agreement with the manifests
that ship the predictor's identity and the runtime."""

from __future__ import annotations

import json
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
        "serving.request_timeout_s=540",
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
    assert pred["serviceAccountName"] == "serving" and pred["timeout"] == 570
    assert (pred["minReplicas"], pred["maxReplicas"]) == (1, 3)
    assert (
        pred["model"]["modelFormat"]["name"] == "brain-ldm"
        and pred["model"]["runtime"] == "brain-ldm"
    )
    assert pred["model"]["storageUri"] == URI
    assert pred["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": isvc_build.BUNDLE_DIGEST_ENV, "value": "ab" * 32} in pred["model"]["env"]
    assert pred["model"]["args"][:2] == ["--model-name", "brain-ldm"]
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


RELEASE_CRDS = Path(__file__).parent / "crds"
KSERVE_RELEASES = ("kserve-v0.14.1", "kserve-v0.15.2")
"""The KServe CRDs of Kubeflow 1.10.0 and 1.11.0 (unmodified copies, tests/crds/SOURCES.md)."""


def _strictly_valid(obj: dict[str, Any], release: str) -> None:
    """No field the release's CRD would prune (the apiserver's strict field validation)."""
    from tests.harness.kube import crd_schemas, unknown_fields

    schema = crd_schemas(RELEASE_CRDS / release)["serving.kserve.io/v1beta1/inferenceservices"]
    assert unknown_fields(obj, schema) == [], release


def test_the_server_serves_the_limits_the_inference_service_promises(tmp_path):
    """KServe appends the predictor's model args to the runtime's; the server reads the
    bundle's config.yaml (written by training) unless told otherwise. The deploy's limits
    must be the ones it runs with, or containerConcurrency and admission disagree."""
    from ldm_core.bundle import config_for
    from ldm_core.cli import build_parser

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    trained = load_config(
        overrides=["serving.max_queue=2", "serving.max_batch_size=1", "serving.model_name=old"]
    )
    trained.save(bundle / "config.yaml")
    cfg = load_config(overrides=["serving.max_concurrency=2", "serving.max_queue=20"])
    isvc = isvc_build.build_inference_service(cfg, name=NAME, namespace=NS, storage_uri=URI)
    runtime = isvc_build.build_serving_runtime(cfg)
    argv = [*runtime["spec"]["containers"][0]["args"], *isvc["spec"]["predictor"]["model"]["args"]]
    argv[argv.index("--bundle") + 1] = str(bundle)
    args = build_parser().parse_args(["serve", *argv])
    served = config_for(args.bundle, args.config, args.preset, args.set or []).serving
    assert args.model_name == cfg.serving.model_name
    for field in (*isvc_build.SERVED_LIMITS, "request_timeout_s"):
        assert getattr(served, field) == getattr(cfg.serving, field), field
    assert served.container_concurrency == isvc["spec"]["predictor"]["containerConcurrency"] == 16
    assert served.max_concurrency + served.max_queue >= served.container_concurrency


@pytest.mark.parametrize("release", KSERVE_RELEASES)
def test_serverless_gpu_revisions_get_a_progress_deadline_and_no_raw_only_fields(release):
    """Knative's default progress deadline (600 s) is shorter than a cold GPU start; KServe
    copies predictor annotations onto the revision template. Knative refuses a container
    lifecycle and sets the grace period itself, and KServe refuses a deploymentStrategy."""
    isvc = _isvc("cluster.predictor.gpus=1", "serving.progress_deadline_s=2400")
    pred = isvc["spec"]["predictor"]
    assert pred["annotations"]["serving.knative.dev/progress-deadline"] == "2400s"
    assert "lifecycle" not in pred["model"] and "terminationGracePeriodSeconds" not in pred
    assert "deploymentStrategy" not in pred
    assert (pred["scaleMetric"], pred["scaleTarget"], pred["containerConcurrency"]) == (
        "concurrency",
        8,
        8,
    )
    crdcheck.validate(isvc)
    _strictly_valid(isvc, release)


@pytest.mark.parametrize("release", KSERVE_RELEASES)
@pytest.mark.parametrize("runtime", [isvc_build.RUNTIME_NAME, None], ids=["runtime", "custom"])
def test_raw_predictors_drain_before_they_stop_and_may_recreate(release, runtime):
    """RawDeployment: a rolling update must not cut a generation short. The pod waits for
    the endpoints to drop it, then has the request timeout to finish (KServe leaves
    Kubernetes' 30 s otherwise), and Recreate spares the second GPU an update needs."""
    isvc = _isvc(
        "serving.deployment_mode=RawDeployment",
        "serving.update_strategy=Recreate",
        "serving.request_timeout_s=600",
        runtime=runtime,
    )
    pred = isvc["spec"]["predictor"]
    container = pred["model"] if runtime else pred["containers"][0]
    drain = isvc_build.PRESTOP_DRAIN_S
    assert container["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", str(drain)]}}}
    assert pred["terminationGracePeriodSeconds"] == drain + 600 + 30
    assert pred["deploymentStrategy"] == {"type": "Recreate"}
    assert (pred["scaleMetric"], pred["scaleTarget"]) == ("cpu", 80)
    assert set(pred["annotations"]) == {isvc_build.ISTIO_PROXY_CONFIG_ANNOTATION}
    crdcheck.validate(isvc)
    _strictly_valid(isvc, release)


@pytest.mark.parametrize("mode, timeout_s", [("Serverless", 570), ("RawDeployment", 900)])
def test_the_istio_sidecar_outlives_the_servers_drain_and_no_longer(mode, timeout_s):
    """A profile namespace injects an Istio sidecar. Without EXIT_ON_ZERO_ACTIVE_CONNECTIONS
    pilot-agent sleeps terminationDrainDuration whole (5 s by default) after SIGTERM, even
    when nothing is left to drain, so a duration long enough for the server's admitted
    requests would make every pod take its full grace. With it, pilot-agent sleeps
    MINIMUM_DRAIN_DURATION (5 s by default) and then leaves on the first moment without an
    active connection, terminationDrainDuration unread (istio pkg/envoy/agent.go
    ``terminate``, 1.24.3 lines 152-220; the same in 1.26.1 and 1.28.0): that minimum must
    cover the time new requests still arrive, the preStop drain (RawDeployment) or Knative
    queue-proxy's 30 s drain (Serverless), or the sidecar refuses them."""
    isvc = _isvc(f"serving.deployment_mode={mode}", f"serving.request_timeout_s={timeout_s}")
    predictor = isvc["spec"]["predictor"]
    config = json.loads(predictor["annotations"]["proxy.istio.io/config"])
    drain = int(config["terminationDrainDuration"].rstrip("s"))
    assert drain >= timeout_s
    metadata = config["proxyMetadata"]
    assert metadata["EXIT_ON_ZERO_ACTIVE_CONNECTIONS"] == "true"
    minimum = int(metadata["MINIMUM_DRAIN_DURATION"].rstrip("s"))
    if mode == "RawDeployment":  # not past the pod's grace, when the kubelet kills it all
        assert drain <= predictor["terminationGracePeriodSeconds"]
        assert minimum >= isvc_build.PRESTOP_DRAIN_S
        assert minimum < predictor["terminationGracePeriodSeconds"]
    else:  # Knative's grace is the revision's timeout, which the longest request the config
        # takes (570 s) keeps within Knative's default max-revision-timeout-seconds (600 s)
        assert 30 <= minimum < predictor["timeout"] <= 600


def test_the_predictor_probes_never_restart_a_loading_pod_but_restart_a_lost_model():
    """Startup holds the other probes until the bundle is loaded and warmed up (the ready
    path), for as long as a revision may take to become ready; liveness then fails only for
    a model that is gone, with no initial delay to sit out; all on the server's port."""
    for runtime in (isvc_build.RUNTIME_NAME, None):
        isvc = _isvc("serving.progress_deadline_s=905", runtime=runtime)
        pred = isvc["spec"]["predictor"]
        container = pred["model"] if runtime else pred["containers"][0]
        kinds = ("startup", "readiness", "liveness")
        startup, ready, live = (container[f"{k}Probe"] for k in kinds)
        assert startup["httpGet"] == ready["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
        assert live["httpGet"] == {"path": "/v2/health/live", "port": 8080}
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 905
        assert "initialDelaySeconds" not in live
        assert live["failureThreshold"] * live["periodSeconds"] <= 60
