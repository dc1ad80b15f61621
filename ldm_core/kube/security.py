"""The one securityContext every pod brain-ldm creates runs under.

Training pods (PyTorchJob) and predictor containers (InferenceService, ServingRuntime) are
held to the Kubernetes "restricted" Pod Security Standard: a fixed non-root user, no
privilege escalation, no Linux capabilities, the runtime's default seccomp profile, and a
read-only root filesystem (writable paths are emptyDir volumes the builders mount). Built
here once so the two stay the same when one of them changes.
"""

from __future__ import annotations

from typing import Any

RUN_AS = 1000
"""The uid and gid of the ``app`` user the training and serving images create."""


def pod_security_context(uid: int = RUN_AS) -> dict[str, Any]:
    """Pod-level settings: who the containers run as and who owns mounted volumes
    (``fsGroup``, so the non-root user can write to the PVC)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(uid: int = RUN_AS) -> dict[str, Any]:
    """Container-level settings; complete on their own, because KServe copies a runtime's
    container into the predictor pod without any pod-level securityContext."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
