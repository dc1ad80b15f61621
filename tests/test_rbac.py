"""The pipeline runner's Role grants exactly what brain-ldm's Kubernetes code calls.

Each kube module declares ``RBAC_RULES``: the (apiGroup, resource, verbs) it uses against
the API server (its own tests hold it to the calls it makes). Their union must equal the
Role in manifests/base/rbac.yaml: a missing permission fails a pipeline on a real cluster
with a 403 halfway through a run; an extra one is privilege nobody needs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RBAC = ROOT / "manifests" / "base" / "rbac.yaml"
PIPELINE_ROLE = "brain-ldm-pipeline-runner"
KUBE_MODULES = (
    "ldm_core.kube.pytorchjob",
    "ldm_core.kube.trainjob",
    "ldm_core.kube.isvc_rollout",
)
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}

Triple = tuple[str, str, str]


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(RBAC.read_text()) if d]


def _role(name: str) -> dict[str, Any]:
    (role,) = [d for d in _docs() if d["kind"] == "Role" and d["metadata"]["name"] == name]
    return role


def role_triples(role: dict[str, Any]) -> set[Triple]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def code_triples() -> dict[Triple, list[str]]:
    """(apiGroup, resource, verb) -> the modules that need it."""
    needed: dict[Triple, list[str]] = {}
    for name in KUBE_MODULES:
        module = importlib.import_module(name)
        rules = getattr(module, "RBAC_RULES", None)
        assert rules is not None, (
            f"{name} must export RBAC_RULES = [(apiGroup, resource, (verb, ...)), ...] "
            "listing every API call it makes"
        )
        for group, resource, verbs in rules:
            assert not isinstance(verbs, str), f"{name}: verbs of {resource} must be a tuple"
            for verb in verbs:
                needed.setdefault((group, resource, verb), []).append(name)
    return needed


def test_code_declares_well_formed_rules():
    needed = code_triples()
    assert needed, "no RBAC_RULES declared"
    for group, resource, verb in needed:
        assert verb in VERBS, f"unknown verb {verb!r} for {resource}"
        assert resource and resource == resource.lower() and "*" not in (group + resource)


def test_pipeline_role_is_exactly_what_the_code_calls():
    granted = role_triples(_role(PIPELINE_ROLE))
    needed = code_triples()
    missing = sorted(set(needed) - granted)
    extra = sorted(granted - set(needed))
    assert not missing, "Role brain-ldm-pipeline-runner lacks (the code calls these): " + ", ".join(
        f"{g or 'core'}/{r}:{v} ({', '.join(needed[(g, r, v)])})" for g, r, v in missing
    )
    assert not extra, "Role brain-ldm-pipeline-runner grants what no code calls: " + ", ".join(
        f"{g or 'core'}/{r}:{v}" for g, r, v in extra
    )


def test_pipeline_role_is_not_limited_by_name():
    # The code creates objects with generated names, so resourceNames would break it; and a
    # rule without them must not be mistaken for a narrower one.
    for rule in _role(PIPELINE_ROLE)["rules"]:
        assert "resourceNames" not in rule


def test_comparison_detects_a_missing_and_an_extra_permission():
    role = _role(PIPELINE_ROLE)
    needed = set(code_triples())
    some = sorted(needed)[0]
    trimmed = {
        "rules": [
            {"apiGroups": [g], "resources": [r], "verbs": [v]}
            for g, r, v in sorted(needed - {some})
        ]
        + [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["create"]}]
    }
    assert role_triples(trimmed) ^ needed == {some, ("apps", "deployments", "create")}
    assert role_triples(role) != role_triples(trimmed)


def test_kfp_runtime_role_stays_as_narrow_as_documented():
    """KFP's own machinery (Argo executor, v2 launcher) - not brain-ldm code - needs these
    when its pods run as pipeline-runner; pinned so the Role cannot grow unnoticed."""
    role = _role("kfp-runtime")
    assert role_triples(role) == {
        ("argoproj.io", "workflowtaskresults", "create"),
        ("argoproj.io", "workflowtaskresults", "patch"),
        ("", "configmaps", "get"),
        ("", "secrets", "get"),
    }
    names = {r["resources"][0]: r.get("resourceNames") for r in role["rules"]}
    assert names["configmaps"] == ["kfp-launcher"]
    assert names["secrets"] == ["mlpipeline-minio-artifact"]


@pytest.mark.parametrize("role", [PIPELINE_ROLE, "kfp-runtime"])
def test_only_the_pipeline_runner_holds_a_role(role):
    bindings = [d for d in _docs() if d["kind"] == "RoleBinding" and d["roleRef"]["name"] == role]
    assert len(bindings) == 1
    assert bindings[0]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role,
    }
    assert bindings[0]["subjects"] == [
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "brain-ldm"}
    ]
    assert {d["kind"] for d in _docs()} == {"Role", "RoleBinding"}


def test_refusals_point_at_the_role_that_grants_the_calls():
    """A 401/403 from the API tells the user which Role in which file to grant
    (ldm_core.kube.errors); that Role must be the one this file checks, and exist there."""
    from ldm_core.kube import errors

    assert ROOT / errors.RBAC_MANIFEST == RBAC
    assert errors.PIPELINE_ROLE == PIPELINE_ROLE
    assert role_triples(_role(errors.PIPELINE_ROLE)) == set(code_triples())
