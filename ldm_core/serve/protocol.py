"""Request parsing and response encoding for the predictor: Open Inference Protocol (V2)
and V1, with nothing of the server in it.

- V2 input ``seed`` INT64 ``[N]`` (one sample per seed); parameters ``sampler``
  (ddim|ddpm|rflow, limited to the ones the bundle's training objective allows), ``steps``,
  ``output`` (volume|nifti|png). Outputs ``volume`` FP32 ``[N,1,D,H,W]``, ``affine`` FP32
  ``[4,4]``, ``nifti`` / ``png`` BYTES ``[N]`` (base64 strings in JSON, raw bytes with the
  binary data extension, which clients ask for with ``binary_data_output`` or a per-output
  ``binary_data`` parameter, as KServe defines them). The protocol's ``outputs`` field
  picks any combination of them, in the order asked; without it the ``output`` parameter
  is a shortcut for one kind (``volume`` gives ``volume`` + ``affine``); with neither, every
  output the model metadata lists, as the protocol says ("If not specified all outputs
  produced by the model will be returned"): KServe's metadata has no field that could say
  otherwise. Each output may be asked for once.
- Unknown request parameters are accepted and ignored (logged at debug): the protocol
  makes parameters extensible, and generic clients send their own.
- V1 ``{"instances": [{"seed": 1}, ...], "parameters": {...}}`` -> ``{"predictions": [...]}``;
  V1 defaults to ``output: nifti`` because a JSON number list of a volume is rarely wanted.

A bad request raises ``kserve.errors.InvalidInput`` (HTTP 400) with a message that names
the field at fault; nothing a client sends should cause a 500.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import (
    InferOutput,
    InferRequest,
    InferResponse,
    to_http_parameters,
)

from ldm_core.config import Config
from ldm_core.sample import to_nifti_bytes, triptych_png
from ldm_core.samplers import ALL_SAMPLERS, samplers_for

OUTPUTS = ("volume", "nifti", "png")
"""Values of the ``output`` parameter, the shortcut for the ``outputs`` field."""
OUTPUT_TENSORS: dict[str, tuple[str, ...]] = {
    "volume": ("volume", "affine"),
    "nifti": ("nifti",),
    "png": ("png",),
}
"""The tensors each ``output`` shortcut produces."""
TENSORS = ("volume", "affine", "nifti", "png")
"""Every output tensor this model can produce (its metadata lists them in this order)."""
CONTENT_TYPES = {"nifti": "application/gzip", "png": "image/png"}
PARAMETERS = ("sampler", "steps", "output", "binary_data_output")
"""Request parameters this model reads (``binary_data_output`` is KServe's own)."""
SEED_DATATYPES = ("INT64", "INT32")
MAX_SEED = 2**63 - 2  # the sampler seeds step noise with seed + 1


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
        """Limits of the server's config (``serving``, ``sampling``) for the bundle's model:
        its objective decides the samplers, its timesteps cap ``steps``."""
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
    outputs: tuple[str, ...]
    """Output tensors, in the order the response lists them."""
    infer_request: InferRequest | None = None
    ignored_parameters: tuple[str, ...] = ()
    """Request parameters this model does not read (accepted, see the module docstring)."""
    started: float = field(default_factory=time.monotonic)


# --------------------------------------------------------------------------- parsing


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _check_seeds(
    seeds: Sequence[Any], where: str, limits: Limits, item: str = "{where}[{i}]"
) -> list[int]:
    if not seeds:
        raise InvalidInput(f"{where}: at least one seed is needed (one sample per seed)")
    if len(seeds) > limits.max_samples:
        raise InvalidInput(
            f"{where}: {len(seeds)} samples requested, at most {limits.max_samples} per request "
            "(serving.max_samples)"
        )
    for i, s in enumerate(seeds):
        name = item.format(where=where, i=i)
        if not _is_int(s):
            raise InvalidInput(f"{name}: seed must be an integer, got {s!r}")
        if not 0 <= int(s) <= MAX_SEED:
            raise InvalidInput(f"{name}: seed {s} is outside 0..{MAX_SEED}")
    return [int(s) for s in seeds]


def _parse_parameters(
    params: Mapping[str, Any] | None, limits: Limits, default_outputs: tuple[str, ...]
) -> tuple[str, int, tuple[str, ...]]:
    """The sampler, the steps, and the tensors the ``output`` shortcut names
    (``default_outputs`` without one)."""
    params = dict(params or {})
    sampler = params.get("sampler", limits.default_sampler)
    if not isinstance(sampler, str) or sampler not in ALL_SAMPLERS:
        raise InvalidInput(
            f"parameters.sampler: {sampler!r} is not one of {', '.join(ALL_SAMPLERS)}"
        )
    if sampler not in limits.samplers:
        raise InvalidInput(
            f"parameters.sampler: {sampler!r} cannot sample this model (trained for "
            f"{', '.join(limits.samplers)})"
        )
    steps = params.get("steps", limits.default_steps)
    if not _is_int(steps):
        raise InvalidInput(f"parameters.steps: expected an integer, got {steps!r}")
    if not 1 <= steps <= limits.max_steps:
        raise InvalidInput(f"parameters.steps: {steps} is outside 1..{limits.max_steps}")
    outputs = default_outputs
    if "output" in params:
        output = params["output"]
        if not isinstance(output, str) or output not in OUTPUTS:
            raise InvalidInput(f"parameters.output: {output!r} is not one of {', '.join(OUTPUTS)}")
        outputs = OUTPUT_TENSORS[output]
    if "binary_data_output" in params and not isinstance(params["binary_data_output"], bool):
        raise InvalidInput("parameters.binary_data_output: expected true or false")
    return sampler, int(steps), outputs


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list | tuple):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _seed_tensor(request: InferRequest, limits: Limits) -> list[int]:
    """The seeds of the one ``seed`` input, checked for name, datatype, shape and range."""
    inputs = request.inputs or []
    for i, tensor in enumerate(inputs):
        if tensor.name != "seed":
            raise InvalidInput(
                f"inputs[{i}].name: unknown input {tensor.name!r}; this model takes only 'seed'"
            )
    if len(inputs) != 1:
        raise InvalidInput("inputs: exactly one input named 'seed' (INT64, shape [N]) is required")
    tensor = inputs[0]
    if tensor.datatype not in SEED_DATATYPES:
        raise InvalidInput(f"inputs[seed].datatype: expected INT64, got {tensor.datatype!r}")
    shape = tensor.shape
    if not (isinstance(shape, list | tuple) and len(shape) == 1 and _is_int(shape[0])):
        raise InvalidInput(f"inputs[seed].shape: expected [N] (one seed per sample), got {shape!r}")
    values = _flatten(tensor.data if tensor.data is not None else [])
    if not values and shape[0]:
        # gRPC raw_input_contents: bytes already typed by the datatype, checked above.
        values = tensor.as_numpy().reshape(-1).tolist()
    if len(values) != shape[0]:
        raise InvalidInput(
            f"inputs[seed].data: {len(values)} values do not match shape {list(shape)}"
        )
    return _check_seeds(values, "inputs[seed].data", limits)


def _ignored(params: Mapping[str, Any] | None) -> tuple[str, ...]:
    return tuple(sorted(set(params or {}) - set(PARAMETERS)))


def _requested_outputs(request: InferRequest) -> tuple[str, ...]:
    """The tensors the ``outputs`` field names, in the order given. A tensor named twice is
    refused: KServe encodes the response once per entry, so a second entry would send the
    same tensor twice, or fail to encode it (500) when the two ask for different encodings."""
    names: list[str] = []
    for i, ro in enumerate(request.request_outputs or []):
        if ro.name not in TENSORS:
            raise InvalidInput(
                f"outputs[{i}].name: unknown output {ro.name!r}; this model gives "
                f"{', '.join(TENSORS)}"
            )
        flag = (ro.parameters or {}).get("binary_data")
        if flag is not None and not isinstance(flag, bool):
            raise InvalidInput(f"outputs[{i}].parameters.binary_data: expected true or false")
        if ro.name in names:
            raise InvalidInput(
                f"outputs[{i}].name: {ro.name!r} is asked for twice "
                f"(also outputs[{names.index(ro.name)}])"
            )
        names.append(ro.name)
    return tuple(names)


def parse_v2(request: InferRequest, limits: Limits, request_id: str) -> GenerationRequest:
    """Validate an Open Inference Protocol request, naming the field at fault. The
    ``outputs`` field decides what is produced; the ``output`` parameter (checked either
    way) only when the request has no ``outputs``; with neither, every output."""
    seeds = _seed_tensor(request, limits)
    # gRPC parameters arrive as typed InferParameter messages; REST ones as plain values.
    params = to_http_parameters(request.parameters or {})
    sampler, steps, shortcut = _parse_parameters(params, limits, default_outputs=TENSORS)
    outputs = _requested_outputs(request) or shortcut
    return GenerationRequest(
        request_id,
        "v2",
        seeds,
        sampler,
        steps,
        outputs,
        infer_request=request,
        ignored_parameters=_ignored(params),
    )


def parse_v1(body: Any, limits: Limits, request_id: str) -> GenerationRequest:
    """Validate a V1 ``:predict`` body: ``{"instances": [{"seed": 1}, ...], "parameters": {...}}``."""
    if isinstance(body, bytes):
        raise InvalidInput("request body: expected JSON (send content-type: application/json)")
    if not isinstance(body, dict):
        raise InvalidInput('request body: expected a JSON object {"instances": [{"seed": 1}, ...]}')
    unknown = sorted(set(body) - {"instances", "parameters"})
    if unknown:
        raise InvalidInput(
            f"{unknown[0]}: unknown field; a V1 request has instances and parameters"
        )
    instances = body.get("instances")
    if not isinstance(instances, list):
        raise InvalidInput('instances: expected a list like [{"seed": 1}, {"seed": 2}]')
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict) or set(inst) != {"seed"}:
            raise InvalidInput(f'instances[{i}]: expected {{"seed": <integer>}}, got {inst!r}')
    seeds = _check_seeds(
        [inst["seed"] for inst in instances], "instances", limits, item="instances[{i}].seed"
    )
    params = body.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidInput("parameters: expected a JSON object")
    sampler, steps, outputs = _parse_parameters(params, limits, OUTPUT_TENSORS["nifti"])
    return GenerationRequest(
        request_id,
        "v1",
        seeds,
        sampler,
        steps,
        outputs,
        ignored_parameters=_ignored(params),
    )


# --------------------------------------------------------------------------- responses


def _binary_wanted(request: InferRequest, name: str) -> bool:
    """Whether KServe will send output ``name`` as raw bytes: the same rule as
    ``InferResponse.to_rest`` (a requested output's ``binary_data`` wins over
    ``binary_data_output``), so BYTES payloads are base64 exactly when they travel in JSON.
    gRPC carries bytes as bytes: its answers are never base64."""
    if request.from_grpc:
        return True
    if request.request_outputs:
        for ro in request.request_outputs:
            if ro.name == name:
                return bool(ro.binary_data)
        return False
    return bool(request.use_binary_outputs)


def encode(
    volumes: np.ndarray, affine: np.ndarray, outputs: Sequence[str]
) -> dict[str, list[bytes]]:
    """One file per volume for each BYTES output in ``outputs``: gzip-NIfTI with
    ``affine``, or a PNG preview. CPU work of tens of milliseconds per volume; callers keep
    it off the event loop."""
    files: dict[str, list[bytes]] = {}
    if "nifti" in outputs:
        files["nifti"] = [to_nifti_bytes(v, affine) for v in volumes]
    if "png" in outputs:
        files["png"] = [triptych_png(v) for v in volumes]
    return files


def _output(
    name: str, datatype: str, data: np.ndarray, grpc: bool, parameters: dict | None = None
) -> InferOutput:
    """An output tensor; for gRPC serialised here, because kserve 0.21's
    ``InferResponse.to_grpc`` takes the truth value of a numpy array (and fails) whenever
    the request's inputs came as raw contents."""
    if not grpc:
        return InferOutput(name, list(data.shape), datatype, data=data, parameters=parameters)
    tensor = InferOutput(name, list(data.shape), datatype, parameters=parameters)
    tensor.set_data_from_numpy(data, binary_data=True)
    return tensor


def _file_output(name: str, payloads: list[bytes], binary: bool, grpc: bool) -> InferOutput:
    items = payloads if binary else [base64.b64encode(p).decode("ascii") for p in payloads]
    data = np.empty(len(items), dtype=object)
    data[:] = items
    params: dict[str, Any] = {"content_type": CONTENT_TYPES[name]}
    if not binary:
        params["encoding"] = "base64"
    return _output(name, "BYTES", data, grpc, params)


def build_v2_response(
    req: GenerationRequest,
    volumes: np.ndarray,
    affine: np.ndarray,
    files: Mapping[str, list[bytes]],
    model_name: str,
    bundle_digest: str,
) -> InferResponse:
    """The V2 response of ``req``: the tensors it asked for, binary where asked, and the
    parameters that say how and from which bundle (``bundle_digest``, also the response's
    ``model_version``: the bundle's digest is the model's version) they were made."""
    ir = req.infer_request
    if ir is None:
        raise ValueError(f"request {req.request_id}: a V2 response needs the V2 request")
    outputs: list[InferOutput] = []
    for name in req.outputs:
        if name == "volume":
            vol = np.ascontiguousarray(volumes, dtype=np.float32)
            outputs.append(_output("volume", "FP32", vol, ir.from_grpc))
        elif name == "affine":
            aff = np.ascontiguousarray(affine, dtype=np.float32).reshape(4, 4)
            outputs.append(_output("affine", "FP32", aff, ir.from_grpc))
        else:
            binary = _binary_wanted(ir, name)
            outputs.append(_file_output(name, files[name], binary, ir.from_grpc))
    return InferResponse(
        response_id=req.request_id,
        model_name=model_name,
        infer_outputs=outputs,
        model_version=bundle_digest,
        parameters={"sampler": req.sampler, "steps": req.steps, "bundle_digest": bundle_digest},
        use_binary_outputs=ir.use_binary_outputs,
        requested_outputs=ir.request_outputs,
    )


def build_v1_response(
    req: GenerationRequest,
    volumes: np.ndarray,
    affine: np.ndarray,
    files: Mapping[str, list[bytes]],
    bundle_digest: str,
) -> dict[str, Any]:
    """The V1 response of ``req``: one prediction per seed, plus the affine, the settings
    and the bundle's digest. V1 asks for one kind (``outputs`` is one shortcut's tensors)."""
    kind = req.outputs[0]
    predictions: list[dict[str, Any]] = []
    for i, seed in enumerate(req.seeds):
        if kind == "volume":
            value: Any = volumes[i].tolist()
        else:
            value = base64.b64encode(files[kind][i]).decode("ascii")
        predictions.append({"seed": seed, kind: value})
    return {
        "predictions": predictions,
        "affine": np.asarray(affine, dtype=float).tolist(),
        "sampler": req.sampler,
        "steps": req.steps,
        "bundle_digest": bundle_digest,
    }
