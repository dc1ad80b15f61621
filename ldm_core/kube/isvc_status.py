"""Where an InferenceService's predictor stands, read from its status: pure functions over
the dicts the API returns, so the rollout's decisions are tested without a server.

"Ready" is only believed for the revision our write created: in Serverless mode the
predictor's ``latestCreatedRevision`` must be newer than the one before the write and equal
its ``latestReadyRevision``; in RawDeployment mode, where KServe reports no revision at all,
the Deployment's own rollout revision must be newer and fully rolled out
(:mod:`ldm_core.kube.deployment_status`). A Ready condition left over from the previous
revision is not success. ``status.observedGeneration`` is not used: KServe copies it from
the Knative Service or Deployment, whose counter is not the InferenceService's generation.

A revision that fails, or a Knative Configuration or Route that turns False, is read here as
failed with KServe's own message; so is a spec KServe makes no revision for at all
(``modelStatus.transitionStatus: InvalidSpec``, :func:`invalid_spec`). The deployment mode is the one KServe reports
(``status.deploymentMode``, else the ``serving.kserve.io/deploymentMode`` annotation).
Also here: where to send a smoke inference (the service's address, or a canary's own
cluster-local tag address, :func:`canary_url`) and whether traffic is pinned to one revision
(:func:`pinned_state`, for a roll back).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ldm_core.kube import deployment_status
from ldm_core.kube.isvc_build import DEPLOYMENT_MODE_ANNOTATION

RAW_MODES = ("RawDeployment", "Standard")
"""KServe's raw Kubernetes Deployment mode, by its old and its >= 0.15 name."""
CANARY_TAG = "latest"
"""Knative's traffic tag for the newest revision (KServe's tag routing)."""

_FAILED_TRANSITIONS = ("BlockedByFailedLoad", "InvalidSpec")
_FAILED_REASONS = ("RevisionFailed", "ProgressDeadlineExceeded")
_WATCHED_CONDITIONS = ("Ready", "PredictorReady")
_FALSE_MEANS_FAILED = (
    # Knative's ConfigurationsReady and RoutesReady, as KServe propagates them: False only
    # when the latest revision failed or its route cannot be programmed (Unknown while busy).
    "PredictorConfigurationReady",
    "LatestDeploymentReady",
    "PredictorRouteReady",
    "RoutesReady",
)


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def predictor_status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """``status.components.predictor``: KServe's copy of its child's revisions, traffic and
    addresses ({} before the first status)."""
    return ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}


def _failure(status: Mapping[str, Any]) -> str | None:
    """KServe's report that the latest revision failed, as a message; None if it has none."""
    model = status.get("modelStatus") or {}
    transition = model.get("transitionStatus")
    info = model.get("lastFailureInfo") or {}
    if transition in _FAILED_TRANSITIONS:
        detail = ": ".join(str(x) for x in (info.get("reason"), info.get("message")) if x)
        return f"modelStatus.transitionStatus={transition}" + (f" ({detail})" if detail else "")
    for kind in (*_FALSE_MEANS_FAILED, *_WATCHED_CONDITIONS):
        cond = _condition(status, kind)
        if not cond or cond.get("status") != "False":
            continue
        if kind in _FALSE_MEANS_FAILED or cond.get("reason") in _FAILED_REASONS:
            text = f"condition {kind}=False reason={cond.get('reason')}: {cond.get('message', '')}"
            return text.rstrip(": ")
    return None


def model_failure(obj: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(transitionStatus, reason, message) of KServe's ``modelStatus`` when it reports an
    invalid spec; None otherwise. Compared before and after a write, it tells a refusal of
    the new spec from one left over from the previous."""
    model = (obj.get("status") or {}).get("modelStatus") or {}
    if model.get("transitionStatus") != "InvalidSpec":
        return None
    info = model.get("lastFailureInfo") or {}
    return "InvalidSpec", str(info.get("reason") or ""), str(info.get("message") or "")


def invalid_spec(obj: Mapping[str, Any]) -> str | None:
    """KServe's refusal of the predictor spec, as a message, or None.

    When KServe cannot serve the spec at all (no such ServingRuntime: ``RuntimeNotRecognized``;
    one that does not take the model's format or protocol: ``NoSupportingRuntime``; a
    disabled one: ``RuntimeDisabled``; ``InvalidPredictorSpec``) it creates no revision and
    no Deployment: it sets ``modelStatus.transitionStatus: InvalidSpec`` with
    ``lastFailureInfo`` (kserve pkg/controller/v1beta1/inferenceservice/components/predictor.go,
    v0.14.1 lines 104-150, v0.15.2 lines 276-325, ``UpdateModelTransitionStatus``) and
    retries, so a wait for a revision would only time out.
    """
    failure = model_failure(obj)
    if failure is None:
        return None
    _, reason, message = failure
    detail = ": ".join(x for x in (reason, message) if x)
    return f"KServe refused the predictor spec: modelStatus.transitionStatus=InvalidSpec ({detail})"


def refusal_patterns(
    refused: tuple[str, str, str] | None, predictor: Mapping[str, Any]
) -> tuple[str, ...]:
    """Regular expressions for what KServe's Warning event says when it refuses
    ``predictor`` for the reason of ``refused`` (:func:`model_failure`): the error of the
    predictor reconciler, which names the runtime (predictor.go, v0.14.1 lines 104-150,
    v0.15.2 lines 276-325; utils.go ``GetServingRuntime``). An event of another reason, or
    about another runtime (an earlier spec's, retried), is not this spec's refusal."""
    reason = refused[1] if refused else ""
    runtime = (predictor.get("model") or {}).get("runtime")
    if runtime is None:
        auto = ("no runtime found to support predictor",)
        return auto if reason == "NoSupportingRuntime" else ()
    named = re.escape(runtime)
    patterns = {
        "RuntimeNotRecognized": f"No ServingRuntimes or ClusterServingRuntimes with the name: {named}$",
        "RuntimeDisabled": f"specified runtime {named} is disabled",
        "NoSupportingRuntime": f"specified runtime {named} does not support specified",
    }
    return (patterns[reason],) if reason in patterns else ()


@dataclass
class RevisionState:
    """One reading of the predictor: ``phase`` is "ready", "failed" or "waiting"; ``detail``
    says why, or what is awaited; ``revision`` is the revision it is about, once known."""

    phase: str
    detail: str
    revision: str | None = None


def is_raw(obj: Mapping[str, Any]) -> bool:
    """RawDeployment (``Standard``) mode, as KServe decides it: the mode it recorded in
    ``status.deploymentMode`` first, else the object's annotation. False when neither says
    (the cluster default is not known before KServe's first status)."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    mode = (obj.get("status") or {}).get("deploymentMode") or annotations.get(
        DEPLOYMENT_MODE_ANNOTATION
    )
    return mode in RAW_MODES


def deployment_mode(obj: Mapping[str, Any]) -> str:
    """The mode KServe runs ``obj`` in, for logs and the rollout's result."""
    return "RawDeployment" if is_raw(obj) else "Serverless"


def revision_state(obj: Mapping[str, Any], previous_revision: str | None) -> RevisionState:
    """Where the Serverless predictor revision for the spec we last wrote stands; ``detail``
    names what is awaited.

    ``status.observedGeneration`` proves nothing here: KServe copies it from its child (the
    Knative Service), whose counter is not the InferenceService's and runs ahead of or
    behind ``metadata.generation``. What does prove it is the revision: after a spec change
    the predictor's ``latestCreatedRevision`` must be a new one (not ``previous_revision``,
    what served before our write) and also the ``latestReadyRevision``; then the Ready
    condition counts.
    """
    status = obj.get("status") or {}
    pred = predictor_status(obj)
    created = pred.get("latestCreatedRevision")
    if created is None or created == previous_revision:
        return RevisionState(
            "waiting",
            f"a new predictor revision (latestCreatedRevision still {created or 'unset'})",
        )
    failure = _failure(status)
    if failure:
        return RevisionState("failed", failure, created)
    if pred.get("latestReadyRevision") != created:
        return RevisionState(
            "waiting",
            f"latestReadyRevision == latestCreatedRevision {created} (now {pred.get('latestReadyRevision')})",
            created,
        )
    return _ready_condition(status, created)


def _ready_condition(status: Mapping[str, Any], revision: str | None) -> RevisionState:
    ready = _condition(status, "Ready")
    if not ready or ready.get("status") != "True":
        why = (
            f"{ready.get('reason', '')} {ready.get('message', '')}".strip()
            if ready
            else "no Ready condition yet"
        )
        return RevisionState(
            "waiting", f"condition Ready=True (now: {why or ready.get('status')})", revision
        )
    return RevisionState("ready", "ready", revision)


def raw_revision_state(
    obj: Mapping[str, Any],
    deployment: Mapping[str, Any] | None,
    hpa: Mapping[str, Any] | None,
    predictor: Mapping[str, Any],
    metadata: Mapping[str, Mapping[str, str]] | None = None,
    *,
    deadline_counts: bool = True,
) -> RevisionState:
    """Where a RawDeployment predictor carrying out ``predictor`` and ``metadata`` (the
    spec, labels and annotations we wrote) stands: its Deployment's pod template must carry
    what they set and its HPA the spec's scaling (an update of scaling alone makes no new
    template, :mod:`ldm_core.kube.deployment_status`), the template must be rolled out by
    ``kubectl rollout status``'s rule, and then the InferenceService must be Ready. KServe's
    own failure reports (a crash-looping model, ProgressDeadlineExceeded) count once the
    Deployment carries the spec; the Deployment's ProgressDeadlineExceeded only with
    ``deadline_counts`` (once the pods' startup budget has passed,
    :data:`ldm_core.kube.deployment_status.DEADLINE_CONDITION`)."""
    awaited = deployment_status.template_differs(deployment, predictor, metadata)
    awaited = awaited or deployment_status.hpa_differs(hpa, predictor)
    if awaited:
        return RevisionState("waiting", awaited)
    progress = deployment_status.deployment_progress(
        deployment, None, new_revision=False, deadline_counts=deadline_counts
    )
    failure = _failure(obj.get("status") or {})
    if progress.phase == "failed" or failure:
        return RevisionState("failed", failure or progress.detail, progress.revision)
    if progress.phase == "waiting":
        return RevisionState("waiting", progress.detail, progress.revision)
    return _ready_condition(obj.get("status") or {}, progress.revision)


def promotion_state(obj: Mapping[str, Any], revision: str | None) -> RevisionState:
    """After dropping the canary: the revision that was smoke-tested takes all traffic.

    Dropping the canary changes traffic only, so no new revision may appear; one that does
    (someone else changed the spec meanwhile) was never smoke-tested and is not promoted.
    """
    state = revision_state(obj, None)
    if state.phase != "ready":
        return state
    if revision is not None and state.revision != revision:
        return RevisionState(
            "failed",
            f"latestCreatedRevision is {state.revision}, not the smoke-tested {revision}: "
            "the spec changed during the rollout",
            state.revision,
        )
    traffic = predictor_status(obj).get("traffic") or []
    full = [t for t in traffic if t.get("percent") == 100]
    if full and full[0].get("revisionName") in (revision, None):
        return state
    return RevisionState(
        "waiting", f"100% of traffic on revision {revision} (now {_split(traffic)})", revision
    )


def canary_split_state(obj: Mapping[str, Any], state: RevisionState, percent: int) -> RevisionState:
    """A canary the stored spec asks for (``percent``), seen through a ready ``state``: ready
    only once the status shows the latest revision, ``state.revision``, at ``percent``.

    Until KServe has reconciled a spec written moments ago (by a rollout that was then
    interrupted), the status still describes the revision before that write: ready, at
    100%, and never the canary. KServe writes the canary's split with the new revision, so
    the split tells the two apart.
    """
    traffic = predictor_status(obj).get("traffic") or []
    for target in traffic:
        if (
            target.get("latestRevision")
            and target.get("revisionName") == state.revision
            and target.get("percent") == percent
        ):
            return state
    return RevisionState(
        "waiting",
        f"the canary split: {percent}% to revision {state.revision} (now {_split(traffic)})",
        state.revision,
    )


def pinned_state(obj: Mapping[str, Any], revision: str | None) -> RevisionState:
    """After ``canaryTrafficPercent: 0``: ready once every request goes to ``revision`` (the
    traffic of its targets adds up to 100; KServe routes the rest, 0 %, to the latest
    ready revision under the ``latest`` tag)."""
    traffic = predictor_status(obj).get("traffic") or []
    held = sum(t.get("percent") or 0 for t in traffic if t.get("revisionName") == revision)
    if revision is not None and held == 100:
        return RevisionState("ready", f"all traffic on revision {revision}", revision)
    return RevisionState(
        "waiting", f"100% of traffic on revision {revision} (now {_split(traffic)})", revision
    )


def _split(traffic: list[Mapping[str, Any]]) -> str:
    """Traffic targets as ``revision=percent%`` for messages."""
    text = ", ".join(
        f"{t.get('revisionName') or t.get('tag')}={t.get('percent')}%" for t in traffic
    )
    return text or "none"


def _host(url: str | None) -> str:
    return (url or "").split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]


def _tagged_name(tag_host: str, route_host: str, route: str) -> str | None:
    """The tag's hostname inside ``tag_host``: Knative builds the route's host and the
    tag's from one ``domain-template``, with ``{{.Name}}`` the route's name and the
    tag-template's hostname respectively (knative/serving pkg/reconciler/route/domains/
    domains.go, v1.16). What surrounds ``route`` in the route's host surrounds the tag's
    hostname in the tag's host."""
    start = route_host.find(route)
    while start >= 0:
        prefix, suffix = route_host[:start], route_host[start + len(route) :]
        inner = len(tag_host) - len(prefix) - len(suffix)
        if inner > 0 and tag_host.startswith(prefix) and tag_host.endswith(suffix):
            return tag_host[len(prefix) : len(tag_host) - len(suffix)]
        start = route_host.find(route, start + 1)
    return None


def canary_url(obj: Mapping[str, Any]) -> str | None:
    """The cluster-local address of the newest revision's ``latest`` tag, or None.

    Knative gives a tagged traffic target two names: ``status.traffic[].url``, the external
    one (``domain-template`` over the tag's hostname; on Kubeflow behind the auth proxy, or
    not resolvable inside the cluster), and a cluster-local Service named by the tag's
    hostname (``tag-template``, default ``{{.Tag}}-{{.Name}}``) in the route's namespace
    (``MakeK8sPlaceholderService``, pkg/reconciler/route/resources/service.go). Nothing is
    assumed of either template: the hostname is what the tag's URL has where the route's
    own URL (``components.predictor.url``) has the route's name, and the route's name,
    namespace and cluster domain are those of its cluster-local address
    (``components.predictor.address``, the Knative Service's ``status.address.url``). A tag
    URL that is already cluster-local (a cluster-local route) is used as it is.
    """
    pred = predictor_status(obj)
    tagged = [t for t in pred.get("traffic") or [] if t.get("tag") == CANARY_TAG and t.get("url")]
    local = _host((pred.get("address") or {}).get("url"))
    if not tagged or not local:
        return None
    tag_host = _host(tagged[0]["url"])
    route, _, service_domain = local.partition(".")
    if tag_host.endswith(f".{service_domain}"):
        return f"http://{tag_host}"
    name = _tagged_name(tag_host, _host(pred.get("url")), route)
    return f"http://{name}.{service_domain}" if name else None


def service_url(obj: Mapping[str, Any], canary: bool = False) -> str | None:
    """Where to send a smoke inference: the canary's cluster-local tag address when
    checking a canary (it reaches the new revision only), else the InferenceService's
    cluster-local address, else its public URL."""
    if canary:
        return canary_url(obj)
    status = obj.get("status") or {}
    address = (status.get("address") or {}).get("url")
    return address or status.get("url") or predictor_status(obj).get("url")
