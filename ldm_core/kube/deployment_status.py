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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
PREDICTOR_SUFFIX = "-predictor"
"""KServe names the predictor's Deployment (and Service) ``<isvc name>-predictor``."""
RBAC_RULES: list[tuple[str, str, tuple[str, ...]]] = [("apps", "deployments", ("get",))]
_FAILED_CONDITIONS = {
    # (type, status): why it fails for good
    ("Progressing", "False"): "ProgressDeadlineExceeded",
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


def revision(deployment: Mapping[str, Any] | None) -> str | None:
    """The Deployment's rollout revision (None before the controller set one)."""
    annotations = ((deployment or {}).get("metadata") or {}).get("annotations") or {}
    value = annotations.get(REVISION_ANNOTATION)
    return str(value) if value is not None else None


def _failed(status: Mapping[str, Any]) -> str | None:
    for cond in status.get("conditions") or []:
        key = (cond.get("type"), cond.get("status"))
        if key in _FAILED_CONDITIONS:
            reason = _FAILED_CONDITIONS[key]
            if reason is None or cond.get("reason") == reason:
                return f"Deployment condition {key[0]}={key[1]} {cond.get('reason')}: {cond.get('message', '')}"
    return None


def deployment_progress(
    deployment: Mapping[str, Any] | None, previous_revision: str | None
) -> DeploymentProgress:
    """Where the Deployment's rollout of a pod template newer than ``previous_revision``
    stands (``previous_revision`` None: any template counts)."""
    if deployment is None:
        return DeploymentProgress("waiting", "KServe to create the predictor's Deployment", None)
    rev = revision(deployment)
    if rev is None or rev == previous_revision:
        return DeploymentProgress(
            "waiting", f"a new Deployment revision (still {rev or 'unset'})", rev
        )
    meta, spec, status = (deployment.get(k) or {} for k in ("metadata", "spec", "status"))
    failure = _failed(status)
    if failure:
        return DeploymentProgress("failed", failure, rev)
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
