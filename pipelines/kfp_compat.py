"""Keep the compiled pipeline loadable by every KFP backend from 2.4 on.

The KFP API server (on upload) and the driver (per task) parse each task's Kubernetes
settings, the platform spec kfp-kubernetes writes, as protobuf JSON with unknown fields
rejected. Backend 2.4 (Kubeflow 1.10) pins the ``kubernetes_platform`` protos of July 2024
(the same messages as kfp-kubernetes 1.4.0). The SDK we compile with writes, beside the
fields those protos know, newer ones that 2.4 refuses:

- ``pvcMount[].pvcNameParameter`` (backend 2.5+); 2.4 reads ``componentInputParameter`` or
  ``constant``, which the SDK still writes beside it;
- ``secretAsEnv[].secretNameParameter`` (2.5+); 2.4 reads the constant ``secretName``;
- ``secretAsEnv[].optional`` (2.15+); 2.4 has no optional Secrets: the Secret must exist;
- ``nodeSelector.nodeSelectorJson`` (2.5+); 2.4 reads the constant ``labels``.

Later backends still read the older fields when the newer one is absent (the driver's
"deprecated fields" branch for PVC mounts and its ``secretName`` fallback in
``backend/src/v2/driver/k8s.go``), so writing only the older fields gives one YAML for
every backend. What the older fields cannot say (a Secret name or node selector taken from a
pipeline parameter, an optional Secret) is refused here, naming the task and the field,
instead of compiling into a YAML that a 2.4 backend rejects at upload.
``tests/test_kfp_backend_compat.py`` parses the result with the oldest and newest protos.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from kfp.dsl import base_component

OLDEST_BACKEND = "2.4"
"""The oldest KFP backend the compiled pipeline must load on (Kubeflow 1.10 ships 2.4/2.5)."""

Config = dict[str, Any]


class BackendCompatError(ValueError):
    """A task setting that KFP backend 2.4 cannot express."""


def down_level(pipeline: base_component.BaseComponent) -> base_component.BaseComponent:
    """Rewrite ``pipeline``'s Kubernetes platform spec in place into the fields backend 2.4
    knows, and return the pipeline, so it can sit above ``@dsl.pipeline`` as a decorator:
    every compilation of it (``make compile``, ``kfp.Client``) then gets the portable form.

    Raises:
        BackendCompatError: a task uses a setting only newer backends accept.
    """
    platforms = pipeline.platform_spec.platforms
    if "kubernetes" not in platforms:  # reading a missing map key would add it
        return pipeline
    for name, struct in platforms["kubernetes"].deployment_spec.executors.items():
        config = down_level_executor(name, json_format.MessageToDict(struct))
        struct.Clear()
        struct.update(config)
    return pipeline


def down_level_executor(executor: str, config: Config) -> Config:
    """One executor's ``KubernetesExecutorConfig`` (as JSON) in the fields backend 2.4 reads.

    Args:
        executor: the executor's name (``exec-…``), for error messages.
        config: the config as kfp-kubernetes wrote it; not modified.
    """
    out = dict(config)
    if "pvcMount" in out:
        out["pvcMount"] = [
            _pvc_mount(f"{executor}: pvcMount[{i}]", m) for i, m in enumerate(out["pvcMount"])
        ]
    if "secretAsEnv" in out:
        out["secretAsEnv"] = [
            _secret_as_env(f"{executor}: secretAsEnv[{i}]", s)
            for i, s in enumerate(out["secretAsEnv"])
        ]
    if "nodeSelector" in out:
        out["nodeSelector"] = _node_selector(f"{executor}: nodeSelector", out["nodeSelector"])
    return out


def _pvc_mount(where: str, mount: Config) -> Config:
    """The PVC name through ``componentInputParameter`` or ``constant``, the fields that
    backend 2.4 resolves and later ones fall back to."""
    out = dict(mount)
    parameter = out.pop("pvcNameParameter", None)
    if parameter is None:
        return out
    constant = _constant(parameter)
    if "componentInputParameter" in parameter:
        out["componentInputParameter"] = parameter["componentInputParameter"]
    elif isinstance(constant, str):
        out["constant"] = constant
    else:
        raise BackendCompatError(
            f"{where}.pvcNameParameter = {parameter}: backend {OLDEST_BACKEND} takes a PVC name "
            "only as a constant or a pipeline parameter"
        )
    return out


def _secret_as_env(where: str, secret: Config) -> Config:
    """The Secret name as the constant ``secretName``; ``optional: false`` dropped (it is the
    default), ``optional: true`` refused (2.4 has no such field and makes every key required)."""
    out = dict(secret)
    if out.pop("optional", False):
        raise BackendCompatError(
            f"{where}.optional: optional Secrets need KFP backend 2.15+; backend "
            f"{OLDEST_BACKEND} requires the Secret and every key: drop optional=True"
        )
    parameter = out.pop("secretNameParameter", None)
    if parameter is not None:
        name = _constant(parameter)
        if not isinstance(name, str):
            raise BackendCompatError(
                f"{where}.secretNameParameter = {parameter}: a Secret name from a pipeline "
                "parameter needs KFP backend 2.5+; give use_secret_as_env a constant name"
            )
        out["secretName"] = name
    return out


def _node_selector(where: str, selector: Config) -> Config:
    """A constant node selector as ``labels``; one from a pipeline parameter refused."""
    out = dict(selector)
    parameter = out.pop("nodeSelectorJson", None)
    if parameter is not None:
        labels = _constant(parameter)
        if not isinstance(labels, dict):
            raise BackendCompatError(
                f"{where}.nodeSelectorJson = {parameter}: a node selector from a pipeline "
                "parameter needs KFP backend 2.5+; use kubernetes.add_node_selector (constant)"
            )
        out["labels"] = labels
    return out


def _constant(parameter: Config) -> Any:
    """The value of an ``InputParameterSpec`` that is a compile-time constant, else None."""
    return parameter.get("runtimeValue", {}).get("constant")
