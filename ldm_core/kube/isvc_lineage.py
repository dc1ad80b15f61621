"""The lineage of what an InferenceService serves, read from the object itself
(``ldm lineage --isvc NAME``).

The deploy stage wrote the bundle's record into the :data:`ldm_core.lineage.ANNOTATION`
annotation, in the same write as the spec that serves the bundle, and the Model Registry's
ids into the labels the registry's controller reads (:mod:`ldm_core.registry`). What the
object says about itself completes it: where the bundle is (``storageUri``), which revision
serves and at which URL, and the InferenceService id the registry's controller adds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm_core import lineage, registry
from ldm_core.kube.client import api_client, current_namespace
from ldm_core.kube.isvc_build import ISVC
from ldm_core.kube.isvc_status import predictor_status
from ldm_core.kube.resources import CustomObjects

INFERENCE_SERVICE_ID_LABEL = registry.LABEL_PREFIX + "inference-service-id"
"""Set by the registry's controller once it recorded the deployment (kubeflow/model-registry
v0.3.4, pkg/inferenceservice-controller/controller.go, end of ``Reconcile``)."""
RBAC_RULES: list[tuple[str, str, tuple[str, ...]]] = [
    ("serving.kserve.io", "inferenceservices", ("get",)),
]
"""What ``ldm lineage --isvc`` needs of the person's own credentials (no pipeline Role)."""


def _storage_uri(predictor: Mapping[str, Any]) -> str | None:
    """The bundle's location: the runtime model's ``storageUri``, or a custom container's
    ``STORAGE_URI`` (see :mod:`ldm_core.kube.isvc_build`)."""
    uri = (predictor.get("model") or {}).get("storageUri")
    for container in predictor.get("containers") or []:
        for env in container.get("env") or []:
            if env.get("name") == "STORAGE_URI":
                uri = uri or env.get("value")
    return uri


def from_object(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The lineage record an InferenceService carries, with what its spec and status say
    about where and how the bundle is served.

    Raises:
        LineageError: the object carries no record (not deployed by brain-ldm, or deployed
            before records were kept), or an unreadable one.
    """
    meta = obj.get("metadata") or {}
    where = f"InferenceService {meta.get('namespace')}/{meta.get('name')}"
    text = (meta.get("annotations") or {}).get(lineage.ANNOTATION)
    if not text:
        raise lineage.LineageError(
            f"{where}: no {lineage.ANNOTATION} annotation (not deployed by brain-ldm's deploy "
            "stage, or deployed before it recorded lineage)"
        )
    record = lineage.from_annotation(text, where)
    status = obj.get("status") or {}
    predictor = predictor_status(obj)
    deployment = {
        "backend": "kserve",
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "storage_uri": _storage_uri((obj.get("spec") or {}).get("predictor") or {}),
        "revision": predictor.get("latestReadyRevision"),
        "url": status.get("url") or (status.get("address") or {}).get("url"),
    }
    record = lineage.with_deployment(record, deployment)
    labels = meta.get("labels") or {}
    ids = {
        "registered_model_id": labels.get(registry.REGISTERED_MODEL_ID_LABEL),
        "model_version_id": labels.get(registry.MODEL_VERSION_ID_LABEL),
        "inference_service_id": labels.get(INFERENCE_SERVICE_ID_LABEL),
        "registry_service": labels.get(registry.NAME_LABEL),
        "registry_namespace": labels.get(registry.NAMESPACE_LABEL),
        "url": (meta.get("annotations") or {}).get(registry.URL_ANNOTATION),
    }
    if ids["registered_model_id"]:
        record = lineage.with_registry(record, {k: v for k, v in ids.items() if v})
    return record


def read(
    name: str,
    namespace: str | None = None,
    api_host: str | None = None,
    api_token: str | None = None,
) -> dict[str, Any]:
    """:func:`from_object` of the InferenceService ``name`` in ``namespace`` (default: the
    pod's or the kubeconfig context's namespace), read through the Kubernetes API.

    Raises:
        LineageError: no such InferenceService, or it carries no record; a refused read
            names the RBAC grant it needs.
    """
    ns = namespace or current_namespace()
    objects = CustomObjects(api_client(api_host, api_token), ISVC, ns, lineage.LineageError)
    obj = objects.get(name)
    if obj is None:
        raise lineage.LineageError(f"InferenceService {ns}/{name}: not found")
    return from_object(obj)
