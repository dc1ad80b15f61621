"""Reading an InferenceService's status without a server: where a canary is reached, how
a RawDeployment's Deployment has rolled out, and which revision a promotion may accept.

The rollout's own tests (tests/test_isvc_rollout.py) drive these decisions through the
emulated API and KServe; here each is held on the statuses that decide it.
"""

from __future__ import annotations

import pytest

from ldm_core.config import load_config
from ldm_core.kube import isvc_build, isvc_status
from ldm_core.kube.deployment_status import (
    REVISION_ANNOTATION,
    SOURCE_URI_ANNOTATION,
    deployment_progress,
    startup_budget_s,
    template_differs,
)

NAME = "brain-ldm"


def _canary_status(route_url: str, tag_url: str, address: str | None) -> dict:
    predictor = {
        "url": route_url,
        "traffic": [
            {"tag": "prev", "url": tag_url.replace("latest", "prev")},
            {"tag": "latest", "url": tag_url},
        ],
    }
    if address:
        predictor["address"] = {"url": address}
    return {
        "metadata": {"name": "brain", "namespace": "team-a"},
        "status": {"components": {"predictor": predictor}},
    }


@pytest.mark.parametrize(
    ("route_url", "tag_url", "expected"),
    [
        # Knative's defaults: domain-template {{.Name}}.{{.Namespace}}.{{.Domain}}.
        (
            "http://brain-predictor.team-a.ml.example.org",
            "https://latest-brain-predictor.team-a.ml.example.org",
            "http://latest-brain-predictor.team-a.svc.corp.local",
        ),
        # {{.Name}}-{{.Namespace}}.{{.Domain}}: the first label is not the tag's name.
        (
            "http://brain-predictor-team-a.example.org",
            "http://latest-brain-predictor-team-a.example.org",
            "http://latest-brain-predictor.team-a.svc.corp.local",
        ),
        # A tag-template of {{.Name}}-{{.Tag}} under a template that puts the name second.
        (
            "http://team-a.brain-predictor.models.example.org",
            "http://team-a.brain-predictor-latest.models.example.org",
            "http://brain-predictor-latest.team-a.svc.corp.local",
        ),
        # A cluster-local route: the tag URL is already the cluster-local one.
        (
            "http://brain-predictor.team-a.svc.corp.local",
            "http://latest-brain-predictor.team-a.svc.corp.local",
            "http://latest-brain-predictor.team-a.svc.corp.local",
        ),
    ],
    ids=["default", "name-dash-namespace", "custom-tag-template", "cluster-local"],
)
def test_the_canary_address_is_read_from_what_knative_reports(route_url, tag_url, expected):
    """The tag's cluster-local Service is named by the tag-template; its external URL is the
    domain-template over that name. Both templates are the cluster's: the address comes
    from comparing the tag's URL with the route's, not from the URL's first label."""
    obj = _canary_status(route_url, tag_url, "http://brain-predictor.team-a.svc.corp.local")
    assert isvc_status.service_url(obj, canary=True) == expected
    # Not Ready yet (KServe copies the address only then), or no tag: no address to use.
    assert isvc_status.canary_url(_canary_status(route_url, tag_url, None)) is None
    obj["status"]["components"]["predictor"]["traffic"] = []
    assert isvc_status.canary_url(obj) is None


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (
            {
                "conditions": [
                    {
                        "type": "Progressing",
                        "status": "False",
                        "reason": "ProgressDeadlineExceeded",
                        "message": "timed out",
                    }
                ]
            },
            ("failed", "ProgressDeadlineExceeded: timed out"),
        ),
        (
            {
                "conditions": [
                    {
                        "type": "ReplicaFailure",
                        "status": "True",
                        "reason": "FailedCreate",
                        "message": "exceeded quota",
                    }
                ]
            },
            ("failed", "FailedCreate: exceeded quota"),
        ),
        ({"observedGeneration": 1}, ("waiting", "observe generation 2")),
        (
            {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 2},
            ("waiting", "1 old replicas to terminate"),
        ),
        (
            {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 0},
            ("waiting", "0 of 1 updated replicas available"),
        ),
        (
            {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1},
            ("ready", "ready"),
        ),
    ],
    ids=["deadline", "replica-failure", "unobserved", "old-pods", "unavailable", "rolled-out"],
)
def test_deployment_progress_reads_the_rollout_as_kubectl_rollout_status_does(status, expected):
    dep = {
        "metadata": {"generation": 2, "annotations": {REVISION_ANNOTATION: "3"}},
        "spec": {"replicas": 1},
        "status": status,
    }
    progress = deployment_progress(dep, "2")
    assert progress.phase == expected[0] and expected[1] in progress.detail
    assert progress.revision == "3"
    assert deployment_progress(dep, "3").detail == "a new Deployment revision (still 3)"


def test_promotion_refuses_a_revision_that_was_never_smoke_tested():
    """Someone changed the spec while the canary was being promoted: Knative created and
    readied a third revision and routed all traffic to it. The rollout smoke-tested 00002,
    so it must not report 00003 as promoted (fail at once, not wait out the timeout)."""
    smoked, sneaked_in = f"{NAME}-predictor-00002", f"{NAME}-predictor-00003"
    status = {
        "conditions": [{"type": "Ready", "status": "True"}],
        "components": {
            "predictor": {
                "latestCreatedRevision": sneaked_in,
                "latestReadyRevision": sneaked_in,
                "traffic": [{"revisionName": sneaked_in, "percent": 100, "latestRevision": True}],
            }
        },
    }
    state = isvc_status.promotion_state({"status": status}, smoked)
    assert state.phase == "failed" and "spec changed during the rollout" in state.detail
    # The smoke-tested revision with all the traffic is what promotion waits for.
    status["components"]["predictor"].update(
        latestCreatedRevision=smoked,
        latestReadyRevision=smoked,
        traffic=[{"revisionName": smoked, "percent": 100, "latestRevision": True}],
    )
    assert isvc_status.promotion_state({"status": status}, smoked).phase == "ready"


def test_the_pod_templates_resources_are_compared_as_quantities():
    """The API server stores quantities in canonical form (k8s.io/apimachinery resource.
    Quantity): what the predictor asked as 0.5 cpu and 1024Mi comes back as 500m and 1Gi,
    and is the same amount; another amount is not."""
    predictor = {
        "model": {
            "storageUri": "s3://b/m",
            "resources": {
                "requests": {"cpu": "0.5", "memory": "1024Mi"},
                "limits": {"cpu": "2000m", "memory": "1024Mi", "nvidia.com/gpu": "1"},
            },
        }
    }
    stored = {"requests": {"cpu": "500m", "memory": "1Gi"}}
    stored["limits"] = {"cpu": "2", "memory": "1Gi", "nvidia.com/gpu": "1"}

    def deployment(resources: dict) -> dict:
        container = {"name": "kserve-container", "resources": resources}
        template = {
            "metadata": {"annotations": {SOURCE_URI_ANNOTATION: "s3://b/m"}},
            "spec": {"containers": [container]},
        }
        return {"spec": {"template": template}}

    assert template_differs(deployment(stored), predictor) is None
    smaller = {**stored, "requests": {"cpu": "400m", "memory": "1Gi"}}
    assert "resources" in (template_differs(deployment(smaller), predictor) or "")
    no_gpu = {**stored, "limits": {"cpu": "2", "memory": "1Gi"}}
    assert "resources" in (template_differs(deployment(no_gpu), predictor) or "")


def test_a_deployment_past_kserves_deadline_still_starting_within_our_budget_is_awaited():
    """KServe fixes the predictor Deployment's progressDeadlineSeconds at 600; the Deployment
    controller then reports ProgressDeadlineExceeded and keeps rolling. Our pods may take
    serving.progress_deadline_s to start (their startup probe's budget): until that has
    passed the condition is not a failure."""
    dep = {
        "metadata": {"generation": 2, "annotations": {REVISION_ANNOTATION: "3"}},
        "spec": {"replicas": 1, "progressDeadlineSeconds": 600},
        "status": {
            "observedGeneration": 2,
            "replicas": 2,
            "updatedReplicas": 1,
            "availableReplicas": 1,
            "conditions": [
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
            ],
        },
    }
    patient = deployment_progress(dep, None, new_revision=False, deadline_counts=False)
    assert patient.phase == "waiting" and "ProgressDeadlineExceeded" in patient.detail
    assert deployment_progress(dep, None, new_revision=False).phase == "failed"
    cfg = load_config(
        overrides=["serving.deployment_mode=RawDeployment", "serving.progress_deadline_s=1800"]
    )
    isvc = isvc_build.build_inference_service(
        cfg, name=NAME, namespace="ns", storage_uri="s3://b/m"
    )
    assert startup_budget_s(isvc["spec"]["predictor"]) == 1800
    assert startup_budget_s({"model": {"storageUri": "s3://b/m"}}) is None
