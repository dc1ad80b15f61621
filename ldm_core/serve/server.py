"""The serving process: KServe's ModelServer for one bundle, until SIGTERM/SIGINT.

Why it looks the way it does:

- The HTTP port opens before the bundle is loaded: liveness (``/v2/health/live``) answers
  at once while readiness (``/v2/health/ready`` and ``/v2/models/{name}/ready``) turns true
  only after the bundle loaded and warmed up, so Kubernetes neither kills a pod that is
  still loading nor routes traffic to it. If loading fails, the server stops and
  :func:`serve` raises with the reason, so a pod restarts with it in its log.
- KServe's ``ModelServer`` keeps the model registry, the data plane and the REST
  application; the REST application runs under a ``uvicorn.Server`` built here, with
  public API only, because ``ModelServer.start`` binds 0.0.0.0 (a local deployment must
  listen on loopback) and ``ModelServer.stop`` does not stop a single-process REST server.
  The listening socket is bound here first, so a taken port is a clear error naming
  ``serving.http_port``, and nothing else can take the port between check and bind.
- 503 (busy) and 504 (time limit) come from :mod:`~ldm_core.serve.admission`'s
  exceptions through one FastAPI handler; KServe's own handlers give 400 for
  ``InvalidInput`` and 500 for ``InferenceError``.
- With ``serving.grpc_port`` set, KServe's gRPC V2 servicer answers on that port, in the
  same event loop and over the same data plane as REST, so both give the same inference.
  Its server is built here (``GRPCServer`` binds every interface); its status codes follow
  the REST ones: ``INVALID_ARGUMENT`` (400), ``RESOURCE_EXHAUSTED`` (503),
  ``DEADLINE_EXCEEDED`` (504), ``INTERNAL`` (500).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from grpc import ServicerContext, StatusCode, aio
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING, INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InferenceError, InvalidInput
from kserve.model_server import app as kserve_app
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import (
    add_GRPCInferenceServiceServicer_to_server,
)
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_datamodels import InferenceRequest

from ldm_core.bundle import require as require_bundle
from ldm_core.config import Config
from ldm_core.errors import LdmError
from ldm_core.serve import DEFAULT_BUNDLE_DIR
from ldm_core.serve.admission import Admission, RequestRejected
from ldm_core.serve.logs import configure_logging, log_event
from ldm_core.serve.model import BrainLDMModel


class ModelAwareDataPlane(DataPlane):
    """Server readiness (``/v2/health/ready``) that waits for every model, so the plain
    readiness probe of the ServingRuntime stays false while the bundle loads and warms up
    (KServe's own answers true as soon as the port is open)."""

    async def ready(self) -> bool:
        models = list(self.model_registry.get_models().values())
        return bool(models) and all([await m.healthy() for m in models])

    def decode_inference_request(
        self, body: bytes | InferenceRequest, headers: dict, model_name: str
    ) -> InferRequest:
        """A V2 body without ``inference-header-content-length`` is all JSON header (the
        binary data extension says so), whatever its Content-Type: ``curl -d`` and many
        clients send JSON without ``application/json``, and KServe would refuse it."""
        if not isinstance(body, bytes) or INFERENCE_CONTENT_LENGTH_HEADER in headers:
            return super().decode_inference_request(body, headers, model_name)
        try:
            data = json.loads(body)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise InvalidInput(f"request body: not JSON ({exc})") from None
        try:
            parsed = InferenceRequest.model_validate(data)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise InvalidInput(f"request body: not a V2 inference request ({exc})") from None
        return InferRequest.from_inference_request(parsed, model_name)


class StatusInterceptor(ExceptionToStatusInterceptor):
    """gRPC status codes that say what the REST status codes say: KServe's interceptor
    turns every ``InferenceError`` into ``INVALID_ARGUMENT`` and our 503/504 into
    ``INTERNAL``."""

    async def handle_exception(
        self, ex: Exception, request_or_iterator: object, context: ServicerContext, method_name: str
    ) -> None:
        if isinstance(ex, RequestRejected):
            code = (
                StatusCode.RESOURCE_EXHAUSTED if ex.status == 503 else StatusCode.DEADLINE_EXCEEDED
            )
            await context.abort(code, str(ex))
        elif isinstance(ex, InferenceError):
            await context.abort(StatusCode.INTERNAL, str(ex))
        else:
            await super().handle_exception(ex, request_or_iterator, context, method_name)


async def _rejected_handler(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestRejected):
        raise TypeError(f"handler registered for RequestRejected got {type(exc).__name__}")
    headers = {"retry-after": "1"} if exc.status == 503 else None
    return JSONResponse(status_code=exc.status, content={"error": str(exc)}, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """503 / 504 for requests the server cannot take, instead of KServe's generic 500."""
    app.add_exception_handler(RequestRejected, _rejected_handler)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (IPv6 if the host has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise LdmError(
            f"serving.http_port: cannot listen on {host}:{port} ({exc.strerror})"
        ) from None


def _http_server(kserve_server: ModelServer, port: int) -> uvicorn.Server:
    """KServe's REST application (V1, V2, health, /metrics, its error handlers) under a
    uvicorn server whose ``should_exit`` this process controls."""
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
    return uvicorn.Server(rest.config)


def _load_or_stop(model: BrainLDMModel, http: uvicorn.Server, errors: list[BaseException]) -> None:
    """Load the model; on any failure record it and make the server shut down (uvicorn
    polls ``should_exit``; set before start-up, it stops right after start-up)."""
    try:
        model.load()
    except BaseException as exc:  # noqa: BLE001 - any failure must stop the server
        errors.append(exc)
        log_event(
            "model_load_failed",
            logging.ERROR,
            model=model.name,
            error=f"{type(exc).__name__}: {exc}",
        )
        http.should_exit = True


def _grpc_server(kserve_server: ModelServer, host: str, port: int) -> aio.Server:
    """KServe's gRPC V2 servicer on ``host:port``, over the REST server's data plane."""
    server = aio.server(interceptors=(StatusInterceptor(),))
    add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(kserve_server.dataplane, kserve_server.model_repository_extension),
        server,
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise LdmError(f"serving.grpc_port: cannot listen on {address} ({exc})") from None
    return server


async def _serve(
    kserve_server: ModelServer,
    http: uvicorn.Server,
    listener: socket.socket,
    grpc_address: tuple[str, int] | None,
) -> None:
    # What ModelServer.start does to its loop: a worker pool sized by max_asyncio_workers
    # for KServe's own blocking calls, and its loop exception handler.
    kserve_server.setup_event_loop()
    # A grpc.aio server belongs to the loop it is created in: this one.
    grpc = _grpc_server(kserve_server, *grpc_address) if grpc_address else None
    if grpc is not None:
        await grpc.start()
    try:
        await http.serve(sockets=[listener])
    finally:
        if grpc is not None:
            await grpc.stop(grace=kserve_server.grace_period)


def serve(
    cfg: Config,
    bundle_dir: str | Path = DEFAULT_BUNDLE_DIR,
    http_port: int | None = None,
    model_name: str | None = None,
    *,
    host: str = "0.0.0.0",
    device: str = "auto",
) -> None:
    """Serve ``bundle_dir`` on ``host:http_port`` until SIGTERM/SIGINT. Blocks.

    ``http_port`` and ``model_name`` default to ``cfg.serving``'s; gRPC answers on
    ``cfg.serving.grpc_port`` unless it is 0. Raises LdmError if the directory holds no
    bundle, a port is taken, or the bundle fails to load.
    """
    configure_logging()
    bundle = require_bundle(bundle_dir)
    port = http_port or cfg.serving.http_port
    name = model_name or cfg.serving.model_name
    listener = _listen(host, port)
    admission = Admission.from_config(cfg.serving)
    load_errors: list[BaseException] = []
    try:
        model = BrainLDMModel(name, bundle, cfg, admission, device=device)
        kserve_server = ModelServer(http_port=port, enable_grpc=False, workers=1)
        kserve_server.dataplane = ModelAwareDataPlane(
            model_registry=kserve_server.registered_models
        )
        kserve_server.register_model(model)
        http = _http_server(kserve_server, port)
        grpc_port = cfg.serving.grpc_port
        grpc_address = (host, grpc_port) if grpc_port else None
        # After uvicorn's graceful shutdown it re-raises the signal it caught; KServe's
        # handler then unloads the models (the default one would end the process at once).
        kserve_server.register_signal_handler()
        log_event(
            "server_starting",
            model=name,
            host=host,
            port=port,
            grpc_port=grpc_port,
            bundle=str(bundle),
        )
        threading.Thread(
            target=_load_or_stop, args=(model, http, load_errors), name="ldm-load", daemon=True
        ).start()
        asyncio.run(_serve(kserve_server, http, listener, grpc_address))
    finally:
        admission.close()
        listener.close()
    if load_errors:
        raise LdmError(f"{bundle}: model failed to load: {load_errors[0]}") from load_errors[0]
