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
  made to the RBAC rules its module declares (:func:`rbac_triple`).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import kmock
import kubernetes

from ldm_core.kube.client import api_client

Triple = tuple[str, str, str]

CORE_RESOURCES = {"v1/pods": "Pod", "v1/events": "Event"}
"""Core resources every API server serves (the ones the launcher reads)."""
PAGE_NOT_FOUND = b"404 page not found\n"
"""What kube-apiserver answers for a path no API group serves (Go's http.NotFound)."""
PLAIN_TEXT = kmock.headers({"Content-Type": "text/plain; charset=utf-8"})
_POD_LOG = re.compile(r"/api/v1/namespaces/[^/]+/pods/[^/]+/log")


class KubeApi:
    """A loopback Kubernetes API server for one test; use it as a context manager.

    Args:
        resources: ``{"group/version/plural": "Kind"}`` of the custom resources to serve.
        generations: keep ``metadata.generation`` as a real API server does.
    """

    def __init__(
        self, resources: Mapping[str, str] | None = None, *, generations: bool = False
    ) -> None:
        self.logs: dict[str, list[str]] = {}
        """Pod name -> its log lines, each ``<RFC3339 timestamp> <text>``."""
        self.url = ""
        self.emulator: kmock.KubernetesEmulator
        """The kmock emulator once started, for reactions a test adds (``[...] << 403``)."""
        self._served = {**CORE_RESOURCES, **(resources or {})}
        self._generations = generations
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
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
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
