"""Validate custom resources the way a cluster would: the CRD's openAPIV3Schema
(files in tests/crds/, unmodified upstream copies, see SOURCES.md there) plus the
admission rules the operators' webhooks enforce that the schema does not express.

Used by every test that emits a PyTorchJob, TrainJob, InferenceService, ServingRuntime,
ServiceMonitor or PodMonitor. The CRDs at the top of tests/crds/ are the newest upstream;
a subfolder (``crds="trainer-v2.1.0"``) holds those of one release, as the Kubeflow
releases in ``schemas/kubeflow-releases.yaml`` ship them.

:func:`prune` is what the API server does with the fields a CRD does not declare, and
``validate(..., strict=True)`` refuses them instead, as a create or patch sent with
``fieldValidation=Strict`` is refused.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_DIR = Path(__file__).parent.parent / "crds"
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class InvalidResource(AssertionError):
    pass


@functools.cache
def _schemas(crds: str = "") -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, from every CRD file of ``CRD_DIR/crds``."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((CRD_DIR / crds).glob("*.yaml")):
        # The C loader parses the 2 MB InferenceService CRD in ~2 s instead of ~9 s.
        for doc in yaml.load_all(
            path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        ):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group = doc["spec"]["group"]
            kind = doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def known_kinds(crds: str = "") -> set[tuple[str, str]]:
    return set(_schemas(crds))


def schema(obj: dict[str, Any], crds: str = "") -> dict[str, Any]:
    """The openAPIV3Schema ``obj`` is checked against (``crds``: a release's subfolder)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    found = _schemas(crds).get(key)  # type: ignore[arg-type]
    if found is None:
        raise InvalidResource(f"no CRD schema for {key} in {CRD_DIR / crds}")
    return found


def prune(obj: dict[str, Any], crds: str = "") -> tuple[dict[str, Any], list[str]]:
    """``obj`` as the API server stores it, and the paths of the fields it dropped
    (``spec.runtimePatches``, ``spec.x[0].y``), sorted.

    The API server's pruning of a structural schema (k8s.io/apiextensions-apiserver
    pkg/apiserver/schema/pruning/algorithm.go): a key of an object is kept when the schema
    declares it in ``properties``, or has ``additionalProperties`` (then checked against
    it), or says ``x-kubernetes-preserve-unknown-fields``; anything else is dropped, also
    every key of an object whose schema declares none. The root's ``apiVersion``, ``kind``
    and ``metadata`` are the API server's own (ObjectMeta is validated apart from the CRD)."""
    out = copy.deepcopy(obj)
    dropped: list[str] = []
    props = schema(obj, crds).get("properties", {})
    for key in list(out):
        if key in ("apiVersion", "kind", "metadata"):
            continue
        if key in props:
            _prune(out[key], props[key], key, dropped)
        else:
            del out[key]
            dropped.append(key)
    return out, sorted(dropped)


def _prune(value: Any, sch: dict[str, Any], path: str, dropped: list[str]) -> None:
    if sch.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        props, extra = sch.get("properties", {}), sch.get("additionalProperties")
        embedded = sch.get("x-kubernetes-embedded-resource")
        for key in list(value):
            where = f"{path}.{key}"
            if key in props:
                _prune(value[key], props[key], where, dropped)
            elif isinstance(extra, dict):
                _prune(value[key], extra, where, dropped)
            elif extra is True or (embedded and key in ("apiVersion", "kind", "metadata")):
                continue
            else:
                del value[key]
                dropped.append(where)
    elif isinstance(value, list) and isinstance(sch.get("items"), dict):
        for i, item in enumerate(value):
            _prune(item, sch["items"], f"{path}[{i}]", dropped)


def validate(obj: dict[str, Any], crds: str = "", *, strict: bool = False) -> None:
    """Raise InvalidResource with a readable reason if the cluster would refuse ``obj``:
    its CRD schema (of the release in subfolder ``crds``), the operator's admission rules,
    and, with ``strict``, every field the schema does not declare (``fieldValidation=Strict``;
    without it the API server drops them silently, see :func:`prune`)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if strict:
        unknown = prune(obj, crds)[1]
        if unknown:
            raise InvalidResource(
                f"{key[1]} {obj.get('metadata', {}).get('name')}: "
                + ", ".join(f"{path}: unknown field" for path in unknown)
            )
    validator = jsonschema.Draft7Validator(schema(obj, crds))
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [
            f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:10]
        ]
        raise InvalidResource(
            f"{key[1]} {obj.get('metadata', {}).get('name')}: " + "; ".join(lines)
        )
    name = obj.get("metadata", {}).get("name", "")
    rules = _ADMISSION.get(key[1])
    if rules:
        rules(obj, name)


def _check_name(kind: str, name: str, pattern: re.Pattern[str] = _DNS1035, limit: int = 63) -> None:
    if not name or len(name) > limit or not pattern.match(name):
        raise InvalidResource(
            f"{kind} name {name!r} must be a DNS-1035 label (lower case, digits, '-', "
            f"starting with a letter, at most {limit} characters)"
        )


def _pytorchjob_rules(obj: dict[str, Any], name: str) -> None:
    # kubeflow/training-operator v1.9 PyTorchJob validating webhook.
    _check_name("PyTorchJob", name)
    spec = obj.get("spec", {})
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not replicas:
        raise InvalidResource("PyTorchJob: spec.pytorchReplicaSpecs must not be empty")
    for rtype, rspec in replicas.items():
        if rtype not in ("Master", "Worker"):
            raise InvalidResource(f"PyTorchJob: replica type {rtype!r} is not Master or Worker")
        policy = rspec.get("restartPolicy")
        if policy is not None and policy not in ("Always", "OnFailure", "Never", "ExitCode"):
            raise InvalidResource(f"PyTorchJob: {rtype}.restartPolicy {policy!r} is not allowed")
        containers = rspec.get("template", {}).get("spec", {}).get("containers") or []
        if not any(c.get("name") == "pytorch" for c in containers):
            raise InvalidResource(f"PyTorchJob: {rtype} needs a container named 'pytorch'")
        for c in containers:
            if not c.get("image"):
                raise InvalidResource(
                    f"PyTorchJob: {rtype} container {c.get('name')!r} has no image"
                )
    if "Master" in replicas and replicas["Master"].get("replicas", 1) != 1:
        raise InvalidResource("PyTorchJob: Master must have exactly one replica")
    if spec.get("elasticPolicy") is not None:
        if "Worker" not in replicas:
            raise InvalidResource("PyTorchJob: elasticPolicy needs a Worker replica spec")
        if (
            spec.get("nprocPerNode") is not None
            and spec["elasticPolicy"].get("nProcPerNode") is not None
        ):
            raise InvalidResource(
                "PyTorchJob: set nprocPerNode or elasticPolicy.nProcPerNode, not both"
            )


def _isvc_rules(obj: dict[str, Any], name: str) -> None:
    # KServe v1beta1 validating webhook + the traffic range the schema leaves open.
    _check_name("InferenceService", name)
    for component in ("predictor", "transformer", "explainer"):
        comp = obj.get("spec", {}).get(component)
        if not comp:
            continue
        lo, hi = comp.get("minReplicas"), comp.get("maxReplicas")
        if lo is not None and lo < 0:
            raise InvalidResource(f"InferenceService {component}.minReplicas must be >= 0")
        if hi is not None and hi < 0:
            raise InvalidResource(f"InferenceService {component}.maxReplicas must be >= 0")
        if lo is not None and hi is not None and hi != 0 and lo > hi:
            raise InvalidResource(
                f"InferenceService {component}: minReplicas {lo} > maxReplicas {hi}"
            )
        pct = comp.get("canaryTrafficPercent")
        if pct is not None and not 0 <= pct <= 100:
            raise InvalidResource(
                f"InferenceService {component}.canaryTrafficPercent {pct} not in 0..100"
            )


def _trainjob_rules(obj: dict[str, Any], name: str) -> None:
    # The CRD's own CEL rules (x-kubernetes-validations, which jsonschema does not run):
    # metadata.name is an RFC 1035 label of at most 63 characters. The Trainer webhook's
    # rules, which depend on the runtime, are the emulator's (tests/harness/trainer.py).
    _check_name("TrainJob", name)


def _generic_name(kind: str):
    def rule(obj: dict[str, Any], name: str) -> None:
        _check_name(kind, name, _DNS1123, 253)

    return rule


_ADMISSION = {
    "PyTorchJob": _pytorchjob_rules,
    "TrainJob": _trainjob_rules,
    "InferenceService": _isvc_rules,
    "ServingRuntime": _generic_name("ServingRuntime"),
    "ServiceMonitor": _generic_name("ServiceMonitor"),
    "PodMonitor": _generic_name("PodMonitor"),
}
