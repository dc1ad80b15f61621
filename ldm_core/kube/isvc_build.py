"""The KServe objects of a deploy, built from the run's config: the InferenceService that
serves a model bundle and the ServingRuntime it names.

The config is their one source: ``cluster`` sizes, places and identifies the predictor pod
(``cluster.predictor``, ``serving_image``, ``serving_service_account``, node selector,
tolerations, priority class, pull secrets), ``serving`` gives its name, replicas,
autoscaling, deployment mode and the limits the derived values come from. The arguments of
the builders are what belongs to one deploy only: where the bundle is and which digest it
has, the object's name and namespace, and whether a ServingRuntime or a custom container
runs it.

Builders return plain dicts (what ``kubectl apply`` would take), so tests validate them
against the real CRD schemas and compare them with the manifests.
"""

from __future__ import annotations

import json
from typing import Any

from ldm_core.config import Config
from ldm_core.config.validation import INGRESS_MARGIN_S
from ldm_core.kube.resources import CustomResource
from ldm_core.kube.security import container_security_context, pod_security_context

GROUP = "serving.kserve.io"
ISVC_VERSION = "v1beta1"
ISVC_PLURAL = "inferenceservices"
RUNTIME_VERSION = "v1alpha1"
RUNTIME_PLURAL = "servingruntimes"
ISVC = CustomResource(GROUP, ISVC_VERSION, ISVC_PLURAL, "InferenceService")
RUNTIME = CustomResource(GROUP, RUNTIME_VERSION, RUNTIME_PLURAL, "ServingRuntime")
MODEL_FORMAT = "brain-ldm"
RUNTIME_NAME = "brain-ldm"
"""The ServingRuntime manifests/base ships (servingruntime.yaml)."""
MODEL_DIR = "/mnt/models"
HTTP_PORT = 8080
LABELS = {"app.kubernetes.io/name": "brain-ldm", "app.kubernetes.io/part-of": "brain-ldm"}
BUNDLE_DIGEST_ENV = "LDM_BUNDLE_SHA256"
"""Set on the predictor so a new bundle always changes the pod template (a new revision),
even when it is uploaded to the same storageUri."""
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
PROGRESS_DEADLINE_ANNOTATION = "serving.knative.dev/progress-deadline"
"""Knative's per-revision progress deadline (knative/serving pkg/apis/serving/register.go,
ProgressDeadlineAnnotationKey, v1.16): a duration at second precision on the revision
template, which KServe fills from the predictor's annotations."""
SERVED_LIMITS = ("max_concurrency", "max_queue", "max_batch_size", "max_batch_wait_ms")
"""The ``serving`` fields the predictor's admission runs on (Admission.from_config), passed
to its server explicitly: the server would otherwise read them from the bundle's own
config.yaml, written by the training run, while containerConcurrency and the timeout come
from this deploy's config. ``request_timeout_s`` travels with them (:func:`served_args`)."""
ISTIO_PROXY_CONFIG_ANNOTATION = "proxy.istio.io/config"
"""Per-pod Istio ProxyConfig; its ``proxyMetadata`` is set as the sidecar agent's environment
by the injector (istio manifests/charts/istio-control/istio-discovery/files/
injection-template.yaml, the istio-proxy container, 1.24.3 lines 325-328). On SIGTERM
pilot-agent drains Envoy, then (istio pkg/envoy/agent.go ``terminate``, 1.24.3 lines
152-220, 1.26.1 and 1.28.0 alike; pilot/cmd/pilot-agent/options/options.go for the two
variables' defaults):

- by default sleeps ``terminationDrainDuration`` whole (5 s unless set), even when nothing is
  left to drain: set to the request time, every pod would take its full grace and be killed;
- with ``EXIT_ON_ZERO_ACTIVE_CONNECTIONS``, sleeps ``MINIMUM_DRAIN_DURATION`` (5 s unless
  set), then leaves once Envoy has no active connection; ``terminationDrainDuration`` is
  then not read, and the pod's grace caps it.

So the sidecar gets the flag, a minimum as long as new requests may still arrive after the
pod starts stopping (:func:`sidecar_min_drain_s`: 5 s would let it leave while they do,
refusing them), and ``terminationDrainDuration`` for an injector that ignores the flag."""
KNATIVE_QUEUE_DRAIN_S = 30
"""Serverless: how long Knative's queue-proxy keeps taking requests after the pod starts
stopping (knative/serving v1.16.2 pkg/queue/sharedmain/main.go line 62,
``drainSleepDuration``), while the networking drops the pod."""
PRESTOP_DRAIN_S = 15
"""RawDeployment: seconds the preStop hook waits before the server gets SIGTERM, so the
endpoints controller, kube-proxy and the ingress drop the pod before it stops taking
requests (in Serverless mode Knative's queue-proxy drains and Knative refuses a
``lifecycle``; knative/serving pkg/apis/serving/fieldmask.go ContainerMask)."""


def served_args(cfg: Config) -> list[str]:
    """The server's arguments that make it serve what the InferenceService promises: its
    model name and admission limits from this deploy's config, as ``--set`` overrides of
    whatever config the bundle carries. KServe appends a predictor's ``model.args`` to the
    ServingRuntime's args (kserve pkg/controller/v1beta1/inferenceservice/utils/utils.go,
    MergeRuntimeContainers: 0.14.1 line 217, 0.15.2 line 226)."""
    s = cfg.serving
    limits = [*SERVED_LIMITS, "request_timeout_s"]
    sets = [arg for f in limits for arg in ("--set", f"serving.{f}={getattr(s, f)}")]
    return ["--model-name", s.model_name, *sets]


def termination_grace_s(cfg: Config) -> int:
    """RawDeployment: how long a stopping pod may take. Its preStop drain, then the longest
    request it may still be generating (``serving.request_timeout_s``), then a margin for
    the server to exit. KServe leaves Kubernetes' 30 s when the predictor sets none
    (deployment_reconciler.go setDefaultPodSpec, v0.14.1 and v0.15.2); in Serverless mode
    Knative sets it to the revision's timeout (pkg/reconciler/revision/resources/deploy.go)."""
    return PRESTOP_DRAIN_S + int(cfg.serving.request_timeout_s) + 30


def sidecar_min_drain_s(cfg: Config) -> int:
    """How long the Istio sidecar serves after SIGTERM before it may leave on no active
    connection: while requests may still arrive, the preStop drain in RawDeployment mode,
    Knative queue-proxy's drain in Serverless mode (:data:`ISTIO_PROXY_CONFIG_ANNOTATION`)."""
    raw = cfg.serving.deployment_mode == "RawDeployment"
    return PRESTOP_DRAIN_S if raw else KNATIVE_QUEUE_DRAIN_S


def ingress_timeout_s(cfg: Config) -> int:
    """The predictor's request timeout: the ingress waits a little longer than the server's
    own limit (``serving.request_timeout_s``), so a slow request gets the server's 504 with
    its reason rather than the gateway's."""
    return int(cfg.serving.request_timeout_s) + INGRESS_MARGIN_S


def _resources(cfg: Config) -> dict[str, Any]:
    """Requests = limits for CPU and memory (Guaranteed QoS: a latency-bound server is not
    throttled below its request nor evicted first), plus the GPUs. These win over the
    ServingRuntime's container resources, key by key: KServe merges the predictor's
    container over the runtime's (strategic merge), so the config sizes the predictor and
    the manifests do not patch the runtime's resources."""
    pod = cfg.cluster.predictor
    cpu_memory = {"cpu": pod.cpu, "memory": pod.memory}
    limits: dict[str, Any] = dict(cpu_memory)
    if pod.gpus:
        # Extended resources must have request == limit; giving the limit is enough.
        limits["nvidia.com/gpu"] = str(pod.gpus)
    return {"requests": dict(cpu_memory), "limits": limits}


def _placement(cfg: Config) -> dict[str, Any]:
    """Pod-level predictor fields: scheduling, pull secrets, and (RawDeployment only) the
    pod securityContext. Knative refuses a pod-level securityContext beyond its defaults
    unless the cluster enables ``kubernetes.podspec-securitycontext``; the container's own
    securityContext holds the same restrictions either way, and the predictor mounts no
    PVC (the bundle is copied to an emptyDir), so it needs no fsGroup in Serverless mode."""
    c = cfg.cluster
    out: dict[str, Any] = {}
    if c.node_selector:
        out["nodeSelector"] = dict(c.node_selector)
    if c.tolerations:
        out["tolerations"] = [t.to_k8s() for t in c.tolerations]
    if c.priority_class:
        out["priorityClassName"] = c.priority_class
    if c.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": n} for n in c.image_pull_secrets]
    if cfg.serving.deployment_mode == "RawDeployment":
        out["securityContext"] = pod_security_context()
        out["terminationGracePeriodSeconds"] = termination_grace_s(cfg)
    return out


def _autoscaling(cfg: Config) -> dict[str, Any]:
    """Replicas and what the autoscaler watches (``serving``, validated against KServe's
    and Knative's rules by the config); ``containerConcurrency`` caps what one replica
    takes (Knative only: an HPA has no such cap)."""
    s = cfg.serving
    out: dict[str, Any] = {
        "minReplicas": s.min_replicas,
        "maxReplicas": s.max_replicas,
        "scaleMetric": s.autoscale_metric,
        "scaleTarget": s.autoscale_target,
        "containerConcurrency": s.container_concurrency,
    }
    raw = s.deployment_mode == "RawDeployment"
    # A Kubeflow profile injects an Istio sidecar; it must take requests while they may still
    # come, outlive the server's drain (at most the pod's grace in Raw mode, the revision's
    # timeout, Knative's grace, in Serverless mode) and leave once nothing is left to drain.
    drain_s = termination_grace_s(cfg) if raw else ingress_timeout_s(cfg)
    metadata = {
        "EXIT_ON_ZERO_ACTIVE_CONNECTIONS": "true",
        "MINIMUM_DRAIN_DURATION": f"{sidecar_min_drain_s(cfg)}s",
    }
    proxy = {"terminationDrainDuration": f"{drain_s}s", "proxyMetadata": metadata}
    out["annotations"] = {ISTIO_PROXY_CONFIG_ANNOTATION: json.dumps(proxy)}
    if raw:
        out["deploymentStrategy"] = {"type": s.update_strategy}
    else:
        out["annotations"][PROGRESS_DEADLINE_ANNOTATION] = f"{s.progress_deadline_s}s"
    return out


def _lifecycle(cfg: Config) -> dict[str, Any]:
    """RawDeployment: the preStop drain (:data:`PRESTOP_DRAIN_S`); Serverless: none."""
    if cfg.serving.deployment_mode != "RawDeployment":
        return {}
    drain = {"exec": {"command": ["sleep", str(PRESTOP_DRAIN_S)]}}
    return {"lifecycle": {"preStop": drain}}


def _env(bundle_digest: str) -> list[dict[str, str]]:
    return [{"name": BUNDLE_DIGEST_ENV, "value": bundle_digest}] if bundle_digest else []


PROBE_PERIOD_S = 10


def _probes(cfg: Config) -> dict[str, Any]:
    """The predictor's three probes, all on the server's own port (Knative moves readiness
    into queue-proxy and rewrites liveness to the user port, serving v1.16 deploy.go).

    - startup: ``/v2/health/ready``, which answers only once the bundle is loaded and warmed
      up; until it passes, Kubernetes runs neither of the others, so a pod that is still
      loading is never restarted. Its budget is ``serving.progress_deadline_s``, the time a
      revision has to become ready at all: a pod that is not ready by then is restarted.
    - readiness: the same path, so a pod leaves the endpoints while it cannot serve (and
      while it drains on SIGTERM).
    - liveness: ``/v2/health/live``, which fails only once a model that was loaded is gone
      (the repository extension's unload), so the kubelet restarts the pod in about 30 s.
    """
    probe = {"periodSeconds": PROBE_PERIOD_S, "timeoutSeconds": 5}
    ready = {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT}, **probe}
    startup_failures = -(-cfg.serving.progress_deadline_s // PROBE_PERIOD_S)
    return {
        "startupProbe": {**ready, "failureThreshold": startup_failures},
        "readinessProbe": {**ready, "failureThreshold": 3},
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": HTTP_PORT},
            **probe,
            "failureThreshold": 3,
        },
    }


def _runtime_model(
    cfg: Config, runtime: str, storage_uri: str, bundle_digest: str
) -> dict[str, Any]:
    """The predictor's ``model``: format ``brain-ldm`` served by ServingRuntime ``runtime``,
    whose storage initializer copies ``storage_uri`` to /mnt/models using the S3 endpoint
    annotations of the secret attached to the predictor's service account."""
    model: dict[str, Any] = {
        "modelFormat": {"name": MODEL_FORMAT, "version": "1"},
        "runtime": runtime,
        "protocolVersion": "v2",
        "storageUri": storage_uri,
        "resources": _resources(cfg),
        "args": served_args(cfg),
        **_lifecycle(cfg),
        # Over the runtime's own (KServe merges the predictor's container over the runtime's),
        # so the startup budget follows this deploy's serving.progress_deadline_s.
        **_probes(cfg),
    }
    env = _env(bundle_digest)
    if env:
        model["env"] = env
    return model


def _custom_container(cfg: Config, storage_uri: str, bundle_digest: str) -> dict[str, Any]:
    """A ``kserve-container`` running the same server as the runtime from
    ``cluster.serving_image``; KServe reads the bundle location from its STORAGE_URI."""
    return {
        "name": "kserve-container",
        "image": cfg.cluster.serving_image,
        "command": ["python", "-m", "ldm_core.serve"],
        "args": ["--bundle", MODEL_DIR, "--http-port", str(HTTP_PORT), *served_args(cfg)],
        "env": [{"name": "STORAGE_URI", "value": storage_uri}, *_env(bundle_digest)],
        "ports": [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "resources": _resources(cfg),
        "securityContext": container_security_context(),
        **_lifecycle(cfg),
        **_probes(cfg),
    }


def build_inference_service(
    cfg: Config,
    *,
    name: str,
    namespace: str,
    storage_uri: str,
    bundle_digest: str = "",
    runtime: str | None = RUNTIME_NAME,
    canary_percent: int | None = None,
) -> dict[str, Any]:
    """The InferenceService serving the bundle at ``storage_uri`` as ``cfg`` says.

    Args:
        cfg: the run's config; ``cluster`` and ``serving`` make the predictor.
        name: the InferenceService's name.
        namespace: where it lives.
        storage_uri: the bundle's location (``s3://...``).
        bundle_digest: the bundle's digest, set as ``LDM_BUNDLE_SHA256`` so a new bundle
            makes a new revision; empty: none.
        runtime: the ServingRuntime that serves model format ``brain-ldm``; None: a custom
            container from ``cluster.serving_image``.
        canary_percent: ``canaryTrafficPercent`` to ask for; None: none.
    """
    predictor: dict[str, Any] = {
        "serviceAccountName": cfg.cluster.serving_service_account,
        **_autoscaling(cfg),
        "timeout": ingress_timeout_s(cfg),
        **_placement(cfg),
    }
    if canary_percent is not None:
        predictor["canaryTrafficPercent"] = canary_percent
    if runtime:
        predictor["model"] = _runtime_model(cfg, runtime, storage_uri, bundle_digest)
    else:
        predictor["containers"] = [_custom_container(cfg, storage_uri, bundle_digest)]
    return {
        "apiVersion": f"{GROUP}/{ISVC_VERSION}",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**LABELS, "app.kubernetes.io/component": "serving"},
            "annotations": {
                # Gives the newest revision its own URL ("latest" tag), so the smoke
                # inference of a canary reaches the canary and not the old revision.
                "serving.kserve.io/enable-tag-routing": "true",
                "serving.kserve.io/enable-prometheus-scraping": "true",
                DEPLOYMENT_MODE_ANNOTATION: cfg.serving.deployment_mode,
            },
        },
        "spec": {"predictor": predictor},
    }


def build_serving_runtime(
    cfg: Config, name: str = RUNTIME_NAME, namespace: str | None = None
) -> dict[str, Any]:
    """A ServingRuntime that serves the ``brain-ldm`` model format with ``ldm_core.serve``
    from ``cluster.serving_image``, as manifests/base/servingruntime.yaml does. Its
    resources are only the defaults of a hand-written InferenceService: the deploy's
    predictor carries the config's (see :func:`_resources`)."""
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
                    "image": cfg.cluster.serving_image,
                    "imagePullPolicy": cfg.cluster.image_pull_policy,
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
                    **_probes(cfg),
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}],
        },
    }


def with_metadata(
    isvc: dict[str, Any], labels: dict[str, str], annotations: dict[str, str]
) -> dict[str, Any]:
    """``isvc`` with ``labels`` and ``annotations`` added to its metadata: the deploy's links
    to the bundle's lineage and its Model Registry version (``ldm_core.lineage``,
    ``ldm_core.registry``). KServe copies both into the revision template, so they belong in
    the same write as the spec they describe."""
    metadata = dict(isvc["metadata"])
    metadata["labels"] = {**metadata.get("labels", {}), **labels}
    metadata["annotations"] = {**metadata.get("annotations", {}), **annotations}
    return {**isvc, "metadata": metadata}
