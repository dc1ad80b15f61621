"""KServe's controller, Knative and the cluster network, reduced to what a rollout observes.

:class:`FakeKServe` reconciles InferenceServices from a background thread against the
emulated API (:class:`tests.harness.kube.KubeApi`) as KServe ``version`` (0.14.1, Kubeflow
1.10.0; 0.15.0, Kubeflow 1.10.2; or 0.15.2, Kubeflow 1.11.0) does, file and line at those tags:

- It notices a new predictor spec after a while (until then the status describes the spec
  before it: the stale state a rollout must not trust), then checks the ServingRuntime the
  model names as ``components/predictor.go`` does (0.14.1 lines 104-150, 0.15.2 reconcileModel
  lines 276-325): a missing runtime is ``InvalidSpec`` / ``RuntimeNotRecognized``, one that does
  not serve the model's format ``NoSupportingRuntime``; KServe then writes no child, sets
  ``modelStatus`` (``UpdateModelTransitionStatus``) and records a Warning ``InternalError``
  event with the error (``controller.go``, 0.15.2 line 246). The first reconcile of a good
  spec after such a refusal meets an update conflict (its own Warning event, the status
  left as it was) and is retried.
- The InferenceService's labels and annotations go into the predictor's pod template
  (``buildObjectMeta``): annotations but KServe's ServiceAnnotationDisallowedList; labels
  all in RawDeployment mode, but RevisionTemplateLabelDisallowedList (and, 0.15.x, the
  configured ``serviceLabelDisallowedList``) in a Knative revision. A change of them alone
  makes a new revision or template (:attr:`FakeKServe.revision_meta` keeps each one's).
- Serverless (Knative Serving 1.16): a spec change that changes the revision template makes
  a new revision, which becomes ready, fails, or never gets ready. The Knative Service's
  traffic is what ``createKnativeService`` writes (``reconcilers/knative/ksvc_reconciler.go``,
  0.15.2 lines 115-147, the same logic in 0.14.1): with ``canaryTrafficPercent`` and a
  ``LatestRolledoutRevision``, ``latest`` (latestRevision) at the canary percent and ``prev``
  (the last rolled-out revision) at the rest; else 100 % to latestRevision. Knative's route
  resolves ``latestRevision: true`` to the latest *ready* revision (not the newest), and
  ``PropagateStatus`` (``pkg/apis/serving/v1beta1/inference_service_status.go``, 0.15.2
  lines 442-510) tracks ``latestRolledoutRevision`` from it. Every split the route
  programs is recorded in :attr:`FakeKServe.traffic_log`, so a test sees where requests go.
  Tag URLs follow Knative's ``tag-template`` and ``domain-template``
  (``pkg/reconciler/route/domains/domains.go``); the cluster-local name of a tag is the
  tag-template's hostname in the namespace (``MakeK8sPlaceholderService``,
  ``pkg/reconciler/route/resources/service.go``). With ``features`` it plays Knative's
  webhook too: a pod spec that needs a podspec flag that is off gets no revision, and
  KServe's Warning event carries the refusal (kserve#1425).
- RawDeployment: a Deployment ``<isvc>-predictor`` whose pod template KServe rewrites only
  when it changes (``reconcilers/deployment/deployment_reconciler.go``: the diff ignores
  replicas; ``setDefaultPodSpec`` gives a 30 s grace when none is set, and
  ``setDefaultDeploymentSpec`` a 25 % ``rollingUpdate``); 0.14.1 and 0.15.0 write a strategic
  merge over the current Deployment (what the spec drops stays, and a Recreate keeps the old
  ``rollingUpdate``, which the API server refuses: a Warning event, no write), 0.15.2 a
  two-way patch. The predictor's resources are merged into the runtime container's key by
  key, and the API server stores quantities canonicalised (:func:`canonical_quantity`). An
  HPA of the same name (``reconcilers/hpa/hpa_reconciler.go`` ``createHPA`` /
  ``getHPAMetrics``): min and max replicas and a resource-utilisation target; 0.14.1 names
  the metric after ``scaleMetric`` whatever it is, 0.15.x builds none for a metric other
  than cpu, or memory without a target, and the API server then defaults it to 80 % cpu. A
  scaling-only change rewrites the HPA and no Deployment revision appears. The Deployment
  controller's revision, generation and replica counts follow; a template not rolled out
  after a while gets ``ProgressDeadlineExceeded`` and keeps rolling. On the
  InferenceService ``PropagateRawStatus``: ``PredictorReady``/``Ready`` from the
  Deployment, its ``observedGeneration``; 0.14.1 also copies the Deployment's revision into
  ``components.predictor.latestCreatedRevision`` (blank for a moment after each write);
  only 0.15.2 reports ``deploymentMode``.

:data:`NETWORK` plays the cluster's DNS and, with an :class:`tests.harness.istio.Mesh`, the
profile's Istio policies: a canary's cluster-local tag name goes through the cluster-local
gateway to the new revision's server when both admit the request; external Knative hosts do
not resolve from a pipeline pod.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any

import httpx
import kubernetes
from kubernetes.client.exceptions import ApiException

from ldm_core.kube import deployment_status, knative
from ldm_core.kube.isvc_build import (
    GROUP,
    ISVC_PLURAL,
    ISVC_VERSION,
    RUNTIME_PLURAL,
    RUNTIME_VERSION,
)
from ldm_core.smoke import SmokeTestError
from tests.harness import istio
from tests.harness.kube import KubeApi

NS = "brain-ldm"
NAME = "brain-ldm"
ROUTE = f"{NAME}-predictor"
"""KServe's Knative Service (and so Knative's Route) of the predictor."""
OLD_URI = "s3://models/brain-ldm/aaaa"
NEW_URI = "s3://models/brain-ldm/bbbb"
BAD_URI = "s3://models/brain-ldm/broken"
STUCK_URI = "s3://models/brain-ldm/stuck"
SLOW_URI = "s3://models/brain-ldm/slow"
UNPULLABLE_URI = "s3://models/brain-ldm/unpullable-image"
KSERVE_UA = "fake-kserve"
SOURCE_URI_ANNOTATION = "internal.serving.kserve.io/storage-initializer-sourceuri"
"""KServe's StorageInitializerSourceUriInternalAnnotationKey (pkg/constants/constants.go)."""
ANNOTATIONS_NOT_COPIED = (
    "autoscaling.knative.dev/min-scale",
    "autoscaling.knative.dev/max-scale",
    SOURCE_URI_ANNOTATION,
    "kubectl.kubernetes.io/last-applied-configuration",
)
"""KServe's ServiceAnnotationDisallowedList (pkg/constants/constants.go, 0.14.1 and 0.15.x):
every other annotation of the InferenceService goes into the predictor's pod template."""
LABELS_NOT_COPIED = ("networking.knative.dev/visibility",)
"""KServe's RevisionTemplateLabelDisallowedList: the labels a Knative revision template does
not get; 0.15.x appends inferenceservice-config's ``serviceLabelDisallowedList``."""
VERSIONS = ("0.14.1", "0.15.0", "0.15.2")
"""The KServe releases modelled (Kubeflow 1.10.0, 1.10.2 and 1.11.0)."""
DOMAIN = "example.com"
DEFAULT_DOMAIN_TEMPLATE = "{{.Name}}.{{.Namespace}}.{{.Domain}}"
DEFAULT_TAG_TEMPLATE = "{{.Tag}}-{{.Name}}"
"""Knative's config-network defaults (``domain-template``, ``tag-template``)."""
SERVED = {
    f"{GROUP}/{ISVC_VERSION}/{ISVC_PLURAL}": "InferenceService",
    f"{GROUP}/{RUNTIME_VERSION}/{RUNTIME_PLURAL}": "ServingRuntime",
    "apps/v1/deployments": "Deployment",
    "autoscaling/v2/horizontalpodautoscalers": "HorizontalPodAutoscaler",
    "v1/configmaps": "ConfigMap",
}
"""What the emulated API serves for these tests (plus pods and events)."""


def closed_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def storage_uri(predictor: dict[str, Any]) -> str:
    if "model" in predictor:
        return predictor["model"]["storageUri"]
    env = {e["name"]: e["value"] for e in predictor["containers"][0].get("env", [])}
    return env["STORAGE_URI"]


def render(template: str, **values: str) -> str:
    """A Knative Go template with ``{{.Field}}`` placeholders only."""
    for field, value in values.items():
        template = template.replace(f"{{{{.{field}}}}}", value)
    return template


def canary_local_host(tag_template: str = DEFAULT_TAG_TEMPLATE) -> str:
    """The cluster-local name Knative gives the ``latest`` tag of the predictor's route."""
    return f"{render(tag_template, Tag='latest', Name=ROUTE)}.{NS}.svc.cluster.local"


_BINARY_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_DECIMAL_SUFFIXES = {
    -9: "n",
    -6: "u",
    -3: "m",
    0: "",
    3: "k",
    6: "M",
    9: "G",
    12: "T",
    15: "P",
    18: "E",
}
_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?")


def canonical_quantity(text: str) -> str:
    """A quantity as the API server stores it (k8s.io/apimachinery pkg/api/resource,
    ``ParseQuantity`` then ``CanonicalizeBytes``): rounded up to nano precision, then the
    largest suffix that leaves a whole number, in the format the quantity was written in
    (decimal SI, binary SI, or decimal exponent); a binary amount under 1Ki or of a
    fraction of a byte is written in decimal SI. Positive amounts only."""
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a quantity")
    number, suffix = Decimal(match[1]), match[2] or ""
    if suffix in _BINARY_SUFFIXES[1:]:
        form, value = "binary", number * 1024 ** _BINARY_SUFFIXES.index(suffix)
    elif suffix[:1] in ("e", "E"):
        form, value = "exponent", number.scaleb(int(suffix[1:]))
    else:
        decimal = {v: k for k, v in _DECIMAL_SUFFIXES.items()}
        form, value = "decimal", number.scaleb(decimal[suffix])
    nanos = (value.scaleb(9)).to_integral_value(ROUND_CEILING)
    if nanos == 0:
        return "0"
    if form == "binary" and (nanos < 1024 * 10**9 or nanos % 10**9):
        form = "decimal"
    if form == "binary":
        amount, power = int(nanos) // 10**9, 0
        while amount % 1024 == 0 and power < len(_BINARY_SUFFIXES) - 1:
            amount, power = amount // 1024, power + 1
        return f"{amount}{_BINARY_SUFFIXES[power]}"
    mantissa, exponent = int(nanos), -9
    while mantissa % 1000 == 0 and exponent < 18:
        mantissa, exponent = mantissa // 1000, exponent + 3
    if form == "exponent":
        return f"{mantissa}e{exponent}" if exponent else str(mantissa)
    return f"{mantissa}{_DECIMAL_SUFFIXES[exponent]}"


def _merged_resources(runtime: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """The predictor's resources laid over the runtime container's, key by key (KServe's
    strategic merge of the two containers, MergeRuntimeContainers), as the API server stores
    them (canonical quantities)."""
    out: dict[str, Any] = {}
    for part in ("requests", "limits"):
        merged = {**(runtime.get(part) or {}), **(model.get(part) or {})}
        if merged:
            out[part] = {k: canonical_quantity(str(v)) for k, v in merged.items()}
    return out


CONFLICT = (
    'fails to reconcile predictor: Operation cannot be fulfilled on {kind} "{name}": the object '
    "has been modified; please apply your changes to the latest version and try again"
)
"""A reconcile's update conflict, as KServe records it (a Warning ``InternalError``)."""
SUPERSET_UPDATES = ("0.14.1", "0.15.0")
"""Releases whose Deployment update is StrategicMergePatch(current, wanted) (deployment_
reconciler.go: 0.14.1 line 236, 0.15.0 line 402): what the new spec drops stays. 0.15.2
sends CreateTwoWayMergePatch(current, wanted) (line 424), removals included."""
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
"""The patchMergeKey of the pod spec's lists a strategic merge merges item by item (the
others, args or tolerations, it replaces): k8s.io/api core/v1 types.go."""


def _strategic_merge(current: Any, patch: Any, field: str = "") -> Any:
    """``patch`` applied to ``current`` as a strategic merge patch with no deletion
    directives: maps merged key by key, keyed lists item by item, nothing removed."""
    if isinstance(current, dict) and isinstance(patch, dict):
        out = copy.deepcopy(current)
        for key, value in patch.items():
            out[key] = _strategic_merge(current[key], value, key) if key in current else value
        return out
    key = _MERGE_KEYS.get(field)
    if key and isinstance(current, list) and isinstance(patch, list):
        out = copy.deepcopy(current)
        for item in patch:
            at = next((i for i, c in enumerate(out) if c.get(key) == item.get(key)), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = _strategic_merge(out[at], item)
        return out
    return copy.deepcopy(patch)


def _invalid_deployment(spec: dict[str, Any]) -> str | None:
    """The API server's refusal of a Deployment with this template and strategy (apps
    validation ValidateDeploymentStrategy), as the error message KServe records; None."""
    strategy = spec["strategy"]
    if strategy.get("type") == "Recreate" and strategy.get("rollingUpdate") is not None:
        return (
            f'Deployment.apps "{ROUTE}" is invalid: spec.strategy.rollingUpdate: Forbidden: '
            "may not be specified when strategy `type` is 'Recreate'"
        )
    return None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Network:
    """Where a smoke inference sent from a pipeline pod lands (the test's DNS + Istio)."""

    def __init__(self) -> None:
        self.kserve: FakeKServe | None = None

    def route(self, url: str, headers: dict[str, str]) -> str:
        """The loopback server that answers ``url``, or SmokeTestError as the client sees it."""
        parsed = httpx.URL(url)
        if parsed.host in ("127.0.0.1", "localhost"):
            return url
        ks = self.kserve
        if ks is not None and parsed.host == canary_local_host(ks.tag_template):
            if ks.mesh is not None:
                self._through_the_mesh(ks.mesh, url, headers)
            return ks.latest_url
        raise SmokeTestError(f"{url}: ConnectError: [Errno -2] Name or service not known")

    @staticmethod
    def _through_the_mesh(mesh: Any, url: str, headers: dict[str, str]) -> None:
        """A cluster-local Knative name is the cluster-local gateway's (Knative's placeholder
        Service): its policies first, then the predictor's sidecar, which sees the gateway's
        identity and the headers the gateway passed on."""
        path = f"/v2/models/{NAME}"
        status, passed = mesh.admit(
            istio.CLUSTER_LOCAL_GATEWAY, istio.ROOT_NAMESPACE, "GET", path, headers
        )
        if status == 200:
            gateway = istio.Source(
                istio.CLUSTER_LOCAL_GATEWAY_SOURCE_PRINCIPAL, istio.ROOT_NAMESPACE
            )
            pods = {"serving.kserve.io/inferenceservice": NAME}
            status = mesh.request(pods, NS, "GET", path, passed, gateway)
        if status != 200:
            answer = {401: "Jwt verification fails", 403: "RBAC: access denied"}
            raise SmokeTestError(f"GET {url}{path}: HTTP {status} {answer[status]}")


NETWORK = Network()


class FakeKServe:
    """KServe's controller + Knative (or the Deployment and HPA controllers, ``raw=True``).

    As KServe's ``PropagateStatus`` does, ``status.observedGeneration`` is the child's (the
    Knative Service's or the Deployment's), not the InferenceService's: the child's counter
    grows when KServe writes a new child spec and starts ``child_ahead`` above the
    InferenceService's, so it can run ahead of ``metadata.generation`` or behind it.

    Args:
        latest_url: the loopback server the newest revision's pods answer on.
        address_url: the loopback stand-in for the InferenceService's cluster-local address.
        failing: storage URIs whose model fails to load (crash-looping pods).
        stuck: storage URIs whose revision never gets ready (and never fails).
        slow: storage URIs whose revision gets ready only after ``slow_after_s``.
        unpullable: storage URIs whose revision fails with an image pull error (Serverless:
            only the Configuration's condition says so; the pods are Pending).
        version: the KServe release to behave as (:data:`VERSIONS`).
        features: Knative's config-features data; None accepts every pod-spec field.
        mesh: the Istio policies in force at the cluster-local gateway and the predictor's
            sidecar (an :class:`tests.harness.istio.Mesh`; None: no mesh).
        domain_template: Knative's ``domain-template``.
        tag_template: Knative's ``tag-template``.
        label_disallowed: inferenceservice-config's ``serviceLabelDisallowedList`` (0.15.x):
            labels kept out of Knative revision templates.
    """

    def __init__(
        self,
        api: KubeApi,
        *,
        latest_url: str,
        address_url: str,
        failing: tuple[str, ...] = (BAD_URI,),
        stuck: tuple[str, ...] = (STUCK_URI,),
        slow: tuple[str, ...] = (SLOW_URI,),
        unpullable: tuple[str, ...] = (UNPULLABLE_URI,),
        notice_after_s: float = 0.4,
        ready_after_s: float = 0.3,
        slow_after_s: float = 3.0,
        deadline_after_s: float = 1.0,
        child_ahead: int = 0,
        raw: bool = False,
        version: str = VERSIONS[-1],
        features: dict[str, str] | None = None,
        mesh: Any = None,
        domain_template: str = DEFAULT_DOMAIN_TEMPLATE,
        tag_template: str = DEFAULT_TAG_TEMPLATE,
        label_disallowed: tuple[str, ...] = (),
    ) -> None:
        assert version in VERSIONS, version
        assert not label_disallowed or version != "0.14.1", "a constant list in 0.14.1"
        self.label_disallowed = (*LABELS_NOT_COPIED, *label_disallowed)
        self.client = api.client(KSERVE_UA)
        self.api = kubernetes.client.CustomObjectsApi(self.client)
        self.latest_url, self.address_url = latest_url, address_url
        self.failing, self.stuck, self.unpullable = failing, stuck, unpullable
        self.notice_after_s, self.ready_after_s = notice_after_s, ready_after_s
        self.slow, self.slow_after_s = slow, slow_after_s
        self.deadline_after_s = deadline_after_s
        """RawDeployment: when the Deployment controller reports ProgressDeadlineExceeded for
        a template not rolled out yet (KServe's fixed progressDeadlineSeconds, 600 s, scaled)."""
        self.deadline_reported: list[str] = []
        self.controller_lag_s = 1.0
        """RawDeployment: how long the Deployment controller takes to act on a new template."""
        self.conflict_retry_s = 2.5
        """When KServe retries a reconcile that met an update conflict (longer than the
        rollout's events cadence, so a rollout sees the conflict's event under the stale
        status)."""
        """RawDeployment: how long the Deployment controller takes to act on a new template."""
        self.ready_at: dict[str, float] = {}
        self.child_generation = child_ahead
        self.raw, self.version, self.features, self.mesh = raw, version, features, mesh
        self.domain_template, self.tag_template = domain_template, tag_template
        self.bookkeeping: bool | None = None
        """Whether the emulated API bumps metadata.generation itself (found on the first create)."""
        self.revision_uri: dict[str, str] = {}
        self.revision_meta: dict[str, dict[str, dict[str, str]]] = {}
        """The labels and annotations KServe copied into each revision's pod template."""
        self.canaries_seen: list[int] = []
        self.refusals: list[str] = []
        self.traffic_log: list[tuple[float, dict[str, int]]] = []
        """Every split Knative's route programmed: (time, {revision: percent})."""
        self.hpa_writes = 0
        self._state: dict[str, dict[str, Any]] = {}
        self._events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.errors: list[BaseException] = []

    def __enter__(self) -> FakeKServe:
        NETWORK.kserve = self
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        NETWORK.kserve = None
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
        items = self.api.list_namespaced_custom_object(GROUP, ISVC_VERSION, NS, ISVC_PLURAL)
        return items.get("items", [])

    def share(self, revision: str, since: float) -> int:
        """The most traffic ``revision`` had at any moment since ``since`` (monotonic): a
        split counts from when it was programmed until the next one."""
        log = self.traffic_log
        active = [
            split.get(revision, 0)
            for i, (_, split) in enumerate(log)
            if i + 1 == len(log) or log[i + 1][0] > since
        ]
        return max(active, default=0)

    # ------------------------------------------------------------------ reconcile

    def _reconcile(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        predictor = obj["spec"]["predictor"]
        spec = json.dumps([predictor, self._pod_metadata(obj)], sort_keys=True)
        st = self._state.setdefault(
            name,
            {
                "seen": None, "since": None, "config": None, "n": 0, "canary": None,
                "created": None, "ready": None, "failed": None, "due": None,
                "rolled": None, "prev_rolled": None, "invalid": None, "warned": None,
                "hpa": None,
            },
        )  # fmt: skip
        now = time.monotonic()
        if spec != st["seen"] and self._noticed(st, spec, now):
            self._adopt(obj, st, spec, predictor, now)
        became_ready = self._progress(st, now)
        if self.raw:
            self._publish_raw(obj, st)
        else:
            self._publish(obj, st)
        if became_ready is not None:
            # Only once the status says so: a test that waits for ready_at then reads it.
            self.ready_at[became_ready] = now

    def _pod_metadata(self, obj: dict[str, Any]) -> dict[str, dict[str, str]]:
        """What of the InferenceService's labels and annotations KServe copies into the
        predictor's pod template (components/predictor.go ``buildObjectMeta``): annotations
        but :data:`ANNOTATIONS_NOT_COPIED`; labels all in RawDeployment mode (the Deployment's
        template), but the disallowed ones in a Knative revision template
        (ksvc_reconciler.go)."""
        meta = obj.get("metadata") or {}
        labels = dict(meta.get("labels") or {})
        if not self.raw:
            labels = {k: v for k, v in labels.items() if k not in self.label_disallowed}
        notes = meta.get("annotations") or {}
        kept = {k: v for k, v in notes.items() if k not in ANNOTATIONS_NOT_COPIED}
        return {"labels": labels, "annotations": kept}

    def _noticed(self, st: dict[str, Any], spec: str, now: float) -> bool:
        if st["since"] is None or st["since"][0] != spec:
            st["since"] = (spec, now)
        return now - st["since"][1] >= self.notice_after_s

    def _adopt(
        self,
        obj: dict[str, Any],
        st: dict[str, Any],
        spec: str,
        predictor: dict[str, Any],
        now: float,
    ) -> None:
        """One reconcile of a spec KServe has not carried out yet."""
        invalid = self._invalid_spec(predictor)
        refusal = None if invalid else self._webhook_refusal(predictor)
        if st["invalid"] and not (invalid or refusal) and st.get("conflicted") != spec:
            # The first reconcile of a good spec after a refused one meets an update conflict
            # (as any reconcile may): a Warning event of its own, the status left as it was
            # (still the refusal), and a retry a little later.
            st["conflicted"], st["retry_at"] = spec, now + self.conflict_retry_s
            kind = "deployments.apps" if self.raw else "services.serving.knative.dev"
            self._warn(obj, CONFLICT.format(kind=kind, name=ROUTE))
            return
        if now < st.get("retry_at", 0.0):
            return
        st["invalid"] = invalid
        if invalid or refusal:
            if st["warned"] != spec:
                st["warned"] = spec
                self._warn(obj, invalid[2] if invalid else refusal)
            return
        st["seen"] = spec
        canary = None if self.raw else predictor.get("canaryTrafficPercent")
        if canary is not None and canary not in self.canaries_seen:
            self.canaries_seen.append(canary)
        st["canary"] = canary
        config = {k: v for k, v in predictor.items() if k != "canaryTrafficPercent"}
        pod_meta = self._pod_metadata(obj)
        if self.raw:
            self._write_raw(obj["metadata"]["name"], st, config, pod_meta, now)
        elif json.dumps([config, pod_meta], sort_keys=True) != st["config"]:
            self._new_revision(obj["metadata"]["name"], st, [config, pod_meta], now)
            self.child_generation += 1  # KServe wrote the ksvc's template
        elif canary != st.get("last_canary"):
            self.child_generation += 1  # KServe wrote the ksvc's traffic
        st["last_canary"] = canary

    def _new_revision(self, name: str, st: dict[str, Any], template: list[Any], now: float) -> None:
        """A new Knative revision of ``template``: the predictor and its pod metadata."""
        config, pod_meta = template
        st["config"], st["n"] = json.dumps(template, sort_keys=True), st["n"] + 1
        st["created"] = f"{name}-predictor-{st['n']:05d}"
        self.revision_uri[st["created"]] = storage_uri(config)
        self.revision_meta[st["created"]] = copy.deepcopy(pod_meta)
        st["due"] = now + self._start_s(st["created"])

    def _start_s(self, revision: str) -> float:
        """How long the pods of ``revision`` take to get ready (or to fail)."""
        slow = self.revision_uri[revision] in self.slow
        return self.slow_after_s if slow else self.ready_after_s

    def _progress(self, st: dict[str, Any], now: float) -> str | None:
        """The newest revision's pods start: ready, failed, or (stuck) neither."""
        uri = self.revision_uri.get(st["created"] or "", "")
        if st["due"] is None or now < st["due"] or uri in self.stuck:
            return None
        st["due"] = None
        if uri in (*self.failing, *self.unpullable):
            st["failed"] = st["created"]
            return None
        st["ready"] = st["created"]
        return st["created"]

    # ------------------------------------------------------------------ admission and runtime

    def _runtime(self, name: str) -> dict[str, Any] | None:
        try:
            return self.api.get_namespaced_custom_object(
                GROUP, RUNTIME_VERSION, NS, RUNTIME_PLURAL, name
            )
        except ApiException as err:
            if err.status != 404:
                raise
            return None

    def _invalid_spec(self, predictor: dict[str, Any]) -> tuple[str, str, str] | None:
        """(reason, message, error) as KServe's predictor reconciler sets them for a model
        whose runtime it cannot use; None when it can (or a custom container runs it)."""
        model = predictor.get("model")
        if not model or not model.get("runtime"):
            return None
        runtime = self._runtime(model["runtime"])
        if runtime is None:
            error = (
                f"No ServingRuntimes or ClusterServingRuntimes with the name: {model['runtime']}"
            )
            return "RuntimeNotRecognized", "Waiting for runtime to become available", error
        formats = {f["name"] for f in runtime["spec"].get("supportedModelFormats") or []}
        if model["modelFormat"]["name"] not in formats:
            return (
                "NoSupportingRuntime",
                "Specified runtime does not support specified framework/version",
                f"specified runtime {model['runtime']} does not support specified "
                "framework/version",
            )
        return None

    def _webhook_refusal(self, predictor: dict[str, Any]) -> str | None:
        """What Knative's validating webhook answers for the pod spec KServe would write."""
        if self.raw or self.features is None:
            return None
        runtime = (predictor.get("model") or {}).get("runtime")
        runtime_spec = ((self._runtime(runtime) if runtime else None) or {}).get("spec") or {}
        fields = [
            f"spec.template.spec.{field}"
            for field, flag in knative.PODSPEC_FLAGS.items()
            if (predictor.get(field) or runtime_spec.get(field))
            and self.features.get(flag) != knative.ENABLED
        ]
        if not fields:
            return None
        return (
            'fails to reconcile predictor: admission webhook "validation.webhook.serving.knative.dev" '
            f"denied the request: validation failed: must not set the field(s): {', '.join(fields)}"
        )

    def _warn(self, obj: dict[str, Any], message: str) -> None:
        """The Warning event KServe's controller records for a failed reconcile."""
        self.refusals.append(message)
        self._events += 1
        meta = obj["metadata"]
        kubernetes.client.CoreV1Api(self.client).create_namespaced_event(
            NS,
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{meta['name']}.{self._events:x}", "namespace": NS},
                "involvedObject": {
                    "apiVersion": f"{GROUP}/{ISVC_VERSION}",
                    "kind": "InferenceService",
                    "name": meta["name"],
                    "namespace": NS,
                },
                "type": "Warning",
                "reason": "InternalError",
                "message": message,
                "source": {"component": "v1beta1Controllers"},
                "firstTimestamp": _now(),
                "lastTimestamp": _now(),
                "count": 1,
            },
        )

    def _model_status(
        self, st: dict[str, Any], load_failed: bool, up_to_date: bool
    ) -> dict[str, Any]:
        """``modelStatus`` as UpdateModelTransitionStatus / PropagateModelStatus leave it: a
        failure's info stays once set (SetModelFailureInfo only ever replaces it)."""
        if st["invalid"]:
            reason, message, _ = st["invalid"]
            st["failure_info"] = {"reason": reason, "message": message}
            transition = "InvalidSpec"
        elif load_failed:
            st["failure_info"] = {"reason": "ModelLoadFailed", "message": "bundle.json missing"}
            transition = "BlockedByFailedLoad"
        else:
            transition = "UpToDate" if up_to_date else "InProgress"
        out: dict[str, Any] = {"transitionStatus": transition}
        if st.get("failure_info"):
            out["lastFailureInfo"] = st["failure_info"]
        return out

    # ------------------------------------------------------------------ Serverless

    def _ksvc_traffic(self, st: dict[str, Any]) -> list[dict[str, Any]]:
        """The Knative Service's spec.traffic as createKnativeService writes it."""
        if st["canary"] is not None and st["rolled"]:
            out = [{"tag": "latest", "latestRevision": True, "percent": st["canary"]}]
            if st["canary"] < 100:
                prev = {"tag": "prev", "revisionName": st["rolled"], "latestRevision": False}
                out.append({**prev, "percent": 100 - st["canary"]})
            return out
        return [{"tag": "latest", "latestRevision": True, "percent": 100}]

    def _tag_url(self, tag: str) -> str:
        host = render(self.tag_template, Tag=tag, Name=ROUTE)
        return f"http://{render(self.domain_template, Name=host, Namespace=NS, Domain=DOMAIN)}"

    def _route_traffic(self, st: dict[str, Any]) -> list[dict[str, Any]]:
        """Knative's route: latestRevision resolves to the latest ready revision; none ready,
        no traffic at all."""
        if st["ready"] is None:
            return []
        targets = []
        for target in self._ksvc_traffic(st):
            revision = st["ready"] if target["latestRevision"] else target["revisionName"]
            targets.append(
                {**target, "revisionName": revision, "url": self._tag_url(target["tag"])}
            )
        return targets

    def _propagate_rollout(self, st: dict[str, Any], traffic: list[dict[str, Any]]) -> None:
        """PropagateStatus' tracking of the last fully rolled-out revision."""
        per_revision: dict[str, int] = {}
        for t in traffic:
            per_revision[t["revisionName"]] = per_revision.get(t["revisionName"], 0) + t["percent"]
        for t in traffic:
            if t["revisionName"] != st["ready"] or not t["latestRevision"]:
                continue
            if st["rolled"] != st["ready"]:
                if t["percent"] == 100:
                    st["prev_rolled"], st["rolled"] = st["rolled"], st["ready"]
            elif st["ready"] == st["created"] and t["percent"] < 100:
                if per_revision.get(t["revisionName"]) == 100 and st["prev_rolled"]:
                    st["rolled"] = st["prev_rolled"]

    def _log_split(self, traffic: list[dict[str, Any]]) -> None:
        split: dict[str, int] = {}
        for t in traffic:
            split[t["revisionName"]] = split.get(t["revisionName"], 0) + t["percent"]
        if not self.traffic_log or self.traffic_log[-1][1] != split:
            self.traffic_log.append((time.monotonic(), split))

    def _publish(self, obj: dict[str, Any], st: dict[str, Any]) -> None:
        if st["ready"] is None and st["created"] is None and not st["invalid"]:
            return
        name = obj["metadata"]["name"]
        traffic = self._route_traffic(st)
        self._propagate_rollout(st, traffic)
        self._log_split(traffic)
        failed = st["failed"] is not None and st["failed"] == st["created"]
        uri = self.revision_uri.get(st["created"] or "", "")
        predictor: dict[str, Any] = {
            "latestCreatedRevision": st["created"],
            "latestReadyRevision": st["ready"],
            "traffic": traffic,
        }
        if st["rolled"]:
            predictor["latestRolledoutRevision"] = st["rolled"]
        if st["prev_rolled"]:
            predictor["previousRolledoutRevision"] = st["prev_rolled"]
        if st["ready"]:
            # Copied from the Knative Service once it is Ready.
            predictor["address"] = {"url": f"http://{ROUTE}.{NS}.svc.cluster.local"}
            predictor["url"] = (
                f"http://{render(self.domain_template, Name=ROUTE, Namespace=NS, Domain=DOMAIN)}"
            )
        config_failed = {
            "reason": "RevisionFailed",
            "message": f"Revision {st['failed']} failed with message: "
            + (
                "Back-off pulling image: unauthorized"
                if uri in self.unpullable
                else "Container failed with: bundle.json missing"
            ),
        }
        status = {
            "observedGeneration": self.child_generation,
            "url": f"http://{name}.{NS}.{DOMAIN}",
            "address": {"url": self.address_url},
            "components": {"predictor": predictor},
            "conditions": [
                {"type": "Ready", "status": "True" if st["ready"] else "Unknown"},
                {
                    "type": "PredictorConfigurationReady",
                    "status": "False" if failed else "True",
                    **(config_failed if failed else {}),
                },
            ],
            "modelStatus": self._model_status(
                st, failed and uri in self.failing, st["ready"] == st["created"]
            ),
        }
        self._patch_status(obj, status)

    def _patch_status(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        current = obj.get("status") or {}
        if any(current.get(k) != v for k, v in status.items()):
            self.api.patch_namespaced_custom_object_status(
                GROUP, ISVC_VERSION, NS, ISVC_PLURAL, obj["metadata"]["name"], {"status": status}
            )

    # ------------------------------------------------------------------ RawDeployment

    def _template(self, config: dict[str, Any], pod_meta: dict[str, Any]) -> dict[str, Any]:
        """The Deployment's pod template KServe writes for the predictor: the runtime's
        container with the model's fields laid over it (args appended), the pod fields."""
        if "model" in config:
            model = config["model"]
            runtime = self._runtime(model["runtime"]) or {"spec": {"containers": [{}]}}
            base = runtime["spec"]["containers"][0]
            container = {
                "name": "kserve-container",
                "image": base.get("image", ""),
                "args": [*(base.get("args") or []), *(model.get("args") or [])],
                "env": [*(base.get("env") or []), *(model.get("env") or [])],
                "resources": _merged_resources(
                    base.get("resources") or {}, model.get("resources") or {}
                ),
            }
            if model.get("lifecycle"):
                container["lifecycle"] = model["lifecycle"]
        else:
            container = copy.deepcopy(config["containers"][0])
            container["resources"] = _merged_resources({}, container.get("resources") or {})
        pod_fields = (
            "serviceAccountName", "nodeSelector", "tolerations", "priorityClassName",
            "imagePullSecrets", "securityContext", "terminationGracePeriodSeconds",
        )  # fmt: skip
        spec = {k: copy.deepcopy(config[k]) for k in pod_fields if k in config}
        spec.setdefault("terminationGracePeriodSeconds", 30)
        dep = deployment_status.predictor_deployment(NAME)
        meta: dict[str, Any] = {
            "labels": {**pod_meta["labels"], "app": dep},
            "annotations": dict(pod_meta["annotations"]),
        }
        if "model" in config:
            # predictor.go: the storage initializer (injected into the pod at admission) is
            # told where the model is by this annotation on the pod template.
            meta["annotations"][SOURCE_URI_ANNOTATION] = storage_uri(config)
        return {"metadata": meta, "spec": {**spec, "containers": [container]}}

    def _hpa_spec(self, config: dict[str, Any]) -> dict[str, Any]:
        low = max(1, config.get("minReplicas", 1))
        spec: dict[str, Any] = {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ROUTE},
            "minReplicas": low,
            "maxReplicas": max(config.get("maxReplicas", 0), low),
        }
        metric, target = config.get("scaleMetric", "cpu"), config.get("scaleTarget")
        if self.version == "0.14.1" or metric == "cpu" or (metric == "memory" and target):
            utilisation = target if target is not None else 80
            target_spec = {"type": "Utilization", "averageUtilization": utilisation}
            resource = {"name": metric, "target": target_spec}
            spec["metrics"] = [{"type": "Resource", "resource": resource}]
        return spec

    def _write_raw(
        self,
        name: str,
        st: dict[str, Any],
        config: dict[str, Any],
        pod_meta: dict[str, Any],
        now: float,
    ) -> None:
        template = self._template(config, pod_meta)
        strategy = copy.deepcopy(config.get("deploymentStrategy") or {"type": "RollingUpdate"})
        if strategy["type"] == "RollingUpdate":
            # setDefaultDeploymentSpec (deployment_reconciler.go, 0.14.1 lines 187-204)
            strategy.setdefault("rollingUpdate", {"maxUnavailable": "25%", "maxSurge": "25%"})
        wanted = {"template": template, "strategy": strategy}
        body = json.dumps(wanted, sort_keys=True)
        if body != st["config"]:
            st["config"] = body
            stored = st.get("deployment")
            if stored is not None and self.version in SUPERSET_UPDATES:
                wanted = _strategic_merge(stored, wanted)
            refusal = _invalid_deployment(wanted)
            if refusal:
                # The reconcile stops there (RawKubeReconciler: Deployment first), and retries.
                self._warn({"metadata": {"name": name}}, f"fails to reconcile predictor: {refusal}")
                return
            if wanted != stored:
                st["deployment"] = wanted
                st["n"] += 1
                st["created"] = f"{name}-predictor-{st['n']:05d}"
                st["failed"] = None
                self.revision_uri[st["created"]] = storage_uri(config)
                self.revision_meta[st["created"]] = copy.deepcopy(pod_meta)
                st["due"], st["written"] = now + self._start_s(st["created"]), now
                self._write_deployment(name, st, wanted["template"], wanted["strategy"])
        hpa = self._hpa_spec(config)
        if hpa != st["hpa"]:
            self._write_hpa(st, hpa)

    def _write_hpa(self, st: dict[str, Any], spec: dict[str, Any]) -> None:
        api, where = self.api, ("autoscaling", "v2", NS, "horizontalpodautoscalers")
        body = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler"}
        stored = copy.deepcopy(spec)
        if not stored.get("metrics"):
            # The API server's default for autoscaling/v2 (SetDefaults_HorizontalPodAutoscaler):
            # no metrics means 80 % average cpu utilisation.
            target = {"type": "Utilization", "averageUtilization": 80}
            stored["metrics"] = [
                {"type": "Resource", "resource": {"name": "cpu", "target": target}}
            ]
        if st["hpa"] is None:
            meta = {"name": ROUTE, "namespace": NS}
            api.create_namespaced_custom_object(*where, {**body, "metadata": meta, "spec": stored})
        else:
            # An Update replaces the spec whole (a metric dropped is gone).
            api.patch_namespaced_custom_object(*where, ROUTE, {"spec": {"metrics": None}})
            api.patch_namespaced_custom_object(*where, ROUTE, {"spec": stored})
        st["hpa"] = spec
        self.hpa_writes += 1

    def _deployments(self) -> tuple[kubernetes.client.CustomObjectsApi, tuple[str, str, str, str]]:
        return self.api, ("apps", "v1", NS, "deployments")

    def _write_deployment(
        self, name: str, st: dict[str, Any], template: dict[str, Any], strategy: dict[str, Any]
    ) -> None:
        """KServe writes the new pod template (the API server bumps the generation with it);
        then the Deployment controller gives the template the next rollout revision, and
        only later reports status for it (``_publish_raw``): three writes, as on a cluster."""
        api, where = self._deployments()
        dep_name = deployment_status.predictor_deployment(name)
        spec = {
            "selector": {"matchLabels": {"app": dep_name}},
            "strategy": strategy,
            "progressDeadlineSeconds": 600,
            "template": template,
        }
        if st["n"] == 1:
            meta = {"name": dep_name, "namespace": NS}
            spec["replicas"] = 1
            body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}
            api.create_namespaced_custom_object(*where, body)
            # Whether this API server keeps generations is known from the created object, before
            # anyone can read a status of it: an emulator that does not gets generation 1 here
            # and a bump in every later spec write, so no reader ever sees a new template under
            # the old generation (a state a real API server never shows).
            created = api.get_namespaced_custom_object(*where, dep_name)
            self.bookkeeping = "generation" in created["metadata"]
            if not self.bookkeeping:
                api.patch_namespaced_custom_object(
                    *where, dep_name, {"metadata": {"generation": 1}}
                )
        else:
            stored = api.get_namespaced_custom_object(*where, dep_name)
            # A merge patch merges maps: clear what KServe's write replaces (the merge of
            # 0.14.1 and 0.15.0 is already in ``template`` and ``strategy``).
            cleared = {"spec": {"template": None, "strategy": None}}
            api.patch_namespaced_custom_object(*where, dep_name, cleared)
            patch: dict[str, Any] = {"spec": spec}
            if not self.bookkeeping:
                # An emulator without generation bookkeeping: bump it in the same write,
                # as the API server does.
                patch["metadata"] = {"generation": stored["metadata"]["generation"] + 1}
            api.patch_namespaced_custom_object(*where, dep_name, patch)
        revision = {deployment_status.REVISION_ANNOTATION: str(st["n"])}
        api.patch_namespaced_custom_object(
            *where, dep_name, {"metadata": {"annotations": revision}}
        )
        st["prev"], st["ready_template"] = st.get("ready_template"), None

    def _publish_raw(self, obj: dict[str, Any], st: dict[str, Any]) -> None:
        if st["created"] is None:
            if st["invalid"]:
                self._patch_status(obj, {"modelStatus": self._model_status(st, False, False)})
            return
        api, where = self._deployments()
        dep_name = deployment_status.predictor_deployment(obj["metadata"]["name"])
        dep = api.get_namespaced_custom_object(*where, dep_name)
        done = st["ready"] == st["created"]
        old = 0 if done or st["n"] == 1 else 1
        available = 1 if done else old
        progressing = (
            {"status": "True", "reason": "NewReplicaSetAvailable"}
            if done
            else {"status": "True", "reason": "ReplicaSetUpdated"}
        )
        if not done and time.monotonic() - st["written"] >= self.deadline_after_s:
            # The controller gives up on the deadline, and keeps rolling: a later ready pod
            # turns the condition back to NewReplicaSetAvailable.
            progressing = {"status": "False", "reason": "ProgressDeadlineExceeded"}
            if st["created"] not in self.deadline_reported:
                self.deadline_reported.append(st["created"])
        dep_status = {
            "observedGeneration": dep["metadata"].get("generation", 0),
            "replicas": 1 + (0 if done else old),
            "updatedReplicas": 1,
            "availableReplicas": available,
            "conditions": [
                {"type": "Available", "status": "True" if available else "False"},
                {"type": "Progressing", **progressing},
            ],
        }
        if dep.get("status") != dep_status:
            api.patch_namespaced_custom_object_status(*where, dep_name, {"status": dep_status})
        # PropagateRawStatus: PredictorReady from Available/Progressing; no revision names.
        if done:
            ready = {"status": "True", "reason": "NewReplicaSetAvailable"}
        elif available:
            ready = {"status": "Unknown", "reason": "ReplicaSetUpdated"}
        else:
            ready = {"status": "False", "reason": "MinimumReplicasUnavailable"}
        crashed = st["failed"] is not None
        predictor: dict[str, Any] = {"url": self.address_url} if done else {}
        if self.version == "0.14.1":
            # PropagateRawStatus copies the revision of the Deployment KServe read; right after
            # a write that is the object it sent, without one (raw_kube_reconciler.go lines
            # 91-108), until the Deployment controller's update brings the next reconcile.
            revision = (dep["metadata"].get("annotations") or {}).get(
                deployment_status.REVISION_ANNOTATION
            )
            fresh = time.monotonic() - st["written"] < self.controller_lag_s
            predictor["latestCreatedRevision"] = "" if fresh else revision
        status: dict[str, Any] = {
            "observedGeneration": dep_status["observedGeneration"],
            "url": f"http://{obj['metadata']['name']}-{NS}.{DOMAIN}",
            "address": {"url": self.address_url},
            "components": {"predictor": predictor},
            "conditions": [
                {"type": "PredictorReady", **ready},
                {"type": "IngressReady", "status": "True"},
                {"type": "Ready", **ready},
            ],
            "modelStatus": self._model_status(st, crashed, done),
        }
        if self.version == "0.15.2":
            status["deploymentMode"] = "RawDeployment"
        self._patch_status(obj, status)
