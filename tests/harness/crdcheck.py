"""Validate custom resources the way a cluster would: the CRD's openAPIV3Schema
(files in tests/crds/, unmodified upstream copies, see SOURCES.md there) plus the
admission rules the operators' webhooks enforce that the schema does not express.

Which CRDs: those of one supported Kubeflow release (``release=``, from
manifests/releases.yaml through tests/harness/releases.py), those of one component version
(``release="trainer-v2.1.0"``, a subfolder of tests/crds/), or without either the newest
upstream files at the top of tests/crds/.

Strict, as ``kubectl apply --validate=strict`` (server-side ``fieldValidation=Strict``): a
field the structural schema does not declare is an error naming its path. jsonschema alone
would accept it, and a real API server prunes it without a word (apiextensions-apiserver
``pkg/apiserver/schema/pruning``), so a field a release does not know would silently do
nothing there. :func:`prune` is that pruning itself, for emulators of an API server that
was not asked to be strict.

Used by every test that emits a PyTorchJob, TrainJob, InferenceService, ServingRuntime,
ServiceMonitor or PodMonitor.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import yaml

if TYPE_CHECKING:
    from tests.harness.releases import Release

CRD_DIR = Path(__file__).parent.parent / "crds"
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_EMBEDDED = ("apiVersion", "kind", "metadata")
"""Fields an ``x-kubernetes-embedded-resource`` object keeps without declaring them."""

Key = tuple[str, str]


class InvalidResource(AssertionError):
    pass


@functools.cache
def _file_schemas(path: Path) -> dict[Key, dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of every CRD in one file."""
    out: dict[Key, dict[str, Any]] = {}
    # The C loader parses the 2 MB InferenceService CRD in ~2 s instead of ~9 s.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for doc in yaml.load_all(path.read_text(), Loader=loader):
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        group = doc["spec"]["group"]
        kind = doc["spec"]["names"]["kind"]
        for version in doc["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def _files(release: Release | str | None) -> Iterable[Path]:
    if release is None or isinstance(release, str):
        return sorted((CRD_DIR / (release or "")).glob("*.yaml"))
    return release.crd_files


def _schemas(release: Release | str | None = None) -> dict[Key, dict[str, Any]]:
    out: dict[Key, dict[str, Any]] = {}
    for path in _files(release):
        out.update(_file_schemas(path))
    return out


def _served_by(release: Release | str | None) -> str:
    if release is None:
        return "the newest upstream CRDs"
    return release if isinstance(release, str) else f"Kubeflow {release}"


def known_kinds(release: Release | str | None = None) -> set[Key]:
    return set(_schemas(release))


def schema(obj: dict[str, Any], release: Release | str | None = None) -> dict[str, Any]:
    """The openAPIV3Schema ``obj`` is checked against."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    schemas = _schemas(release)
    if key not in schemas:
        raise InvalidResource(
            f"{_served_by(release)} serves no CRD for {key}; known: {sorted(schemas)}"
        )
    return schemas[key]


def unknown_fields(
    value: Any, node: dict[str, Any], path: str = "", *, drop: bool = False
) -> list[str]:
    """Paths in ``value`` that the structural schema ``node`` does not declare: what the API
    server prunes (``drop``: and remove them from ``value``, as it does). A node with
    ``x-kubernetes-preserve-unknown-fields`` keeps everything, one with an
    ``additionalProperties`` schema is a map, and the root's ``metadata`` is ObjectMeta, which
    the server checks on its own (so do embedded resources' apiVersion/kind/metadata)
    (apiextensions-apiserver ``pkg/apiserver/schema/pruning/algorithm.go``)."""
    if node.get("x-kubernetes-preserve-unknown-fields") or path == ".metadata":
        return []
    out: list[str] = []
    if isinstance(value, dict):
        props = node.get("properties") or {}
        extra = node.get("additionalProperties")
        embedded = node.get("x-kubernetes-embedded-resource")
        for key in list(value):
            where = f"{path}.{key}"
            if key in props:
                out += unknown_fields(value[key], props[key], where, drop=drop)
            elif isinstance(extra, dict):
                out += unknown_fields(value[key], extra, where, drop=drop)
            elif not (extra is True or (embedded and key in _EMBEDDED)):
                out.append(where)
                if drop:
                    del value[key]
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            out += unknown_fields(item, node["items"], f"{path}[{i}]", drop=drop)
    return out


def prune(
    obj: dict[str, Any], release: Release | str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """``obj`` as the API server stores it, and the paths of the fields it dropped
    (``spec.runtimePatches``, ``spec.x[0].y``), sorted."""
    out = copy.deepcopy(obj)
    dropped = unknown_fields(out, schema(obj, release), drop=True)
    return out, sorted(path.lstrip(".") for path in dropped)


def validate(obj: dict[str, Any], release: Release | str | None = None) -> None:
    """Raise InvalidResource with a readable reason if the cluster would refuse ``obj``, or
    drop a field of it: the CRDs of ``release``, or the newest upstream ones."""
    crd = schema(obj, release)
    kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
    errors = sorted(
        jsonschema.Draft7Validator(crd).iter_errors(obj), key=lambda e: list(e.absolute_path)
    )
    if errors:
        lines = [
            f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:10]
        ]
        raise InvalidResource(f"{kind} {name} ({_served_by(release)}): " + "; ".join(lines))
    unknown = unknown_fields(obj, crd)
    if unknown:
        raise InvalidResource(
            f"{kind} {name}: {', '.join(f'{path}: unknown field' for path in unknown)} "
            f"(not in the CRD schema of {_served_by(release)}: the API server prunes them, or "
            "refuses them with fieldValidation=Strict)"
        )
    rules = _ADMISSION.get(kind)
    if rules:
        rules(obj, name or "")


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
