"""KServe's data plane as this server needs it: health that means something to Kubernetes,
metadata that tells the truth, and JSON bodies read as JSON.

- Readiness (``/v2/health/ready``) waits for every model, so the ServingRuntime's readiness
  probe stays false while the bundle loads and warms up (KServe's answers true as soon as
  the port is open).
- Liveness (``/v2/health/live``, V1's ``/``) fails once a model that finished loading is no
  longer ready (unloaded through the repository extension, or stopped): this server loads its
  bundle once, at start, so such a process can never serve again and only a restart helps.
  While the bundle still loads, liveness holds (the pod's startup probe covers that time).
- While the server drains before it stops (:mod:`~ldm_core.serve.shutdown`), readiness is
  false so endpoints drop the pod, liveness holds (a failing one would have the kubelet
  restart the container instead of letting it finish), and a model route refuses new work:
  model readiness and inference answer 503 saying the server is shutting down (gRPC
  ``UNAVAILABLE``; KServe's inference routes ask ``model_ready`` first, gRPC's ``get_model``).
- A model that is not ready is refused (503), never loaded on the spot: KServe's
  ``get_model`` loads it on the event loop, so a gRPC inference during warm-up would load
  the bundle a second time while blocking every other request, health checks included.
- Server metadata lists the model repository extension only when its routes exist
  (``serving.repository_endpoints``); model metadata lists the model's versions.
"""

from __future__ import annotations

import json
from typing import Any

from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InvalidInput, ModelNotReady, ServerNotLive
from kserve.model import BaseKServeModel
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.rest.v2_datamodels import InferenceRequest

from ldm_core.serve.admission import ShuttingDown

REPOSITORY_EXTENSION = "model_repository_extension"
"""The extension's name in the server metadata (KServe's, after Triton's)."""


class ModelAwareDataPlane(DataPlane):
    """KServe's data plane with health, metadata and decoding for one bundle per model.

    Args:
        model_registry: the server's models; those registered now are the ones liveness
            watches, through their ``loaded`` flag (true once ``load`` finished; a model
            without one never fails liveness, as in KServe).
        repository_endpoints: whether the repository extension's routes exist
            (``serving.repository_endpoints``), for the server metadata.
    """

    def __init__(self, model_registry: ModelRepository, repository_endpoints: bool = False):
        super().__init__(model_registry=model_registry)
        self.repository_endpoints = repository_endpoints
        self._served = list(model_registry.get_models().values())
        self.draining = False
        """Set when the server starts to stop: not ready, no new work, still alive."""

    async def ready(self) -> bool:
        if self.draining:
            return False
        models = list(self.model_registry.get_models().values())
        return bool(models) and all([await m.healthy() for m in models])

    async def model_ready(
        self, model_name: str, disable_predictor_health_check: bool = False
    ) -> bool:
        """KServe's answer, unless the server drains: then ``ShuttingDown`` (503)."""
        if self.draining:
            self.get_model_from_registry(model_name)  # an unknown model is still a 404
            raise ShuttingDown()
        return await super().model_ready(model_name, disable_predictor_health_check)

    async def live(self) -> dict[str, str]:
        """Alive unless a model that finished loading is no longer ready (see the module
        docstring); raises ``ServerNotLive`` (503) naming it."""
        for model in self._served:
            gone = not await self.model_registry.is_model_ready(model.name)
            if gone and getattr(model, "loaded", False):
                raise ServerNotLive(
                    f"Model {model.name} was loaded and is no longer ready; this server loads "
                    "its bundle only at start, so it must be restarted."
                )
        return {"status": "alive"}

    async def get_model(self, name: str) -> BaseKServeModel:
        """The model ``name`` if it is ready; 404 if unknown, 503 if not ready or draining."""
        model = self.get_model_from_registry(name)
        if self.draining:
            raise ShuttingDown()
        if not await model.healthy():
            raise ModelNotReady(name)
        return model

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["extensions"] = [REPOSITORY_EXTENSION] if self.repository_endpoints else []
        return meta

    async def model_metadata(self, model_name: str) -> dict[str, Any]:
        meta = await super().model_metadata(model_name)
        versions = getattr(self.get_model_from_registry(model_name), "versions", None)
        if versions:
            meta["versions"] = list(versions)
        return meta

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
