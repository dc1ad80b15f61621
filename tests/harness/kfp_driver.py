"""How a KFP backend's driver turns a task's resource placeholders into the pod's resources.

The compiled pipeline sizes the evaluate pod from configure's outputs (resource
placeholders such as ``{{$.inputs.parameters['pipelinechannel--configure-evaluate_gpus']}}``).
What the pod gets is decided in Go, by three steps modelled here one to one, each the same
in the backends Kubeflow ships (2.4.1, 2.5.0, 2.15.0):

1. the launcher of the producing task reads its output parameter file and converts the text
   to a ``structpb.Value`` by the parameter's declared type
   (``backend/src/v2/metadata/converter.go`` ``TextToPbValue``: STRING -> string_value,
   NUMBER_INTEGER / NUMBER_DOUBLE -> number_value, ...);
2. the driver resolves a placeholder by looking the channel's name up in the executor input
   and taking ``val.GetStringValue()`` (2.4.1 ``backend/src/v2/driver/util.go:65-78``
   ``resolvePodSpecInputRuntimeParameter``; 2.15.0 the same function in ``resolve.go:798``):
   a value that is not a string resolves to "";
3. ``initPodSpecPatch`` (2.4.1 ``driver.go:499-531``, 2.15.0 ``driver.go:361-393``) sets the
   accelerator limit only when both the type and the count resolved to non-empty strings, and
   parses the count as a Kubernetes quantity; CPU and memory placeholders go through step 2
   the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

CHANNEL = re.compile(r"\$.inputs.parameters\['(.+?)'\]")
"""``inputPipelineChannelPattern`` (util.go:25 at 2.4.1, :27 at 2.15.0)."""


def text_to_value(text: str, parameter_type: str) -> struct_pb2.Value:
    """``TextToPbValue``: an output parameter file's text as the declared type's value."""
    value = struct_pb2.Value()
    if parameter_type == "STRING":
        value.string_value = text
    elif parameter_type == "NUMBER_INTEGER":
        value.number_value = float(int(text.strip()))
    elif parameter_type == "NUMBER_DOUBLE":
        value.number_value = float(text.strip())
    elif parameter_type == "BOOLEAN":
        value.bool_value = {"true": True, "false": False}[text.strip().lower()]
    else:
        raise ValueError(f"parameter type {parameter_type} is not modelled here")
    return value


def resolve(placeholder: str, parameters: Mapping[str, struct_pb2.Value]) -> str:
    """``resolvePodSpecInputRuntimeParameter``: a channel resolves to its value's string
    (``GetStringValue()``: "" for a number); anything else is taken as it is."""
    match = CHANNEL.search(placeholder)
    if not match:
        return placeholder
    if match.group(1) not in parameters:
        raise KeyError(f"executorInput did not contain input parameter {match.group(1)}")
    value = parameters[match.group(1)]
    return value.string_value if value.WhichOneof("kind") == "string_value" else ""


def pod_resources(
    resources: Mapping[str, Any], parameters: Mapping[str, struct_pb2.Value]
) -> dict[str, dict[str, str]]:
    """The requests and limits ``initPodSpecPatch`` gives the container for a compiled
    ``resources`` block (``deploymentSpec.executors.<exec>.container.resources``)."""
    out: dict[str, dict[str, str]] = {"requests": {}, "limits": {}}
    fields = {
        "resourceCpuRequest": ("requests", "cpu"),
        "resourceCpuLimit": ("limits", "cpu"),
        "resourceMemoryRequest": ("requests", "memory"),
        "resourceMemoryLimit": ("limits", "memory"),
    }
    for field, (where, name) in fields.items():
        if field in resources:
            text = resolve(str(resources[field]), parameters)
            if text:
                out[where][name] = text
    accelerator = resources.get("accelerator") or {}
    kind = resolve(str(accelerator.get("resourceType", accelerator.get("type", ""))), parameters)
    count = resolve(str(accelerator.get("resourceCount", "")), parameters)
    if kind and count:
        if not re.fullmatch(r"\d+", count):
            raise ValueError(f"failed to init podSpecPatch: quantity {count!r}")
        out["limits"][kind] = count
    return out
