"""Kubeflow Training Operator v1 on the emulated Kubernetes API: what a PyTorchJob launcher sees.

A :class:`FakeOperator` thread plays the training operator (with the kubelet under it, see
:mod:`tests.harness.kubelet`) for every PyTorchJob that appears in its namespace. Modelled
on kubeflow/training-operator v1.9 (the release of tests/crds/kubeflow.org_pytorchjobs.yaml):

- pods (pkg/controller.v1/common/pod.go ``createNewPod``): one per replica, named
  ``<job>-<replica type>-<index>`` and labelled with the job's name, the replica type and
  index, and ``job-role: master`` on the Master, their spec the replica's template;
- conditions (pkg/util/status.go ``UpdateJobConditions``): one condition per type, a changed
  one moves to the end, Running and Restarting replace each other, and setting Succeeded or
  Failed keeps Running with status "False"; ``Created`` first, ``Running`` once the pods run;
- a failed pod (pod.go ``ReconcilePods``): under the replica's ``restartPolicy`` ExitCode
  with a retryable exit code (128 and above: an eviction's 137), OnFailure or Always, it is
  deleted and made again under the same name, and the job shows ``Restarting`` until it
  runs; under Never it stays Failed (the job's later Failed condition is not modelled: the
  launcher acts on the evicted pod first);
- completion: ``cleanPodPolicy: All`` deletes every pod once the job Succeeded or Failed
  (pkg/controller.v1/common/job.go ``CleanupJob``), and with them their logs;
- a pod the API server refuses (a ResourceQuota, a missing ServiceAccount, Pod Security
  admission): the operator records a Warning ``FailedCreatePod`` "Error creating: <the API
  server's message>" on the PyTorchJob (v1.9.1 pkg/controller.v1/control/pod_control.go:153)
  and requeues the job; it stays ``Created`` with no pod.

Outcomes a test picks: ``succeed``, ``succeed-clean`` (the pods are deleted the moment the
job Succeeded), ``fail`` (the master exits 1), ``evict`` (the kubelet evicts the master;
what follows is the job's restart policy's), ``hang``, ``absent`` (no operator), and the
pending kinds of :func:`tests.harness.kubelet.pending`.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import kubernetes

from tests.harness.kube import KubeApi
from tests.harness.kubelet import (
    EVICTION,
    evicted,
    pending,
    record_event,
    stamp,
    terminated,
)

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
RESOURCE = {f"{GROUP}/{VERSION}/{PLURAL}": KIND}
"""What :class:`~tests.harness.kube.KubeApi` serves when the training operator is installed."""
OPERATOR_UA = "fake-training-operator"
CONTAINER = "pytorch"
"""The container the operator treats as the training process (its default container name)."""
JOB_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
ROLE_LABEL = "training.kubeflow.org/job-role"
RESTARTED = ("ExitCode", "OnFailure", "Always")
"""Restart policies under which the operator replaces a pod that failed with exit code 137."""
PENDING = pending(CONTAINER)


class FakeOperator(threading.Thread):
    """Plays the training operator for each new PyTorchJob in ``namespace``.

    Args:
        api: the emulated API server.
        namespace: where PyTorchJobs are watched.
        outcome: what happens to every PyTorchJob (see the module docstring).
        step_s: the pause between steps (a training step, a restart).
    """

    def __init__(self, api: KubeApi, namespace: str, outcome: str, step_s: float = 0.15) -> None:
        super().__init__(daemon=True, name=f"fake-training-operator-{outcome}")
        self.api, self.namespace, self.outcome, self.step_s = api, namespace, outcome, step_s
        client = api.client(OPERATOR_UA)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)
        self.seen: set[str] = set()
        self.done = threading.Event()
        """Set once a job has been played to the end of its outcome."""
        self.stopping = threading.Event()
        self.logged: dict[str, list[str]] = {}
        """PyTorchJob name -> the master's log lines written, in order, without stamps."""
        self.conditions: dict[str, list[dict[str, Any]]] = {}

    def run(self) -> None:
        while not self.stopping.is_set():
            jobs = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL
            )["items"]
            for job in jobs:
                name = job["metadata"]["name"]
                if job["metadata"].get("deletionTimestamp"):
                    continue  # not reconciled (v1.9.1 pytorchjob_controller.go:149)
                if name not in self.seen and self.outcome != "absent" and not job.get("status"):
                    self.seen.add(name)
                    self._play(job)
            self.stopping.wait(0.05)

    # ------------------------------------------------------------------ writes

    def _conditions(self, name: str, *types: tuple[str, str, str]) -> None:
        """Set each condition (status True) in turn, as the operator's reconciles would."""
        for kind, reason, message in types:
            self._set(name, kind, reason, message)
        self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            name,
            {"status": {"conditions": self.conditions[name]}},
        )

    def _set(self, name: str, kind: str, reason: str, message: str) -> None:
        current = self.conditions.setdefault(name, [])
        if any(c["type"] == kind and c["status"] == "True" for c in current):
            return  # unchanged: the operator does not rewrite it
        kept = []
        for c in current:
            if c["type"] == kind or {c["type"], kind} == {"Running", "Restarting"}:
                continue
            if kind in ("Succeeded", "Failed") and c["type"] == "Running":
                c = {**c, "status": "False"}
            kept.append(c)
        now = stamp()
        new = {"type": kind, "status": "True", "reason": reason, "message": message}
        self.conditions[name] = [*kept, {**new, "lastUpdateTime": now, "lastTransitionTime": now}]

    def _log(self, job: str, pod: str, text: str) -> None:
        self.api.logs.setdefault(pod, []).append(f"{stamp()} {text}")
        self.logged.setdefault(job, []).append(text)

    def _event(self, obj: str, kind: str, type_: str, reason: str, message: str) -> None:
        record_event(self.core, self.namespace, obj, kind, type_, reason, message)

    def _pod(self, job: str, rtype: str, index: int, spec: dict[str, Any]) -> str:
        """Create one replica's pod, or record FailedCreatePod on the job when the API server
        refuses it ("" then)."""
        name = f"{job}-{rtype.lower()}-{index}"
        labels = {
            JOB_LABEL: job,
            REPLICA_TYPE_LABEL: rtype.lower(),
            REPLICA_INDEX_LABEL: str(index),
        }
        if rtype == "Master":
            labels[ROLE_LABEL] = "master"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace, "labels": labels},
            "spec": spec["template"]["spec"],
            "status": {"phase": "Running"},
        }
        try:
            self.core.create_namespaced_pod(self.namespace, pod)
        except kubernetes.client.ApiException as err:
            if err.status not in (403, 422):
                raise
            message = json.loads(err.body)["message"]
            self._event(job, KIND, "Warning", "FailedCreatePod", f"Error creating: {message}")
            return ""
        return name

    def _pod_status(self, pod: str, status: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(pod, self.namespace, {"status": status})

    def _clean(self, pods: list[str]) -> None:
        for pod in pods:
            self.core.delete_namespaced_pod(pod, self.namespace)
            self.api.logs.pop(pod, None)

    # ------------------------------------------------------------------ play

    def _play(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        replicas = job["spec"]["pytorchReplicaSpecs"]
        created = ("Created", "PyTorchJobCreated", f"PyTorchJob {name} is created.")
        running = ("Running", "PyTorchJobRunning", f"PyTorchJob {name} is running.")
        self._conditions(name, created)
        pods = [
            self._pod(name, rtype, i, spec)
            for rtype, spec in replicas.items()
            for i in range(spec.get("replicas", 1))
        ]
        master = f"{name}-master-0"
        if not all(pods):
            self.done.set()
            return  # requeued with a backoff: the job stays Created
        if self.outcome in PENDING:
            status, event = PENDING[self.outcome]
            for pod in pods:
                self._pod_status(pod, status)
                self._event(pod, "Pod", "Warning", *event)
            self.done.set()
            return  # the job stays Created: no pod ever runs
        self._conditions(name, created, running)
        for step in range(3):
            self._log(name, master, f"step {step} loss {1.0 / (step + 1):.3f}")
            # Several lines within one timestamp must neither vanish nor repeat on reconnect.
            self._log(name, master, f"step {step} lr 1e-4")
            time.sleep(self.step_s)
        if self.outcome == "evict":
            self._pod_status(master, evicted(CONTAINER))
            self._event(master, "Pod", "Warning", "Evicted", EVICTION)
            if replicas["Master"].get("restartPolicy") not in RESTARTED:
                self.done.set()
                return  # nothing brings the master back
            self._restart(name, master, replicas["Master"], running)
        if self.outcome in ("succeed", "succeed-clean", "evict"):
            self._log(name, master, "saved autoencoder.pt")
            for pod in pods:
                self._pod_status(pod, terminated(CONTAINER, "Succeeded", 0, "Completed"))
            self._conditions(name, ("Succeeded", "PyTorchJobSucceeded", "done"))
            if self.outcome != "succeed-clean":
                time.sleep(self.step_s)
            self._clean(pods)
        elif self.outcome == "fail":
            self._fail(name, master, pods)
        self.done.set()

    def _restart(
        self, name: str, master: str, spec: dict[str, Any], running: tuple[str, str, str]
    ) -> None:
        """The failed master is deleted and made again under its name; the job says
        Restarting until the new pod runs, which resumes from the last checkpoint."""
        time.sleep(self.step_s)
        self._clean([master])
        restarting = (
            "Restarting",
            "PyTorchJobRestarting",
            f"PyTorchJob {name} is restarting because 1 Master replica(s) failed.",
        )
        self._conditions(name, restarting)
        time.sleep(self.step_s)
        self._pod(name, "Master", 0, spec)
        self._conditions(name, running)
        self._log(name, master, "resumed from checkpoint step 2")
        time.sleep(self.step_s)

    def _fail(self, name: str, master: str, pods: list[str]) -> None:
        """The master exits 1 (not retryable): the job Fails and, a little later,
        cleanPodPolicy All removes its pods, and with them the master's log."""
        self._log(name, master, "Traceback (most recent call last):")
        self._log(name, master, "RuntimeError: CUDA out of memory (simulated)")
        for pod in pods:
            self._pod_status(pod, terminated(CONTAINER, "Failed", 1, "Error"))
        self._event(
            master, "Pod", "Warning", "BackOff", "Back-off restarting failed container pytorch"
        )
        self._event(name, KIND, "Normal", "PyTorchJobFailed", f"PyTorchJob {name} is failed")
        failed = (
            "Failed",
            "PyTorchJobFailed",
            f"PyTorchJob {name} is failed because 1 Master replica(s) failed.",
        )
        self._conditions(name, failed)
        time.sleep(3 * self.step_s)
        self._clean(pods)
