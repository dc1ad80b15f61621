"""Why a training pod cannot start, read from what the API shows, with what to change.

A job whose pods never start otherwise waits out its whole deadline (a day) holding a
pipeline slot. The reasons are few and each leaves a mark on the pod that the kubelet or
the scheduler writes:

- the scheduler sets condition ``PodScheduled=False`` with reason ``Unschedulable`` and a
  message that names the shortage ("Insufficient nvidia.com/gpu", "untolerated taint",
  "didn't match Pod's node affinity/selector") or an unbound PersistentVolumeClaim (a PVC
  left Pending: no StorageClass, or none that can bind it);
- the kubelet sets a container's ``state.waiting.reason``: ``ErrImagePull`` /
  ``ImagePullBackOff`` / ``InvalidImageName`` (image name, registry, pull secret) or
  ``CreateContainerConfigError`` (a Secret or ConfigMap the container's env refers to is
  missing).

:func:`pending_problem` turns one look at the pods into a sentence, or None when nothing
blocks them. The launcher decides how long a problem may last (autoscalers add GPU nodes in
minutes, so an unschedulable pod is not failed at first sight).
"""

from __future__ import annotations

from typing import Any

_IMAGE_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName")
_CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError")


def _unschedulable_hint(message: str) -> str:
    if "PersistentVolumeClaim" in message:
        return (
            "the run's PVC is not bound: check `kubectl get pvc` and give it a storageClassName "
            "that exists (ReadWriteMany only for multi-pod jobs)"
        )
    if "nvidia.com/gpu" in message:
        return "no node has that many free GPUs: ask for fewer GPUs or add GPU nodes"
    if "taint" in message:
        return "the nodes carry taints the pod does not tolerate: add the tolerations"
    if "affinity" in message or "selector" in message:
        return "no node matches the pod's nodeSelector/affinity: change the node selector"
    return "no node has the CPU/memory asked for: lower the stage's resources or add nodes"


def _scheduling(pod: Any) -> str | None:
    for cond in pod.status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False":
            if cond.reason == "Unschedulable":
                message = cond.message or "no message"
                return f"Unschedulable ({message}); {_unschedulable_hint(message)}"
    return None


def _waiting(pod: Any) -> str | None:
    statuses = [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]
    for cs in statuses:
        waiting = cs.state.waiting if cs.state else None
        if waiting is None:
            continue
        what = f"container {cs.name}: {waiting.reason} ({waiting.message or 'no message'})"
        if waiting.reason in _IMAGE_REASONS:
            return (
                f"{what}; check the image name and tag, and the imagePullSecrets for its registry"
            )
        if waiting.reason in _CONFIG_REASONS:
            return f"{what}; create the Secret/ConfigMap it names in the job's namespace"
    return None


def pending_problem(pods: list[Any]) -> str | None:
    """Why the first blocked pod cannot start (pod name, reason, what to change), or None."""
    for pod in pods:
        if pod.status is None or pod.status.phase not in (None, "Pending"):
            continue
        why = _scheduling(pod) or _waiting(pod)
        if why:
            return f"pod {pod.metadata.name} cannot start: {why}"
    return None
