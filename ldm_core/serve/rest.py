"""The REST application: KServe's (V1, V2, health, ``/metrics`` and its error handlers) under
a uvicorn server this process controls, with this server's rules on top.

- Every error body is ``{"error": ...}``, KServe's own shape, also where FastAPI would answer
  ``{"detail": ...}``: a body that does not fit the schema (422, naming the field), an
  unknown route (404) or method (405).
- 503 (busy, shutting down) and 504 (time limit) come from
  :mod:`~ldm_core.serve.admission`'s exceptions, instead of KServe's generic 500. A 503
  while shutting down also closes the connection, so a keep-alive client reconnects, to
  another replica.
- The model repository extension (``/v2/repository/models/{name}/load|unload``) takes no
  credentials and an unload ends serving, so its routes answer only with
  ``serving.repository_endpoints`` (admin-only); otherwise they are a 404 that names the
  switch, and the OpenAPI document does not list them.
- A request that names a model version is checked and routed by
  :class:`~ldm_core.serve.versions.ModelVersionRoutes`.
- Public API only: the app is KServe's module-level one, changed through FastAPI's
  exception handlers, middleware and OpenAPI document. ``ModelServer.start`` would bind 0.0.0.0 (a local deployment must listen on loopback) and
  ``ModelServer.stop`` does not stop a single-process REST server, hence the own uvicorn
  server. It leaves signals to the process (:mod:`~ldm_core.serve.shutdown`): uvicorn's
  own handler would close the listening socket at the first SIGTERM, so neither readiness
  nor a "shutting down" answer could be given while in-flight generations finish.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.model_server import app as kserve_app
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from starlette.exceptions import HTTPException

from ldm_core.serve.admission import RequestRejected, ShuttingDown
from ldm_core.serve.repository import RepositoryRoutesOff, without_repository_routes
from ldm_core.serve.versions import ModelVersionRoutes

_ALTERNATIVES = frozenset({InferenceRequest.__name__, "bytes", "float", "int", "bool", "str"})
"""Members of the unions in KServe's V2 body types (the body is ``InferenceRequest | bytes``,
a parameter ``float | int | bool | str``): pydantic names the member in an error's location."""


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The body of every error this server answers over REST: ``{"error": message}``."""
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


async def _rejected_handler(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestRejected):
        raise TypeError(f"handler registered for RequestRejected got {type(exc).__name__}")
    headers = {"retry-after": "1"} if exc.status == 503 else {}
    if isinstance(exc, ShuttingDown):
        headers["connection"] = "close"
    return error_response(exc.status, str(exc), headers or None)


async def _http_error_handler(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, HTTPException):
        raise TypeError(f"handler registered for HTTPException got {type(exc).__name__}")
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def _validation_handler(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise TypeError(f"handler registered for RequestValidationError got {type(exc).__name__}")
    return error_response(422, describe_validation_errors(exc.errors()))


def _dotted(loc: Sequence[str | int]) -> str:
    """``("inputs", 0, "name")`` -> ``inputs[0].name``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def describe_validation_errors(errors: Sequence[dict[str, Any]]) -> str:
    """FastAPI's validation errors as one line naming each field at fault the way a client
    spells it (``parameters.steps: …``), without pydantic's union member names."""
    for e in errors:
        if e["type"] == "json_invalid":
            return f"request body: not JSON ({e.get('ctx', {}).get('error', e['msg'])})"
    # The raw-bytes alternative of a V2 body fails for every JSON body: noise beside the rest.
    errors = [e for e in errors if tuple(e["loc"]) != ("body", "bytes")] or errors
    fields: dict[str, list[tuple[str, str]]] = {}
    for e in errors:
        source, *loc = e["loc"]
        name = _dotted([p for p in loc if p not in _ALTERNATIVES])
        field = (name or "request body") if source == "body" else f"{source} parameter {name}"
        member = next((p for p in reversed(loc) if p in _ALTERNATIVES), "")
        fields.setdefault(field, []).append((member, e["msg"]))
    return "; ".join(
        f"{field}: {failed[0][1]}"
        if len(failed) == 1
        else f"{field}: expected one of {', '.join(member for member, _ in failed)}"
        for field, failed in fields.items()
    )


def install_error_handlers(app: FastAPI) -> None:
    """``{"error": ...}`` bodies for FastAPI's own errors, 503 / 504 for requests the server
    cannot take (KServe registers its handlers for its exceptions itself)."""
    app.add_exception_handler(RequestRejected, _rejected_handler)
    app.add_exception_handler(HTTPException, _http_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)


class HttpServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: the process owns SIGTERM and SIGINT
    (:mod:`~ldm_core.serve.shutdown`) and sets ``should_exit`` once drained."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build_http_server(
    kserve_server: ModelServer, port: int, repository_endpoints: bool
) -> HttpServer:
    """KServe's REST application for ``kserve_server``'s models, with this module's rules,
    under a uvicorn server whose ``should_exit`` this process controls."""
    rest = RESTServer(
        FASTAPI_APP_IMPORT_STRING,
        kserve_server.dataplane,
        kserve_server.model_repository_extension,
        port,
        access_log_format=kserve_server.access_log_format,
        workers=1,
        grace_period=kserve_server.grace_period,
        event_loop=kserve_server.event_loop,
        timeout_keep_alive=kserve_server.timeout_keep_alive,
    )
    rest.create_application()
    install_error_handlers(kserve_app)
    kserve_app.add_middleware(ModelVersionRoutes, registry=kserve_server.registered_models)
    if not repository_endpoints:
        kserve_app.add_middleware(RepositoryRoutesOff)
        without_repository_routes(kserve_app)
    return HttpServer(rest.config)
