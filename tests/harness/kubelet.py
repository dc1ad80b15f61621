"""What the scheduler and the kubelet write on training pods, for the emulated controllers.

The training-operator emulator (:mod:`tests.harness.training_operator`) and the Trainer
emulator (:mod:`tests.harness.trainer`) make pods; what happens to those pods is the
node's doing, the same under either controller, and written here once:

- log and status timestamps are RFC3339Nano with trailing zeros trimmed (Go's
  ``time.RFC3339Nano``, as the kubelet writes ``timestamps=true`` log lines), so they do not
  sort as strings;
- a container status as the kubelet reports it (``state`` waiting / running / terminated,
  ``lastState`` after a restart, ``restartCount``);
- pods that never start (:func:`pending`): kube-scheduler marks an unschedulable pod with
  ``PodScheduled=False``/``Unschedulable`` and a ``FailedScheduling`` event naming the
  shortage; the kubelet leaves a container waiting with ``ImagePullBackOff`` after a failed
  pull (event ``Failed``: "Failed to pull image ...") or ``CreateContainerConfigError`` when
  a Secret its env refers to is missing (event ``Failed``: "Error: secret ... not found");
- an eviction (:func:`evicted`): the kubelet's eviction manager fails the pod with reason
  ``Evicted`` and kills its container (exit code 137).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kubernetes

IMAGE = "registry.example/brain-ldm-training:0.1.0"
"""The training image the tests' configs name (a pull of it fails in ``pending-image``)."""
S3_SECRET = "brain-ldm-s3"
"""The S3 Secret the tests' configs name (missing in ``pending-secret``)."""
EVICTION = "The node was low on resource: memory."


def stamp() -> str:
    """Now, as the kubelet stamps log lines and conditions."""
    now = datetime.now(UTC)
    frac = f"{now.microsecond:06d}".rstrip("0")
    return now.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def container_status(
    name: str, *, restarts: int = 0, last: dict[str, Any] | None = None, **state: Any
) -> dict[str, Any]:
    """The status of container ``name`` in ``state`` (``waiting=``, ``running=`` or
    ``terminated=`` the state's fields)."""
    status = {
        "name": name,
        "ready": "running" in state,
        "restartCount": restarts,
        "image": IMAGE,
        "imageID": "",
        "state": state,
    }
    if last:
        status["lastState"] = last
    return status


def terminated(container: str, phase: str, code: int, reason: str, restarts: int = 0) -> dict:
    """A pod status whose one container ended with exit ``code``."""
    term = {"exitCode": code, "reason": reason}
    return {
        "phase": phase,
        "containerStatuses": [container_status(container, restarts=restarts, terminated=term)],
    }


def evicted(container: str) -> dict[str, Any]:
    """A pod status after the kubelet evicted it: Failed/Evicted, its container killed."""
    return {
        **terminated(container, "Failed", 137, "Error"),
        "reason": "Evicted",
        "message": EVICTION,
    }


def _unschedulable(message: str) -> dict[str, Any]:
    cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    return {"phase": "Pending", "conditions": [{**cond, "message": message}]}


def _waiting(container: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "True"}],
        "containerStatuses": [
            container_status(container, waiting={"reason": reason, "message": message})
        ],
    }


def pending(container: str) -> dict[str, tuple[dict[str, Any], tuple[str, str]]]:
    """Pods whose container ``container`` never starts, by kind: the status the scheduler or
    the kubelet writes, and the (reason, message) of the event it records."""
    return {
        "pending-gpu": (
            _unschedulable(
                "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes "
                "are available: 4 No preemption victims found for incoming pod."
            ),
            ("FailedScheduling", "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."),
        ),
        "pending-pvc": (
            _unschedulable(
                "0/4 nodes are available: pod has unbound immediate PersistentVolumeClaims. "
                "preemption: 0/4 nodes are available: 4 Preemption is not helpful for "
                "scheduling."
            ),
            ("FailedScheduling", "pod has unbound immediate PersistentVolumeClaims"),
        ),
        "pending-image": (
            _waiting(container, "ImagePullBackOff", f'Back-off pulling image "{IMAGE}"'),
            ("Failed", f'Failed to pull image "{IMAGE}": not found'),
        ),
        "pending-secret": (
            _waiting(container, "CreateContainerConfigError", f'secret "{S3_SECRET}" not found'),
            ("Failed", f'Error: secret "{S3_SECRET}" not found'),
        ),
    }


PENDING = tuple(pending(""))
"""The kinds of pods that never start, as the emulators' outcomes name them."""


def record_event(
    core: kubernetes.client.CoreV1Api,
    namespace: str,
    obj: str,
    kind: str,
    type_: str,
    reason: str,
    message: str,
) -> None:
    """An Event about ``kind``/``obj``, as a controller's or the kubelet's recorder writes it."""
    core.create_namespaced_event(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{obj}.{reason.lower()}", "namespace": namespace},
            "involvedObject": {"kind": kind, "name": obj, "namespace": namespace},
            "type": type_,
            "reason": reason,
            "message": message,
            "lastTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    )
