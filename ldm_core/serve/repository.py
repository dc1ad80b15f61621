"""KServe's model repository extension (load / unload a model), off unless
``serving.repository_endpoints`` turns it on.

KServe's ModelServer always registers ``POST /v2/repository/models/{name}/load`` and
``/unload`` (and their gRPC calls). They take no credentials, and on this server an unload is
an outage: the bundle loads only at start, so the model never comes back (KServe's
registry cannot load it again; liveness then fails, so the kubelet restarts the pod).
Off, they are refused before KServe sees them: 404 over REST, naming the switch, absent from
the OpenAPI document; ``UNIMPLEMENTED`` over gRPC. On, they are KServe's, for admins only.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from kserve.constants.constants import V2_ROUTE_PREFIX
from starlette.responses import JSONResponse

from ldm_core.errors import LdmError
from ldm_core.serve.versions import ASGIApp, Scope

REPOSITORY_ROUTES = f"{V2_ROUTE_PREFIX}/repository/"
"""Where the extension's REST routes start."""


class RepositoryEndpointsOff(LdmError):
    """A repository request while ``serving.repository_endpoints`` is off."""

    def __init__(self) -> None:
        super().__init__(
            "the model repository extension is off on this server (serving.repository_endpoints)"
        )


class RepositoryRoutesOff:
    """ASGI middleware: any request under :data:`REPOSITORY_ROUTES` is a 404 naming the
    switch. (FastAPI keeps included routers behind private types, so the routes are refused
    in front of them rather than taken out.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith(REPOSITORY_ROUTES):
            body = {"error": f"{scope['path']}: {RepositoryEndpointsOff()}"}
            await JSONResponse(body, status_code=404)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def without_repository_routes(app: FastAPI) -> None:
    """Build ``app``'s OpenAPI document now (FastAPI serves the one it built first) without
    the extension's routes, so clients and schema-driven tools do not see them."""
    paths = app.openapi()["paths"]
    for path in [p for p in paths if p.startswith(REPOSITORY_ROUTES)]:
        del paths[path]
