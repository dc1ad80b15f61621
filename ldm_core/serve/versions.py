"""Model versions, as the Open Inference Protocol names them, for a server of one bundle.

A client may name a version on every model route: ``/v2/models/{name}/versions/{version}``
(metadata), ``…/ready`` and ``…/infer``, and KServe's REST routes also take
``?model_version=``; gRPC requests carry ``version`` / ``model_version`` fields. KServe 0.21
answers every REST request that names one with 501 Not Implemented, which monitoring counts
as a server fault, and its gRPC servicer ignores the field.

A served bundle has one version: its digest (:func:`ldm_core.bundle.digest`), which the model
metadata reports in ``versions`` and every V2 response in ``model_version``. That version is
accepted on every route and answered as the route without it; any other is a 404 whose
``error`` names the versions there are. The digest rather than a constant such as ``"1"``:

- a version names weights: a client that pinned one gets a 404 after a redeploy with another
  bundle, not volumes from weights it did not ask for, which ``"1"`` would give (every
  bundle ever deployed would be version 1);
- it is the identity the project already gives a bundle (``parameters.bundle_digest`` in
  every response, the deploy's smoke check, the storage prefix of a deployed bundle): one
  name for one thing.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlencode

from kserve.errors import ModelNotFound, ModelNotReady
from kserve.model_repository import ModelRepository
from starlette.responses import JSONResponse

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

QUERY_PARAMETER = "model_version"
"""The query parameter KServe's REST routes read a version from."""
_MODEL_ROUTE = re.compile(
    r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<tail>/ready|/infer)?"
)
"""The V2 routes of one model (metadata, readiness, inference), with or without a version."""


class Versioned(Protocol):
    name: str

    @property
    def versions(self) -> list[str]: ...


class VersionNotFound(ModelNotFound):
    """A request named a version the model does not have. A ``ModelNotFound``, so KServe's
    handlers answer it as they answer an unknown model: 404, gRPC ``NOT_FOUND``."""

    def __init__(self, model: str, version: str, versions: list[str]) -> None:
        super().__init__(model)
        self.reason = (
            f"model {model} has no version {version!r}; its versions: {', '.join(versions)}"
        )


def check_version(registry: ModelRepository, name: str, version: str | None) -> None:
    """Raise unless ``version`` is empty or a version of model ``name``.

    An unknown model passes: the route without a version answers it (404 from KServe).

    Raises:
        VersionNotFound: the model has no such version (404).
        ModelNotReady: the model is still loading, so its version is not known yet (503).
    """
    model: Versioned | None = registry.get_model(name)
    if not version or model is None:
        return
    if not model.versions:
        raise ModelNotReady(name, "Its version is known once its bundle has loaded.")
    if version not in model.versions:
        raise VersionNotFound(name, version, model.versions)


class ModelVersionRoutes:
    """ASGI middleware: a REST request that names a version (in the path or the
    ``model_version`` query) is checked here, then routed as the same request without it,
    so KServe's unversioned routes answer every version the model has.

    Args:
        app: the application it wraps.
        registry: the server's models, asked for their versions at each request.
    """

    def __init__(self, app: ASGIApp, registry: ModelRepository) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        route = _MODEL_ROUTE.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        # An empty model_version names no version (KServe reads it so too).
        named = [v for k, v in query if k == QUERY_PARAMETER and v]
        if route["version"]:
            named.append(route["version"])
        if not named:
            await self.app(scope, receive, send)
            return
        try:
            for version in named:
                check_version(self.registry, route["name"], version)
        except (ModelNotFound, ModelNotReady) as exc:
            status = 404 if isinstance(exc, ModelNotFound) else 503
            await JSONResponse({"error": str(exc)}, status_code=status)(scope, receive, send)
            return
        path = f"/v2/models/{route['name']}{route['tail'] or ''}"
        rest = urlencode([(k, v) for k, v in query if k != QUERY_PARAMETER])
        unversioned = {
            **scope,
            "path": path,
            "raw_path": quote(path).encode(),
            "query_string": rest.encode("latin-1"),
        }
        await self.app(unversioned, receive, send)
