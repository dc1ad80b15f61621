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
- every write stores a new ``metadata.resourceVersion`` (one counter, as etcd's revision is)
  and every object gets a ``metadata.uid`` when created without one (a test may name a
  pod's uid; the apiserver's ``rest.FillObjectMetaSystemFields`` always assigns it). A merge
  patch that carries a ``metadata.resourceVersion`` other than the stored one is refused with
  409 Conflict, "the object has been modified; please apply your changes to the latest
  version and try again" (k8s.io/apiserver registry/generic/registry/store.go ``Update``),
  and a delete whose ``preconditions`` (uid, resourceVersion) do not match with 409 Conflict,
  "Precondition failed: ..." (k8s.io/apiserver storage ``Preconditions.Check``, made a
  Conflict by ``InterpretDeleteError``); nothing is written then;
- :meth:`KubeApi.hold` stops one request before the API server acts on it until the test
  lets it go, so that another client's writes land in between, deterministically;
- with ``crds`` (a directory of CRD files), writes of those custom resources are checked
  against the CRD's structural schema as the apiserver's server-side field validation does
  (KEP-2885): ``?fieldValidation=Strict`` refuses a write with an unknown field (400
  BadRequest, nothing written). A create is refused as k8s.io/apiserver handlers/create.go
  words the decoder's error, ``Widget in version "v1" cannot be handled as a Widget: strict
  decoding error: unknown field "spec.x"``, a patch with the bare ``strict decoding error:
  unknown field "spec.x"`` (handlers/patch.go, which decodes the patched object: a merge
  patch's null removes a field, it sets none). The default, ``Warn``, prunes the unknown
  fields and answers a ``Warning: 299 - "unknown field ..."`` header per field; ``Ignore``
  prunes silently. Which fields are unknown is :func:`unknown_fields`: the root ``metadata``
  decoded strictly into ObjectMeta, then the structural schema's pruning
  (:func:`tests.harness.crdcheck.unknown_fields`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import kubernetes
import yaml

from ldm_core.kube.client import api_client
from tests.harness import crdcheck

Triple = tuple[str, str, str]

CORE_RESOURCES = {"v1/pods": "Pod", "v1/events": "Event"}
"""Core resources every API server serves (the ones the launcher reads)."""
PAGE_NOT_FOUND = b"404 page not found\n"
"""What kube-apiserver answers for a path no API group serves (Go's http.NotFound)."""
PLAIN_TEXT = kmock.headers({"Content-Type": "text/plain; charset=utf-8"})
_POD_LOG = re.compile(r"/api/v1/namespaces/[^/]+/pods/[^/]+/log")
WRITES = (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "properties": {
        **dict.fromkeys(
            (
                "name",
                "generateName",
                "namespace",
                "selfLink",
                "uid",
                "resourceVersion",
                "generation",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ),
            {},
        ),
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": dict.fromkeys(
                    ("apiVersion", "kind", "name", "uid", "controller", "blockOwnerDeletion"), {}
                ),
            },
        },
        "managedFields": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    **dict.fromkeys(
                        ("manager", "operation", "apiVersion", "time", "fieldsType", "subresource"),
                        {},
                    ),
                    "fieldsV1": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                },
            },
        },
    },
}
"""The fields of ObjectMeta (k8s.io/apimachinery pkg/apis/meta/v1 types.go), as a
structural schema: what a strict decode of an object's ``metadata`` knows."""


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


def unknown_fields(
    obj: dict[str, Any], schema: Mapping[str, Any], *, drop: bool = False
) -> list[str]:
    """The fields of ``obj`` a strict write is refused for, as the API server names them
    (``metadata.labelz``, ``spec.containers[0].bar``); ``drop``: also remove them from
    ``obj``, as a write that is not strict is stored.

    In apiextensions-apiserver's order (customresource_handler.go
    ``unstructuredSchemaCoercer.apply``): first the root ``metadata``'s, which is decoded
    strictly into ObjectMeta (schema/objectmeta ``GetObjectMetaWithOptions``), then those
    the structural schema prunes, sorted (pruning ``PruneWithOptions``; the root is an
    embedded resource, so its apiVersion, kind and metadata are the server's own)."""
    meta = obj.get("metadata")
    found: list[str] = []
    if isinstance(meta, dict):
        found = sorted(
            f"metadata{p}" for p in crdcheck.unknown_fields(meta, OBJECT_META, drop=drop)
        )
    root = {**schema, "x-kubernetes-embedded-resource": True}
    pruned = crdcheck.unknown_fields(obj, root, drop=drop)
    return found + sorted(p.lstrip(".") for p in pruned)


def merge_patched(target: Any, patch: Any) -> Any:
    """``patch`` applied to ``target`` as a JSON merge patch (RFC 7386); neither is changed.
    Applied to ``{}``, it is what the patch sets: its nulls remove, they set nothing."""
    if not isinstance(patch, Mapping):
        return patch
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patched(out.get(key), value)
    return out


class Gate:
    """Holds the first request that ``matches`` before the API server acts on it (see
    :meth:`KubeApi.hold`)."""

    def __init__(self, matches: Callable[[kmock.Request], bool]) -> None:
        self.matches = matches
        self.arrived = threading.Event()
        self.released = threading.Event()

    def wait(self, timeout_s: float = 30.0) -> None:
        """Until the request is held."""
        assert self.arrived.wait(timeout_s), "the held request never came"

    def release(self) -> None:
        """Let the request through."""
        self.released.set()


@attrs.frozen
class _BadRequest(kmock.KubernetesError):
    status: int = 400
    reason: str = "BadRequest"
    message: str = ""
    details: Any = None


def _conflict(request: kmock.Request, name: str, why: str) -> kmock.KubernetesError:
    """409 Conflict as k8s.io/apimachinery ``errors.NewConflict`` writes it."""
    resource = request.resource
    assert resource is not None
    what = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
    return kmock.KubernetesError(
        status=409,
        reason="Conflict",
        message=f'Operation cannot be fulfilled on {what} "{name}": {why}',
        details={"name": name, "group": resource.group, "kind": resource.plural},
    )


@attrs.define(kw_only=True)
class _Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with the apiserver's resourceVersion bookkeeping and field validation
    of custom resources (see the module docstring). kmock stores a write before any reaction
    runs, so both sit in front of that: a subclass, as kmock's docstring suggests for
    field-specific behaviour. One write at a time: a check and the write it allows are one
    step, as in the apiserver's storage."""

    schemas: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    gates: list[Gate] = attrs.field(factory=list)
    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _writing: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        for gate in self.gates:
            if not gate.arrived.is_set() and gate.matches(request):
                gate.arrived.set()
                await asyncio.to_thread(gate.released.wait, 60)
        if request.resource is None or request.action not in WRITES:
            return await super()._handle(request)
        async with self._writing:
            refusal = self._strict(request) or self._stale(request)
            if refusal is not None:
                return await self._render_error(refusal)
            unknown = self._prune(request)
            self._stamp(request)
            response = await super()._handle(request)
        if request.params.get("fieldValidation", "Warn") == "Warn" and not response.prepared:
            for field in unknown:
                response.headers.add("Warning", f'299 - "unknown field \\"{field}\\""')
        return response

    def _stored(self, request: kmock.Request) -> Any:
        """The object a write of one named object acts on, if it exists."""
        key = (request.resource, request.namespace, request.name)
        if request.name is None or key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key]

    def _stale(self, request: kmock.Request) -> kmock.KubernetesError | None:
        """409 Conflict for a patch of another version, or a delete whose preconditions fail."""
        stored = self._stored(request)
        data = request.data if isinstance(request.data, dict) else {}
        if stored is None or request.action == kmock.action.CREATE:
            return None
        meta = stored.get("metadata") or {}
        if request.action == kmock.action.UPDATE:
            want = (data.get("metadata") or {}).get("resourceVersion")
            if want and want != meta.get("resourceVersion"):
                return _conflict(
                    request,
                    request.name,
                    "the object has been modified; please apply your changes to the latest "
                    "version and try again",
                )
            return None
        resource = request.resource
        where = (resource.group, resource.plural, request.namespace, request.name)
        key = "/registry/" + "/".join(part for part in where if part)  # etcd's key
        wants = data.get("preconditions") or {}
        for field, name in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            if wants.get(field) is not None and wants[field] != meta.get(field):
                return _conflict(
                    request,
                    request.name,
                    f"StorageError: invalid object, Code: 4, Key: {key}, ResourceVersion: 0, "
                    f"AdditionalErrorMsg: Precondition failed: {name} in precondition: "
                    f"{wants[field]}, {name} in object meta: {meta.get(field, '')}",
                )
        return None

    def _schema(self, request: kmock.Request) -> Mapping[str, Any] | None:
        resource = request.resource
        key = f"{resource.group}/{resource.version}/{resource.plural}".lstrip("/")
        if request.action == kmock.action.DELETE or not isinstance(request.data, dict):
            return None
        return self.schemas.get(key)

    def _strict(self, request: kmock.Request) -> kmock.KubernetesError | None:
        """400 BadRequest for a strict write with unknown fields, worded as create.go and
        patch.go word it."""
        schema = self._schema(request)
        if schema is None or request.params.get("fieldValidation") != "Strict":
            return None
        create = request.action == kmock.action.CREATE
        written = request.data if create else merge_patched({}, request.data)
        unknown = unknown_fields(written, schema)
        if not unknown:
            return None
        error = "strict decoding error: " + ", ".join(f'unknown field "{u}"' for u in unknown)
        if not create:
            return _BadRequest(message=error)
        kind = (schema.get("x-kubernetes-group-version-kind") or [{}])[0]
        what = request.data.get("kind") or kind.get("kind") or request.resource.plural
        version = request.resource.version
        return _BadRequest(
            message=f'{what} in version "{version}" cannot be handled as a {what}: {error}'
        )

    def _prune(self, request: kmock.Request) -> list[str]:
        """Drop the unknown fields from a write that is not strict; say which."""
        schema = self._schema(request)
        return [] if schema is None else unknown_fields(request.data, schema, drop=True)

    def _stamp(self, request: kmock.Request) -> None:
        """The new resourceVersion (and a new object's uid) in what kmock stores next."""
        version = str(next(self._versions))
        if request.action == kmock.action.DELETE:
            stored = self._stored(request)
            if stored is not None and not (stored.get("metadata") or {}).get("deletionTimestamp"):
                stored.patch({"metadata": {"resourceVersion": version}})
        elif isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            meta["resourceVersion"] = version
            if request.action == kmock.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))


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
        self._gates: list[Gate] = []
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="kube-api", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> KubeApi:
        self._thread.start()
        assert self._ready.wait(20), "the emulated Kubernetes API did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        for gate in self._gates:
            gate.release()
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        emulator = _Emulator(schemas=self._schemas, gates=self._gates)
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

    def hold(self, matches: Callable[[kmock.Request], bool]) -> Gate:
        """Hold the next request that ``matches`` before the API server acts on it (stores,
        checks or refuses anything) until :meth:`Gate.release`; meanwhile it serves every
        other request, so another client's writes land between that request and the
        reads it was computed from."""
        gate = Gate(matches)
        self._gates.append(gate)
        return gate

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
