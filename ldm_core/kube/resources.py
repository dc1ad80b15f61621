"""Typed access to one kind of custom resource in one namespace.

The launcher and the rollout need the same four calls on their custom resources (get,
create, merge-patch, delete) with the same conventions: a missing object is ``None``, not an
exception; a create's answer is never trusted to carry the object (some API servers answer
with an empty body); only JSON merge patches are sent (no PUT); a patch or delete decided on
an object as read can be made to apply to that version only (``seen``: optimistic
concurrency, the API server answers 409 Conflict once the object changed); and every failure
goes through :func:`ldm_core.kube.errors.call_api`. :func:`api_served` asks
whether a custom resource is served at all, with only the ``get`` verb the Role grants;
:func:`cluster_serves` asks it of the cluster this process's credentials reach.

Every create and patch asks for strict field validation (``fieldValidation=Strict``). An
API server otherwise drops, with a mere warning header, every field the CRD it serves does
not declare, and answers success: a TrainJob written for Trainer v2.2 then loses its pod
settings on a v2.1 cluster (Kubeflow 1.11) and fails much later, on a pod without its
volume. Strict, the write is refused with 400 BadRequest and the decoder's ``strict decoding
error: unknown field "spec.x"`` (k8s.io/apiserver handlers, the CRD handler of
apiextensions-apiserver); the error raised names each field and, from the resource's
:attr:`CustomResource.field_releases`, the releases that have it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from ldm_core.errors import LdmError
from ldm_core.kube.client import KubeConfigError, current_namespace
from ldm_core.kube.client import api_client as make_api_client
from ldm_core.kube.errors import ApiCall, api_message, call_api

PROBE_NAME = "ldm-backend-probe"
"""A name no object has: the probe reads it to learn whether the resource is served."""
STRICT = "Strict"
"""``fieldValidation`` of every write: an unknown field is refused, not dropped."""
_UNKNOWN_FIELD = re.compile(r'unknown field "([^"]+)"')


@dataclass(frozen=True)
class CustomResource:
    """Where the API server serves a custom resource, and what RBAC calls it."""

    group: str
    version: str
    plural: str
    kind: str
    field_releases: tuple[tuple[str, str], ...] = ()
    """(field path, the releases that have it and what to set) for the fields the CRDs of
    the supported releases do not all declare; quoted when a strict write is refused for
    one of them."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def rbac_name(self) -> str:
        """``plural.group``, as RBAC rules and ``kubectl auth can-i`` name it."""
        return f"{self.plural}.{self.group}"

    def unknown(self, path: str) -> str:
        """Why the API server does not know field ``path``, and what to do about it."""
        why = dict(self.field_releases).get(path, f"not in the {self.kind} CRD this cluster serves")
        return f"{path}: unknown field ({why})"


def refused_fields(err: ApiException) -> list[str]:
    """The fields a strict write was refused for (400, the decoder's "strict decoding error:
    unknown field ..."); empty for any other answer."""
    if err.status != 400:
        return []
    return _UNKNOWN_FIELD.findall(api_message(err, limit=10_000))


class CustomObjects:
    """The objects of one :class:`CustomResource` in one namespace.

    Args:
        api_client: a configured client (see :func:`ldm_core.kube.client.api_client`).
        resource: which custom resource.
        namespace: where the objects live.
        error: the exception type raised for a failed call (the caller's own).
    """

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        resource: CustomResource,
        namespace: str,
        error: type[LdmError],
    ) -> None:
        self.api = kubernetes.client.CustomObjectsApi(api_client)
        self.resource = resource
        self.namespace = namespace
        self.error = error
        self.host = str(api_client.configuration.host)

    def _call(self, verb: str, name: str, send: Any, absent_on: tuple[int, ...] = ()) -> Any:
        call = ApiCall(verb, self.resource.rbac_name, self.namespace, name)

        def sent() -> Any:
            try:
                return send()
            except ApiException as err:
                fields = refused_fields(err)
                if not fields:
                    raise
                reasons = "; ".join(self.resource.unknown(f) for f in fields)
                raise self.error(f"{call}: {reasons}") from None

        return call_api(call, sent, host=self.host, error=self.error, absent_on=absent_on)

    def _args(self) -> tuple[str, str, str, str]:
        r = self.resource
        return r.group, r.version, self.namespace, r.plural

    def _here(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "metadata": {**body["metadata"], "namespace": self.namespace}}

    def get(self, name: str) -> dict[str, Any] | None:
        """The object, or None when there is none of that name."""
        return self._call(
            "get", name, lambda: self.api.get_namespaced_custom_object(*self._args(), name), (404,)
        )

    def create(self, body: dict[str, Any], *, exist_ok: bool = False) -> dict[str, Any] | None:
        """Create ``body`` in this namespace; return the server's answer (``{}`` when it sent
        none). With ``exist_ok``, an object of that name already there returns None."""
        body = self._here(body)
        return self._call(
            "create",
            body["metadata"]["name"],
            lambda: (
                self.api.create_namespaced_custom_object(
                    *self._args(), body, field_validation=STRICT
                )
                or {}
            ),
            (409,) if exist_ok else (),
        )

    def unknown_fields(self, body: dict[str, Any]) -> list[str]:
        """The fields of ``body`` the API server's CRD does not declare, asked with a
        server-side dry-run create under strict field validation: the ``create`` grant,
        nothing stored (admission webhooks run, as they declare no side effects). Empty when
        the server takes every field; another refusal raises, as the create would."""
        body = self._here(body)
        call = ApiCall("create", self.resource.rbac_name, self.namespace, body["metadata"]["name"])

        def probe() -> list[str]:
            try:
                self.api.create_namespaced_custom_object(
                    *self._args(), body, dry_run="All", field_validation=STRICT
                )
            except ApiException as err:
                fields = refused_fields(err)
                if not fields:
                    raise
                return fields
            return []

        found = call_api(call, probe, host=self.host, error=self.error, absent_on=(409,))
        return found or []

    def patch(
        self, name: str, patch: dict[str, Any], *, seen: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Apply a JSON merge patch (RFC 7386; None deletes a key); return the answer.

        With ``seen``, the object the patch was computed from, the patch carries its
        ``metadata.resourceVersion``: the API server applies it to that version only, and
        None is returned when the object changed (409 Conflict) or went (404) since; read it
        again and decide anew."""
        absent_on: tuple[int, ...] = ()
        if seen is not None:
            version = (seen.get("metadata") or {}).get("resourceVersion")
            meta = {**(patch.get("metadata") or {}), "resourceVersion": version}
            patch, absent_on = {**patch, "metadata": meta}, (404, 409)
        answer = self._call(
            "patch",
            name,
            lambda: self.api.patch_namespaced_custom_object(
                *self._args(), name, patch, field_validation=STRICT
            ),
            absent_on,
        )
        return None if answer is None and seen is not None else (answer or {})

    def delete(self, name: str, *, seen: Mapping[str, Any] | None = None) -> bool:
        """Delete with foreground propagation (dependents, e.g. pods, go first); False when
        nothing was deleted.

        With ``seen``, the object the decision to delete was made on, only that object at
        that version is deleted (preconditions on its uid and resourceVersion): False too
        when it changed since (409 Conflict); read it again and decide anew."""
        preconditions = None
        if seen is not None:
            meta = seen.get("metadata") or {}
            preconditions = kubernetes.client.V1Preconditions(
                resource_version=meta.get("resourceVersion"), uid=meta.get("uid")
            )
        options = kubernetes.client.V1DeleteOptions(
            propagation_policy="Foreground", preconditions=preconditions
        )
        answer = self._call(
            "delete",
            name,
            lambda: (
                self.api.delete_namespaced_custom_object(*self._args(), name, body=options) or {}
            ),
            (404, 409) if seen is not None else (404,),
        )
        return answer is not None


def api_served(
    api_client: kubernetes.client.ApiClient, resource: CustomResource, namespace: str
) -> tuple[bool, str]:
    """Whether the API server serves ``resource``, and why it seems so.

    Reads an object that does not exist. A served resource answers a ``Status`` 404 whose
    ``details`` name the resource (``kind`` is the plural); an unserved one answers the
    server's plain-text "404 page not found". ``get`` is a verb the pipeline's Role grants,
    whereas listing CRDs would need a ClusterRole. Any other answer (a refusal, a 404 that
    names another resource), or none, counts as not served, and the reason says which.
    """
    api = kubernetes.client.CustomObjectsApi(api_client)
    try:
        api.get_namespaced_custom_object(
            resource.group, resource.version, namespace, resource.plural, PROBE_NAME
        )
        return True, f"{resource.kind} API served"
    except ApiException as err:
        try:
            details = json.loads(err.body or "{}").get("details") or {}
        except (ValueError, AttributeError):
            details = {}
        if err.status == 404 and details.get("kind") == resource.plural:
            return True, f"{resource.kind} API served"
        return False, f"{resource.kind} API answered {err.status} {err.reason}"
    except (urllib3.exceptions.HTTPError, OSError) as err:
        return False, f"Kubernetes API not reachable: {type(err).__name__}: {err}"


def cluster_serves(resource: CustomResource, namespace: str = "") -> tuple[bool, str]:
    """:func:`api_served` on the cluster of the current credentials (the pod's service
    account, else the kubeconfig), in ``namespace`` or the current one; never raises: no
    credentials at all is an answer too (not served, and why)."""
    try:
        client = make_api_client()
    except KubeConfigError as err:
        return False, str(err)
    return api_served(client, resource, namespace or current_namespace())
