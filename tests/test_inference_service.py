"""InferenceService objects and rollout against an in-memory Kubernetes API on loopback.

kmock's KubernetesEmulator plays the API server (optionally with the generation
bookkeeping a real one does); ``FakeKServe`` plays KServe's controller and Knative by
patching status from a background thread: it notices a new predictor spec after a while
(until then the previous revision's Ready is all there is - the stale state a rollout must
not trust), creates a revision, and makes it ready, failed, or never ready. Smoke
inferences go over real HTTP to a real local model server.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from ldm_core.deploy import deploy, deploy_kserve, smoke_check, stop_local
from ldm_core.kube import inference_service as isvc
from ldm_core.kube.client import api_client
from tests.harness import crdcheck
from tests.harness.configs import MODEL, serve_config
from tests.harness.data import random_bundle
from tests.harness.kube import KubeApi, declared, rbac_triple

NS = "brain-ldm"
NAME = "brain-ldm"
OLD_URI = "s3://models/brain-ldm/aaaa"
NEW_URI = "s3://models/brain-ldm/bbbb"
BAD_URI = "s3://models/brain-ldm/broken"
STUCK_URI = "s3://models/brain-ldm/stuck"


# --------------------------------------------------------------------------- API server

ROLLOUT_UA = "ldm-rollout-under-test"
KSERVE_UA = "fake-kserve"
INSPECTOR_UA = "test-inspector"
INTERRUPTED_UA = "interrupted-rollout"
HELPERS = {KSERVE_UA, INSPECTOR_UA, INTERRUPTED_UA}
"""Clients of the test itself; every other request comes from the code under test."""
SERVED = {
    f"{isvc.GROUP}/{isvc.ISVC_VERSION}/{isvc.ISVC_PLURAL}": "InferenceService",
    f"{isvc.GROUP}/{isvc.RUNTIME_VERSION}/{isvc.RUNTIME_PLURAL}": "ServingRuntime",
}


def _served_api(generations: bool):
    """An emulated API serving KServe's CRDs; on teardown, every call the code under test
    made must be one its module's RBAC_RULES declare."""
    with KubeApi(SERVED, generations=generations) as api:
        yield api
        sent = [r for r in api.requests() if r.headers.get("User-Agent") not in HELPERS]
        used = {rbac_triple(r) for r in sent}
        rules = declared(isvc.RBAC_RULES)
        assert used <= rules, f"calls outside RBAC_RULES: {sorted(used - rules)}"


@pytest.fixture(params=["no-generation", "generation"])
def api(request):
    """An emulated API, with and without generation bookkeeping."""
    yield from _served_api(generations=request.param == "generation")


@pytest.fixture
def plain_api():
    yield from _served_api(generations=False)


# --------------------------------------------------------------------------- KServe stand-in


def _closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _storage_uri(predictor: dict[str, Any]) -> str:
    if "model" in predictor:
        return predictor["model"]["storageUri"]
    env = {e["name"]: e["value"] for e in predictor["containers"][0].get("env", [])}
    return env["STORAGE_URI"]


class FakeKServe:
    """KServe's controller + Knative, reduced to what a rollout observes in status.

    As KServe's ``PropagateStatus`` does, ``status.observedGeneration`` is the Knative
    Service's (the child's) observedGeneration, not the InferenceService's: the child's
    counter grows when KServe writes a new ksvc spec (a new revision, or a traffic change)
    and starts ``child_ahead`` above the InferenceService's (a ksvc recreated, or written by
    another controller), so it can run ahead of ``metadata.generation`` or behind it.
    """

    def __init__(
        self,
        api: KubeApi,
        *,
        latest_url: str,
        address_url: str,
        failing: tuple[str, ...] = (BAD_URI,),
        stuck: tuple[str, ...] = (STUCK_URI,),
        notice_after_s: float = 0.4,
        ready_after_s: float = 0.3,
        child_ahead: int = 0,
        raw: bool = False,
    ) -> None:
        self.api = kubernetes.client.CustomObjectsApi(api.client(KSERVE_UA))
        self.latest_url, self.address_url = latest_url, address_url
        self.failing, self.stuck = failing, stuck
        self.notice_after_s, self.ready_after_s = notice_after_s, ready_after_s
        self.ready_at: dict[str, float] = {}
        self.child_generation = child_ahead
        self.raw = raw
        self._child_spec: tuple[str | None, int | None] | None = None
        self.revision_uri: dict[str, str] = {}
        self.canaries_seen: list[int] = []
        self._state: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.errors: list[BaseException] = []

    def __enter__(self) -> FakeKServe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self.errors, self.errors

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for obj in self._list():
                    self._reconcile(obj)
            except BaseException as exc:  # surfaced by __exit__
                self.errors.append(exc)
                return
            time.sleep(0.03)

    def _list(self) -> list[dict[str, Any]]:
        items = self.api.list_namespaced_custom_object(
            isvc.GROUP, isvc.ISVC_VERSION, NS, isvc.ISVC_PLURAL
        )
        return items.get("items", [])

    def _reconcile(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        predictor = obj["spec"]["predictor"]
        config = json.dumps(
            {k: v for k, v in predictor.items() if k != "canaryTrafficPercent"}, sort_keys=True
        )
        canary = predictor.get("canaryTrafficPercent")
        if canary is not None and canary not in self.canaries_seen:
            self.canaries_seen.append(canary)
        st = self._state.setdefault(
            name,
            {
                "config": None,
                "since": None,
                "n": 0,
                "created": None,
                "ready": None,
                "prev": None,
                "failed": None,
                "due": None,
            },
        )
        now = time.monotonic()
        if config != st["config"]:
            if st["since"] is None or st["since"][0] != config:
                st["since"] = (config, now)
            if now - st["since"][1] < self.notice_after_s:
                return  # not reconciled yet: status still describes the previous revision
            st["config"], st["n"] = config, st["n"] + 1
            st["created"] = f"{name}-predictor-{st['n']:05d}"
            st["failed"], st["due"] = None, now + self.ready_after_s
            self.revision_uri[st["created"]] = _storage_uri(predictor)
        uri = self.revision_uri.get(st["created"] or "", "")
        if st["due"] is not None and now >= st["due"] and uri not in self.stuck:
            st["due"] = None
            if uri in self.failing:
                st["failed"] = st["created"]
            else:
                st["prev"], st["ready"] = st["ready"], st["created"]
                self.ready_at[st["created"]] = now
        if (st["config"], canary) != self._child_spec:
            self._child_spec = (st["config"], canary)
            self.child_generation += 1  # KServe wrote the ksvc: Knative observes it
        self._publish(obj, st, canary)

    def _publish(self, obj: dict[str, Any], st: dict[str, Any], canary: int | None) -> None:
        if st["ready"] is None and st["created"] is None:
            return
        if st["ready"] == st["created"] and canary is not None and st["prev"]:
            traffic = [
                {
                    "tag": "latest",
                    "revisionName": st["ready"],
                    "percent": canary,
                    "latestRevision": True,
                    "url": self.latest_url,
                },
                {
                    "tag": "prev",
                    "revisionName": st["prev"],
                    "percent": 100 - canary,
                    "latestRevision": False,
                    "url": _closed_url(),
                },
            ]
        elif st["ready"]:
            traffic = [
                {
                    "tag": "latest",
                    "revisionName": st["ready"],
                    "percent": 100,
                    "latestRevision": st["ready"] == st["created"],
                    "url": self.latest_url,
                }
            ]
        else:
            traffic = []
        failed = st["failed"] is not None
        status = {
            "observedGeneration": self.child_generation,
            "url": f"http://{obj['metadata']['name']}.{NS}.example.com",
            "address": {"url": self.address_url},
            "components": {
                "predictor": {
                    "latestCreatedRevision": st["created"],
                    "latestReadyRevision": st["ready"],
                    "traffic": traffic,
                }
            },
            "conditions": [
                {"type": "Ready", "status": "True" if st["ready"] else "Unknown"},
                {
                    "type": "PredictorConfigurationReady",
                    "status": "False" if failed else "True",
                    **(
                        {"reason": "RevisionFailed", "message": f"Revision {st['failed']} failed"}
                        if failed
                        else {}
                    ),
                },
            ],
            "modelStatus": {
                "transitionStatus": "BlockedByFailedLoad"
                if failed
                else ("UpToDate" if st["ready"] == st["created"] else "InProgress"),
                "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "bundle.json missing"}
                if failed
                else None,
            },
        }
        if self.raw:
            # RawDeployment (KServe's PropagateRawStatus): latestCreatedRevision is the
            # Deployment's revision annotation, observedGeneration the Deployment's; no
            # latestReadyRevision and no traffic split are reported.
            status["deploymentMode"] = "RawDeployment"
            status["components"]["predictor"] = {"latestCreatedRevision": str(st["n"])}
        if obj.get("status") != status:
            self.api.patch_namespaced_custom_object_status(
                isvc.GROUP,
                isvc.ISVC_VERSION,
                NS,
                isvc.ISVC_PLURAL,
                obj["metadata"]["name"],
                {"status": status},
            )


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def served_bundle(tmp_path_factory) -> Path:
    """The bundle the local model server answers from (deploy it to pass the smoke check)."""
    return random_bundle(tmp_path_factory.mktemp("isvc") / "bundle", serve_config())


@pytest.fixture(scope="module")
def model_server(served_bundle):
    """A real local model server: where smoke inferences land."""
    root = served_bundle.parent
    result = deploy(
        serve_config(),
        served_bundle,
        backend="local",
        state_dir=root / "state",
        ready_timeout_s=240,
    )
    try:
        yield result["url"]
    finally:
        stop_local(result)


class Smoke:
    """The real smoke check, with a record of when and where it was called."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    def __call__(self, url: str) -> dict[str, Any]:
        self.calls.append((time.monotonic(), url))
        return smoke_check(url, MODEL, steps=2, timeout_s=60)


def desired(uri: str, **kw: Any) -> dict[str, Any]:
    return isvc.build_inference_service(
        isvc.PredictorSettings(name=NAME, namespace=NS, storage_uri=uri, **kw)
    )


def stored(api: KubeApi) -> dict[str, Any]:
    return kubernetes.client.CustomObjectsApi(
        api.client(INSPECTOR_UA)
    ).get_namespaced_custom_object(isvc.GROUP, isvc.ISVC_VERSION, NS, isvc.ISVC_PLURAL, NAME)


def rollout(api: KubeApi, timeout_s: float = 30.0) -> isvc.InferenceServiceRollout:
    return isvc.InferenceServiceRollout(api.client(ROLLOUT_UA), timeout_s=timeout_s, poll_s=0.05)


# --------------------------------------------------------------------------- builders


def test_every_emitted_object_passes_the_crd_schema_and_admission_rules():
    runtime_mode = desired(
        OLD_URI, gpus=1, min_replicas=1, max_replicas=3, timeout_s=900, bundle_digest="ab" * 32
    )
    custom = desired(
        OLD_URI, runtime=None, image="registry.local/brain-ldm-serving:1", model_name="brain-ldm-x"
    )
    canary = isvc.build_inference_service(
        isvc.PredictorSettings(name=NAME, namespace=NS, storage_uri=NEW_URI), canary_percent=10
    )
    runtime = isvc.build_serving_runtime(namespace=NS)
    for obj in (runtime_mode, custom, canary, runtime):
        crdcheck.validate(obj)

    pred = runtime_mode["spec"]["predictor"]
    assert pred["serviceAccountName"] == "serving" and pred["timeout"] == 900
    assert (pred["minReplicas"], pred["maxReplicas"]) == (1, 3)
    assert (
        pred["model"]["modelFormat"]["name"] == "brain-ldm"
        and pred["model"]["runtime"] == "brain-ldm"
    )
    assert pred["model"]["storageUri"] == OLD_URI
    assert pred["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": isvc.BUNDLE_DIGEST_ENV, "value": "ab" * 32} in pred["model"]["env"]
    assert "args" not in pred["model"]  # the default model name needs no extra args
    assert runtime_mode["metadata"]["annotations"]["serving.kserve.io/enable-tag-routing"] == "true"
    container = custom["spec"]["predictor"]["containers"][0]
    assert container["name"] == "kserve-container"
    assert {"name": "STORAGE_URI", "value": OLD_URI} in container["env"]
    assert container["args"][container["args"].index("--model-name") + 1] == "brain-ldm-x"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10

    with pytest.raises(crdcheck.InvalidResource):  # the validator does catch bad objects
        crdcheck.validate(desired(OLD_URI, min_replicas=3, max_replicas=1))


def test_the_predictor_identity_in_manifests_finds_s3_and_carries_no_credentials():
    """The predictor runs as PredictorSettings' default ServiceAccount; the manifests ship it
    listing the S3 secret whose serving.kserve.io/s3-* annotations tell KServe's storage
    initializer where the bundle is, and the secret's template holds placeholders only."""
    base = Path(__file__).parents[1] / "manifests" / "base"
    secret = yaml.safe_load((base / "s3-secret.template.yaml").read_text())
    accounts = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all((base / "serviceaccounts.yaml").read_text())
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
    sa = accounts[isvc.DEFAULT_SERVICE_ACCOUNT]
    assert sa["secrets"] == [{"name": secret["metadata"]["name"]}]
    assert sa["automountServiceAccountToken"] is False


def test_runtime_builder_agrees_with_the_checked_in_manifest():
    manifest = Path(__file__).parents[1] / "manifests" / "base" / "servingruntime.yaml"
    if not manifest.exists():
        pytest.skip("manifests/base/servingruntime.yaml not present")
    shipped = yaml.safe_load(manifest.read_text())
    built = isvc.build_serving_runtime()
    assert built["metadata"]["name"] == shipped["metadata"]["name"]
    assert (
        built["spec"]["supportedModelFormats"][0]["name"]
        == shipped["spec"]["supportedModelFormats"][0]["name"]
    )
    a, b = built["spec"]["containers"][0], shipped["spec"]["containers"][0]
    for key in ("name", "image", "command", "args", "ports", "readinessProbe"):
        assert a[key] == b[key], key


# --------------------------------------------------------------------------- rollout


def test_first_deploy_creates_waits_and_smokes(api, model_server):
    smoke = Smoke()
    with FakeKServe(api, latest_url=model_server, address_url=model_server) as kserve:
        result = rollout(api).rollout(desired(OLD_URI), smoke)
    assert result["action"] == "created" and result["revision"] == f"{NAME}-predictor-00001"
    assert result["url"] == model_server and result["smoke"]["shape"] == [1, 1, 16, 16, 16]
    assert len(smoke.calls) == 1 and smoke.calls[0][0] >= kserve.ready_at[result["revision"]]
    obj = stored(api)
    crdcheck.validate(obj)
    assert obj["spec"]["predictor"]["model"]["storageUri"] == OLD_URI


def test_update_goes_through_a_canary_then_promotes(api, model_server):
    smoke = Smoke()
    with FakeKServe(api, latest_url=model_server, address_url=model_server) as kserve:
        rollout(api).rollout(desired(OLD_URI), smoke)
        # From here on only the new revision's own URL answers: a smoke inference sent
        # anywhere else (the service address, the previous revision) fails.
        kserve.address_url = _closed_url()
        result = rollout(api).rollout(desired(NEW_URI), smoke, canary_percent=20)
    assert result["action"] == "updated" and result["canary_percent"] == 20
    assert (result["previous_revision"], result["revision"]) == (
        f"{NAME}-predictor-00001",
        f"{NAME}-predictor-00002",
    )
    assert kserve.canaries_seen == [20]
    # The smoke inference waited for the NEW revision, not the stale Ready of the old one.
    assert smoke.calls[-1][0] >= kserve.ready_at[result["revision"]]
    assert smoke.calls[-1][1] == model_server
    obj = stored(api)
    crdcheck.validate(obj)
    pred = obj["spec"]["predictor"]
    assert "canaryTrafficPercent" not in pred and pred["model"]["storageUri"] == NEW_URI
    traffic = obj["status"]["components"]["predictor"]["traffic"]
    assert [(t["revisionName"], t["percent"]) for t in traffic] == [(result["revision"], 100)]


@pytest.mark.parametrize("child_ahead", [1, -1], ids=["child-ahead", "child-behind"])
def test_the_child_generation_counter_proves_nothing_the_new_revision_does(
    api, model_server, child_ahead
):
    """KServe's observedGeneration is the Knative Service's: one ahead, it already equals the
    patched generation while status still shows the old revision; one behind, it never
    catches up. Either way the rollout waits for, smoke-tests and promotes the new revision."""
    smoke = Smoke()
    kserve = FakeKServe(
        api, latest_url=model_server, address_url=model_server, child_ahead=child_ahead
    )
    with kserve:
        rollout(api).rollout(desired(OLD_URI), smoke)
        kserve.notice_after_s = 1.0
        result = rollout(api).rollout(desired(NEW_URI), smoke, canary_percent=20)
    assert result["revision"] == f"{NAME}-predictor-00002"
    assert smoke.calls[-1][0] >= kserve.ready_at[result["revision"]]
    status = stored(api)["status"]
    assert status["observedGeneration"] != stored(api)["metadata"].get("generation", -5)
    traffic = status["components"]["predictor"]["traffic"]
    assert [(t["revisionName"], t["percent"]) for t in traffic] == [(result["revision"], 100)]


def test_an_unreconciled_spec_is_never_smoke_tested_on_the_old_revision(api, model_server):
    """Child counter one ahead and KServe never reconciles the new spec: observedGeneration
    matches, the old revision is Ready, and still the rollout must not call that success."""
    smoke = Smoke()
    with FakeKServe(api, latest_url=model_server, address_url=model_server, child_ahead=1) as ks:
        rollout(api).rollout(desired(OLD_URI), smoke)
        ks.notice_after_s = 3600.0
        with pytest.raises(isvc.RolloutTimeout, match="a new predictor revision") as info:
            rollout(api, timeout_s=1.5).rollout(desired(NEW_URI), smoke)
    assert "rolled back" in str(info.value)
    assert len(smoke.calls) == 1  # only the first deploy's
    assert stored(api)["spec"]["predictor"]["model"]["storageUri"] == OLD_URI


def test_raw_deployment_mode_reports_no_ready_revision_and_still_deploys(api, model_server):
    """In RawDeployment mode KServe reports only the Deployment's revision number: a rollout
    that waited for latestReadyRevision would wait forever."""
    smoke = Smoke()
    kserve = FakeKServe(api, latest_url=model_server, address_url=model_server, raw=True)
    with kserve:
        result = rollout(api).rollout(desired(OLD_URI), smoke)
    assert result["action"] == "created" and result["revision"] == "1"
    assert smoke.calls[-1][0] >= kserve.ready_at[f"{NAME}-predictor-00001"]


def test_failed_revision_is_rolled_back_with_the_reason(api, model_server):
    smoke = Smoke()
    with FakeKServe(api, latest_url=model_server, address_url=model_server):
        rollout(api).rollout(desired(OLD_URI), smoke)
        with pytest.raises(isvc.RolloutFailed) as info:
            rollout(api).rollout(desired(BAD_URI), smoke)
    message = str(info.value)
    assert "BlockedByFailedLoad" in message and "bundle.json missing" in message
    assert "rolled back" in message and f"{NAME}-predictor-00001" in message
    assert len(smoke.calls) == 1  # never smoke-tested the failed revision
    pred = stored(api)["spec"]["predictor"]
    assert pred["model"]["storageUri"] == OLD_URI and "canaryTrafficPercent" not in pred


def test_timeout_names_what_it_waited_for_and_rolls_back(api, model_server):
    smoke = Smoke()
    with FakeKServe(api, latest_url=model_server, address_url=model_server):
        rollout(api).rollout(desired(OLD_URI), smoke)
        with pytest.raises(isvc.RolloutTimeout) as info:
            rollout(api, timeout_s=2.0).rollout(desired(STUCK_URI), smoke)
    message = str(info.value)
    assert "not done after 2 s" in message and "still waiting for latestReadyRevision" in message
    assert "rolled back" in message
    assert stored(api)["spec"]["predictor"]["model"]["storageUri"] == OLD_URI


def test_first_deploy_timeout_is_reported_and_left_for_inspection(plain_api, model_server):
    with FakeKServe(plain_api, latest_url=model_server, address_url=model_server):
        with pytest.raises(
            isvc.RolloutTimeout,
            match="first revision ready not done after 1.5 s; still waiting for latestReadyRevision",
        ):
            rollout(plain_api, timeout_s=1.5).rollout(desired(STUCK_URI), Smoke())
    assert stored(plain_api)["spec"]["predictor"]["model"]["storageUri"] == STUCK_URI


def test_failed_smoke_inference_rolls_back(plain_api, model_server):
    smoke = Smoke()
    with FakeKServe(plain_api, latest_url=model_server, address_url=model_server):
        rollout(plain_api).rollout(desired(OLD_URI), smoke)
        dead = _closed_url()
        with pytest.raises(
            isvc.RolloutFailed, match=f"smoke inference through {dead} failed.*rolled back"
        ):
            rollout(plain_api).rollout(desired(NEW_URI), smoke, url_override=dead)
    assert stored(plain_api)["spec"]["predictor"]["model"]["storageUri"] == OLD_URI


def test_unchanged_spec_only_smokes(plain_api, model_server):
    smoke = Smoke()
    with FakeKServe(plain_api, latest_url=model_server, address_url=model_server) as kserve:
        rollout(plain_api).rollout(desired(OLD_URI), smoke)
        result = rollout(plain_api).rollout(desired(OLD_URI), smoke)
    assert result["action"] == "unchanged" and len(smoke.calls) == 2
    assert list(kserve.revision_uri) == [f"{NAME}-predictor-00001"]  # no new revision made


def test_deploy_kserve_uploads_the_bundle_and_rolls_out(
    monkeypatch, plain_api, model_server, served_bundle
):
    from tests.harness.s3 import make_bucket, raw_client, s3_env, s3_server

    cfg = serve_config(f"cluster.namespace={NS}")
    bundle = served_bundle  # the smoke check holds the answer to the deployed bundle's digest
    host = plain_api.url
    with s3_server() as endpoint:
        s3_env(monkeypatch, endpoint)
        bucket = make_bucket(endpoint)
        with FakeKServe(plain_api, latest_url=model_server, address_url=model_server):
            result = deploy(
                cfg,
                bundle,
                backend="kserve",
                storage_prefix=f"s3://{bucket}/bundles",
                api_host=host,
                timeout_s=30,
                poll_s=0.05,
                smoke_url=model_server,
                create_runtime=True,
            )
            again = deploy_kserve(
                cfg,
                bundle,
                storage_prefix=f"s3://{bucket}/bundles",
                api_host=host,
                timeout_s=30,
                poll_s=0.05,
                smoke_url=model_server,
            )
        keys = {o.object_name for o in raw_client(endpoint).list_objects(bucket, recursive=True)}
    digest = result["bundle_sha256"]
    assert result["storage_uri"] == f"s3://{bucket}/bundles/{MODEL}/{digest[:16]}"
    prefix = f"bundles/{MODEL}/{digest[:16]}/"
    assert {prefix + f for f in ("bundle.json", "config.yaml", "autoencoder.pt", "unet.pt")} <= keys
    assert result["action"] == "created" and result["smoke"]["ok"]
    assert result["infer_url"] == f"{model_server}/v2/models/{MODEL}/infer"
    assert again["action"] == "unchanged"  # same bundle, same URI: nothing to roll out
    obj = stored(plain_api)
    crdcheck.validate(obj)
    model = obj["spec"]["predictor"]["model"]
    assert model["storageUri"] == result["storage_uri"]
    assert {"name": isvc.BUNDLE_DIGEST_ENV, "value": digest} in model["env"]
    inspector = kubernetes.client.CustomObjectsApi(plain_api.client(INSPECTOR_UA))
    runtime = inspector.get_namespaced_custom_object(
        isvc.GROUP, isvc.RUNTIME_VERSION, NS, isvc.RUNTIME_PLURAL, model["runtime"]
    )
    crdcheck.validate(runtime)
    assert runtime["spec"]["supportedModelFormats"][0]["name"] == model["modelFormat"]["name"]


def test_a_canary_left_by_an_interrupted_rollout_is_verified_and_promoted(api, model_server):
    smoke = Smoke()
    with FakeKServe(api, latest_url=model_server, address_url=model_server) as kserve:
        rollout(api).rollout(desired(OLD_URI), smoke)
        # A deploy step killed mid-rollout: new spec at 30% canary, never promoted.
        left = desired(NEW_URI)["spec"]["predictor"]
        patch = isvc.merge_patch(
            stored(api)["spec"]["predictor"], {**left, "canaryTrafficPercent": 30}
        )
        interrupted = kubernetes.client.CustomObjectsApi(api.client(INTERRUPTED_UA))
        interrupted.patch_namespaced_custom_object(
            isvc.GROUP,
            isvc.ISVC_VERSION,
            NS,
            isvc.ISVC_PLURAL,
            NAME,
            {"spec": {"predictor": patch}},
        )
        deadline = time.monotonic() + 20
        while f"{NAME}-predictor-00002" not in kserve.ready_at:
            assert time.monotonic() < deadline, "fake controller never made the canary ready"
            time.sleep(0.05)
        result = rollout(api).rollout(desired(NEW_URI), smoke)
    assert result["action"] == "promoted" and result["canary_percent"] == 30
    assert smoke.calls[-1][1] == model_server
    obj = stored(api)
    assert "canaryTrafficPercent" not in obj["spec"]["predictor"]
    assert [t["percent"] for t in obj["status"]["components"]["predictor"]["traffic"]] == [100]


def test_kube_client_from_kubeconfig_and_explicit_host(tmp_path, monkeypatch):
    from ldm_core.kube.client import KubeConfigError, current_namespace

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "lab",
                "clusters": [{"name": "lab", "cluster": {"server": "http://127.0.0.1:6443"}}],
                "users": [{"name": "me", "user": {"token": "t0ken"}}],
                "contexts": [
                    {
                        "name": "lab",
                        "context": {"cluster": "lab", "user": "me", "namespace": "team-a"},
                    }
                ],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    client = api_client()
    assert client.configuration.host == "http://127.0.0.1:6443"
    assert client.configuration.get_api_key_with_prefix("authorization") == "Bearer t0ken"
    assert current_namespace() == "team-a"
    explicit = api_client("http://127.0.0.1:8001/", token="other")
    assert explicit.configuration.host == "http://127.0.0.1:8001"
    assert explicit.configuration.get_api_key_with_prefix("authorization") == "Bearer other"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(KubeConfigError, match="pass an explicit API host"):
        api_client()
    assert current_namespace(default="fallback") == "fallback"


def test_forbidden_create_names_the_missing_rbac(plain_api):
    """A refusal reads as the PyTorchJob launcher's: verb, resource, namespace, Role."""
    path = f"/apis/{isvc.GROUP}/{isvc.ISVC_VERSION}/namespaces/{NS}/{isvc.ISVC_PLURAL}"
    plain_api.emulator["post", path] << 403
    with pytest.raises(isvc.RolloutError) as err:
        rollout(plain_api).rollout(desired(OLD_URI), Smoke())
    message = str(err.value)
    assert f"create inferenceservices.serving.kserve.io {NS}/{NAME}" in message
    assert "refused (403" in message and "service account needs the Role" in message
    assert "brain-ldm-pipeline-runner (manifests/base/rbac.yaml)" in message
    assert f"allow 'create' on inferenceservices.serving.kserve.io in namespace {NS}" in message


def test_unreachable_api_is_a_rollout_error_naming_the_host():
    closed = _closed_url()
    with pytest.raises(isvc.RolloutError, match=f"Kubernetes API at {closed} unreachable"):
        isvc.InferenceServiceRollout(api_client(closed)).rollout(desired(OLD_URI), Smoke())


def test_waiting_runs_on_the_injected_clock(plain_api):
    """Fifteen minutes of a revision that never gets ready, in no real time."""
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    slow = isvc.InferenceServiceRollout(
        plain_api.client(ROLLOUT_UA), timeout_s=900, poll_s=60, clock=lambda: now[0], sleep=sleep
    )
    t0 = time.monotonic()
    with pytest.raises(isvc.RolloutTimeout, match="not done after 900 s"):
        slow.rollout(desired(STUCK_URI), Smoke())  # no controller: no status ever
    assert time.monotonic() - t0 < 20 and now[0] >= 900
