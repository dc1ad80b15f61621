"""KServe predictor for a model bundle: Open Inference Protocol (V2) and V1 over HTTP.

One ``kserve.Model`` answers ``POST /v2/models/{name}/infer`` and ``/v1/models/{name}:predict``:

- V2 input ``seed`` INT64 ``[N]`` (one sample per seed); parameters ``sampler``
  (ddim|ddpm|rflow, limited to the ones the bundle's training objective allows), ``steps``,
  ``output`` (volume|nifti|png). Outputs ``volume`` FP32 ``[N,1,D,H,W]`` + ``affine`` FP32
  ``[4,4]``, or ``nifti`` / ``png`` BYTES ``[N]`` (base64 strings in JSON, raw bytes with the
  binary data extension, which clients ask for with ``binary_data_output`` or a per-output
  ``binary_data`` parameter, as KServe defines them).
- V1 ``{"instances": [{"seed": 1}, ...], "parameters": {...}}`` -> ``{"predictions": [...]}``;
  V1 defaults to ``output: nifti`` because a JSON number list of a volume is rarely wanted.

Why it looks the way it does:

- The HTTP port opens before the bundle is loaded: liveness (``/v2/health/live``) answers
  at once while model readiness (``/v2/models/{name}/ready``) turns true only after the
  bundle loaded and one tiny generation warmed it up, so Kubernetes neither kills a pod
  that is still loading nor routes traffic to it.
- Generation runs in a worker pool of ``serving.max_concurrency`` threads so the event loop
  keeps answering health checks and /metrics; at most ``max_queue`` requests wait for a
  slot and any beyond that get 503 at once instead of piling up until the device runs out
  of memory. ``serving.request_timeout_s`` bounds queueing plus denoising (504); a timed-out
  generation stops at its next denoising step, so it frees its slot soon.
- Bad requests get 400 (``kserve.errors.InvalidInput``) or FastAPI's 422 for a malformed
  V2 body, with a message naming the field; nothing a client sends should cause a 500.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import json
import logging
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Gauge, Histogram

from ldm_core.bundle import load as load_bundle
from ldm_core.config import Config, load_config, samplers_for
from ldm_core.errors import LdmError
from ldm_core.sample import generate, to_nifti_bytes, triptych_png

# kserve.model_server parses sys.argv when imported (with argparse prefix matching, so our
# --config would be taken for its --configure_logging and exit the process). Hide ours.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    from kserve import Model, ModelServer
    from kserve.errors import InvalidInput
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
finally:
    sys.argv = _argv


DEFAULT_BUNDLE_DIR = "/mnt/models"
"""Where KServe's storage initializer puts the contents of ``storageUri``."""
SAMPLERS = ("ddim", "ddpm", "rflow")
OUTPUTS = ("volume", "nifti", "png")
OUTPUT_TENSORS: dict[str, tuple[str, ...]] = {
    "volume": ("volume", "affine"),
    "nifti": ("nifti",),
    "png": ("png",),
}
CONTENT_TYPES = {"nifti": "application/gzip", "png": "image/png"}
PARAMETERS = ("sampler", "steps", "output", "binary_data_output")
"""Request parameters this model reads (``binary_data_output`` is KServe's own)."""
SEED_DATATYPES = ("INT64", "INT32")
MAX_SEED = 2**63 - 2  # the sampler seeds step noise with seed + 1

log = logging.getLogger("ldm_core.serve")

# Process-wide metrics, exported on /metrics next to KServe's request_*_seconds.
REQUEST_LATENCY = Histogram(
    "ldm_request_latency_seconds",
    "Time from request parsed to response encoded, by sampler",
    ["sampler"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
SAMPLES_GENERATED = Counter("ldm_samples_generated_total", "Volumes generated", ["sampler"])
IN_FLIGHT = Gauge("ldm_requests_in_flight", "Requests generating right now")
QUEUED = Gauge("ldm_requests_queued", "Requests waiting for a generation slot")
REJECTED = Counter(
    "ldm_requests_rejected_total", "Requests refused or failed, by reason", ["reason"]
)


class RequestRejected(LdmError):
    """A valid request the server cannot take now; carries the HTTP status to answer with."""

    status = 503
    reason = "rejected"


class ServerBusy(RequestRejected):
    status = 503
    reason = "busy"


class GenerationTimeout(RequestRejected):
    status = 504
    reason = "timeout"


class _Cancelled(Exception):
    """Raised inside the worker thread to stop a generation whose request gave up."""


def _invalid(message: str) -> InvalidInput:
    REJECTED.labels("invalid").inc()
    return InvalidInput(message)


# --------------------------------------------------------------------------- request parsing


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: from ``cfg.serving`` and the bundle's objective."""

    max_samples: int
    max_steps: int
    samplers: tuple[str, ...]
    default_sampler: str
    default_steps: int

    @classmethod
    def from_config(cls, serving_cfg: Config, bundle_cfg: Config) -> Limits:
        samplers = samplers_for(bundle_cfg.model.scheduler.objective)
        max_steps = min(
            serving_cfg.serving.max_steps, bundle_cfg.model.scheduler.num_train_timesteps
        )
        wanted = serving_cfg.sampling.sampler
        return cls(
            max_samples=serving_cfg.serving.max_samples,
            max_steps=max_steps,
            samplers=samplers,
            default_sampler=wanted if wanted in samplers else samplers[0],
            default_steps=max(1, min(serving_cfg.sampling.steps, max_steps)),
        )


@dataclass
class GenerationRequest:
    """A validated request: everything generation and encoding need, nothing else."""

    request_id: str
    protocol: str  # "v1" | "v2"
    seeds: list[int]
    sampler: str
    steps: int
    output: str
    infer_request: InferRequest | None = None
    started: float = field(default_factory=time.monotonic)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _check_seeds(
    seeds: Sequence[Any], where: str, limits: Limits, item: str = "{where}[{i}]"
) -> list[int]:
    if not seeds:
        raise _invalid(f"{where}: at least one seed is needed (one sample per seed)")
    if len(seeds) > limits.max_samples:
        raise _invalid(
            f"{where}: {len(seeds)} samples requested, at most {limits.max_samples} per request "
            "(serving.max_samples)"
        )
    for i, s in enumerate(seeds):
        name = item.format(where=where, i=i)
        if not _is_int(s):
            raise _invalid(f"{name}: seed must be an integer, got {s!r}")
        if not 0 <= int(s) <= MAX_SEED:
            raise _invalid(f"{name}: seed {s} is outside 0..{MAX_SEED}")
    return [int(s) for s in seeds]


def _parse_parameters(
    params: Mapping[str, Any] | None, limits: Limits, default_output: str
) -> tuple[str, int, str]:
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise _invalid(
            f"parameters.{unknown[0]}: unknown parameter; this model reads {', '.join(PARAMETERS)}"
        )
    sampler = params.get("sampler", limits.default_sampler)
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise _invalid(f"parameters.sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if sampler not in limits.samplers:
        raise _invalid(
            f"parameters.sampler: {sampler!r} cannot sample this model (trained for "
            f"{', '.join(limits.samplers)})"
        )
    steps = params.get("steps", limits.default_steps)
    if not _is_int(steps):
        raise _invalid(f"parameters.steps: expected an integer, got {steps!r}")
    if not 1 <= steps <= limits.max_steps:
        raise _invalid(f"parameters.steps: {steps} is outside 1..{limits.max_steps}")
    output = params.get("output", default_output)
    if not isinstance(output, str) or output not in OUTPUTS:
        raise _invalid(f"parameters.output: {output!r} is not one of {', '.join(OUTPUTS)}")
    if "binary_data_output" in params and not isinstance(params["binary_data_output"], bool):
        raise _invalid("parameters.binary_data_output: expected true or false")
    return sampler, int(steps), output


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list | tuple):
        return [x for item in data for x in _flatten(item)]
    return [data]


def parse_v2(request: InferRequest, limits: Limits, request_id: str) -> GenerationRequest:
    """Validate an Open Inference Protocol request, naming the field at fault."""
    inputs = request.inputs or []
    seed_inputs = [i for i in inputs if i.name == "seed"]
    for i, tensor in enumerate(inputs):
        if tensor.name != "seed":
            raise _invalid(
                f"inputs[{i}].name: unknown input {tensor.name!r}; this model takes only 'seed'"
            )
    if len(seed_inputs) != 1:
        raise _invalid("inputs: exactly one input named 'seed' (INT64, shape [N]) is required")
    tensor = seed_inputs[0]
    if tensor.datatype not in SEED_DATATYPES:
        raise _invalid(f"inputs[seed].datatype: expected INT64, got {tensor.datatype!r}")
    shape = tensor.shape
    if not (isinstance(shape, list | tuple) and len(shape) == 1 and _is_int(shape[0])):
        raise _invalid(f"inputs[seed].shape: expected [N] (one seed per sample), got {shape!r}")
    values = _flatten(tensor.data if tensor.data is not None else [])
    if len(values) != shape[0]:
        raise _invalid(f"inputs[seed].data: {len(values)} values do not match shape {list(shape)}")
    seeds = _check_seeds(values, "inputs[seed].data", limits)
    params = dict(request.parameters or {})
    requested = [o.name for o in request.request_outputs or []]
    if "output" not in params and requested:
        # The client named the tensors it wants; let that pick the output kind.
        kinds = {k for k, names in OUTPUT_TENSORS.items() if set(requested) <= set(names)}
        if len(kinds) == 1:
            params["output"] = kinds.pop()
    sampler, steps, output = _parse_parameters(params, limits, default_output="volume")
    for i, name in enumerate(requested):
        if name not in OUTPUT_TENSORS[output]:
            raise _invalid(
                f"outputs[{i}].name: {name!r} is not produced with output={output!r} "
                f"(it gives {', '.join(OUTPUT_TENSORS[output])})"
            )
    for i, ro in enumerate(request.request_outputs or []):
        flag = (ro.parameters or {}).get("binary_data")
        if flag is not None and not isinstance(flag, bool):
            raise _invalid(f"outputs[{i}].parameters.binary_data: expected true or false")
    return GenerationRequest(request_id, "v2", seeds, sampler, steps, output, infer_request=request)


def parse_v1(body: Any, limits: Limits, request_id: str) -> GenerationRequest:
    """Validate a V1 ``:predict`` body: ``{"instances": [{"seed": 1}, ...], "parameters": {...}}``."""
    if not isinstance(body, dict):
        raise _invalid('request body: expected a JSON object {"instances": [{"seed": 1}, ...]}')
    unknown = sorted(set(body) - {"instances", "parameters"})
    if unknown:
        raise _invalid(f"{unknown[0]}: unknown field; a V1 request has instances and parameters")
    instances = body.get("instances")
    if not isinstance(instances, list):
        raise _invalid('instances: expected a list like [{"seed": 1}, {"seed": 2}]')
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict) or set(inst) != {"seed"}:
            raise _invalid(f'instances[{i}]: expected {{"seed": <integer>}}, got {inst!r}')
    seeds = _check_seeds(
        [inst["seed"] for inst in instances], "instances", limits, item="instances[{i}].seed"
    )
    params = body.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise _invalid("parameters: expected a JSON object")
    sampler, steps, output = _parse_parameters(params, limits, default_output="nifti")
    return GenerationRequest(request_id, "v1", seeds, sampler, steps, output)


# --------------------------------------------------------------------------- responses


def _binary_wanted(request: InferRequest, name: str) -> bool:
    """Whether KServe will send output ``name`` as raw bytes: the same rule as
    ``InferResponse.to_rest`` (a requested output's ``binary_data`` wins over
    ``binary_data_output``), so BYTES payloads are base64 exactly when they travel in JSON."""
    if request.request_outputs:
        for ro in request.request_outputs:
            if ro.name == name:
                return bool(ro.binary_data)
        return False
    return bool(request.use_binary_outputs)


def _encode(volumes: np.ndarray, affine: np.ndarray, output: str) -> list[bytes]:
    if output == "nifti":
        return [to_nifti_bytes(v, affine) for v in volumes]
    return [triptych_png(v) for v in volumes]


def build_v2_response(
    req: GenerationRequest,
    volumes: np.ndarray,
    affine: np.ndarray,
    payloads: list[bytes],
    model_name: str,
) -> InferResponse:
    ir = req.infer_request
    assert ir is not None
    outputs: list[InferOutput] = []
    if req.output == "volume":
        vol = np.ascontiguousarray(volumes, dtype=np.float32)
        outputs.append(InferOutput("volume", list(vol.shape), "FP32", data=vol))
        aff = np.ascontiguousarray(affine, dtype=np.float32)
        outputs.append(InferOutput("affine", [4, 4], "FP32", data=aff))
    else:
        binary = _binary_wanted(ir, req.output)
        items = payloads if binary else [base64.b64encode(p).decode("ascii") for p in payloads]
        data = np.empty(len(items), dtype=object)
        data[:] = items
        params: dict[str, Any] = {"content_type": CONTENT_TYPES[req.output]}
        if not binary:
            params["encoding"] = "base64"
        outputs.append(InferOutput(req.output, [len(items)], "BYTES", data=data, parameters=params))
    return InferResponse(
        response_id=req.request_id,
        model_name=model_name,
        infer_outputs=outputs,
        parameters={"sampler": req.sampler, "steps": req.steps},
        use_binary_outputs=ir.use_binary_outputs,
        requested_outputs=ir.request_outputs,
    )


def build_v1_response(
    req: GenerationRequest, volumes: np.ndarray, affine: np.ndarray, payloads: list[bytes]
) -> dict[str, Any]:
    predictions: list[dict[str, Any]] = []
    for i, seed in enumerate(req.seeds):
        if req.output == "volume":
            value: Any = volumes[i].tolist()
        else:
            value = base64.b64encode(payloads[i]).decode("ascii")
        predictions.append({"seed": seed, req.output: value})
    return {
        "predictions": predictions,
        "affine": np.asarray(affine, dtype=float).tolist(),
        "sampler": req.sampler,
        "steps": req.steps,
    }


# --------------------------------------------------------------------------- the model


@dataclass
class _Generated:
    request: GenerationRequest
    volumes: np.ndarray  # [N, 1, D, H, W] float32
    generate_s: float


class BrainLDMModel(Model):
    """The bundle behind KServe's protocols. ``load`` may run in a background thread while
    the server already answers liveness; ``ready`` flips only after the warm-up."""

    def __init__(
        self, name: str, bundle_dir: str | Path, cfg: Config, device: str = "auto"
    ) -> None:
        super().__init__(name)
        self.bundle_dir = Path(bundle_dir)
        self.cfg = cfg
        self.device = device
        self.bundle: Any = None
        self.limits: Limits | None = None
        self.load_error: BaseException | None = None
        s = cfg.serving
        self._timeout_s = float(s.request_timeout_s)
        self._capacity = s.max_concurrency + s.max_queue
        self._admitted = 0
        self._slots = asyncio.Semaphore(s.max_concurrency)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=s.max_concurrency, thread_name_prefix="ldm-generate"
        )

    # ---- lifecycle

    def load(self) -> bool:
        started = time.monotonic()
        self.bundle = load_bundle(self.bundle_dir, self.device)
        self.limits = Limits.from_config(self.cfg, self.bundle.config)
        if self.cfg.serving.warmup:
            # One tiny generation touches every kernel (and, on a GPU, initialises cuDNN and
            # the allocator) so the first real request is not the slow one.
            generate(self.bundle, [0], self.limits.default_sampler, min(2, self.limits.max_steps))
        self.ready = True
        _log_event(
            "model_ready",
            model=self.name,
            bundle=str(self.bundle_dir),
            device=str(self.bundle.device),
            image_shape=list(self.bundle.image_shape),
            samplers=list(self.limits.samplers),
            load_s=round(time.monotonic() - started, 3),
        )
        return self.ready

    def start(self) -> None:
        """KServe's default marks the model ready here; readiness is ``load``'s to decide."""

    def stop(self) -> None:
        self.ready = False
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- metadata

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": "seed", "datatype": "INT64", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        d, h, w = self.bundle.image_shape if self.bundle is not None else (-1, -1, -1)
        return [
            {"name": "volume", "datatype": "FP32", "shape": [-1, 1, d, h, w]},
            {"name": "affine", "datatype": "FP32", "shape": [4, 4]},
            {"name": "nifti", "datatype": "BYTES", "shape": [-1]},
            {"name": "png", "datatype": "BYTES", "shape": [-1]},
        ]

    # ---- inference

    def validate(self, payload: Any) -> Any:
        """Validation happens in ``preprocess`` (which knows the fields); KServe's generic
        check would trip over the parsed request object."""
        return payload

    async def preprocess(
        self, payload: Any, headers: dict[str, str] | None = None
    ) -> GenerationRequest:
        assert self.limits is not None
        header_id = (headers or {}).get("x-request-id")
        v2 = isinstance(payload, InferRequest)
        request_id = header_id or (payload.id if v2 else None) or uuid.uuid4().hex
        try:
            if v2:
                return parse_v2(payload, self.limits, request_id)
            if isinstance(payload, bytes):
                raise _invalid("request body: expected JSON (send content-type: application/json)")
            return parse_v1(payload, self.limits, request_id)
        except InvalidInput as exc:
            _log_event(
                "request",
                request_id=request_id,
                protocol="v2" if v2 else "v1",
                status=400,
                error=str(exc),
            )
            raise

    async def predict(
        self, req: GenerationRequest, headers: dict[str, str] | None = None
    ) -> _Generated:
        if self._admitted >= self._capacity:
            REJECTED.labels("busy").inc()
            _log_request(req, status=503, error="busy")
            raise ServerBusy(
                f"busy: {self._admitted} requests generating or queued (serving.max_concurrency="
                f"{self.cfg.serving.max_concurrency}, serving.max_queue={self.cfg.serving.max_queue}); retry later"
            )
        loop = asyncio.get_running_loop()
        deadline = req.started + self._timeout_s
        self._admitted += 1
        try:
            QUEUED.inc()
            try:
                await asyncio.wait_for(
                    self._slots.acquire(), timeout=max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                raise self._timed_out(req, "waiting in the queue for a generation slot") from None
            finally:
                QUEUED.dec()
            cancel = threading.Event()
            progress = {"step": 0}
            IN_FLIGHT.inc()
            started = time.monotonic()
            future = loop.run_in_executor(self._executor, self._generate, req, cancel, progress)
            future.add_done_callback(self._finished)
            try:
                volumes = await asyncio.wait_for(
                    asyncio.shield(future), timeout=max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                cancel.set()
                raise self._timed_out(
                    req, f"generating (step {progress['step']} of {req.steps})"
                ) from None
            except asyncio.CancelledError:
                cancel.set()  # the client went away: stop at the next denoising step
                raise
            except LdmError as exc:
                raise _invalid(str(exc)) from None
            except torch.cuda.OutOfMemoryError:
                REJECTED.labels("out_of_memory").inc()
                raise ServerBusy(
                    f"out of device memory generating {len(req.seeds)} samples; retry with fewer seeds"
                ) from None
            return _Generated(req, volumes, time.monotonic() - started)
        finally:
            self._admitted -= 1

    def _finished(self, future: asyncio.Future) -> None:
        # Runs on the event loop when the worker thread is really done (not when the
        # request stopped waiting), so the slot count always matches the busy threads.
        IN_FLIGHT.dec()
        self._slots.release()
        if not future.cancelled():
            future.exception()  # retrieved here so abandoned failures are not logged as leaks

    def _timed_out(self, req: GenerationRequest, what: str) -> GenerationTimeout:
        REJECTED.labels("timeout").inc()
        _log_request(req, status=504, error=f"timeout {what}")
        return GenerationTimeout(
            f"request {req.request_id} exceeded serving.request_timeout_s={self._timeout_s:g} s while {what}"
        )

    def _generate(
        self, req: GenerationRequest, cancel: threading.Event, progress: dict[str, int]
    ) -> np.ndarray:
        def on_step(done: int, total: int) -> None:
            progress["step"] = done
            if cancel.is_set():
                raise _Cancelled()

        volumes = generate(self.bundle, req.seeds, req.sampler, req.steps, progress=on_step)
        return volumes.numpy().astype(np.float32, copy=False)

    async def postprocess(
        self,
        result: _Generated,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse | dict[str, Any]:
        req = result.request
        affine = np.asarray(self.bundle.affine)
        payloads: list[bytes] = []
        if req.output != "volume":
            # gzip / PNG encoding is CPU work; keep it off the event loop.
            payloads = await asyncio.to_thread(_encode, result.volumes, affine, req.output)
        if req.protocol == "v2":
            response: InferResponse | dict[str, Any] = build_v2_response(
                req, result.volumes, affine, payloads, self.name
            )
        else:
            response = build_v1_response(req, result.volumes, affine, payloads)
        latency = time.monotonic() - req.started
        REQUEST_LATENCY.labels(req.sampler).observe(latency)
        SAMPLES_GENERATED.labels(req.sampler).inc(len(req.seeds))
        _log_request(
            req, status=200, latency_s=round(latency, 4), generate_s=round(result.generate_s, 4)
        )
        return response


# --------------------------------------------------------------------------- logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line, so log shippers index fields instead of parsing text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, event, extra={"fields": fields})


def _log_request(req: GenerationRequest, status: int, **fields: Any) -> None:
    _log_event(
        "request",
        logging.INFO if status < 500 else logging.WARNING,
        request_id=req.request_id,
        protocol=req.protocol,
        n=len(req.seeds),
        sampler=req.sampler,
        steps=req.steps,
        output=req.output,
        status=status,
        **fields,
    )


def configure_logging(level: int = logging.INFO) -> None:
    """Route this module's logs to stderr as JSON lines (KServe keeps its own format)."""
    if any(isinstance(h.formatter, JsonFormatter) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


# --------------------------------------------------------------------------- server


async def _rejected_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestRejected)
    headers = {"retry-after": "1"} if exc.status == 503 else None
    return JSONResponse(status_code=exc.status, content={"error": str(exc)}, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """503 / 504 for requests the server cannot take, instead of KServe's generic 500."""
    app.add_exception_handler(RequestRejected, _rejected_handler)


class _ModelAwareDataPlane(DataPlane):
    """Server readiness (``/v2/health/ready``) that waits for every model, so the plain
    readiness probe of the ServingRuntime stays false while the bundle loads and warms up
    (KServe's own answers true as soon as the port is open)."""

    async def ready(self) -> bool:
        models = list(self.model_registry.get_models().values())
        return bool(models) and all([await m.healthy() for m in models])


class _HostModelServer(ModelServer):
    """KServe's ModelServer with model-aware readiness and a chosen listen address (it
    binds 0.0.0.0; a local deployment should listen on loopback only)."""

    def __init__(self, host: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._host = host
        self.dataplane = _ModelAwareDataPlane(model_registry=self.registered_models)

        self._stop_requested = False

    def setup_event_loop(self) -> None:
        # Called after the REST server is built and before it binds: the one hook to set the host.
        super().setup_event_loop()
        if self._rest_server is not None:
            self._rest_server.config.host = self._host
        if self._stop_requested:
            self.request_stop()

    def request_stop(self) -> None:
        """Make uvicorn shut down gracefully, from any thread and at any point of start-up
        (a signal sent before uvicorn installs its handlers would be lost)."""
        self._stop_requested = True
        rest = self._rest_server
        if rest is not None:
            rest._server.should_exit = True  # uvicorn polls this flag in its main loop


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LdmError(
                f"serving.http_port: cannot listen on {host}:{port} ({exc.strerror})"
            ) from None


def serve(
    cfg: Config,
    bundle_dir: str | Path = DEFAULT_BUNDLE_DIR,
    http_port: int | None = None,
    model_name: str | None = None,
    *,
    host: str = "0.0.0.0",
    device: str = "auto",
) -> None:
    """Serve ``bundle_dir`` until SIGTERM/SIGINT. Blocks.

    The port opens first; the bundle loads and warms up in a background thread. If loading
    fails the server shuts down and this raises LdmError, so a pod restarts with the reason
    in its log instead of staying live but never ready.
    """
    import kserve.model_server

    configure_logging()
    port = http_port or cfg.serving.http_port
    name = model_name or cfg.serving.model_name
    bundle_path = Path(bundle_dir)
    if not (bundle_path / "bundle.json").is_file():
        raise LdmError(f"{bundle_path}: not a model bundle (no bundle.json)")
    _check_port_free(host, port)
    model = BrainLDMModel(name, bundle_path, cfg, device=device)
    server = _HostModelServer(host, http_port=port, enable_grpc=False, workers=1)
    install_error_handlers(kserve.model_server.app)
    server.register_model(model)
    _log_event("server_starting", model=name, host=host, port=port, bundle=str(bundle_path))

    def load_in_background() -> None:
        try:
            model.load()
        except BaseException as exc:  # noqa: BLE001 - any failure must stop the server
            model.load_error = exc
            _log_event(
                "model_load_failed", logging.ERROR, model=name, error=f"{type(exc).__name__}: {exc}"
            )
            server.request_stop()

    threading.Thread(target=load_in_background, name="ldm-load", daemon=True).start()
    server.start([])
    model.stop()
    if model.load_error is not None:
        raise LdmError(
            f"{bundle_path}: model failed to load: {model.load_error}"
        ) from model.load_error


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ldm_core.serve",
        description="Serve a model bundle with KServe (V1 and Open Inference Protocol V2).",
    )
    p.add_argument(
        "--bundle",
        default=DEFAULT_BUNDLE_DIR,
        help=f"bundle directory (default {DEFAULT_BUNDLE_DIR})",
    )
    p.add_argument("--http-port", type=int, default=None, help="default: serving.http_port")
    p.add_argument("--model-name", default=None, help="default: serving.model_name")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--config", default=None, help="YAML config (default: the bundle's config.yaml)")
    p.add_argument("--preset", default=None, help="config preset")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if not (Path(args.bundle) / "bundle.json").is_file():
            raise LdmError(f"{args.bundle}: not a model bundle (no bundle.json)")
        config_path = args.config or Path(args.bundle) / "config.yaml"
        cfg = load_config(config_path, preset=args.preset, overrides=args.set)
        serve(cfg, args.bundle, args.http_port, args.model_name, host=args.host, device=args.device)
    except LdmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
