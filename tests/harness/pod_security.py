"""The Pod Security Standards as an evaluator over pod specs, for tests that build pods.

A namespace labelled ``pod-security.kubernetes.io/enforce: restricted`` (Kubeflow 1.11's own
namespaces; ``baseline`` on its profile namespaces) makes the API server refuse any pod that
fails one of the level's controls. :func:`violations` applies those controls to a PodSpec as
the API takes it (camelCase dict) and says which fail, so a test can hold what a builder
emits to the level its pods will meet, without a cluster.

Each check is one control of https://kubernetes.io/docs/concepts/security/pod-security-standards/
(the page as of Kubernetes 1.34), written from its "Restricted Fields" and "Allowed Values";
where the page leaves a detail open, the admission plugin decides
(``k8s.io/pod-security-admission/policy/check_*.go``, named at the check). Restricted is
Baseline plus its own controls.

Not modelled, each of which makes this evaluator stricter than the API server, never looser:
the Windows exemptions (``spec.os.name: windows`` skips privilege escalation, seccomp and
capabilities) and the user-namespace relaxations (``hostUsers: false`` skips runAsNonRoot and
runAsUser). The controls are those of ``enforce-version: latest``, the default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

Spec = Mapping[str, Any]
Check = Callable[[Spec, Mapping[str, str]], list[str]]

CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")
"""Every list whose entries the controls' ``[*]`` covers."""

BASELINE_CAPABILITIES = frozenset(
    {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD"}
    | {"NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
)
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
SELINUX_TYPES = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)
"""``container_engine_t`` since Kubernetes 1.31."""
RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
SECCOMP_CONFINED = ("RuntimeDefault", "Localhost")
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def _containers(spec: Spec) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(``containers[i]``-style path, container) for every container of the pod."""
    for field in CONTAINER_LISTS:
        for i, container in enumerate(spec.get(field) or []):
            yield f"{field}[{i}]", container


def _sc(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("securityContext") or {}


def _pod_and_containers(spec: Spec) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(path, securityContext) for the pod and for every container."""
    yield "spec.securityContext", _sc(spec)
    for path, container in _containers(spec):
        yield f"spec.{path}.securityContext", _sc(container)


# --------------------------------------------------------------------------- Baseline


def host_process(spec: Spec, _: Mapping[str, str]) -> list[str]:
    return [
        f"{path}.windowsOptions.hostProcess must not be true"
        for path, sc in _pod_and_containers(spec)
        if (sc.get("windowsOptions") or {}).get("hostProcess") is True
    ]


def host_namespaces(spec: Spec, _: Mapping[str, str]) -> list[str]:
    return [
        f"spec.{field} must not be true"
        for field in ("hostNetwork", "hostPID", "hostIPC")
        if spec.get(field) is True
    ]


def privileged(spec: Spec, _: Mapping[str, str]) -> list[str]:
    return [
        f"spec.{path}.securityContext.privileged must not be true"
        for path, c in _containers(spec)
        if _sc(c).get("privileged") is True
    ]


def capabilities_baseline(spec: Spec, _: Mapping[str, str]) -> list[str]:
    out = []
    for path, c in _containers(spec):
        added = set((_sc(c).get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPABILITIES:
            extra = sorted(added - BASELINE_CAPABILITIES)
            out.append(f"spec.{path}.securityContext.capabilities.add must not hold {extra}")
    return out


def host_path_volumes(spec: Spec, _: Mapping[str, str]) -> list[str]:
    return [
        f"spec.volumes[{i}].hostPath must not be set"
        for i, v in enumerate(spec.get("volumes") or [])
        if v.get("hostPath") is not None
    ]


def host_ports(spec: Spec, _: Mapping[str, str]) -> list[str]:
    return [
        f"spec.{path}.ports[{j}].hostPort must be 0 or unset"
        for path, c in _containers(spec)
        for j, port in enumerate(c.get("ports") or [])
        if port.get("hostPort")
    ]


def host_probes_and_lifecycle(spec: Spec, _: Mapping[str, str]) -> list[str]:
    """Kubernetes 1.34+: a probe or lifecycle handler must not reach another host
    (check_hostProbesAndhostLifecycle.go)."""
    out = []
    for path, c in _containers(spec):
        handlers = {p: c.get(p) for p in ("livenessProbe", "readinessProbe", "startupProbe")}
        for hook, handler in (c.get("lifecycle") or {}).items():
            handlers[f"lifecycle.{hook}"] = handler
        for where, handler in handlers.items():
            for kind in ("httpGet", "tcpSocket"):
                if ((handler or {}).get(kind) or {}).get("host"):
                    out.append(f"spec.{path}.{where}.{kind}.host must be unset")
    return out


def app_armor(spec: Spec, annotations: Mapping[str, str]) -> list[str]:
    out = [
        f"{path}.appArmorProfile.type must be RuntimeDefault or Localhost"
        for path, sc in _pod_and_containers(spec)
        if (sc.get("appArmorProfile") or {}).get("type")
        not in (None, "RuntimeDefault", "Localhost")
    ]
    for key, value in annotations.items():
        if key.startswith(APPARMOR_ANNOTATION):
            if value != "runtime/default" and not value.startswith("localhost/"):
                out.append(f"annotation {key} must be runtime/default or localhost/*")
    return out


def se_linux(spec: Spec, _: Mapping[str, str]) -> list[str]:
    out = []
    for path, sc in _pod_and_containers(spec):
        options = sc.get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES:
            out.append(f"{path}.seLinuxOptions.type {options['type']!r} is not allowed")
        for field in ("user", "role"):
            if options.get(field):
                out.append(f"{path}.seLinuxOptions.{field} must be unset")
    return out


def proc_mount(spec: Spec, _: Mapping[str, str]) -> list[str]:
    return [
        f"spec.{path}.securityContext.procMount must be Default"
        for path, c in _containers(spec)
        if _sc(c).get("procMount") not in (None, "Default")
    ]


def seccomp_baseline(spec: Spec, _: Mapping[str, str]) -> list[str]:
    return [
        f"{path}.seccompProfile.type must not be Unconfined"
        for path, sc in _pod_and_containers(spec)
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined"
    ]


def sysctls(spec: Spec, _: Mapping[str, str]) -> list[str]:
    return [
        f"spec.securityContext.sysctls[{i}] {s.get('name')!r} is not a safe sysctl"
        for i, s in enumerate(_sc(spec).get("sysctls") or [])
        if s.get("name") not in SAFE_SYSCTLS
    ]


# --------------------------------------------------------------------------- Restricted


def volume_types(spec: Spec, _: Mapping[str, str]) -> list[str]:
    out = []
    for i, volume in enumerate(spec.get("volumes") or []):
        if not any(volume.get(kind) is not None for kind in RESTRICTED_VOLUMES):
            kinds = sorted(set(volume) - {"name"})
            out.append(f"spec.volumes[{i}] ({volume.get('name')}) uses {kinds}")
    return out


def privilege_escalation(spec: Spec, _: Mapping[str, str]) -> list[str]:
    """Must be set, and false: unset allows escalation (check_allowPrivilegeEscalation.go)."""
    return [
        f"spec.{path}.securityContext.allowPrivilegeEscalation must be false"
        for path, c in _containers(spec)
        if _sc(c).get("allowPrivilegeEscalation") is not False
    ]


def run_as_non_root(spec: Spec, _: Mapping[str, str]) -> list[str]:
    """True on the pod, or on every container; false anywhere fails even under a pod-level
    true (check_runAsNonRoot.go)."""
    pod = _sc(spec).get("runAsNonRoot")
    out = ["spec.securityContext.runAsNonRoot must not be false"] if pod is False else []
    for path, c in _containers(spec):
        value = _sc(c).get("runAsNonRoot")
        if value is False or (value is None and pod is not True):
            out.append(f"spec.{path}.securityContext.runAsNonRoot must be true (or the pod's)")
    return out


def run_as_user(spec: Spec, _: Mapping[str, str]) -> list[str]:
    return [
        f"{path}.runAsUser must not be 0"
        for path, sc in _pod_and_containers(spec)
        if sc.get("runAsUser") == 0
    ]


def seccomp_restricted(spec: Spec, _: Mapping[str, str]) -> list[str]:
    """RuntimeDefault or Localhost on the pod, or on every container; a container's own
    value wins over the pod's (check_seccompProfile_restricted.go)."""
    pod = (_sc(spec).get("seccompProfile") or {}).get("type")
    out = []
    if pod is not None and pod not in SECCOMP_CONFINED:
        out.append("spec.securityContext.seccompProfile.type must be RuntimeDefault or Localhost")
    for path, c in _containers(spec):
        own = (_sc(c).get("seccompProfile") or {}).get("type")
        if (pod if own is None else own) not in SECCOMP_CONFINED:
            out.append(
                f"spec.{path}.securityContext.seccompProfile.type must be RuntimeDefault or "
                "Localhost (or unset under such a pod-level profile)"
            )
    return out


def capabilities_restricted(spec: Spec, _: Mapping[str, str]) -> list[str]:
    out = []
    for path, c in _containers(spec):
        caps = _sc(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"spec.{path}.securityContext.capabilities.drop must include ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(
                f"spec.{path}.securityContext.capabilities.add may hold NET_BIND_SERVICE only"
            )
    return out


BASELINE: dict[str, Check] = {
    "HostProcess": host_process,
    "Host Namespaces": host_namespaces,
    "Privileged Containers": privileged,
    "Capabilities": capabilities_baseline,
    "HostPath Volumes": host_path_volumes,
    "Host Ports": host_ports,
    "Host Probes / Lifecycle Hooks": host_probes_and_lifecycle,
    "AppArmor": app_armor,
    "SELinux": se_linux,
    "/proc Mount Type": proc_mount,
    "Seccomp": seccomp_baseline,
    "Sysctls": sysctls,
}
"""The Baseline controls, by the names the Pod Security Standards page gives them."""

RESTRICTED: dict[str, Check] = {
    **{name: check for name, check in BASELINE.items() if name != "HostPath Volumes"},
    # Stricter versions of three Baseline controls take their place, as the admission
    # plugin's restricted checks override the baseline ones (OverrideCheckIDs).
    "Volume Types": volume_types,
    "Seccomp": seccomp_restricted,
    "Capabilities": capabilities_restricted,
    "Privilege Escalation": privilege_escalation,
    "Running as Non-root": run_as_non_root,
    "Running as Non-root user": run_as_user,
}
"""Baseline with the Restricted controls."""

LEVELS: dict[str, dict[str, Check]] = {
    "privileged": {},
    "baseline": BASELINE,
    "restricted": RESTRICTED,
}
"""Every level by its label value; ``privileged`` (no controls) is also what a namespace
without an ``enforce`` label gets."""


def violations(
    spec: Spec, level: str = "restricted", annotations: Mapping[str, str] | None = None
) -> list[str]:
    """Why a pod with ``spec`` (and metadata ``annotations``) is refused at ``level``: one
    ``"<control>: <field and rule>"`` line per failure; empty when it is admitted."""
    checks = LEVELS[level]
    return [
        f"{control}: {problem}"
        for control, check in checks.items()
        for problem in check(spec, annotations or {})
    ]
