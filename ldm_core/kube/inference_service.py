"""KServe InferenceService for a model bundle: object builders and a safe rollout.

Builders return plain dicts (what ``kubectl apply`` would take), so tests validate them
against the real CRD schema and the manifests can be compared with them.

The rollout is a small state machine over the Kubernetes API, in the deployment mode KServe
reports (``status.deploymentMode``, else the ``serving.kserve.io/deploymentMode``
annotation):

    absent  -> create -> wait for the revision -> smoke inference -> done
    Serverless (Knative), present -> patch the predictor with ``canaryTrafficPercent`` ->
               wait for the NEW revision -> smoke inference through the canary's own
               cluster-local tag address -> promote (drop the canary, 100%) or, on failure
               or timeout, roll back (restore the previous predictor spec)
    RawDeployment (``Standard``), present -> no canary (a Deployment has no traffic split):
               patch -> wait until the Deployment rolled out the new pod template -> smoke
               inference through the predictor's Service -> done, or roll back by
               re-applying the previous predictor spec

"Ready" is only believed for the revision our write created: in Serverless mode the
predictor's ``latestCreatedRevision`` must be newer than the one before the write and equal
its ``latestReadyRevision``; in RawDeployment mode, where KServe reports no revision at all,
the Deployment's own rollout revision must be newer and fully rolled out
(:mod:`ldm_core.kube.deployment_status`). A Ready condition left over from the previous
revision is not success. ``status.observedGeneration`` is not used: KServe copies it from
the Knative Service or Deployment, whose counter is not the InferenceService's generation.
The revision promoted is the one smoke-tested, or the rollout fails.

A revision that fails, a Knative Configuration or Route that turns False, or a webhook that
refuses what KServe writes (a Warning event on the InferenceService, see
:mod:`ldm_core.kube.knative`) ends the wait at once with that message. Before an update in
Serverless mode, Knative's podspec feature flags are read (when RBAC allows) and a spec
that needs one that is off is warned about up front.

Only JSON merge patches are sent (no PUT, no resourceVersion), and a create's response body
is never relied on, so the code works against API servers with partial bookkeeping. API
calls go through :class:`ldm_core.kube.resources.CustomObjects`, so a refusal names the
missing RBAC grant as the PyTorchJob launcher's do; the clock and sleep are injected.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes

from ldm_core.config import Config
from ldm_core.errors import LdmError
from ldm_core.kube import deployment_status, knative
from ldm_core.kube.errors import ApiCall, call_api
from ldm_core.kube.resources import CustomObjects, CustomResource
from ldm_core.kube.security import container_security_context, pod_security_context

log = logging.getLogger(__name__)

GROUP = "serving.kserve.io"
ISVC_VERSION = "v1beta1"
ISVC_PLURAL = "inferenceservices"
RUNTIME_VERSION = "v1alpha1"
RUNTIME_PLURAL = "servingruntimes"
ISVC = CustomResource(GROUP, ISVC_VERSION, ISVC_PLURAL, "InferenceService")
RUNTIME = CustomResource(GROUP, RUNTIME_VERSION, RUNTIME_PLURAL, "ServingRuntime")
MODEL_FORMAT = "brain-ldm"
DEFAULT_IMAGE = "brain-ldm-serving:0.1.0"
DEFAULT_RUNTIME = "brain-ldm"
DEFAULT_SERVICE_ACCOUNT = "serving"
DEFAULT_MODEL_NAME = "brain-ldm"
MODEL_DIR = "/mnt/models"
HTTP_PORT = 8080
LABELS = {"app.kubernetes.io/name": "brain-ldm", "app.kubernetes.io/part-of": "brain-ldm"}
BUNDLE_DIGEST_ENV = "LDM_BUNDLE_SHA256"
"""Set on the predictor so a new bundle always changes the pod template (a new revision),
even when it is uploaded to the same storageUri."""

RBAC_RULES: list[tuple[str, str, tuple[str, ...]]] = [
    (GROUP, ISVC_PLURAL, ("create", "get", "patch")),
    (GROUP, RUNTIME_PLURAL, ("create", "get")),
    *deployment_status.RBAC_RULES,
    ("", "events", ("list",)),
]
"""Every (apiGroup, resource, verbs) this module calls; the pipeline runner's Role in
manifests/ grants exactly the union of the kube modules' rules (tests/test_rbac.py), and
tests/test_inference_service.py holds the rollout's real requests to this list."""

DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
RAW_MODES = ("RawDeployment", "Standard")
"""KServe's raw Kubernetes Deployment mode, by its old and its >= 0.15 name."""
EVENTS_EVERY_S = 2.0
"""How often, at most, a wait lists the InferenceService's events for a webhook's refusal
(a list weighs more than a get, and KServe repeats the event on every retry anyway)."""
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


class RolloutError(LdmError):
    """The InferenceService did not become a verified, serving revision."""


class RolloutTimeout(RolloutError):
    """Waited longer than allowed; the message says for what."""


class RolloutFailed(RolloutError):
    """KServe reported the revision failed, or the smoke inference through it failed."""


# --------------------------------------------------------------------------- builders


@dataclass
class PredictorSettings:
    """What the deploy stage chooses for the predictor; everything else is derived.

    Built from the run's config with :meth:`from_config` (``cluster.predictor`` for the pod,
    ``serving`` for replicas, autoscaling and mode); the defaults here are for tests and
    hand-made objects.
    """

    name: str
    namespace: str
    storage_uri: str
    model_name: str = DEFAULT_MODEL_NAME
    runtime: str | None = DEFAULT_RUNTIME
    """ServingRuntime to use (model format ``brain-ldm``); None = a custom container."""
    image: str = DEFAULT_IMAGE
    """Image of the custom container (unused with a runtime: the runtime names it)."""
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    cpu: str = "2"
    memory: str = "8Gi"
    gpus: int = 0
    min_replicas: int = 1
    max_replicas: int = 1
    scale_metric: str = ""
    """concurrency | rps | cpu | memory; empty = KServe's default."""
    scale_target: int = 0
    """Target per replica of scale_metric; 0 = KServe's default."""
    container_concurrency: int = 0
    """Requests one replica takes at once (what its server generates at once:
    ``serving.max_concurrency`` loops of up to ``serving.max_batch_size`` requests); 0 =
    unlimited."""
    deployment_mode: str = ""
    """Serverless | RawDeployment; empty = the cluster's default (KServe's inferenceservice
    ConfigMap)."""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    priority_class: str = ""
    image_pull_secrets: list[str] = field(default_factory=list)
    timeout_s: int = 600
    """Predictor request timeout (the ingress's, above serving.request_timeout_s)."""
    bundle_digest: str = ""
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(
        cls, cfg: Config, *, name: str, namespace: str, storage_uri: str, bundle_digest: str
    ) -> PredictorSettings:
        """The predictor of ``cfg``: one replica sized by ``cluster.predictor``, as many as
        ``serving`` allows, each taking as many requests as its server generates at once
        (``serving.max_concurrency`` denoising loops, each a batch of up to
        ``serving.max_batch_size`` requests): fewer would starve the batching, more would
        queue in the pod where Knative's autoscaler cannot see them."""
        c, s = cfg.cluster, cfg.serving
        return cls(
            name=name,
            namespace=namespace,
            storage_uri=storage_uri,
            model_name=s.model_name,
            image=c.serving_image,
            service_account=c.serving_service_account,
            cpu=c.predictor.cpu,
            memory=c.predictor.memory,
            gpus=c.predictor.gpus,
            min_replicas=s.min_replicas,
            max_replicas=s.max_replicas,
            scale_metric=s.scale_metric,
            scale_target=s.scale_target,
            container_concurrency=s.max_concurrency * s.max_batch_size,
            deployment_mode=s.deployment_mode,
            node_selector=dict(c.node_selector),
            tolerations=[t.to_k8s() for t in c.tolerations],
            priority_class=c.priority_class,
            image_pull_secrets=list(c.image_pull_secrets),
            # The ingress waits a little longer than the server's own limit, so a slow
            # request gets the server's 504 with its reason rather than the gateway's.
            timeout_s=int(s.request_timeout_s) + 30,
            bundle_digest=bundle_digest,
        )


def _resources(s: PredictorSettings) -> dict[str, Any]:
    """Requests = limits for CPU and memory (Guaranteed QoS: a latency-bound server is not
    throttled below its request nor evicted first), plus the GPUs. These win over the
    ServingRuntime's container resources, key by key: KServe merges the predictor's
    container over the runtime's (strategic merge), so the config sizes the predictor and
    the manifests do not patch the runtime's resources."""
    cpu_memory = {"cpu": s.cpu, "memory": s.memory}
    limits: dict[str, Any] = dict(cpu_memory)
    if s.gpus:
        # Extended resources must have request == limit; giving the limit is enough.
        limits["nvidia.com/gpu"] = str(s.gpus)
    return {"requests": dict(cpu_memory), "limits": limits}


def _placement(s: PredictorSettings) -> dict[str, Any]:
    """Pod-level predictor fields: scheduling, pull secrets, and (RawDeployment only) the
    pod securityContext. Knative refuses a pod-level securityContext beyond its defaults
    unless the cluster enables ``kubernetes.podspec-securitycontext``; the container's own
    securityContext holds the same restrictions either way, and the predictor mounts no
    PVC (the bundle is copied to an emptyDir), so it needs no fsGroup in Serverless mode."""
    out: dict[str, Any] = {}
    if s.node_selector:
        out["nodeSelector"] = dict(s.node_selector)
    if s.tolerations:
        out["tolerations"] = [dict(t) for t in s.tolerations]
    if s.priority_class:
        out["priorityClassName"] = s.priority_class
    if s.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": n} for n in s.image_pull_secrets]
    if s.deployment_mode == "RawDeployment":
        out["securityContext"] = pod_security_context()
    return out


def _autoscaling(s: PredictorSettings) -> dict[str, Any]:
    out: dict[str, Any] = {"minReplicas": s.min_replicas, "maxReplicas": s.max_replicas}
    if s.scale_metric:
        out["scaleMetric"] = s.scale_metric
    if s.scale_target:
        out["scaleTarget"] = s.scale_target
    if s.container_concurrency:
        out["containerConcurrency"] = s.container_concurrency
    return out


def _env(s: PredictorSettings) -> list[dict[str, str]]:
    env = dict(s.env)
    if s.bundle_digest:
        env[BUNDLE_DIGEST_ENV] = s.bundle_digest
    return [{"name": k, "value": v} for k, v in sorted(env.items())]


def _probes() -> dict[str, Any]:
    return {
        # The server's readiness turns true only after the bundle loaded and warmed up.
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": HTTP_PORT},
            "initialDelaySeconds": 120,
            "periodSeconds": 20,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
    }


def _serve_args(model_name: str) -> list[str]:
    return ["--bundle", MODEL_DIR, "--http-port", str(HTTP_PORT), "--model-name", model_name]


def build_inference_service(
    s: PredictorSettings, canary_percent: int | None = None
) -> dict[str, Any]:
    """The InferenceService for a bundle at ``s.storage_uri``.

    With a runtime, the predictor names model format ``brain-ldm`` and KServe's storage
    initializer copies ``storageUri`` to /mnt/models using the S3 endpoint annotations of
    the secret attached to ``serviceAccountName``. Without one, a custom ``kserve-container``
    runs the same command and KServe reads the bundle location from its STORAGE_URI.
    """
    predictor: dict[str, Any] = {
        "serviceAccountName": s.service_account,
        **_autoscaling(s),
        "timeout": s.timeout_s,
        **_placement(s),
    }
    if canary_percent is not None:
        predictor["canaryTrafficPercent"] = canary_percent
    if s.runtime:
        model: dict[str, Any] = {
            "modelFormat": {"name": MODEL_FORMAT, "version": "1"},
            "runtime": s.runtime,
            "protocolVersion": "v2",
            "storageUri": s.storage_uri,
            "resources": _resources(s),
        }
        if s.model_name != DEFAULT_MODEL_NAME:
            # KServe appends these to the runtime's args; the default name needs none.
            model["args"] = ["--model-name", s.model_name]
        env = _env(s)
        if env:
            model["env"] = env
        predictor["model"] = model
    else:
        predictor["containers"] = [
            {
                "name": "kserve-container",
                "image": s.image,
                "command": ["python", "-m", "ldm_core.serve"],
                "args": _serve_args(s.model_name),
                "env": [{"name": "STORAGE_URI", "value": s.storage_uri}, *_env(s)],
                "ports": [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}],
                "resources": _resources(s),
                "securityContext": container_security_context(),
                **_probes(),
            }
        ]
    return {
        "apiVersion": f"{GROUP}/{ISVC_VERSION}",
        "kind": "InferenceService",
        "metadata": {
            "name": s.name,
            "namespace": s.namespace,
            "labels": {**LABELS, "app.kubernetes.io/component": "serving", **s.labels},
            "annotations": {
                # Gives the newest revision its own URL ("latest" tag), so the smoke
                # inference of a canary reaches the canary and not the old revision.
                "serving.kserve.io/enable-tag-routing": "true",
                "serving.kserve.io/enable-prometheus-scraping": "true",
                **_mode_annotation(s),
            },
        },
        "spec": {"predictor": predictor},
    }


def _mode_annotation(s: PredictorSettings) -> dict[str, str]:
    """The deployment mode annotation KServe reads (none: the cluster's default mode)."""
    return {"serving.kserve.io/deploymentMode": s.deployment_mode} if s.deployment_mode else {}


def build_serving_runtime(
    name: str = DEFAULT_RUNTIME, namespace: str | None = None, image: str = DEFAULT_IMAGE
) -> dict[str, Any]:
    """A ServingRuntime that serves the ``brain-ldm`` model format with ``ldm_core.serve``."""
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {**LABELS, "app.kubernetes.io/component": "serving"},
    }
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": f"{GROUP}/{RUNTIME_VERSION}",
        "kind": "ServingRuntime",
        "metadata": metadata,
        "spec": {
            "supportedModelFormats": [{"name": MODEL_FORMAT, "version": "1", "autoSelect": True}],
            "protocolVersions": ["v2", "v1"],
            "containers": [
                {
                    "name": "kserve-container",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python", "-m", "ldm_core.serve"],
                    "args": ["--bundle", MODEL_DIR, "--http-port", str(HTTP_PORT)],
                    "ports": [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}],
                    "env": [{"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"}],
                    "resources": {
                        "requests": {"cpu": "2", "memory": "8Gi"},
                        "limits": {"cpu": "4", "memory": "16Gi"},
                    },
                    "securityContext": container_security_context(),
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                    **_probes(),
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}],
        },
    }


# --------------------------------------------------------------------------- status reading


def merge_patch(current: Any, desired: Any) -> Any:
    """RFC 7386 merge patch turning ``current`` into ``desired`` (None deletes a key)."""
    if not isinstance(current, Mapping) or not isinstance(desired, Mapping):
        return copy.deepcopy(desired)
    patch: dict[str, Any] = {}
    for key in current.keys() - desired.keys():
        patch[key] = None
    for key, value in desired.items():
        if key not in current:
            patch[key] = copy.deepcopy(value)
        elif current[key] != value:
            patch[key] = merge_patch(current[key], value)
    return patch


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def _predictor_status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}


def _failure(status: Mapping[str, Any]) -> str | None:
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


@dataclass
class RevisionState:
    phase: str  # "ready" | "failed" | "waiting"
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
    pred = _predictor_status(obj)
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
    previous_revision: str | None,
) -> RevisionState:
    """Where a RawDeployment predictor stands: its Deployment must have rolled out a pod
    template newer than ``previous_revision`` (its rollout revision before our write), and
    then the InferenceService must be Ready. KServe's own failure reports (a crash-looping
    model, ProgressDeadlineExceeded) count once the new template is out."""
    progress = deployment_status.deployment_progress(deployment, previous_revision)
    if progress.revision is None or progress.revision == previous_revision:
        return RevisionState("waiting", progress.detail)
    failure = _failure(obj.get("status") or {})
    if progress.phase == "failed" or failure:
        return RevisionState("failed", failure or progress.detail, progress.revision)
    if progress.phase == "waiting":
        return RevisionState("waiting", progress.detail, progress.revision)
    return _ready_condition(obj.get("status") or {}, progress.revision)


def _promoted(obj: Mapping[str, Any], revision: str | None) -> RevisionState:
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
    traffic = _predictor_status(obj).get("traffic") or []
    full = [t for t in traffic if t.get("percent") == 100]
    if full and full[0].get("revisionName") in (revision, None):
        return state
    return RevisionState(
        "waiting", f"100% of traffic on revision {revision} (now {_split(traffic)})", revision
    )


def _canary_in_place(obj: Mapping[str, Any], state: RevisionState, percent: int) -> RevisionState:
    """A canary the stored spec asks for (``percent``), seen through a ready ``state``: ready
    only once the status shows the latest revision, ``state.revision``, at ``percent``.

    Until KServe has reconciled a spec written moments ago (by a rollout that was then
    interrupted), the status still describes the revision before that write: ready, at
    100%, and never the canary. KServe writes the canary's split with the new revision, so
    the split tells the two apart.
    """
    traffic = _predictor_status(obj).get("traffic") or []
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


def _split(traffic: list[Mapping[str, Any]]) -> str:
    """Traffic targets as ``revision=percent%`` for messages."""
    text = ", ".join(
        f"{t.get('revisionName') or t.get('tag')}={t.get('percent')}%" for t in traffic
    )
    return text or "none"


def _host(url: str | None) -> str:
    return (url or "").split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]


def canary_url(obj: Mapping[str, Any]) -> str | None:
    """The cluster-local address of the newest revision's ``latest`` tag, or None.

    Knative gives a tagged traffic target two names: ``status.traffic[].url`` is the
    external one (``http://latest-<isvc>-predictor.<ns>.<domain>``), which on Kubeflow sits
    behind the auth proxy or does not resolve inside the cluster; and a cluster-local
    Service ``<tag name>.<ns>.svc.<cluster domain>`` (an ExternalName to the local
    gateway). The tag name is the first label of the external host (Knative's
    ``tag-template``, default ``{{.Tag}}-{{.Name}}``); namespace and cluster domain come
    from the predictor's own cluster-local address, KServe's copy of the Knative
    Service's ``status.address.url``.
    """
    pred = _predictor_status(obj)
    tagged = [t for t in pred.get("traffic") or [] if t.get("tag") == CANARY_TAG and t.get("url")]
    meta = obj.get("metadata") or {}
    local = _host((pred.get("address") or {}).get("url")) or (
        f"{deployment_status.predictor_deployment(meta.get('name', ''))}."
        f"{meta.get('namespace', '')}.svc.cluster.local"
    )
    if not tagged:
        return None
    tag_name = _host(tagged[0]["url"]).split(".", 1)[0]
    return f"http://{tag_name}.{local.split('.', 1)[1]}"


def service_url(obj: Mapping[str, Any], canary: bool = False) -> str | None:
    """Where to send a smoke inference: the canary's cluster-local tag address when
    checking a canary (it reaches the new revision only), else the InferenceService's
    cluster-local address, else its public URL."""
    if canary:
        return canary_url(obj)
    status = obj.get("status") or {}
    address = (status.get("address") or {}).get("url")
    return address or status.get("url") or _predictor_status(obj).get("url")


# --------------------------------------------------------------------------- rollout


SmokeFn = Callable[[str], dict[str, Any]]


@dataclass(frozen=True)
class _Before:
    """What served before our write: the new revision must differ from these, and only
    events after ``written_at`` are about our write."""

    revision: str | None
    """Serverless: the predictor's latestCreatedRevision."""
    deployment_revision: str | None
    """RawDeployment: the predictor Deployment's rollout revision."""
    written_at: datetime


class InferenceServiceRollout:
    """Create or update one InferenceService and verify it serves before trusting it.

    Args:
        api_client: the API to use (see :func:`ldm_core.kube.client.api_client`).
        timeout_s: how long each wait (first revision, new revision, promotion) may take.
        poll_s: seconds between two reads of the InferenceService.
        clock: monotonic seconds, for deadlines (tests pass a fake one).
        sleep: waits between polls (tests pass one that advances their clock).
    """

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        timeout_s: float = 900.0,
        poll_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.api_client = api_client
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.clock = clock
        self.sleep = sleep
        self._advice: list[str] = []
        self._events_due = 0.0

    # ---- API calls (merge patches only; responses of create are not relied on)

    def _objects(self, resource: CustomResource, namespace: str) -> CustomObjects:
        return CustomObjects(self.api_client, resource, namespace, RolloutError)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The InferenceService as stored, or None when there is none of that name."""
        return self._objects(ISVC, namespace).get(name)

    def _create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self._objects(ISVC, obj["metadata"]["namespace"]).create(obj) or {}

    def _patch(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._objects(ISVC, namespace).patch(name, body)

    def _deployment(self, ns: str, name: str) -> dict[str, Any] | None:
        """The predictor's Deployment (RawDeployment mode), or None before KServe made it."""
        apps = kubernetes.client.AppsV1Api(self.api_client)
        dep = deployment_status.predictor_deployment(name)
        answer = call_api(
            ApiCall("get", "deployments.apps", ns, dep),
            lambda: apps.read_namespaced_deployment(dep, ns, _preload_content=False),
            host=str(self.api_client.configuration.host),
            error=RolloutError,
            absent_on=(404,),
        )
        return None if answer is None else json.loads(answer.data)

    def _refusal(self, ns: str, name: str, since: datetime) -> str | None:
        """A webhook's refusal of what KServe wrote for our spec, from the Warning events
        KServe records on the InferenceService (its status never shows it)."""
        core = kubernetes.client.CoreV1Api(self.api_client)
        events = call_api(
            ApiCall("list", "events", ns),
            lambda: core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}"),
            host=str(self.api_client.configuration.host),
            error=RolloutError,
        )
        return knative.reconcile_failure(events.items or [], name, since)

    def ensure_serving_runtime(self, runtime: dict[str, Any]) -> str:
        """Create the ServingRuntime if the namespace has none of that name (never overwrite
        one a platform engineer applied from manifests). Returns "created" or "exists"."""
        runtimes = self._objects(RUNTIME, runtime["metadata"]["namespace"])
        if runtimes.get(runtime["metadata"]["name"]) is not None:
            return "exists"
        runtimes.create(runtime)
        return "created"

    # ---- before writing

    def _knative_advice(
        self, desired: dict[str, Any], existing: dict[str, Any] | None
    ) -> list[str]:
        """Podspec feature flags the spec needs and Knative has off (Serverless mode only),
        logged as warnings before the write; [] when none, or when they cannot be read."""
        if is_raw(existing or desired):
            return []
        ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        predictor = desired["spec"]["predictor"]
        runtime_name = (predictor.get("model") or {}).get("runtime")
        runtime = self._objects(RUNTIME, ns).get(runtime_name) if runtime_name else None
        needed = knative.needed_flags(predictor, (runtime or {}).get("spec"))
        if not needed:
            return []
        features, source = knative.read_features(self.api_client)
        if features is None:
            log.info("Knative podspec feature flags not checked: %s", source)
            return []
        advice = knative.missing_flags(features, needed)
        for line in advice:
            log.warning("InferenceService %s/%s: %s", ns, name, line)
        return advice

    # ---- waiting

    def _before(self, obj: dict[str, Any] | None) -> _Before:
        """The identities our write must replace, read from ``obj`` (None: a first deploy)."""
        revision = deployment_revision = None
        if obj is not None:
            revision = _predictor_status(obj).get("latestCreatedRevision")
            if is_raw(obj):
                ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
                deployment_revision = deployment_status.revision(self._deployment(ns, name))
        # Event times have whole seconds: a margin keeps an event of this very second.
        now = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
        return _Before(revision, deployment_revision, now)

    def _state(self, obj: dict[str, Any], before: _Before) -> RevisionState:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if is_raw(obj):
            dep = self._deployment(ns, name)
            state = raw_revision_state(obj, dep, before.deployment_revision)
        else:
            state = revision_state(obj, before.revision)
        if state.phase == "waiting" and state.revision is None and self.clock() >= self._events_due:
            self._events_due = self.clock() + max(self.poll_s, EVENTS_EVERY_S)
            refused = self._refusal(ns, name, before.written_at)
            if refused:
                return RevisionState("failed", f"no new revision; KServe reported {refused}")
        return state

    def _wait(
        self, ns: str, name: str, check: Callable[[dict[str, Any]], RevisionState], what: str
    ) -> tuple[RevisionState, dict[str, Any]]:
        deadline = self.clock() + self.timeout_s
        state = RevisionState("waiting", "the InferenceService to exist")
        while True:
            obj = self.get(ns, name)
            if obj is not None:
                state = check(obj)
                if state.phase != "waiting":
                    return state, obj
            if self.clock() >= deadline:
                advice = "".join(f"; note: {line}" for line in self._advice)
                raise RolloutTimeout(
                    f"InferenceService {ns}/{name}: {what} not done after {self.timeout_s:g} s; "
                    f"still waiting for {state.detail}{advice}"
                )
            self.sleep(self.poll_s)

    # ---- the state machine

    def rollout(
        self,
        desired: dict[str, Any],
        smoke: SmokeFn,
        *,
        canary_percent: int | None = 10,
        url_override: str | None = None,
    ) -> dict[str, Any]:
        """Create or update ``desired`` (built without canaryTrafficPercent) and verify it.

        Returns a dict with ``action`` (created | updated | unchanged | promoted: the same
        spec was left as a canary by an interrupted rollout), ``url``, ``revision``,
        ``smoke`` (what ``smoke(url)`` returned), ``canary_percent`` (None in RawDeployment
        mode, which has no canary) and ``mode`` (Serverless | RawDeployment).
        Raises RolloutFailed / RolloutTimeout; an update that fails is rolled back first.
        """
        ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        predictor = desired["spec"]["predictor"]
        if "canaryTrafficPercent" in predictor:
            raise RolloutError(
                "desired InferenceService must not set canaryTrafficPercent; pass canary_percent"
            )
        self._advice = []  # said again in a timeout's message; this rollout's only
        self._events_due = self.clock()
        existing = self.get(ns, name)
        if existing is None:
            self._advice = self._knative_advice(desired, None)
            return self._first_deploy(desired, smoke, url_override)
        current = copy.deepcopy((existing.get("spec") or {}).get("predictor") or {})
        leftover_canary = current.pop("canaryTrafficPercent", None)
        if current == predictor:
            return self._resume(existing, leftover_canary, smoke, url_override)
        self._advice = self._knative_advice(desired, existing)
        return self._update(existing, desired, smoke, canary_percent, url_override)

    def _resume(
        self,
        existing: dict[str, Any],
        canary: int | None,
        smoke: SmokeFn,
        url_override: str | None,
    ) -> dict[str, Any]:
        """The stored spec is the desired one: verify what KServe made of it, writing no spec.

        Writing the same spec again would make no new revision to wait for. The stored spec's
        revision may still be starting (an earlier deploy was interrupted, or runs now), or be
        a ``canary`` percent left by an interrupted rollout of this very spec: wait for it,
        smoke-test it (a canary through its own address) and promote a canary.

        A canary's split shows when KServe has reconciled the spec. Without a canary nothing
        in the status does: in the moment between another writer's spec change and KServe's
        first reconcile of it, the previous revision is verified (KServe's
        ``status.observedGeneration`` is its child's, see :func:`revision_state`).
        """
        ns, name = existing["metadata"]["namespace"], existing["metadata"]["name"]
        canary = None if is_raw(existing) else canary
        before = _Before(None, None, datetime.now(UTC))

        def check(obj: dict[str, Any]) -> RevisionState:
            state = self._state(obj, before)
            if state.phase != "ready" or canary is None:
                return state
            return _canary_in_place(obj, state, canary)

        state, obj = self._wait(ns, name, check, "the unchanged spec's revision ready")
        if state.phase == "failed":
            where = (
                f"; its {canary}% canary share goes to the last ready revision meanwhile"
                if canary is not None
                else ""
            )
            raise RolloutFailed(
                f"InferenceService {ns}/{name}: revision {state.revision or ''} of the unchanged "
                f"spec failed: {state.detail}{where}. Nothing was written: the same spec again "
                "would not retry it; deploy a fixed bundle, or delete the InferenceService "
                f"(kubectl -n {ns} delete inferenceservice {name}) and deploy again"
            )
        action = "unchanged" if canary is None else "promoted"
        return {"action": action, **self._verify(obj, state, smoke, canary, url_override, None)}

    def _verify(
        self,
        obj: dict[str, Any],
        state: RevisionState,
        smoke: SmokeFn,
        canary: int | None,
        url_override: str | None,
        rollback: Callable[[str], str] | None,
    ) -> dict[str, Any]:
        """Smoke-test the ready revision of ``state`` (a canary through its own address),
        promote a canary, and return the rollout result's keys but ``action``."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        url = url_override or service_url(obj, canary=canary is not None)
        result = self._smoke(ns, name, smoke, url, rollback=rollback)
        if canary is not None:
            self._promote(ns, name, state.revision)
            obj = self.get(ns, name) or obj
        return {
            "url": url_override or service_url(obj),
            "revision": state.revision,
            "smoke": result,
            "canary_percent": canary,
            "mode": _mode(obj),
        }

    def _promote(self, ns: str, name: str, revision: str | None) -> None:
        """Drop canaryTrafficPercent (100% to the latest revision) and wait until it is so."""
        self._patch(ns, name, {"spec": {"predictor": {"canaryTrafficPercent": None}}})
        state, _ = self._wait(ns, name, lambda o: _promoted(o, revision), "promotion to 100%")
        if state.phase == "failed":
            raise RolloutFailed(f"InferenceService {ns}/{name}: not promoted: {state.detail}")
        log.info("promoted InferenceService %s/%s revision %s to 100%%", ns, name, revision)

    def _first_deploy(
        self, desired: dict[str, Any], smoke: SmokeFn, url_override: str | None
    ) -> dict[str, Any]:
        ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        before = self._before(None)
        self._create(desired)
        log.info("created InferenceService %s/%s", ns, name)
        state, obj = self._wait(ns, name, lambda o: self._state(o, before), "first revision ready")
        if state.phase == "failed":
            raise RolloutFailed(
                f"InferenceService {ns}/{name}: first revision failed: {state.detail}; left in place "
                f"for inspection (kubectl -n {ns} describe inferenceservice {name})"
            )
        return {"action": "created", **self._verify(obj, state, smoke, None, url_override, None)}

    def _rollback(
        self, ns: str, name: str, previous: dict[str, Any], raw: bool
    ) -> Callable[[str], str]:
        """A function that restores the ``previous`` predictor spec and says so."""

        def rollback(reason: str) -> str:
            current = self.get(ns, name) or {}
            undo = merge_patch(
                (current.get("spec") or {}).get("predictor") or {},
                previous.get("predictor") or {},
            )
            self._patch(ns, name, {"spec": {"predictor": undo}})
            how = (
                "re-applied the previous predictor spec: the Deployment rolls back to its pod "
                "template (RawDeployment mode has no canary to drop)"
                if raw
                else "restored the previous predictor spec"
            )
            log.warning("rolled back InferenceService %s/%s (%s): %s", ns, name, how, reason)
            return f"rolled back: {how}"

        return rollback

    def _update(
        self,
        existing: dict[str, Any],
        desired: dict[str, Any],
        smoke: SmokeFn,
        canary_percent: int | None,
        url_override: str | None,
    ) -> dict[str, Any]:
        ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        previous_spec = copy.deepcopy(existing.get("spec") or {})
        raw = is_raw(existing)
        before = self._before(existing)
        pred_before = _predictor_status(existing)
        previous_revision = (
            before.deployment_revision
            if raw
            else pred_before.get("latestReadyRevision") or before.revision
        )
        canary = canary_percent if canary_percent is not None and 0 < canary_percent < 100 else None
        if raw and canary is not None:
            log.info(
                "InferenceService %s/%s runs in RawDeployment mode: no canary (a Deployment "
                "has no traffic split); rolling update, smoke inference, roll back on failure",
                ns,
                name,
            )
            canary = None
        new_predictor = copy.deepcopy(desired["spec"]["predictor"])
        if canary is not None:
            new_predictor["canaryTrafficPercent"] = canary
        body = {
            "metadata": {
                "labels": desired["metadata"].get("labels", {}),
                "annotations": desired["metadata"].get("annotations", {}),
            },
            "spec": {"predictor": merge_patch(previous_spec.get("predictor") or {}, new_predictor)},
        }
        self._patch(ns, name, body)
        log.info(
            "patched InferenceService %s/%s (%s, canary %s%%)",
            ns,
            name,
            _mode(existing),
            canary if canary is not None else 100,
        )
        rollback = self._rollback(ns, name, previous_spec, raw)
        try:
            state, obj = self._wait(
                ns, name, lambda o: self._state(o, before), "new revision ready"
            )
        except RolloutTimeout as exc:
            raise RolloutTimeout(
                f"{exc}; {rollback(str(exc))} (revision {previous_revision or 'unknown'})"
            ) from None
        if state.phase == "failed":
            raise RolloutFailed(
                f"InferenceService {ns}/{name}: new revision {state.revision or ''} failed: {state.detail}; "
                f"{rollback(state.detail)} (revision {previous_revision or 'unknown'})"
            )
        return {
            "action": "updated",
            "previous_revision": previous_revision,
            **self._verify(obj, state, smoke, canary, url_override, rollback),
        }

    def _smoke(
        self,
        ns: str,
        name: str,
        smoke: SmokeFn,
        url: str | None,
        rollback: Callable[[str], str] | None,
    ) -> dict[str, Any]:
        if not url:
            reason = (
                "no URL in status (status.address.url / status.url, or the canary's "
                "traffic tag) to send a smoke inference to"
            )
        else:
            try:
                return smoke(url)
            except LdmError as exc:
                reason = f"smoke inference through {url} failed: {exc}"
        if rollback is None:
            raise RolloutFailed(f"InferenceService {ns}/{name}: {reason}")
        raise RolloutFailed(f"InferenceService {ns}/{name}: {reason}; {rollback(reason)}")


def _mode(obj: Mapping[str, Any]) -> str:
    """The mode KServe runs ``obj`` in, for logs and the rollout's result."""
    return "RawDeployment" if is_raw(obj) else "Serverless"
