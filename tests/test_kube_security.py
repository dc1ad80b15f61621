"""The securityContext every brain-ldm pod runs under (ldm_core.kube.security), held to the
Pod Security Standards' "restricted" level by the evaluator in tests/harness/pod_security.py.

Kubeflow 1.11 enforces "restricted" on its own namespaces and "baseline" on profile
namespaces (shared/schemas/kubeflow-releases.yaml); a pod that fails a control is refused by
the API server at creation, so a training job would never start. The evaluator is first shown
to refuse a pod that lacks each rule, so that its passing the module's contexts means something.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ldm_core.config import Config
from ldm_core.kube import security
from ldm_core.kube.isvc_build import build_serving_runtime
from ldm_core.kube.pytorchjob import CONTAINER
from ldm_core.kube.training_job import pod_template
from ldm_core.launcher import TrainingTask
from tests.harness.pod_security import violations


def _pod(*, pod_level: bool = True, uid: int = security.RUN_AS) -> dict[str, Any]:
    """A training-shaped pod spec under the module's contexts: one container, its scratch
    emptyDir and the run's PVC (the volume types a brain-ldm pod mounts)."""
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "pytorch",
                "image": "registry.example/brain-ldm-training:0.1.0",
                "ports": [{"containerPort": 23456}],
                "securityContext": security.container_security_context(uid),
            }
        ],
        "volumes": [
            {"name": "workdir", "persistentVolumeClaim": {"claimName": "brain-ldm-work"}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if pod_level:
        spec["securityContext"] = security.pod_security_context(uid)
    return spec


# --------------------------------------------------------------------------- the module


def test_pod_and_container_contexts_pass_restricted():
    assert violations(_pod()) == []
    assert violations(_pod(), level="baseline") == []


def test_the_container_context_passes_restricted_on_its_own():
    """KServe copies a ServingRuntime's container into the predictor pod without any pod
    securityContext (Knative refuses one unless a feature flag is on): the container's
    context alone must satisfy every rule that a pod-level field could otherwise cover."""
    assert violations(_pod(pod_level=False)) == []


def test_a_custom_uid_reaches_every_id_field_and_still_passes():
    uid = 4242
    pod, container = security.pod_security_context(uid), security.container_security_context(uid)
    assert pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == uid
    assert container["runAsUser"] == container["runAsGroup"] == uid
    assert violations(_pod(uid=uid)) == []


def test_root_is_refused_even_with_run_as_non_root():
    """runAsNonRoot is verified by the kubelet against the image; PSS refuses an explicit
    runAsUser 0 at admission already (the "Running as Non-root user" control)."""
    problems = violations(_pod(uid=0))
    assert any(p.startswith("Running as Non-root user") for p in problems), problems


def test_the_root_filesystem_is_read_only():
    """Not a PSS rule, but the module promises it: writable paths are emptyDirs."""
    assert security.container_security_context()["readOnlyRootFilesystem"] is True


def test_each_call_builds_a_fresh_context():
    """Builders embed the result and may extend it; a shared dict would leak one pod's
    change into the next."""
    first = security.container_security_context()
    first["capabilities"]["drop"].clear()
    first["runAsUser"] = 0
    assert security.container_security_context()["capabilities"]["drop"] == ["ALL"]
    assert security.container_security_context()["runAsUser"] == security.RUN_AS


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(
            pod_template(
                TrainingTask(
                    name="brain-ldm-run-train-ae",
                    verb="train-autoencoder",
                    args=["--data", "/d", "--output", "/o"],
                    nproc_per_node=2,
                ),
                Config(),
                "train_autoencoder",
                CONTAINER,
            )["spec"],
            id="training-pod-template",
        ),
        pytest.param(build_serving_runtime(Config())["spec"], id="serving-runtime-containers"),
    ],
)
def test_the_pods_built_with_these_contexts_pass_restricted(spec):
    """The two places the contexts are used: the pod every training replica runs, and the
    runtime's container as KServe places it (no pod-level context of its own)."""
    pod = {k: v for k, v in spec.items() if k in ("containers", "securityContext", "volumes")}
    assert pod["containers"], "no containers found in the built object"
    assert violations(pod) == []


# --------------------------------------------------------------------------- the evaluator


def _container_sc(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["containers"][0]["securityContext"]


def _drop(spec: dict[str, Any], path: str) -> None:
    """Remove ``path`` (``pod.x`` or ``container.x.y``) from the pod's contexts."""
    where, *keys = path.split(".")
    sc = spec["securityContext"] if where == "pod" else _container_sc(spec)
    for key in keys[:-1]:
        sc = sc[key]
    del sc[keys[-1]]


def _apply(spec: dict[str, Any], target: str, values: dict[str, Any]) -> None:
    """Set ``values`` on the pod spec (``pod``), its securityContext (``pod.sc``), the
    container (``container``) or its securityContext (``container.sc``), or add them as a
    volume (``volume``)."""
    values = copy.deepcopy(values)
    if target == "volume":
        spec["volumes"].append({"name": "extra", **values})
        return
    where = spec if target.startswith("pod") else spec["containers"][0]
    if target.endswith(".sc"):
        where = where.setdefault("securityContext", {})
    where.update(values)


# Without a pod-level context: the container's own fields are the only thing that satisfies
# the rule, so removing one must be refused.
MISSING_FROM_CONTAINER = [
    ("container.runAsNonRoot", "Running as Non-root"),
    ("container.allowPrivilegeEscalation", "Privilege Escalation"),
    ("container.capabilities.drop", "Capabilities"),
    ("container.capabilities", "Capabilities"),
    ("container.seccompProfile", "Seccomp"),
]


@pytest.mark.parametrize("path,control", MISSING_FROM_CONTAINER)
def test_a_container_context_missing_a_rule_is_refused(path, control):
    spec = _pod(pod_level=False)
    _drop(spec, path)
    problems = violations(spec)
    assert [p for p in problems if p.startswith(f"{control}:")], problems


@pytest.mark.parametrize(
    "path,passes",
    [
        # A pod-level field covers a container that leaves it unset ...
        ("container.runAsNonRoot", True),
        ("container.seccompProfile", True),
        # ... but not these, which only a container can hold.
        ("container.allowPrivilegeEscalation", False),
        ("container.capabilities", False),
    ],
)
def test_pod_level_fields_cover_only_what_the_standard_lets_them(path, passes):
    spec = _pod()
    _drop(spec, path)
    assert (violations(spec) == []) is passes, violations(spec)


BROKEN = [
    ("container.sc", {"runAsNonRoot": False}, "Running as Non-root"),
    ("pod.sc", {"runAsNonRoot": False}, "Running as Non-root"),
    ("container.sc", {"allowPrivilegeEscalation": True}, "Privilege Escalation"),
    ("container.sc", {"capabilities": {"drop": ["NET_RAW"]}}, "Capabilities"),
    ("container.sc", {"capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}}, "Capabilities"),
    ("container.sc", {"seccompProfile": {"type": "Unconfined"}}, "Seccomp"),
    ("pod.sc", {"seccompProfile": {"type": "Unconfined"}}, "Seccomp"),
    ("container.sc", {"privileged": True}, "Privileged Containers"),
    ("container.sc", {"runAsUser": 0}, "Running as Non-root user"),
    ("pod.sc", {"runAsUser": 0}, "Running as Non-root user"),
    ("container.sc", {"procMount": "Unmasked"}, "/proc Mount Type"),
    ("container.sc", {"seLinuxOptions": {"type": "spc_t"}}, "SELinux"),
    ("pod.sc", {"seLinuxOptions": {"user": "system_u"}}, "SELinux"),
    ("container.sc", {"appArmorProfile": {"type": "Unconfined"}}, "AppArmor"),
    ("container.sc", {"windowsOptions": {"hostProcess": True}}, "HostProcess"),
    ("pod", {"hostNetwork": True}, "Host Namespaces"),
    ("pod", {"hostPID": True}, "Host Namespaces"),
    ("pod", {"hostIPC": True}, "Host Namespaces"),
    ("pod.sc", {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}, "Sysctls"),
    ("container", {"ports": [{"containerPort": 8080, "hostPort": 8080}]}, "Host Ports"),
    (
        "container",
        {"livenessProbe": {"httpGet": {"host": "10.0.0.1", "port": 8080}}},
        "Host Probes / Lifecycle Hooks",
    ),
    (
        "container",
        {"lifecycle": {"preStop": {"tcpSocket": {"host": "node", "port": 1}}}},
        "Host Probes / Lifecycle Hooks",
    ),
    ("volume", {"hostPath": {"path": "/var/run"}}, "Volume Types"),
    ("volume", {"nfs": {"server": "nfs.example", "path": "/data"}}, "Volume Types"),
]
"""(where, what, the control that refuses it): one breach of each control."""


@pytest.mark.parametrize(
    "target,values,control",
    [pytest.param(*case, id=f"{case[0]}:{next(iter(case[1]))}") for case in BROKEN],
)
def test_a_context_breaking_a_rule_is_refused(target, values, control):
    spec = _pod()
    _apply(spec, target, values)
    problems = violations(spec)
    assert [p for p in problems if p.startswith(f"{control}:")], problems


def test_a_rule_broken_by_an_init_container_is_refused():
    """The controls cover initContainers (and ephemeralContainers) as well."""
    spec = _pod()
    spec["initContainers"] = [{"name": "copy", "image": "busybox"}]
    problems = violations(spec)
    assert any("initContainers[0]" in p for p in problems), problems


def test_an_apparmor_annotation_other_than_the_defaults_is_refused():
    key = "container.apparmor.security.beta.kubernetes.io/pytorch"
    assert violations(_pod(), annotations={key: "runtime/default"}) == []
    assert violations(_pod(), annotations={key: "localhost/k8s-train"}) == []
    assert violations(_pod(), annotations={key: "unconfined"}) != []


ALLOWED = [
    ("container.sc", {"seccompProfile": {"type": "Localhost", "localhostProfile": "t.json"}}),
    ("container.sc", {"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}),
    ("container.sc", {"seLinuxOptions": {"type": "container_t"}}),
    ("container.sc", {"appArmorProfile": {"type": "RuntimeDefault"}}),
    ("container", {"ports": [{"containerPort": 8080, "hostPort": 0}]}),
    ("volume", {"secret": {"secretName": "brain-ldm-s3"}}),
    ("volume", {"projected": {"sources": []}}),
    ("pod.sc", {"sysctls": [{"name": "net.ipv4.tcp_syncookies", "value": "1"}]}),
]


@pytest.mark.parametrize(
    "target,values",
    [pytest.param(*case, id=f"{case[0]}:{next(iter(case[1]))}") for case in ALLOWED],
)
def test_what_restricted_allows_is_admitted(target, values):
    """The evaluator is no stricter than the standard where brain-ldm might need the room."""
    spec = _pod()
    _apply(spec, target, values)
    assert violations(spec) == []


def test_baseline_admits_what_only_restricted_refuses():
    """Kubeflow's profile namespaces enforce baseline: a container without the restricted
    fields passes there, one that is privileged does not."""
    spec = _pod(pod_level=False)
    spec["containers"][0]["securityContext"] = {}
    assert violations(spec, level="baseline") == []
    assert violations(spec) != []
    spec["containers"][0]["securityContext"] = {"privileged": True}
    assert violations(spec, level="baseline") != []
