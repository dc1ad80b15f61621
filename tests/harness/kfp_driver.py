"""How a KFP backend's driver turns a task's resource placeholders into the pod's resources.

The compiled pipeline sizes the evaluate pod from configure's outputs (resource
placeholders such as ``{{$.inputs.parameters['pipelinechannel--configure-evaluate_gpus']}}``).
What the pod gets is decided in Go, by steps modelled here one to one. The code is the same in
the three backends Kubeflow ships (2.4.1, 2.5.0, 2.15.0; function bodies compared tag against
tag, only their places differ: :data:`SOURCES`):

1. the launcher of the producing task reads its output parameter file and converts the text
   to a ``structpb.Value`` by the parameter's declared type (``TextToPbValue``: STRING ->
   string_value, NUMBER_INTEGER / NUMBER_DOUBLE -> number_value, ...);
2. the driver resolves a placeholder by looking the channel's name up in the executor input
   and taking ``val.GetStringValue()`` (``resolvePodSpecInputRuntimeParameter``): a value
   that is not a string resolves to "";
3. ``initPodSpecPatch`` sets the accelerator limit only when both the type and the count
   resolved to non-empty strings, and parses the count as a Kubernetes quantity; CPU and
   memory go through ``getPodResource``, which parses whatever the placeholder resolved to,
   so one that resolved to "" fails the task ("failed to init podSpecPatch").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

CHANNEL = re.compile(r"\$.inputs.parameters\['(.+?)'\]")
"""``inputPipelineChannelPattern``."""
QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
"""What ``k8s.io/apimachinery`` ``resource.ParseQuantity`` accepts (its error message's
pattern); the empty string fails it."""

SOURCES = {
    "2.4.1": {
        "TextToPbValue": "backend/src/v2/metadata/converter.go:50",
        "inputPipelineChannelPattern": "backend/src/v2/driver/util.go:25",
        "resolvePodSpecInputRuntimeParameter": "backend/src/v2/driver/util.go:65-78",
        "getPodResource": "backend/src/v2/driver/driver.go:368-392",
        "initPodSpecPatch (accelerator)": "backend/src/v2/driver/driver.go:499-531",
    },
    "2.5.0": {
        "TextToPbValue": "backend/src/v2/metadata/converter.go:50",
        "inputPipelineChannelPattern": "backend/src/v2/driver/util.go:29",
        "resolvePodSpecInputRuntimeParameter": "backend/src/v2/driver/util.go:69-82",
        "getPodResource": "backend/src/v2/driver/driver.go:414-438",
        "initPodSpecPatch (accelerator)": "backend/src/v2/driver/driver.go:557-589",
    },
    "2.15.0": {
        "TextToPbValue": "backend/src/v2/metadata/converter.go:50",
        "inputPipelineChannelPattern": "backend/src/v2/driver/util.go:27",
        "resolvePodSpecInputRuntimeParameter": "backend/src/v2/driver/resolve.go:798-811",
        "getPodResource": "backend/src/v2/driver/driver.go:150-174",
        "initPodSpecPatch (accelerator)": "backend/src/v2/driver/driver.go:361-393",
    },
}
"""Where each modelled function is in kubeflow/pipelines at each backend's tag. A backend not
listed has not been read: :func:`sources` refuses it, so a new release needs a look at its
driver before its tests pass."""


def sources(backend: str) -> dict[str, str]:
    """The code this model follows for KFP backend ``backend``."""
    if backend not in SOURCES:
        raise LookupError(
            f"KFP backend {backend}'s driver has not been compared with this model; "
            f"read the functions of SOURCES at its tag and add it (modelled: {sorted(SOURCES)})"
        )
    return SOURCES[backend]


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
            out[where][name] = _quantity(resolve(str(resources[field]), parameters))
    accelerator = resources.get("accelerator") or {}
    kind = resolve(str(accelerator.get("resourceType", accelerator.get("type", ""))), parameters)
    count = resolve(str(accelerator.get("resourceCount", "")), parameters)
    if kind and count:
        out["limits"][kind] = _quantity(count)
    return out


def _quantity(text: str) -> str:
    if not QUANTITY.match(text):
        raise ValueError(f"failed to init podSpecPatch: quantity {text!r}")
    return text
