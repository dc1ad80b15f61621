"""The gRPC V2 endpoint: KServe's servicer over the REST server's data plane, in the same
event loop, so both transports give the same answers; what it changes:

- Status codes that say what the REST status codes say: ``INVALID_ARGUMENT`` (400),
  ``NOT_FOUND`` (404), ``RESOURCE_EXHAUSTED`` (503 busy), ``UNAVAILABLE`` (503 not ready, or
  shutting down: the code gRPC clients retry elsewhere), ``DEADLINE_EXCEEDED`` (504),
  ``INTERNAL`` (500). KServe's interceptor turns every
  ``InferenceError`` into ``INVALID_ARGUMENT``, our 503/504 into ``INTERNAL``, and fails on
  its own not-ready exceptions (it reads a ``reason`` they lack).
- ``RepositoryModelLoad`` / ``Unload`` exist only with ``serving.repository_endpoints``, as
  their REST routes do (``UNIMPLEMENTED`` otherwise); KServe's servicer unloads the model and
  then fails reading the extension's empty answer.
- Versions are checked as over REST (:mod:`~ldm_core.serve.versions`); model metadata lists
  them. ``ServerLive`` answers ``live: false`` when the REST liveness fails, ``ModelReady``
  ``ready: false`` while the server drains (REST answers that 503).
- The server is built here because KServe's ``GRPCServer`` binds every interface.
"""

from __future__ import annotations

from typing import Any

from grpc import ServicerContext, StatusCode, aio
from kserve.errors import InferenceError, ModelNotReady, ServerNotLive, ServerNotReady
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import (
    add_GRPCInferenceServiceServicer_to_server,
)
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.model_repository_extension import ModelRepositoryExtension

from ldm_core.errors import LdmError
from ldm_core.serve.admission import RequestRejected, ShuttingDown
from ldm_core.serve.repository import RepositoryEndpointsOff
from ldm_core.serve.versions import check_version


class StatusInterceptor(ExceptionToStatusInterceptor):
    """gRPC status codes that say what the REST status codes say (see the module docstring)."""

    async def handle_exception(
        self, ex: Exception, request_or_iterator: object, context: ServicerContext, method_name: str
    ) -> None:
        if isinstance(ex, ShuttingDown):
            await context.abort(StatusCode.UNAVAILABLE, str(ex))
        elif isinstance(ex, RequestRejected):
            code = (
                StatusCode.RESOURCE_EXHAUSTED if ex.status == 503 else StatusCode.DEADLINE_EXCEEDED
            )
            await context.abort(code, str(ex))
        elif isinstance(ex, InferenceError):
            await context.abort(StatusCode.INTERNAL, str(ex))
        elif isinstance(ex, ModelNotReady | ServerNotReady | ServerNotLive):
            await context.abort(StatusCode.UNAVAILABLE, str(ex))
        elif isinstance(ex, RepositoryEndpointsOff):
            await context.abort(StatusCode.UNIMPLEMENTED, str(ex))
        else:
            await super().handle_exception(ex, request_or_iterator, context, method_name)


class Servicer(InferenceServicer):
    """KServe's V2 servicer with versions, liveness and the repository switch of the REST side.

    Args:
        data_plane: the REST server's data plane.
        repository: the model repository extension.
        repository_endpoints: whether its calls are served (``serving.repository_endpoints``).
    """

    def __init__(
        self,
        data_plane: DataPlane,
        repository: ModelRepositoryExtension,
        repository_endpoints: bool,
    ) -> None:
        super().__init__(data_plane, repository)
        self.data_plane = data_plane
        self.repository = repository
        self.repository_endpoints = repository_endpoints

    def _check_version(self, name: str, version: str) -> None:
        check_version(self.data_plane.model_registry, name, version)

    async def ServerLive(self, request: Any, context: ServicerContext) -> pb.ServerLiveResponse:
        try:
            await self.data_plane.live()
        except ServerNotLive:
            return pb.ServerLiveResponse(live=False)
        return pb.ServerLiveResponse(live=True)

    async def ModelReady(self, request: Any, context: ServicerContext) -> pb.ModelReadyResponse:
        self._check_version(request.name, request.version)
        try:
            return await super().ModelReady(request, context)
        except ShuttingDown:
            return pb.ModelReadyResponse(ready=False)

    async def ModelMetadata(
        self, request: Any, context: ServicerContext
    ) -> pb.ModelMetadataResponse:
        self._check_version(request.name, request.version)
        metadata = await self.data_plane.model_metadata(request.name)
        return pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata.get("versions", []),
            platform=metadata["platform"],
            inputs=metadata["inputs"],
            outputs=metadata["outputs"],
        )

    async def ModelInfer(self, request: Any, context: ServicerContext) -> pb.ModelInferResponse:
        self._check_version(request.model_name, request.model_version)
        return await super().ModelInfer(request, context)

    async def RepositoryModelLoad(
        self, request: Any, context: ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        if not self.repository_endpoints:
            raise RepositoryEndpointsOff()
        await self.repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse(model_name=request.model_name, isLoaded=True)

    async def RepositoryModelUnload(
        self, request: Any, context: ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        if not self.repository_endpoints:
            raise RepositoryEndpointsOff()
        await self.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse(model_name=request.model_name, isUnloaded=True)


def build_grpc_server(
    data_plane: DataPlane,
    repository: ModelRepositoryExtension,
    repository_endpoints: bool,
    host: str,
    port: int,
) -> aio.Server:
    """The gRPC V2 server on ``host:port``; create it in the event loop it will run in."""
    server = aio.server(interceptors=(StatusInterceptor(),))
    add_GRPCInferenceServiceServicer_to_server(
        Servicer(data_plane, repository, repository_endpoints), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise LdmError(f"serving.grpc_port: cannot listen on {address} ({exc})") from None
    return server
