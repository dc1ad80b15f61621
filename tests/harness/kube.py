"""An in-memory Kubernetes API server on loopback, for the tests of ``ldm_core.kube``.

:class:`KubeApi` serves kmock's ``KubernetesEmulator`` on 127.0.0.1 from an event loop in
its own thread, so the synchronous ``kubernetes`` client talks to it over real HTTP. Only
kmock's public API is used. Where our code can tell the difference, it answers as a real
API server does:

- only the resources it was told to serve (plus core ``pods`` and ``events``) exist: any
  other answers the API server's plain-text ``404 page not found``, as a cluster without
  that CRD does; a missing object of a served resource answers a ``NotFound`` Status whose
  ``details`` name the resource (``kind`` is the plural, as the apiserver writes it);
- with ``generations=True``, ``metadata.generation`` is 1 on create and grows by one on
  every write that changes ``spec`` (status writes leave it alone), as the apiserver keeps
  it for CRDs with a status subresource; without, the emulator keeps none (the gap the
  rollout must tolerate);
- ``pods/log`` answers from :attr:`KubeApi.logs` (kubelet-style timestamped lines; honours
  ``timestamps`` and ``tailLines``; 404 once the pod's lines are gone);
- every request is recorded with its User-Agent, so a test can hold the calls one client
  made to the RBAC rules its module declares (:func:`rbac_triple`);
- with ``crds`` (a directory of CRD files), writes of those custom resources are checked
  against the CRD's structural schema as the apiserver's server-side field validation does
  (KEP-2885; k8s.io/apiserver pkg/endpoints/handlers/create.go and patch.go, the
  apiextensions-apiserver's structural pruning): ``?fieldValidation=Strict`` refuses a body
  with an unknown field (400 BadRequest, ``strict decoding error: unknown field "spec.x"``,
  the object is not written); the default, ``Warn``, prunes the unknown fields and answers
  a ``Warning: 299 - "unknown field ..."`` header per field; ``Ignore`` prunes silently. A
  field is unknown where the schema lists ``properties`` without
  ``x-kubernetes-preserve-unknown-fields``; ``additionalProperties`` maps and ``items``
  lists are descended; ``apiVersion``, ``kind`` and ``metadata`` at the root are the
  apiserver's own.
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import kubernetes
import yaml

from ldm_core.kube.client import api_client

Triple = tuple[str, str, str]

CORE_RESOURCES = {"v1/pods": "Pod", "v1/events": "Event"}
"""Core resources every API server serves (the ones the launcher reads)."""
PAGE_NOT_FOUND = b"404 page not found\n"
"""What kube-apiserver answers for a path no API group serves (Go's http.NotFound)."""
PLAIN_TEXT = kmock.headers({"Content-Type": "text/plain; charset=utf-8"})
_POD_LOG = re.compile(r"/api/v1/namespaces/[^/]+/pods/[^/]+/log")
ROOT_FIELDS = ("apiVersion", "kind", "metadata")
"""What every object has whatever its schema says (the apiserver's own fields)."""


@functools.cache
def crd_schemas(directory: Path) -> dict[str, dict[str, Any]]:
    """``group/version/plural`` -> openAPIV3Schema of every CRD file in ``directory``."""
    out: dict[str, dict[str, Any]] = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted(Path(directory).glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=loader):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, plural = doc["spec"]["group"], doc["spec"]["names"]["plural"]
            for version in doc["spec"]["versions"]:
                schema = version["schema"]["openAPIV3Schema"]
                out[f"{group}/{version['name']}/{plural}"] = schema
    return out


def unknown_fields(value: Any, schema: Mapping[str, Any], path: str = "") -> list[str]:
    """The paths of ``value``'s fields that ``schema`` does not know, as the apiserver names
    them (``spec.predictor.foo``, ``spec.containers[0].bar``). ``None`` values (a merge
    patch's deletions) are not fields."""
    found: list[str] = []
    if isinstance(value, Mapping):
        props = schema.get("properties")
        keep = schema.get("x-kubernetes-preserve-unknown-fields") or props is None
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if item is None or (not path and key in ROOT_FIELDS):
                continue
            if props is not None and key in props:
                found += unknown_fields(item, props[key], where)
            elif isinstance(extra, Mapping):
                found += unknown_fields(item, extra, where)
            elif not keep:
                found.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def prune(value: Any, paths: Iterable[str]) -> None:
    """Drop the fields at ``paths`` (from :func:`unknown_fields`) from ``value`` in place."""
    for path in paths:
        parts = [p for p in re.split(r"\.|\[(\d+)\]", path) if p]
        node = value
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node.pop(parts[-1], None)


@attrs.frozen
class _BadRequest(kmock.KubernetesError):
    status: int = 400
    reason: str = "BadRequest"
    message: str = ""
    details: Any = None


@attrs.define(kw_only=True)
class _FieldValidatingEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the apiserver's field validation of custom resources (see the
    module docstring). kmock stores a write before any reaction runs, so the check sits in
    front of that: a subclass, as kmock's docstring suggests for field-specific behaviour."""

    schemas: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        resource = request.resource
        writes = (kmock.action.CREATE, kmock.action.UPDATE)
        key = resource and f"{resource.group}/{resource.version}/{resource.plural}".lstrip("/")
        if request.action not in writes or key not in self.schemas:
            return await super()._handle(request)
        if not isinstance(request.data, dict):
            return await super()._handle(request)
        unknown = unknown_fields(request.data, self.schemas[key])
        directive = request.params.get("fieldValidation", "Warn")
        if unknown and directive == "Strict":
            kind = (self.schemas[key].get("x-kubernetes-group-version-kind") or [{}])[0]
            fields = ", ".join(f'unknown field "{u}"' for u in unknown)
            what = request.data.get("kind") or kind.get("kind") or resource.plural
            return await self._render_error(
                _BadRequest(
                    message=f"{what} in version {resource.version!r} cannot be handled as a "
                    f"{what}: strict decoding error: {fields}"
                )
            )
        prune(request.data, unknown)
        response = await super()._handle(request)
        if directive == "Warn" and not response.prepared:
            for field in unknown:
                response.headers.add("Warning", f'299 - "unknown field \\"{field}\\""')
        return response


class KubeApi:
    """A loopback Kubernetes API server for one test; use it as a context manager.

    Args:
        resources: ``{"group/version/plural": "Kind"}`` of the custom resources to serve.
        generations: keep ``metadata.generation`` as a real API server does.
        crds: a directory of CRD files whose structural schemas the writes of those
            resources are validated and pruned against (``fieldValidation``); None: none.
    """

    def __init__(
        self,
        resources: Mapping[str, str] | None = None,
        *,
        generations: bool = False,
        crds: str | Path | None = None,
    ) -> None:
        self.logs: dict[str, list[str]] = {}
        """Pod name -> its log lines, each ``<RFC3339 timestamp> <text>``."""
        self.url = ""
        self.emulator: kmock.KubernetesEmulator
        """The kmock emulator once started, for reactions a test adds (``[...] << 403``)."""
        self._served = {**CORE_RESOURCES, **(resources or {})}
        self._generations = generations
        self._schemas = crd_schemas(Path(crds)) if crds is not None else {}
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="kube-api", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> KubeApi:
        self._thread.start()
        assert self._ready.wait(20), "the emulated Kubernetes API did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        emulator = _FieldValidatingEmulator(schemas=self._schemas)
        async with emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            for resource, kind in self._served.items():
                emulator.resources[resource] = {"namespaced": True, "kind": kind}
            # Below the default priority: a reaction a test adds (``<< 403``) wins.
            behaviour = emulator**-1
            behaviour[self._unserved] << 404 << PLAIN_TEXT << PAGE_NOT_FOUND
            behaviour[kmock.action.FETCH] << self._not_found
            behaviour["get", _POD_LOG] << self._pod_log
            if self._generations:
                behaviour[self._spec_write] << self._bump_generation
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    # ------------------------------------------------------------------ behaviours

    def _unserved(self, request: kmock.Request) -> bool:
        resource = request.resource
        if resource is None or not resource.plural:
            return False
        return f"{resource.group}/{resource.version}/{resource.plural}".lstrip("/") not in (
            self._served
        )

    def _not_found(self, request: kmock.Request) -> Any:
        """A NotFound Status as the apiserver writes it; fall through if the object exists."""
        resource = request.resource
        if request.name is None or resource is None or request.subresource:
            raise NotImplementedError  # not a read of one object: the emulator answers
        if self._unserved(request):
            raise NotImplementedError  # the page-not-found reaction answers
        key = (resource, request.namespace, request.name)
        if key in self.emulator.objects and not self.emulator.objects[key].deleted:
            raise NotImplementedError
        what = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
        return kmock.KubernetesNotFoundError(
            reason="NotFound",
            message=f'{what} "{request.name}" not found',
            details={"name": request.name, "group": resource.group, "kind": resource.plural},
        )

    def _pod_log(self, request: kmock.Request) -> bytes:
        """pods/log: the kubelet's view; honours tailLines and timestamps; 404 once the pod is gone."""
        lines = self.logs.get(request.name or "")
        if lines is None:
            raise kmock.KubernetesObjectNotFoundError()
        if request.params.get("timestamps") not in ("true", "True"):
            lines = [line.partition(" ")[2] for line in lines]
        if request.params.get("tailLines"):
            lines = lines[-int(request.params["tailLines"]) :]
        return "".join(f"{line}\n" for line in lines).encode()

    @staticmethod
    def _spec_write(request: kmock.Request) -> bool:
        data = request.data if isinstance(request.data, dict) else {}
        if request.resource is None or request.subresource:
            return False
        return request.action == kmock.action.CREATE or (
            request.action == kmock.action.UPDATE and "spec" in data
        )

    def _bump_generation(self, request: kmock.Request) -> None:
        """After the emulator stored the write: generation 1 on create, +1 on a spec change.
        Raises NotImplementedError so the emulator still answers with the stored object."""
        name = request.name or request.data.get("metadata", {}).get("name")
        namespace = request.namespace or request.data.get("metadata", {}).get("namespace")
        obj = self.emulator.objects[request.resource, namespace, name]
        if request.action == kmock.action.CREATE:
            generation = 1
        else:
            generation = (obj.get("metadata") or {}).get("generation", 0) + 1
        obj.patch({"metadata": {"generation": generation}})
        raise NotImplementedError

    # ------------------------------------------------------------------ for tests

    def client(self, agent: str) -> kubernetes.client.ApiClient:
        """A client of this server whose requests carry User-Agent ``agent``."""
        client = api_client(self.url)
        client.user_agent = agent
        return client

    def requests(self, agent: str | None = None) -> list[kmock.Request]:
        """Every request served so far (from the client ``agent`` only, if given)."""
        sent = list(self.emulator)
        if agent is None:
            return sent
        return [r for r in sent if r.headers.get("User-Agent") == agent]


def rbac_triple(request: kmock.Request) -> Triple:
    """(apiGroup, resource[/subresource], verb) that RBAC checks for ``request``."""
    assert request.resource is not None, f"not a Kubernetes API request: {request.url}"
    resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
    method = request.method.value.upper()
    if method == "GET":
        watch = request.params.get("watch") in ("true", "1")
        verb = "watch" if watch else ("get" if request.name else "list")
    elif method == "DELETE":
        verb = "delete" if request.name else "deletecollection"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}[method]
    return request.resource.group, resource, verb


def declared(rules: Iterable[tuple[str, str, tuple[str, ...]]]) -> set[Triple]:
    """A module's ``RBAC_RULES`` as (apiGroup, resource, verb) triples."""
    return {(group, resource, verb) for group, resource, verbs in rules for verb in verbs}
