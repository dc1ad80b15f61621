"""The bundle behind KServe's protocols: a ``kserve.Model`` that loads a bundle and turns
parsed requests into volumes.

It overrides what KServe means a model to override: ``load`` (readiness turns true only
after the bundle loaded and one tiny generation warmed it up), ``preprocess`` (parse and
validate, :mod:`~ldm_core.serve.protocol`), ``predict`` (generate, under the server's
:class:`~ldm_core.serve.admission.Admission`, which may denoise it in one loop with other
requests that ask for the same :class:`~ldm_core.serve.batching.LoopKey`) and
``postprocess`` (encode), plus the metadata of its inputs and outputs. The server owns
HTTP, admission and threads.

Status codes: 400 for a bad request (the field named), 503 busy or out of device memory,
504 past the time limit, and 500 when generation itself fails: an engine error is ours,
not the client's, and is logged with its type, message and request id. Both are the
request's own: a batch that fails is retried request by request
(:mod:`~ldm_core.serve.admission`), so an error answers the request that caused it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kserve import Model
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferRequest, InferResponse

from ldm_core.bundle import Bundle, digest
from ldm_core.bundle import load as load_bundle
from ldm_core.config import Config
from ldm_core.io import BUNDLE_JSON
from ldm_core.sample import generate, prepare
from ldm_core.serve.admission import Admission, Outcome, Progress, RequestRejected, ServerBusy
from ldm_core.serve.batching import LoopKey
from ldm_core.serve.logs import log_event, log_request
from ldm_core.serve.metrics import REJECTED, REQUEST_LATENCY, SAMPLES_GENERATED
from ldm_core.serve.monitoring import export_reference, observe, read_reference
from ldm_core.serve.protocol import (
    TENSORS,
    GenerationRequest,
    Limits,
    build_v1_response,
    build_v2_response,
    encode,
    parse_v1,
    parse_v2,
)


@dataclass
class Generated:
    """What ``predict`` hands ``postprocess``: the request, its volumes and its batch."""

    request: GenerationRequest
    outcome: Outcome[np.ndarray]
    """``result``: the volumes, ``[N, 1, D, H, W]`` float32."""


class BrainLDMModel(Model):
    """One model bundle served under ``name``.

    Args:
        name: the model name in the URLs (``/v2/models/{name}/infer``).
        bundle_dir: the bundle directory.
        cfg: the server's config (``serving`` limits, ``sampling`` defaults).
        admission: the server's limits on concurrency, queue and time, which generation
            runs under.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
    """

    def __init__(
        self,
        name: str,
        bundle_dir: str | Path,
        cfg: Config,
        admission: Admission,
        device: str = "auto",
    ) -> None:
        super().__init__(name)
        self.bundle_dir = Path(bundle_dir)
        self.cfg = cfg
        self.admission = admission
        self.device = device
        self.bundle: Bundle | None = None
        self.limits: Limits | None = None
        self.bundle_digest = ""
        """``ldm_core.bundle.digest`` of the bundle served, in every response's parameters,
        so a deploy's smoke check can tell which bundle answered; also the model's version
        (:mod:`~ldm_core.serve.versions`)."""
        self.loaded = False
        """True once ``load`` finished, and still after an unload: liveness tells a model
        that is gone from one still loading by it."""

    def load(self) -> bool:
        """Load the bundle, warm it up, then mark the model ready. May run in a background
        thread while the server already answers liveness."""
        started = time.monotonic()
        self.bundle_digest = digest(self.bundle_dir)
        self.bundle = load_bundle(self.bundle_dir, self.device)
        reference = read_reference(self.bundle.meta, str(self.bundle_dir / BUNDLE_JSON))
        export_reference(reference)
        if not reference:
            log_event(
                "no_output_reference",
                logging.WARNING,
                bundle=str(self.bundle_dir),
                detail="bundle.json has no reference: output drift is exported, not compared",
            )
        self.limits = Limits.from_config(self.cfg, self.bundle.config)
        if self.cfg.serving.warmup:
            # A one-step generation touches every kernel (and, on a GPU, initialises cuDNN and
            # the allocator) so the first real request is not the slow one. On a GPU the UNet
            # is compiled for the bundle's fixed latent shape, one graph per batch size a
            # loop may have (a request alone, or requests batched together), and under the
            # precision requests run with (autocast is part of the graph), so the compile
            # cost is paid here and measured.
            on_gpu = self.bundle.device.type == "cuda"
            self.warmup_s = prepare(
                self.bundle,
                compile=on_gpu,
                batch_sizes=range(1, self._largest_batch() + 1) if on_gpu else (1,),
                sampler=self.limits.default_sampler,
                precision=self.cfg.sampling.precision,
            )
        self.ready = self.loaded = True
        log_event(
            "model_ready",
            model=self.name,
            bundle=str(self.bundle_dir),
            device=str(self.bundle.device),
            image_shape=list(self.bundle.image_shape),
            samplers=list(self.limits.samplers),
            bundle_digest=self.bundle_digest,
            load_s=round(time.monotonic() - started, 3),
        )
        return self.ready

    @property
    def versions(self) -> list[str]:
        """The model's one version, its bundle's digest (empty until ``load`` reads it)."""
        return [self.bundle_digest] if self.bundle_digest else []

    def _largest_batch(self) -> int:
        """Most samples one denoising loop may hold: a request alone (``max_samples``) or
        requests batched together (``max_batch_size``)."""
        return max(self.cfg.serving.max_samples, self.cfg.serving.max_batch_size)

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": "seed", "datatype": "INT64", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        """Every output; a V2 request that names none (nor the ``output`` shortcut) gets
        all of them, as the protocol says (:mod:`~ldm_core.serve.protocol`)."""
        d, h, w = self.bundle.image_shape if self.bundle is not None else (-1, -1, -1)
        types = {
            "volume": {"name": "volume", "datatype": "FP32", "shape": [-1, 1, d, h, w]},
            "affine": {"name": "affine", "datatype": "FP32", "shape": [4, 4]},
            "nifti": {"name": "nifti", "datatype": "BYTES", "shape": [-1]},
            "png": {"name": "png", "datatype": "BYTES", "shape": [-1]},
        }
        return [types[name] for name in TENSORS]

    async def preprocess(
        self, payload: InferRequest | dict[str, Any] | bytes, headers: dict[str, str] | None = None
    ) -> GenerationRequest:
        """Parse a V2 ``InferRequest`` or a V1 body; a bad one is a 400 naming the field.

        The request id (the response's ``id``, and the log's ``request_id``) is the V2 body's
        ``id``, else the ``x-request-id`` header, else new. The body wins because the protocol
        echoes it and a mesh stamps the header on every request (Envoy generates one), so a
        header first would never give a client its own id back; KServe's models do the same
        (``kserve.utils.utils.get_predict_response``: ``payload.id``, else a new one)."""
        if self.limits is None:
            raise RuntimeError(f"model {self.name}: preprocess before load")
        v2 = isinstance(payload, InferRequest)
        header_id = (headers or {}).get("x-request-id")
        request_id = (payload.id if v2 else None) or header_id or uuid.uuid4().hex
        try:
            req = (
                parse_v2(payload, self.limits, request_id)
                if v2
                else parse_v1(payload, self.limits, request_id)
            )
        except InvalidInput as exc:
            REJECTED.labels("invalid").inc()
            log_event(
                "request",
                request_id=request_id,
                protocol="v2" if v2 else "v1",
                status=400,
                error=str(exc),
            )
            raise
        if req.ignored_parameters:
            log_event(
                "parameters_ignored",
                logging.DEBUG,
                request_id=request_id,
                parameters=list(req.ignored_parameters),
            )
        return req

    async def predict(
        self, req: GenerationRequest, headers: dict[str, str] | None = None
    ) -> Generated:
        """Generate one volume per seed, once admission lets the request in (alone or in a
        batch with requests that share its loop)."""
        try:
            outcome = await self.admission.run(
                self._generate,
                req.seeds,
                key=self.loop_key(req),
                size=len(req.seeds),
                request_id=req.request_id,
                started=req.started,
                steps=req.steps,
            )
        except RequestRejected as exc:
            log_request(req, status=exc.status, error=str(exc))
            raise
        except torch.cuda.OutOfMemoryError:
            REJECTED.labels("out_of_memory").inc()
            log_request(req, status=503, error="out of device memory")
            raise ServerBusy(
                f"out of device memory generating {len(req.seeds)} samples; retry with fewer seeds"
            ) from None
        except Exception as exc:
            REJECTED.labels("error").inc()
            cause = f"{type(exc).__name__}: {exc}"
            log_request(req, status=500, exc_info=exc, error=f"generation failed: {cause}")
            raise InferenceError(f"request {req.request_id}: generation failed ({cause})") from exc
        return Generated(req, outcome)

    def loop_key(self, req: GenerationRequest) -> LoopKey:
        """The loop ``req`` runs in: the request's sampler and steps, the bundle's eta and the
        server's precision (requests cannot choose those yet, but a loop is defined by them)."""
        return LoopKey(
            req.sampler, req.steps, self.bundle.config.sampling.eta, self.cfg.sampling.precision
        )

    def _generate(
        self, key: LoopKey, seeds: list[list[int]], progress: Progress
    ) -> list[np.ndarray]:
        """One denoising loop over the seeds of every request in a batch; each request's
        volumes decoded on their own, as if it had run alone."""
        sizes = [len(s) for s in seeds]
        volumes = generate(
            self.bundle,
            [seed for group in seeds for seed in group],
            key.sampler,
            key.steps,
            eta=key.eta,
            progress=progress,
            precision=key.precision,
            decode_groups=sizes,
        )
        volumes = volumes.numpy().astype(np.float32, copy=False)
        return np.split(volumes, np.cumsum(sizes)[:-1])

    async def postprocess(
        self,
        result: Generated,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse | dict[str, Any]:
        """Encode the volumes as the request asked, record metrics, log the request."""
        req, outcome, volumes = result.request, result.outcome, result.outcome.result
        affine = np.asarray(self.bundle.affine)
        # Summaries and gzip / PNG encoding are CPU work; keep them off the event loop.
        await asyncio.to_thread(observe, volumes)
        files = await asyncio.to_thread(encode, volumes, affine, req.outputs)
        if req.protocol == "v2":
            response: InferResponse | dict[str, Any] = build_v2_response(
                req, volumes, affine, files, self.name, self.bundle_digest
            )
        else:
            response = build_v1_response(req, volumes, affine, files, self.bundle_digest)
        latency = time.monotonic() - req.started
        REQUEST_LATENCY.labels(req.sampler).observe(latency)
        SAMPLES_GENERATED.labels(req.sampler).inc(len(req.seeds))
        log_request(
            req,
            status=200,
            latency_s=round(latency, 4),
            generate_s=round(outcome.seconds, 4),
            batch_id=outcome.batch_id,
            batch_samples=outcome.batch_samples,
            batch_requests=outcome.batch_requests,
        )
        return response
