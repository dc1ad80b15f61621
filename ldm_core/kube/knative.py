"""What Knative Serving allows in a predictor's pod spec, and why an update never rolls.

In Serverless mode KServe writes the predictor as a Knative Service, and Knative's
validating webhook refuses pod-spec fields that its ``config-features`` ConfigMap (namespace
``knative-serving``) has not switched on: ``nodeSelector`` needs
``kubernetes.podspec-nodeselector: enabled``, ``tolerations`` needs
``kubernetes.podspec-tolerations``, ``affinity`` needs ``kubernetes.podspec-affinity``
(all "disabled" by default; https://knative.dev/docs/serving/configuration/feature-flags/).
KServe merges the ServingRuntime's scheduling fields into the same pod spec, so a GPU
overlay that patches the runtime needs them as much as an InferenceService that sets them.

The refusal never reaches the InferenceService's status: KServe's reconcile fails, no new
revision is created, and the old one keeps serving, so a rollout that only watches status
waits out its whole timeout. KServe records the webhook's answer as a Warning event on the
InferenceService instead (kserve/kserve#1425, #1433: ``InternalError  fails to reconcile
predictor: admission webhook "validation.webhook.serving.knative.dev" denied the request:
validation failed: must not set the field(s): spec.template.spec.nodeSelector``), which
:func:`reconcile_failure` reads.

Reading ``config-features`` is optional: it needs a Role in ``knative-serving``
(``manifests/components/knative-features-reader``); without it the check is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

FEATURES_NAMESPACE = "knative-serving"
FEATURES_CONFIGMAP = "config-features"
PODSPEC_FLAGS = {
    "nodeSelector": "kubernetes.podspec-nodeselector",
    "tolerations": "kubernetes.podspec-tolerations",
    "affinity": "kubernetes.podspec-affinity",
}
"""Pod-spec field -> the config-features flag Knative's webhook needs for it."""
ENABLED = "enabled"
RBAC_RULES: list[tuple[str, str, tuple[str, ...]]] = [("", "configmaps", ("get",))]
"""What :func:`read_features` calls, in namespace knative-serving on ConfigMap
config-features only: granted by the opt-in component, not by the pipeline's Role."""
DENIED_BY_WEBHOOK = "denied the request"
"""In the message of the Warning event KServe records when an admission webhook refused
the Knative Service it wrote."""


def needed_flags(
    predictor: Mapping[str, Any], runtime_spec: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """``{flag: where}`` for every podspec feature flag the predictor's pods need.

    ``where`` names the field that needs it (``spec.predictor.nodeSelector`` or
    ``ServingRuntime spec.tolerations``), for a message a person can act on.
    """
    needed: dict[str, str] = {}
    sources = [("spec.predictor", predictor), ("ServingRuntime spec", runtime_spec or {})]
    for where, spec in sources:
        for field, flag in PODSPEC_FLAGS.items():
            if spec.get(field) and flag not in needed:
                needed[flag] = f"{where}.{field}"
    return needed


def read_features(api_client: kubernetes.client.ApiClient) -> tuple[dict[str, str] | None, str]:
    """Knative's feature flags, or None with the reason they could not be read.

    A refusal (403: the optional Role is not installed), an absent ConfigMap (Knative not
    installed, or another namespace) or an unreachable server all skip the check: it is
    advice before the rollout, never a reason to stop one.
    """
    core = kubernetes.client.CoreV1Api(api_client)
    where = f"ConfigMap {FEATURES_NAMESPACE}/{FEATURES_CONFIGMAP}"
    try:
        cm = core.read_namespaced_config_map(FEATURES_CONFIGMAP, FEATURES_NAMESPACE)
    except ApiException as err:
        if err.status in (401, 403):
            return None, (
                f"{where} not readable ({err.status}); apply the component "
                "manifests/components/knative-features-reader to let the rollout check it"
            )
        return None, f"{where}: {err.status} {err.reason}"
    except (urllib3.exceptions.HTTPError, OSError) as err:
        return None, f"{where}: {type(err).__name__}: {err}"
    return dict(cm.data or {}), where


def missing_flags(features: Mapping[str, str], needed: Mapping[str, str]) -> list[str]:
    """One sentence per needed flag that is not ``enabled`` (absent means Knative's default,
    disabled)."""
    out = []
    for flag, where in sorted(needed.items()):
        value = str(features.get(flag, "disabled (default)")).strip()
        if value.lower() != ENABLED:
            out.append(
                f"{where} needs {flag}: enabled in {FEATURES_NAMESPACE}/{FEATURES_CONFIGMAP} "
                f"(now {value}); Knative's webhook refuses the new revision without it"
            )
    return out


def reconcile_failure(
    events: Iterable[Any],
    name: str,
    since: datetime,
    patterns: tuple[str, ...] = (DENIED_BY_WEBHOOK,),
) -> str | None:
    """The newest Warning event on InferenceService ``name`` since ``since`` whose message
    one of the regular expressions ``patterns`` finds (default: an admission webhook refused
    what KServe wrote), as ``reason: message``; else None."""
    newest: tuple[datetime, str] | None = None
    for ev in events:
        involved = ev.involved_object
        if involved is None or involved.kind != "InferenceService" or involved.name != name:
            continue
        when = ev.last_timestamp or ev.event_time or ev.first_timestamp
        if ev.type != "Warning" or when is None or when < since:
            continue
        if not any(re.search(pattern, ev.message or "") for pattern in patterns):
            continue
        if newest is None or when > newest[0]:
            newest = (when, f"{ev.reason}: {ev.message}")
    return newest[1] if newest else None
