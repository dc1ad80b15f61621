"""KServe's controller, Knative and the cluster network, reduced to what a rollout observes.

:class:`FakeKServe` patches InferenceService status from a background thread against the
emulated API (:class:`tests.harness.kube.KubeApi`): it notices a new predictor spec after a
while (until then the previous revision's Ready is all there is - the stale state a rollout
must not trust), creates a revision, and makes it ready, failed, or never ready. It plays
both deployment modes as KServe reports them:

- Serverless (``PropagateStatus``): ``latestCreatedRevision`` / ``latestReadyRevision`` /
  ``traffic`` with Knative's tag URLs (external ``latest-<isvc>-predictor.<ns>.<domain>``),
  the predictor's cluster-local ``address``, the Knative Service's conditions, and the
  Knative Service's own ``observedGeneration``. With ``features`` it plays Knative's
  webhook too: a pod spec that needs a podspec flag that is off gets no revision, and
  KServe's Warning event on the InferenceService carries the refusal (kserve#1425).
- RawDeployment (``PropagateRawStatus``): a Deployment ``<isvc>-predictor`` with its
  rollout revision, generation and replica counts (it plays the Deployment controller);
  on the InferenceService only ``PredictorReady`` / ``Ready`` from the Deployment's
  conditions, the Deployment's ``observedGeneration``, ``deploymentMode`` and ``modelStatus``
  from the pods: no revision names, no traffic.

:data:`NETWORK` plays the cluster's DNS and the profile's Istio policy for smoke inferences:
the canary's cluster-local tag name reaches the new revision's server (with the token the
AuthorizationPolicy wants, when one is set); external Knative hosts do not resolve.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import kubernetes
from kubernetes.client.exceptions import ApiException

from ldm_core.deploy import SmokeTestError
from ldm_core.kube import deployment_status, knative
from ldm_core.kube.isvc_build import (
    GROUP,
    ISVC_PLURAL,
    ISVC_VERSION,
    RUNTIME_PLURAL,
    RUNTIME_VERSION,
)
from tests.harness.kube import KubeApi

NS = "brain-ldm"
NAME = "brain-ldm"
OLD_URI = "s3://models/brain-ldm/aaaa"
NEW_URI = "s3://models/brain-ldm/bbbb"
BAD_URI = "s3://models/brain-ldm/broken"
STUCK_URI = "s3://models/brain-ldm/stuck"
UNPULLABLE_URI = "s3://models/brain-ldm/unpullable-image"
KSERVE_UA = "fake-kserve"
DOMAIN = "example.com"
CANARY_LOCAL_HOST = f"latest-{NAME}-predictor.{NS}.svc.cluster.local"
"""The cluster-local name Knative gives the ``latest`` tag of the predictor's route."""
SERVED = {
    f"{GROUP}/{ISVC_VERSION}/{ISVC_PLURAL}": "InferenceService",
    f"{GROUP}/{RUNTIME_VERSION}/{RUNTIME_PLURAL}": "ServingRuntime",
    "apps/v1/deployments": "Deployment",
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


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Network:
    """Where a smoke inference sent from a pipeline pod lands (the test's DNS + Istio)."""

    def __init__(self) -> None:
        self.kserve: FakeKServe | None = None

    def route(self, url: str, headers: dict[str, str]) -> str:
        """The loopback server that answers ``url``, or SmokeTestError as the client sees it."""
        host = httpx.URL(url).host
        if host in ("127.0.0.1", "localhost"):
            return url
        ks = self.kserve
        if ks is not None and host == CANARY_LOCAL_HOST:
            if ks.token and headers.get("Authorization") != f"Bearer {ks.token}":
                # What the sidecar answers when no AuthorizationPolicy allows the caller.
                raise SmokeTestError(f"GET {url}/v2/models/{NAME}: HTTP 403 RBAC: access denied")
            return ks.latest_url
        raise SmokeTestError(f"{url}: ConnectError: [Errno -2] Name or service not known")


NETWORK = Network()


class FakeKServe:
    """KServe's controller + Knative (or the Deployment controller, ``raw=True``).

    As KServe's ``PropagateStatus`` does, ``status.observedGeneration`` is the child's (the
    Knative Service's or the Deployment's), not the InferenceService's: the child's counter
    grows when KServe writes a new child spec and starts ``child_ahead`` above the
    InferenceService's, so it can run ahead of ``metadata.generation`` or behind it.

    Args:
        latest_url: the loopback server the newest revision's pods answer on.
        address_url: the loopback stand-in for the InferenceService's cluster-local address.
        failing: storage URIs whose model fails to load (crash-looping pods).
        stuck: storage URIs whose revision never gets ready (and never fails).
        unpullable: storage URIs whose revision fails with an image pull error (Serverless:
            only the Configuration's condition says so; the pods are Pending).
        features: Knative's config-features data; None accepts every pod-spec field.
        token: the bearer the predictor's AuthorizationPolicy wants (None: no policy).
    """

    def __init__(
        self,
        api: KubeApi,
        *,
        latest_url: str,
        address_url: str,
        failing: tuple[str, ...] = (BAD_URI,),
        stuck: tuple[str, ...] = (STUCK_URI,),
        unpullable: tuple[str, ...] = (UNPULLABLE_URI,),
        notice_after_s: float = 0.4,
        ready_after_s: float = 0.3,
        child_ahead: int = 0,
        raw: bool = False,
        features: dict[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        self.client = api.client(KSERVE_UA)
        self.api = kubernetes.client.CustomObjectsApi(self.client)
        self.latest_url, self.address_url = latest_url, address_url
        self.failing, self.stuck, self.unpullable = failing, stuck, unpullable
        self.notice_after_s, self.ready_after_s = notice_after_s, ready_after_s
        self.ready_at: dict[str, float] = {}
        self.child_generation = child_ahead
        self.raw, self.features, self.token = raw, features, token
        self.bookkeeping: bool | None = None
        """Whether the emulated API bumps metadata.generation itself (found on first update)."""
        self._child_spec: tuple[str | None, int | None] | None = None
        self.revision_uri: dict[str, str] = {}
        self.canaries_seen: list[int] = []
        self.refusals: list[str] = []
        self._state: dict[str, dict[str, Any]] = {}
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

    # ------------------------------------------------------------------ reconcile

    def _reconcile(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        predictor = obj["spec"]["predictor"]
        config = json.dumps(
            {k: v for k, v in predictor.items() if k != "canaryTrafficPercent"}, sort_keys=True
        )
        canary = None if self.raw else predictor.get("canaryTrafficPercent")
        if canary is not None and canary not in self.canaries_seen:
            self.canaries_seen.append(canary)
        st = self._state.setdefault(
            name,
            {"config": None, "since": None, "n": 0, "created": None, "ready": None},
        )
        st.setdefault("prev", None)
        now = time.monotonic()
        if config != st["config"] and self._noticed(st, config, now):
            refusal = self._webhook_refusal(predictor)
            if refusal is None:
                self._new_revision(name, st, config, predictor, now)
            elif st.get("refused") != config:
                st["refused"] = config
                self._warn(obj, refusal)
        uri = self.revision_uri.get(st["created"] or "", "")
        became_ready = None
        if st.get("due") is not None and now >= st["due"] and uri not in self.stuck:
            st["due"] = None
            if uri in (*self.failing, *self.unpullable):
                st["failed"] = st["created"]
            else:
                st["prev"], st["ready"] = st["ready"], st["created"]
                became_ready = st["created"]
        if self.raw:
            self._publish_raw(obj, st)
        else:
            if (st["config"], canary) != self._child_spec:
                self._child_spec = (st["config"], canary)
                self.child_generation += 1  # KServe wrote the ksvc: Knative observes it
            self._publish(obj, st, canary)
        if became_ready is not None:
            # Only once the status says so: a test that waits for ready_at then reads it.
            self.ready_at[became_ready] = now

    def _noticed(self, st: dict[str, Any], config: str, now: float) -> bool:
        if st["since"] is None or st["since"][0] != config:
            st["since"] = (config, now)
        return now - st["since"][1] >= self.notice_after_s

    def _new_revision(
        self, name: str, st: dict[str, Any], config: str, predictor: dict[str, Any], now: float
    ) -> None:
        st["config"], st["n"] = config, st["n"] + 1
        st["created"] = f"{name}-predictor-{st['n']:05d}"
        st["failed"], st["due"] = None, now + self.ready_after_s
        self.revision_uri[st["created"]] = storage_uri(predictor)
        if self.raw:
            self._write_deployment(name, st)

    # ------------------------------------------------------------------ Knative's webhook

    def _webhook_refusal(self, predictor: dict[str, Any]) -> str | None:
        """What Knative's validating webhook answers for the pod spec KServe would write."""
        if self.raw or self.features is None:
            return None
        runtime_spec = None
        runtime = (predictor.get("model") or {}).get("runtime")
        if runtime:
            try:
                runtime_spec = self.api.get_namespaced_custom_object(
                    GROUP, RUNTIME_VERSION, NS, RUNTIME_PLURAL, runtime
                )["spec"]
            except ApiException as err:
                if err.status != 404:
                    raise
        fields = [
            f"spec.template.spec.{field}"
            for field, flag in knative.PODSPEC_FLAGS.items()
            if (predictor.get(field) or (runtime_spec or {}).get(field))
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
        meta = obj["metadata"]
        kubernetes.client.CoreV1Api(self.client).create_namespaced_event(
            NS,
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{meta['name']}.{len(self.refusals):x}", "namespace": NS},
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

    # ------------------------------------------------------------------ Serverless status

    def _traffic(self, name: str, st: dict[str, Any], canary: int | None) -> list[dict[str, Any]]:
        def target(tag: str, revision: str, percent: int, latest: bool) -> dict[str, Any]:
            # Knative's tag URL is the external one: behind the auth proxy on Kubeflow.
            url = f"http://{tag}-{name}-predictor.{NS}.{DOMAIN}"
            return {
                "tag": tag,
                "revisionName": revision,
                "percent": percent,
                "latestRevision": latest,
                "url": url,
            }

        if st["ready"] == st["created"] and canary is not None and st["prev"]:
            return [
                target("latest", st["ready"], canary, True),
                target("prev", st["prev"], 100 - canary, False),
            ]
        if st["ready"]:
            return [target("latest", st["ready"], 100, st["ready"] == st["created"])]
        return []

    def _publish(self, obj: dict[str, Any], st: dict[str, Any], canary: int | None) -> None:
        if st["ready"] is None and st["created"] is None:
            return
        name = obj["metadata"]["name"]
        failed = st.get("failed") is not None
        uri = self.revision_uri.get(st["created"] or "", "")
        load_failed = failed and uri in self.failing
        predictor: dict[str, Any] = {
            "latestCreatedRevision": st["created"],
            "latestReadyRevision": st["ready"],
            "traffic": self._traffic(name, st, canary),
        }
        if st["ready"]:
            # Copied from the Knative Service once it is Ready.
            predictor["address"] = {"url": f"http://{name}-predictor.{NS}.svc.cluster.local"}
            predictor["url"] = f"http://{name}-predictor.{NS}.{DOMAIN}"
        config_failed = {
            "reason": "RevisionFailed",
            "message": f"Revision {st.get('failed')} failed with message: "
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
            "modelStatus": {
                "transitionStatus": "BlockedByFailedLoad"
                if load_failed
                else ("UpToDate" if st["ready"] == st["created"] else "InProgress"),
                "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "bundle.json missing"}
                if load_failed
                else None,
            },
        }
        self._patch_status(obj, status)

    def _patch_status(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        if obj.get("status") != status:
            self.api.patch_namespaced_custom_object_status(
                GROUP,
                ISVC_VERSION,
                NS,
                ISVC_PLURAL,
                obj["metadata"]["name"],
                {"status": status},
            )

    # ------------------------------------------------------------------ RawDeployment

    def _deployments(self) -> tuple[kubernetes.client.CustomObjectsApi, tuple[str, str, str, str]]:
        return self.api, ("apps", "v1", NS, "deployments")

    def _write_deployment(self, name: str, st: dict[str, Any]) -> None:
        """KServe writes the new pod template (the API server bumps the generation with it);
        then the Deployment controller gives the template the next rollout revision, and
        only later reports status for it (``_publish_raw``): three writes, as on a cluster."""
        api, where = self._deployments()
        dep_name = deployment_status.predictor_deployment(name)
        spec = {
            "replicas": 1,
            "selector": {"matchLabels": {"app": dep_name}},
            "template": {
                "metadata": {"labels": {"app": dep_name}},
                "spec": {"containers": [{"name": "kserve-container", "image": st["config"]}]},
            },
        }
        if st["n"] == 1:
            meta = {"name": dep_name, "namespace": NS, "generation": 1}
            body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}
            api.create_namespaced_custom_object(*where, body)
        else:
            stored = api.get_namespaced_custom_object(*where, dep_name)
            patch: dict[str, Any] = {"spec": spec}
            if self.bookkeeping is False:
                # An emulator without generation bookkeeping: bump it in the same write,
                # as the API server does.
                patch["metadata"] = {"generation": stored["metadata"]["generation"] + 1}
            api.patch_namespaced_custom_object(*where, dep_name, patch)
            if self.bookkeeping is None:
                after = api.get_namespaced_custom_object(*where, dep_name)
                self.bookkeeping = (
                    after["metadata"]["generation"] > stored["metadata"]["generation"]
                )
                if not self.bookkeeping:  # only the first update can find out
                    bump = {"metadata": {"generation": stored["metadata"]["generation"] + 1}}
                    api.patch_namespaced_custom_object(*where, dep_name, bump)
        revision = {deployment_status.REVISION_ANNOTATION: str(st["n"])}
        api.patch_namespaced_custom_object(
            *where, dep_name, {"metadata": {"annotations": revision}}
        )

    def _publish_raw(self, obj: dict[str, Any], st: dict[str, Any]) -> None:
        if st["created"] is None:
            return
        api, where = self._deployments()
        dep_name = deployment_status.predictor_deployment(obj["metadata"]["name"])
        dep = api.get_namespaced_custom_object(*where, dep_name)
        done = st["ready"] == st["created"]
        old = 0 if done or st["prev"] is None and st["ready"] is None else 1
        available = 1 if done else old
        progressing = (
            {"status": "True", "reason": "NewReplicaSetAvailable"}
            if done
            else {"status": "True", "reason": "ReplicaSetUpdated"}
        )
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
        # PropagateRawStatus: PredictorReady from Available/Progressing; no revisions.
        if done:
            ready = {"status": "True", "reason": "NewReplicaSetAvailable"}
        elif available:
            ready = {"status": "Unknown", "reason": "ReplicaSetUpdated"}
        else:
            ready = {"status": "False", "reason": "MinimumReplicasUnavailable"}
        crashed = st.get("failed") is not None
        status = {
            "observedGeneration": dep_status["observedGeneration"],
            "deploymentMode": "RawDeployment",
            "url": f"http://{obj['metadata']['name']}-{NS}.{DOMAIN}",
            "address": {"url": self.address_url},
            "components": {"predictor": {"url": self.address_url} if done else {}},
            "conditions": [
                {"type": "PredictorReady", **ready},
                {"type": "IngressReady", "status": "True"},
                {"type": "Ready", **ready},
            ],
            "modelStatus": {
                "transitionStatus": "BlockedByFailedLoad" if crashed else "UpToDate",
                "lastFailureInfo": {
                    "reason": "ModelLoadFailed",
                    "message": "bundle.json missing",
                    "exitCode": 1,
                }
                if crashed
                else None,
            },
        }
        self._patch_status(obj, status)
