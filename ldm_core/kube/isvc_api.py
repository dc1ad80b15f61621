"""The Kubernetes API calls an InferenceService rollout makes, and the one write form it
sends (:func:`merge_patch`).

Only JSON merge patches are sent (no PUT, no resourceVersion), and a create's response body
is never relied on, so the rollout works against API servers with partial bookkeeping. Every
create and patch asks for ``fieldValidation=Strict``, so an API server refuses a field the
installed CRD does not know instead of pruning it. Every call goes through
:func:`ldm_core.kube.errors.call_api`, so a refusal names the missing RBAC grant as the
PyTorchJob launcher's do.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import kubernetes

from ldm_core.errors import LdmError
from ldm_core.kube import deployment_status, knative
from ldm_core.kube.errors import ApiCall, call_api
from ldm_core.kube.isvc_build import GROUP, ISVC, ISVC_PLURAL, RUNTIME, RUNTIME_PLURAL
from ldm_core.kube.resources import CustomObjects, CustomResource

RBAC_RULES: list[tuple[str, str, tuple[str, ...]]] = [
    (GROUP, ISVC_PLURAL, ("create", "get", "patch")),
    (GROUP, RUNTIME_PLURAL, ("create", "get")),
    *deployment_status.RBAC_RULES,
    ("", "events", ("list",)),
]
"""Every (apiGroup, resource, verbs) :class:`InferenceServiceApi` calls."""
FIELD_VALIDATION = "Strict"
"""Every create and patch: refuse unknown fields (a CRD older than the code) loudly."""


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


class InferenceServiceApi:
    """Reads and writes of one rollout: the InferenceService, its ServingRuntime, the
    predictor's Deployment and HPA (RawDeployment mode), and the Warning events KServe
    records on the InferenceService.

    Args:
        api_client: the API to use (see :func:`ldm_core.kube.client.api_client`).
        error: what a refused or failed call raises.
    """

    def __init__(self, api_client: kubernetes.client.ApiClient, error: type[LdmError]) -> None:
        self.api_client = api_client
        self.error = error

    def _objects(self, resource: CustomResource, namespace: str) -> CustomObjects:
        return CustomObjects(self.api_client, resource, namespace, self.error)

    def _call(self, call: ApiCall, send: Any) -> Any:
        host = str(self.api_client.configuration.host)
        return call_api(call, send, host=host, error=self.error)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The InferenceService as stored, or None when there is none of that name."""
        return self._objects(ISVC, namespace).get(name)

    def runtime(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ServingRuntime ``name``, or None."""
        return self._objects(RUNTIME, namespace).get(name)

    def create(self, obj: dict[str, Any], resource: CustomResource = ISVC) -> None:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        api = kubernetes.client.CustomObjectsApi(self.api_client)
        args = (resource.group, resource.version, ns, resource.plural, obj)
        self._call(
            ApiCall("create", resource.rbac_name, ns, name),
            lambda: api.create_namespaced_custom_object(*args, field_validation=FIELD_VALIDATION),
        )

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        """A merge patch of the InferenceService."""
        api = kubernetes.client.CustomObjectsApi(self.api_client)
        args = (GROUP, ISVC.version, namespace, ISVC_PLURAL, name, body)
        self._call(
            ApiCall("patch", ISVC.rbac_name, namespace, name),
            lambda: api.patch_namespaced_custom_object(*args, field_validation=FIELD_VALIDATION),
        )

    def deployment(self, ns: str, name: str) -> dict[str, Any] | None:
        """The predictor's Deployment (RawDeployment mode), or None before KServe made it."""
        return deployment_status.read(self.api_client, "deployment", ns, name, self.error)

    def hpa(self, ns: str, name: str) -> dict[str, Any] | None:
        """The predictor's HorizontalPodAutoscaler (RawDeployment mode), or None."""
        return deployment_status.read(self.api_client, "hpa", ns, name, self.error)

    def warning(self, ns: str, name: str, since: datetime, patterns: tuple[str, ...]) -> str | None:
        """The newest Warning event on the InferenceService since ``since`` whose message
        matches one of ``patterns`` (:func:`ldm_core.kube.knative.reconcile_failure`)."""
        core = kubernetes.client.CoreV1Api(self.api_client)
        events = self._call(
            ApiCall("list", "events", ns),
            lambda: core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}"),
        )
        return knative.reconcile_failure(events.items or [], name, since, patterns)

    def ensure_serving_runtime(self, runtime: dict[str, Any]) -> str:
        """Create the ServingRuntime if the namespace has none of that name (never overwrite
        one a platform engineer applied from manifests). Returns "created" or "exists"."""
        meta = runtime["metadata"]
        if self.runtime(meta["namespace"], meta["name"]) is not None:
            return "exists"
        self.create(runtime, RUNTIME)
        return "created"
