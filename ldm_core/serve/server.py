"""The serving process: KServe's ModelServer for one bundle, until SIGTERM/SIGINT.

Why it looks the way it does:

- The HTTP port opens before the bundle is loaded: liveness (``/v2/health/live``) answers
  at once while readiness (``/v2/health/ready`` and ``/v2/models/{name}/ready``) turns true
  only after the bundle loaded and warmed up, so Kubernetes neither kills a pod that is
  still loading nor routes traffic to it. Liveness fails once the loaded model is gone
  (:mod:`~ldm_core.serve.dataplane`), so the kubelet restarts a server that can no longer
  serve. If loading fails, the server stops and :func:`serve` raises with the reason, so a
  pod restarts with it in its log.
- KServe's ``ModelServer`` keeps the model registry, the data plane
  (:mod:`~ldm_core.serve.dataplane`: readiness, liveness, metadata) and the REST
  application (:mod:`~ldm_core.serve.rest`), which runs under a ``uvicorn.Server`` built
  here on a listening socket bound here first, so a taken port is a clear error naming
  ``serving.http_port``, and nothing else can take the port between check and bind.
- With ``serving.grpc_port`` set, KServe's gRPC V2 servicer
  (:mod:`~ldm_core.serve.grpc_service`) answers on that port, in the same event loop and
  over the same data plane as REST, so both give the same inference.
- The model repository extension (load / unload) is served only with
  ``serving.repository_endpoints``: it takes no credentials, and an unload ends serving.
- SIGTERM (what Kubernetes sends a pod it deletes) or SIGINT drains
  (:mod:`~ldm_core.serve.shutdown`): not ready, new requests 503, what was admitted
  finishes within ``serving.request_timeout_s``, then exit 0; a second signal or the
  deadline ends it at once, and :func:`serve` raises if that abandoned requests.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path

from grpc import aio
from kserve import ModelServer

from ldm_core.bundle import require as require_bundle
from ldm_core.config import Config
from ldm_core.errors import LdmError
from ldm_core.serve import DEFAULT_BUNDLE_DIR
from ldm_core.serve.admission import Admission
from ldm_core.serve.dataplane import ModelAwareDataPlane
from ldm_core.serve.grpc_service import build_grpc_server
from ldm_core.serve.logs import configure_logging, log_event
from ldm_core.serve.model import BrainLDMModel
from ldm_core.serve.rest import HttpServer, build_http_server
from ldm_core.serve.shutdown import GracefulShutdown


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (IPv6 if the host has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise LdmError(
            f"serving.http_port: cannot listen on {host}:{port} ({exc.strerror})"
        ) from None


def _load_or_stop(model: BrainLDMModel, http: HttpServer, errors: list[BaseException]) -> None:
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


async def _serve(
    kserve_server: ModelServer,
    http: HttpServer,
    listener: socket.socket,
    grpc_address: tuple[str, int] | None,
    repository_endpoints: bool,
    shutdown: GracefulShutdown,
) -> None:
    # What ModelServer.start does to its loop: a worker pool sized by max_asyncio_workers
    # for KServe's own blocking calls, and its loop exception handler.
    kserve_server.setup_event_loop()
    shutdown.install()
    # A grpc.aio server belongs to the loop it is created in: this one.
    grpc: aio.Server | None = None
    if grpc_address:
        grpc = build_grpc_server(
            kserve_server.dataplane,
            kserve_server.model_repository_extension,
            repository_endpoints,
            *grpc_address,
        )
    if grpc is not None:
        await grpc.start()
    try:
        await http.serve(sockets=[listener])
    finally:
        if grpc is not None:
            # RPCs in flight get what is left of the drain's deadline.
            await grpc.stop(grace=shutdown.grace_s())
        shutdown.finished()


def serve(
    cfg: Config,
    bundle_dir: str | Path = DEFAULT_BUNDLE_DIR,
    http_port: int | None = None,
    model_name: str | None = None,
    *,
    host: str = "0.0.0.0",
    device: str = "auto",
) -> None:
    """Serve ``bundle_dir`` on ``host:http_port`` until SIGTERM/SIGINT, then drain. Blocks.

    ``http_port`` and ``model_name`` default to ``cfg.serving``'s; gRPC answers on
    ``cfg.serving.grpc_port`` unless it is 0. Raises LdmError if the directory holds no
    bundle, a port is taken, the bundle fails to load, or the stop abandoned admitted
    requests (a second signal, or the drain's deadline).
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
        repository_endpoints = cfg.serving.repository_endpoints
        kserve_server = ModelServer(http_port=port, enable_grpc=False, workers=1)
        kserve_server.register_model(model)
        # After the model is registered: liveness watches the models registered now.
        kserve_server.dataplane = ModelAwareDataPlane(
            kserve_server.registered_models, repository_endpoints
        )
        http = build_http_server(kserve_server, port, repository_endpoints)
        grpc_port = cfg.serving.grpc_port
        grpc_address = (host, grpc_port) if grpc_port else None
        shutdown = GracefulShutdown(
            admission, kserve_server.dataplane, http, cfg.serving.request_timeout_s
        )
        log_event(
            "server_starting",
            model=name,
            host=host,
            port=port,
            grpc_port=grpc_port,
            bundle=str(bundle),
            repository_endpoints=repository_endpoints,
        )
        threading.Thread(
            target=_load_or_stop, args=(model, http, load_errors), name="ldm-load", daemon=True
        ).start()
        asyncio.run(
            _serve(kserve_server, http, listener, grpc_address, repository_endpoints, shutdown)
        )
    finally:
        admission.close()
        listener.close()
    if load_errors:
        raise LdmError(f"{bundle}: model failed to load: {load_errors[0]}") from load_errors[0]
    if shutdown.unfinished:
        raise LdmError(
            f"stopped with requests unfinished ({shutdown.unfinished}): {shutdown.forced}"
        )
