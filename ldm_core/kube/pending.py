"""Why a training pod cannot start, or was never created, read from what the API shows,
with what to change.

A job whose pods never start otherwise waits out its whole deadline (a day) holding a
pipeline slot. The reasons are few and each leaves a mark that the scheduler, the kubelet or
the controller writes:

- the scheduler sets condition ``PodScheduled=False`` with reason ``Unschedulable`` and a
  message that names the shortage ("Insufficient nvidia.com/gpu", "untolerated taint",
  "didn't match Pod's node affinity/selector") or an unbound PersistentVolumeClaim (a PVC
  left Pending: no StorageClass, or none that can bind it);
- the kubelet sets a container's ``state.waiting.reason``: ``ErrImagePull`` /
  ``ImagePullBackOff`` / ``InvalidImageName`` (image name, registry, pull secret) or
  ``CreateContainerConfigError`` (a Secret or ConfigMap the container's env refers to is
  missing);
- a pod the API server refuses is never made: the controller records a Warning event
  "Error creating: <the API server's message>" and retries, and the pods alone show nothing.
  The training operator records ``FailedCreatePod`` on the PyTorchJob (kubeflow/trainer
  v1.9.1 pkg/controller.v1/control/pod_control.go:153); under a TrainJob the Job controller
  records ``FailedCreate`` on the JobSet's Job (kubernetes pkg/controller/controller_utils.go
  ``createPods``; jobset v0.10.1 creates the Jobs, not the pods). The refusals seen in
  Kubeflow namespaces: a ResourceQuota (``failed quota: Q: must specify limits.cpu`` when it
  counts CPU limits and the pod sets none; ``exceeded quota`` when it is full), a missing
  ServiceAccount, Pod Security admission (``violates PodSecurity``), a webhook.

:func:`pending_problem` turns one look at the pods into a sentence, :func:`failed_create`
one look at the events; a :class:`Blocked` says whether waiting can help. The launcher
decides how long a problem that may pass may last (autoscalers add GPU nodes in minutes, a
quota frees up when other pods end); one that cannot pass fails the job at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

_IMAGE_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName")
_CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError")
FAILED_CREATE = ("FailedCreate", "FailedCreatePod")
"""Event reasons of a pod the API server refused: the Job controller's, the operator's."""


@dataclass(frozen=True)
class Blocked:
    """Why the job's pods cannot run: ``problem`` (what, why, what to change), and whether
    it ``lasts`` (waiting cannot help: fail at once)."""

    problem: str
    lasts: bool = False


_FIT_REASON = re.compile(r"(\d+) ([^,]+?)(?=, \d+ |$)")
"""One ``<count> <reason>`` of a FitError: kube-scheduler's message is ``0/N nodes are
available: 1 node(s) had untolerated taint {…}, 3 Insufficient cpu. preemption: …``
(pkg/scheduler/framework/types.go ``FitError.Error``: reasons sorted by text, each with the
number of nodes it ruled out)."""
_HINTS = (
    (
        ("Insufficient nvidia.com/gpu",),
        "no node has that many free GPUs: ask for fewer GPUs or add GPU nodes",
    ),
    (("taint",), "the nodes carry taints the pod does not tolerate: add the tolerations"),
    (
        ("affinity", "selector"),
        "no node matches the pod's nodeSelector/affinity: change the node selector",
    ),
)
"""What the blocking reason says (any of the words) -> what to change."""
_NO_ROOM = "no node has the CPU/memory asked for: lower the stage's resources or add nodes"


def _blocking_reason(message: str) -> str:
    """The reason that rules out the most nodes, which is what keeps the pod off the nodes
    it could run on: a kubeadm cluster's control-plane taint is named in nearly every
    FitError, beside the one reason that matters for the workers."""
    body = message.split("nodes are available:", 1)[-1].split(". preemption:", 1)[0]
    found = [(int(n), reason) for n, reason in _FIT_REASON.findall(body.strip().rstrip("."))]
    return max(found, key=lambda item: item[0])[1] if found else message


def _unschedulable_hint(message: str) -> str:
    if "PersistentVolumeClaim" in message:
        return (
            "the run's PVC is not bound: check `kubectl get pvc` and give it a storageClassName "
            "that exists (ReadWriteMany only for multi-pod jobs)"
        )
    reason = _blocking_reason(message)
    for words, hint in _HINTS:
        if any(word in reason for word in words):
            return hint
    return _NO_ROOM


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


def refusal_hint(message: str, stage: str) -> tuple[str, bool]:
    """What to change about a pod the API server refused with ``message``, and whether the
    refusal lasts (it does unless something else in the namespace changes by itself)."""
    if "failed quota" in message and "must specify" in message:
        if "limits.cpu" in message:
            return (
                "the namespace's ResourceQuota counts limits.cpu and training pods set no CPU "
                f"limit: set cluster.{stage}.cpu_limit (at least cluster.{stage}.cpu)",
                True,
            )
        return "the namespace's ResourceQuota requires the resources it names on every pod", True
    if "exceeded quota" in message:
        return (
            "the namespace's ResourceQuota has no room left: wait for other workloads, lower "
            f"cluster.{stage}, or ask for a larger quota",
            False,
        )
    if "error looking up service account" in message:
        return (
            "create the ServiceAccount (manifests/base/serviceaccounts.yaml) or set "
            "cluster.service_account to one that exists",
            False,
        )
    if "violates PodSecurity" in message:
        return (
            "the namespace's Pod Security level refuses the pod for the fields named "
            "(`kubectl get ns -L pod-security.kubernetes.io/enforce`)",
            True,
        )
    if "admission webhook" in message:
        return "an admission webhook refused the pod: its message says why", True
    return "", False


def _when(event: Any) -> datetime | None:
    return event.last_timestamp or event.event_time or event.first_timestamp


def failed_create(events: Iterable[Any], stage: str, since: datetime | None) -> Blocked | None:
    """The newest refusal of one of the job's pods among ``events`` (of the job and the
    objects under it) recorded at or after ``since`` (the job's creation: an earlier job of
    the same name left its own), as a :class:`Blocked`; None when there is none."""
    refusals = [
        ev
        for ev in events
        if ev.reason in FAILED_CREATE and (since is None or _when(ev) is None or _when(ev) >= since)
    ]
    if not refusals:
        return None
    ev = max(refusals, key=lambda e: str(_when(e) or ""))
    hint, lasts = refusal_hint(ev.message or "", stage)
    obj = f"{(ev.involved_object.kind or '').lower()}/{ev.involved_object.name}"
    problem = f"the pods are not created: {ev.reason} on {obj}: {ev.message or 'no message'}"
    return Blocked(f"{problem}; {hint}" if hint else problem, lasts)
