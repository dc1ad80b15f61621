"""Whether a RawDeployment-mode predictor's Deployment has rolled out the newest pod template.

In RawDeployment mode (KServe >= 0.15 calls it ``Standard``) KServe writes a plain
Deployment ``<isvc>-predictor`` and reports on the InferenceService only what
``PropagateRawStatus`` copies from it (kserve/kserve
pkg/apis/serving/v1beta1/inference_service_status.go): a ``PredictorReady`` condition from
the Deployment's Available / Progressing / ReplicaFailure conditions, the Deployment's
``observedGeneration``, and the URL once ready. There is no ``latestCreatedRevision``, no
``latestReadyRevision`` and no traffic: nothing on the InferenceService says which pod
template is ready. So the rollout reads the Deployment itself and applies the rule
``kubectl rollout status`` uses (kubectl/pkg/polymorphichelpers/rollout_status.go): the
controller has observed the latest spec (``status.observedGeneration >= metadata.generation``),
every replica is updated, no old replica is left, and every updated one is available.
The pod template's identity is the Deployment controller's ``deployment.kubernetes.io/revision``
annotation, which grows whenever a new template (or an old one again, on a roll back) is
rolled out.

Not every update makes a new template: KServe writes ``minReplicas``, ``maxReplicas``,
``scaleMetric`` and ``scaleTarget`` into an HPA ``<isvc>-predictor``
(reconcilers/hpa/hpa_reconciler.go ``createHPA``, v0.14.1 and v0.15.2) and leaves the
Deployment alone when only those change (deployment_reconciler.go ignores replicas in its
diff). So what proves an update was carried out is what it changes: the template's fields
the predictor sets (:func:`template_differs`) and the HPA's bounds and target
(:func:`hpa_differs`); then the rollout rule above, on whatever revision that is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import kubernetes
from kubernetes.utils import parse_quantity

from ldm_core.errors import LdmError
from ldm_core.kube.errors import ApiCall, call_api

REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
SOURCE_URI_ANNOTATION = "internal.serving.kserve.io/storage-initializer-sourceuri"
"""Where KServe tells the storage initializer the model's storageUri: an annotation on the
predictor's pod template (components/predictor.go, v0.15.2 line 264; v0.14.1 alike)."""
ANNOTATIONS_NOT_COPIED = (
    "autoscaling.knative.dev/min-scale",
    "autoscaling.knative.dev/max-scale",
    SOURCE_URI_ANNOTATION,
    "kubectl.kubernetes.io/last-applied-configuration",
)
"""KServe's ServiceAnnotationDisallowedList (pkg/constants/constants.go, v0.14.1 and v0.15.2):
every other annotation and every label of the InferenceService goes into the predictor's
pod template (components/predictor.go ``buildObjectMeta``), so a change of them alone
rolls out a new one."""
PREDICTOR_SUFFIX = "-predictor"
"""KServe names the predictor's Deployment (and Service) ``<isvc name>-predictor``."""
RBAC_RULES: list[tuple[str, str, tuple[str, ...]]] = [
    ("apps", "deployments", ("get",)),
    ("autoscaling", "horizontalpodautoscalers", ("get",)),
]
_POD_FIELDS = (
    "serviceAccountName",
    "nodeSelector",
    "tolerations",
    "priorityClassName",
    "imagePullSecrets",
    "terminationGracePeriodSeconds",
)
"""Pod-level predictor fields KServe copies into the Deployment's pod template as given."""
DEADLINE_CONDITION = ("Progressing", "False")
"""ProgressDeadlineExceeded: KServe fixes the predictor Deployment's progressDeadlineSeconds at
600 (deployment_reconciler.go ``setDefaultDeploymentSpec``, v0.14.1 lines 201-204, v0.15.2
alike), shorter than a GPU pod may take to start; the Deployment controller keeps rolling
after it, so it is a failure only once the pods' own startup budget has passed too."""
_FAILED_CONDITIONS = {
    # (type, status): why it fails for good
    DEADLINE_CONDITION: "ProgressDeadlineExceeded",
    ("ReplicaFailure", "True"): None,
}


class DeploymentProgress(NamedTuple):
    phase: str
    """"ready" | "failed" | "waiting"."""
    detail: str
    revision: str | None


def predictor_deployment(isvc_name: str) -> str:
    """The name of the Deployment KServe writes for an InferenceService's predictor."""
    return f"{isvc_name}{PREDICTOR_SUFFIX}"


def read(
    api_client: kubernetes.client.ApiClient,
    kind: str,
    namespace: str,
    isvc_name: str,
    error: type[LdmError],
) -> dict[str, Any] | None:
    """The predictor's ``kind`` ("deployment" or "hpa", both named
    ``<isvc>-predictor``) as the API returns it, or None while there is none."""
    name = predictor_deployment(isvc_name)
    if kind == "deployment":
        apps = kubernetes.client.AppsV1Api(api_client)
        call = ApiCall("get", "deployments.apps", namespace, name)
        send = lambda: apps.read_namespaced_deployment(name, namespace, _preload_content=False)  # noqa: E731
    else:
        scaling = kubernetes.client.AutoscalingV2Api(api_client)
        call = ApiCall("get", "horizontalpodautoscalers.autoscaling", namespace, name)
        send = lambda: scaling.read_namespaced_horizontal_pod_autoscaler(  # noqa: E731
            name, namespace, _preload_content=False
        )
    host = str(api_client.configuration.host)
    answer = call_api(call, send, host=host, error=error, absent_on=(404,))
    return None if answer is None else json.loads(answer.data)


def revision(deployment: Mapping[str, Any] | None) -> str | None:
    """The Deployment's rollout revision (None before the controller set one)."""
    annotations = ((deployment or {}).get("metadata") or {}).get("annotations") or {}
    value = annotations.get(REVISION_ANNOTATION)
    return str(value) if value is not None else None


def _failed(status: Mapping[str, Any], deadline_counts: bool) -> str | None:
    for cond in status.get("conditions") or []:
        key = (cond.get("type"), cond.get("status"))
        if key in _FAILED_CONDITIONS and (deadline_counts or key != DEADLINE_CONDITION):
            reason = _FAILED_CONDITIONS[key]
            if reason is None or cond.get("reason") == reason:
                return f"Deployment condition {key[0]}={key[1]} {cond.get('reason')}: {cond.get('message', '')}"
    return None


def startup_budget_s(predictor: Mapping[str, Any]) -> float | None:
    """How long the predictor's pods may take to start before the kubelet restarts them:
    the startup probe's initial delay plus ``failureThreshold`` x ``periodSeconds`` (its
    budget is ``serving.progress_deadline_s``, see ``isvc_build``); None without one."""
    container = predictor.get("model") or (predictor.get("containers") or [{}])[0]
    probe = container.get("startupProbe")
    if not probe:
        return None
    periods = probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)
    return float(probe.get("initialDelaySeconds", 0) + periods)


def _contains(actual: Any, expected: Any) -> bool:
    """``expected`` is in ``actual``: maps key by key, lists item by item (KServe and the
    API server add defaults and the runtime's entries beside ours)."""
    if isinstance(expected, Mapping):
        return isinstance(actual, Mapping) and all(
            _contains(actual.get(k), v) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return isinstance(actual, list) and all(
            any(_contains(a, e) for a in actual) for e in expected
        )
    return actual == expected or str(actual) == str(expected)


def _same_resources(actual: Any, expected: Mapping[str, Any]) -> bool:
    """The container's ``resources`` hold the amounts ``expected`` asks for, compared as
    quantities: the API server stores them in canonical form (0.5 as 500m, 1024Mi as 1Gi;
    k8s.io/apimachinery resource.Quantity), and KServe merges the runtime's keys beside
    ours."""
    actual = actual if isinstance(actual, Mapping) else {}
    for part, wanted in expected.items():
        held = actual.get(part) or {}
        if not isinstance(wanted, Mapping):
            if not _contains(held, wanted):
                return False
            continue
        for key, amount in wanted.items():
            if key not in held or parse_quantity(held[key]) != parse_quantity(amount):
                return False
    return True


def template_differs(
    deployment: Mapping[str, Any] | None,
    predictor: Mapping[str, Any],
    metadata: Mapping[str, Mapping[str, str]] | None = None,
) -> str | None:
    """What of the ``predictor`` spec and the InferenceService's ``metadata`` (labels and
    annotations) the Deployment's pod template does not carry yet (the kserve-container's
    image, args, env, resources, lifecycle; the pod's placement and grace; the labels and
    the annotations KServe copies), or None when it carries all of it."""
    if deployment is None:
        return "KServe to create the predictor's Deployment"
    template = (deployment.get("spec") or {}).get("template") or {}
    pod = template.get("spec") or {}
    uri = (predictor.get("model") or {}).get("storageUri")
    meta = template.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    if uri and annotations.get(SOURCE_URI_ANNOTATION) != uri:
        return f"the Deployment's pod template to load {uri}"
    for part, written in (metadata or {}).items():
        held = meta.get(part) or {}
        copied = {k: v for k, v in written.items() if k not in ANNOTATIONS_NOT_COPIED}
        if any(held.get(k) != v for k, v in copied.items()):
            return f"the Deployment's pod template to carry the InferenceService's {part}"
    containers = {c.get("name"): c for c in pod.get("containers") or []}
    served = containers.get("kserve-container") or {}
    want = predictor.get("model") or (predictor.get("containers") or [{}])[0]
    fields = ("image", "env", "resources", "lifecycle")
    expected = {k: want[k] for k in fields if k in want}
    for key, value in expected.items():
        same = _same_resources if key == "resources" else _contains
        if not same(served.get(key), value):
            return f"the Deployment's pod template to carry the predictor's {key}"
    args = list(want.get("args") or [])
    if args and (served.get("args") or [])[-len(args) :] != args:
        return "the Deployment's pod template to carry the predictor's args"
    for key in _POD_FIELDS:
        if key in predictor and not _contains(pod.get(key), predictor[key]):
            return f"the Deployment's pod template to carry the predictor's {key}"
    return None


def hpa_differs(hpa: Mapping[str, Any] | None, predictor: Mapping[str, Any]) -> str | None:
    """What of the predictor's scaling the HPA does not say yet, or None: its replica bounds
    as createHPA derives them (min at least 1, max at least min) and a resource metric
    ``scaleMetric`` at ``scaleTarget`` % utilisation."""
    low = max(1, predictor.get("minReplicas", 1))
    high = max(predictor.get("maxReplicas", 0), low)
    if hpa is None:
        return "KServe to create the predictor's HorizontalPodAutoscaler"
    spec = hpa.get("spec") or {}
    if (spec.get("minReplicas"), spec.get("maxReplicas")) != (low, high):
        return (
            f"the HPA's replicas {low}..{high} (now {spec.get('minReplicas')}.."
            f"{spec.get('maxReplicas')})"
        )
    metric, target = predictor.get("scaleMetric"), predictor.get("scaleTarget")
    if metric is None:
        return None
    resources = {
        (m.get("resource") or {}).get("name"): (m.get("resource") or {}).get("target") or {}
        for m in spec.get("metrics") or []
    }
    if metric not in resources or (
        target is not None and resources[metric].get("averageUtilization") != target
    ):
        return f"the HPA's target of {target} % {metric}"
    return None


def deployment_progress(
    deployment: Mapping[str, Any] | None,
    previous_revision: str | None,
    *,
    new_revision: bool = True,
    deadline_counts: bool = True,
) -> DeploymentProgress:
    """Where the Deployment's rollout stands: of a pod template newer than
    ``previous_revision`` (``previous_revision`` None, or ``new_revision`` False: of the
    template it has now). ``deadline_counts`` False: a ProgressDeadlineExceeded is only
    noted (:data:`DEADLINE_CONDITION`)."""
    if deployment is None:
        return DeploymentProgress("waiting", "KServe to create the predictor's Deployment", None)
    rev = revision(deployment)
    if rev is None or (new_revision and rev == previous_revision):
        return DeploymentProgress(
            "waiting", f"a new Deployment revision (still {rev or 'unset'})", rev
        )
    meta, spec, status = (deployment.get(k) or {} for k in ("metadata", "spec", "status"))
    failure = _failed(status, deadline_counts)
    if failure:
        return DeploymentProgress("failed", failure, rev)
    progress = _rollout_progress(meta, spec, status, rev)
    if progress.phase == "waiting" and _failed(status, True):
        late = "; past the Deployment's progressDeadlineSeconds, within the pods' startup budget"
        return progress._replace(detail=f"{progress.detail} (ProgressDeadlineExceeded{late})")
    return progress


def _rollout_progress(
    meta: Mapping[str, Any], spec: Mapping[str, Any], status: Mapping[str, Any], rev: str | None
) -> DeploymentProgress:
    """``kubectl rollout status``'s rule over a Deployment that reports no failure."""
    generation, observed = meta.get("generation", 0), status.get("observedGeneration", -1)
    if observed < generation:
        return DeploymentProgress(
            "waiting", f"the Deployment controller to observe generation {generation}", rev
        )
    wanted = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < wanted:
        return DeploymentProgress("waiting", f"{updated} of {wanted} replicas updated", rev)
    if status.get("replicas", 0) > updated:
        left = status.get("replicas", 0) - updated
        return DeploymentProgress("waiting", f"{left} old replicas to terminate", rev)
    if available < updated:
        return DeploymentProgress(
            "waiting", f"{available} of {updated} updated replicas available", rev
        )
    return DeploymentProgress("ready", "ready", rev)
