"""Kubeflow Trainer v2 on the emulated Kubernetes API: what a TrainJob launcher can observe.

:func:`install_webhooks` adds the admission chain a TrainJob create meets on a cluster, and a
:class:`FakeTrainer` thread plays the Trainer controller with the JobSet controller, the Job
controller and the kubelet under it, for every TrainJob that appears. Modelled on
kubeflow/trainer 8c0f505 (the commit of tests/crds/trainer.kubeflow.org_trainjobs.yaml) and
kubernetes-sigs/jobset 08dfbdf:

- admission (pkg/webhooks/trainjob_webhook.go; the apiserver's schema check between the
  mutating and validating webhooks): the defaulter stamps ``runtimePatches[].time``; an
  object the CRD schema refuses answers 422 Invalid; the validator refuses, with 403
  Forbidden (controller-runtime's ``Denied`` for a plain error) and ``admission webhook ...
  denied the request``, a runtime that does not exist, reserved ``PET_*`` env in
  ``spec.trainer.env``, a patch whose ``manager`` is not a domain-prefixed path, or a patch of
  a replicated Job or container the runtime lacks, or of the ``node`` container's env
  (plugins/torch/torch.go, plugins/jobset/jobset.go ``Validate``);
- pods (jobset ``GenPodName`` + the Job controller's suffix): ``<name>-node-0-<rank>-xxxxx``,
  labelled with the JobSet name, the replicated Job name and the completion index (the node
  rank); their spec is the runtime's pod template, strategically merged with the TrainJob's
  ``runtimePatches``, with ``spec.trainer`` image, command, env and resourcesPerNode on the
  ``node`` container and the torch plugin's ``PET_*`` env and port 29500 (what the tests
  inspect); restartPolicy OnFailure (JobSet's defaulter);
- status (trainjob_controller.go, plugins/jobset ``Status``): no condition while running,
  ``jobsStatus`` mirrors the Job's pod counts, the JobSet's terminal condition is copied as
  ``Complete``/``AllJobsCompleted`` or ``Failed``/``FailedJobs``, a deadline gives
  ``Failed``/``DeadlineExceeded`` and deletes the JobSet (the pods go), a suspended TrainJob
  shows ``Suspended``/``Suspended`` and has no pods.

Outcomes a test picks: ``succeed``, ``fail`` (rank 0 exits 1, restarts under OnFailure,
the Job passes its backoffLimit), ``evict-replace`` (rank 0 evicted; the Job makes a new pod
that finishes the work), ``deadline``, ``hang``, ``suspend`` (queued by Kueue), ``absent`` (no
controller), and the pending kinds of :func:`tests.harness.kubelet.pending`.
"""

from __future__ import annotations

import copy
import itertools
import re
import threading
import time
from typing import Any

import kmock
import kubernetes
import urllib3

from tests.harness import crdcheck
from tests.harness.kube import KubeApi
from tests.harness.kubelet import (
    EVICTION,
    container_status,
    evicted,
    pending,
    record_event,
    stamp,
    terminated,
)

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RESOURCE = {f"{GROUP}/{VERSION}/{PLURAL}": KIND}
"""What :class:`~tests.harness.kube.KubeApi` serves when Trainer v2 is installed."""
CONTROLLER_UA = "fake-trainer-controller"
MASTER_PORT = 29500
"""trainer constants.ContainerTrainerPort."""

TORCH_DISTRIBUTED: dict[str, Any] = {
    "mlPolicy": {"numNodes": 1, "torch": {}},
    "template": {
        "spec": {
            "replicatedJobs": [
                {
                    "name": "node",
                    "template": {
                        "metadata": {
                            "labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
                        },
                        "spec": {
                            "template": {
                                "spec": {
                                    "containers": [
                                        {
                                            "name": "node",
                                            "image": "pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime",
                                        }
                                    ]
                                }
                            }
                        },
                    },
                }
            ]
        }
    },
}
"""spec of kubeflow/trainer manifests/base/runtimes/torch_distributed.yaml at 8c0f505."""
RESERVED_ENV = {
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
}
_DOMAIN_PATH = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/\S+$")
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "name",
    "env": "name",
    "imagePullSecrets": "name",
}
"""List fields a strategic merge patch merges by key (the rest are replaced)."""
_POD_SUFFIX = itertools.count(0xA0000)
"""The Job controller's random pod-name suffix; a counter keeps names unique across tests."""


# --------------------------------------------------------------------------- admission


class Admission:
    """The TrainJob admission chain, as reactions on the emulator (install with :meth:`install`).

    Args:
        api: the emulated API server.
        runtimes: ClusterTrainingRuntime name -> spec installed on the cluster.
    """

    def __init__(self, api: KubeApi, runtimes: dict[str, dict[str, Any]]) -> None:
        self.api, self.runtimes = api, runtimes

    def install(self) -> None:
        def is_create(r: kmock.Request) -> bool:
            return (
                r.action == kmock.action.CREATE
                and r.resource is not None
                and (r.resource.plural == PLURAL)
            )

        def is_delete(r: kmock.Request) -> bool:
            return (
                r.action == kmock.action.DELETE
                and r.resource is not None
                and (r.resource.plural == PLURAL)
            )

        self.api.emulator[is_create] << self._admit
        self.api.emulator[is_delete] << self._collect

    def _admit(self, request: kmock.Request) -> Any:
        obj = request.data
        for patch in obj.get("spec", {}).get("runtimePatches", []):
            patch.setdefault("time", stamp())  # the defaulter (mutating webhook)
        name = obj.get("metadata", {}).get("name")
        try:
            crdcheck.validate(obj)
        except crdcheck.InvalidResource as err:
            return self._refuse(
                request, 422, "Invalid", f'TrainJob.{GROUP} "{name}" is invalid: {err}'
            )
        denied = self._validate(obj)
        if denied:
            message = (
                'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the '
                f"request: {denied}"
            )
            return self._refuse(request, 403, "Forbidden", message)
        raise NotImplementedError  # admitted: the emulator answers with the stored object

    def _collect(self, request: kmock.Request) -> Any:
        """The garbage collector under foreground deletion: the TrainJob's JobSet, Jobs and
        pods are gone before the TrainJob is."""
        for (resource, namespace, name), obj in list(self.api.emulator.objects.items()):
            labels = (obj.get("metadata") or {}).get("labels") or {}
            if (
                resource.plural == "pods"
                and namespace == request.namespace
                and labels.get("jobset.sigs.k8s.io/jobset-name") == request.name
                and not obj.deleted
            ):
                obj.delete()
                self.api.logs.pop(name, None)
        raise NotImplementedError  # the emulator deletes the TrainJob itself

    def _refuse(self, request: kmock.Request, status: int, reason: str, message: str) -> Any:
        # The emulator stores a create before reactions run; a refused one never existed.
        meta = request.data.get("metadata", {})
        key = (request.resource, request.namespace or meta.get("namespace"), meta.get("name"))
        self.api.emulator.objects[key].delete()
        return kmock.KubernetesError(status=status, reason=reason, message=message)

    def _validate(self, obj: dict[str, Any]) -> str | None:
        spec = obj.get("spec", {})
        ref = spec.get("runtimeRef", {})
        runtime = self.runtimes.get(ref.get("name", ""))
        if ref.get("kind", "ClusterTrainingRuntime") != "ClusterTrainingRuntime" or runtime is None:
            return (
                f"spec.RuntimeRef: Invalid value: {ref}: clustertrainingruntimes.{GROUP} "
                f'"{ref.get("name")}" not found: specified clusterTrainingRuntime must be created '
                "before the TrainJob is created"
            )
        reserved = sorted(
            e["name"] for e in spec.get("trainer", {}).get("env", []) if e["name"] in RESERVED_ENV
        )
        if reserved:
            return (
                "spec.trainer.env: Invalid value: must not have reserved envs, invalid envs "
                f"configured: {reserved}"
            )
        containers = {
            rj["name"]: {
                c["name"] for c in rj["template"]["spec"]["template"]["spec"]["containers"]
            }
            for rj in runtime["template"]["spec"]["replicatedJobs"]
        }
        for patch in spec.get("runtimePatches", []):
            if not _DOMAIN_PATH.match(patch["manager"]):
                return f"spec.runtimePatches.manager: Invalid value: {patch['manager']!r}"
            template = patch.get("trainingRuntimeSpec", {}).get("template", {})
            for rj in template.get("spec", {}).get("replicatedJobs", []):
                if rj["name"] not in containers:
                    return (
                        "spec.runtimePatches: must not have replicated job that doesn't exist "
                        "in the runtime job template"
                    )
                pod = rj.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
                for c in pod.get("containers", []):
                    if c["name"] not in containers[rj["name"]]:
                        return (
                            "spec.runtimePatches: must not have container that doesn't exist "
                            f"in the runtime job {rj['name']}"
                        )
                    if c.get("env") and c["name"] == "node":
                        return "spec.runtimePatches: must not have envs for the node containers"
        return None


# --------------------------------------------------------------------------- pods


def strategic_merge(base: Any, patch: Any, key: str = "") -> Any:
    """A strategic merge patch over pod-template dicts: maps merge, lists in
    :data:`_MERGE_KEYS` merge by their key, other lists and values are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base.get(k), v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in _MERGE_KEYS:
        by = _MERGE_KEYS[key]
        out = [copy.deepcopy(b) for b in base]
        for item in patch:
            match = [i for i, b in enumerate(out) if b.get(by) == item.get(by)]
            if match:
                out[match[0]] = strategic_merge(out[match[0]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def node_pod(
    job: dict[str, Any], runtime: dict[str, Any], rank: int, suffix: str
) -> dict[str, Any]:
    """The pod the Trainer, JobSet and Job controllers make for node ``rank`` of ``job``."""
    name, spec = job["metadata"]["name"], job["spec"]
    (rjob,) = runtime["template"]["spec"]["replicatedJobs"]
    template = copy.deepcopy(rjob["template"]["spec"]["template"])
    for patch in spec.get("runtimePatches", []):
        for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if rj["name"] == rjob["name"]:
                template = strategic_merge(template, rj["template"]["spec"]["template"])
    trainer = spec.get("trainer", {})
    nnodes = trainer.get("numNodes", runtime["mlPolicy"]["numNodes"])
    pet = {
        "PET_NNODES": str(nnodes),
        "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", "auto")),
        "PET_NODE_RANK": str(rank),  # a fieldRef to the completion index, resolved
        "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
        "PET_MASTER_PORT": str(MASTER_PORT),
    }
    for c in template["spec"]["containers"]:
        if c["name"] != "node":
            continue
        for k in ("image", "command", "args"):
            if k in trainer:
                c[k] = trainer[k]
        c["env"] = [
            *c.get("env", []),
            *trainer.get("env", []),
            *({"name": k, "value": v} for k, v in pet.items()),
        ]
        if "resourcesPerNode" in trainer:
            c["resources"] = trainer["resourcesPerNode"]
        c["ports"] = [{"containerPort": MASTER_PORT}]
    template["spec"].setdefault("restartPolicy", "OnFailure")
    labels = {
        **template.get("metadata", {}).get("labels", {}),
        "jobset.sigs.k8s.io/jobset-name": name,
        "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"],
        "jobset.sigs.k8s.io/job-index": "0",
        "batch.kubernetes.io/job-name": f"{name}-{rjob['name']}-0",
        "batch.kubernetes.io/job-completion-index": str(rank),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-{rjob['name']}-0-{rank}-{suffix}",
            "labels": labels,
            "annotations": {
                **template.get("metadata", {}).get("annotations", {}),
                "batch.kubernetes.io/job-completion-index": str(rank),
            },
        },
        "spec": template["spec"],
        "status": {"phase": "Running"},
    }


PENDING = pending("node")
"""Node pods that never start, as the scheduler or the kubelet marks them, with the event."""


# --------------------------------------------------------------------------- controller


class FakeTrainer(threading.Thread):
    """Plays Trainer v2 (and JobSet, Job, kubelet) for each new TrainJob in ``namespace``.

    Args:
        api: the emulated API server.
        namespace: where TrainJobs are watched.
        outcome: what happens to every TrainJob (see the module docstring).
        step_s: the pause between steps (a training step, a restart).
        runtimes: the ClusterTrainingRuntimes installed (default: torch-distributed).
    """

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        outcome: str,
        step_s: float = 0.1,
        runtimes: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(daemon=True, name=f"fake-trainer-{outcome}")
        self.api, self.namespace, self.outcome, self.step_s = api, namespace, outcome, step_s
        self.runtimes = (
            runtimes if runtimes is not None else {"torch-distributed": TORCH_DISTRIBUTED}
        )
        client = api.client(CONTROLLER_UA)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)
        self.seen: set[str] = set()
        self.done = threading.Event()
        """Set once a TrainJob has been played to the end of its outcome."""
        self.stopping = threading.Event()
        self.logged: dict[str, list[str]] = {}
        """TrainJob name -> the rank-0 log lines written, in order, without stamps."""
        self.pods: dict[str, list[dict[str, Any]]] = {}
        """TrainJob name -> every pod made for it (as created)."""

    def run(self) -> None:
        while not self.stopping.is_set():
            items = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL
            )
            for job in items["items"]:
                name = job["metadata"]["name"]
                if name not in self.seen and self.outcome != "absent" and not job.get("status"):
                    self.seen.add(name)
                    threading.Thread(target=self._reconcile, args=(job,), daemon=True).start()
            self.stopping.wait(0.05)

    # ------------------------------------------------------------------ writes

    def _status(self, name: str, status: dict[str, Any]) -> None:
        if self.stopping.is_set():
            return
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, name, {"status": status}
        )

    def _jobs_status(self, name: str, **counts: int) -> None:
        zero = {"active": 0, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}
        self._status(name, {"jobsStatus": [{"name": "node", **zero, **counts}]})

    def _condition(self, name: str, kind: str, reason: str, message: str) -> None:
        cond = {
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastTransitionTime": stamp().split(".")[0].rstrip("Z") + "Z",
        }
        self._status(name, {"conditions": [cond]})

    def _pod_status(self, pod: str, status: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(pod, self.namespace, {"status": status})

    def _event(self, obj: str, kind: str, type_: str, reason: str, message: str) -> None:
        record_event(self.core, self.namespace, obj, kind, type_, reason, message)

    def _log(self, job: str, pod: str, text: str) -> None:
        self.api.logs.setdefault(pod, []).append(f"{stamp()} {text}")
        self.logged.setdefault(job, []).append(text)

    def _make_pods(self, job: dict[str, Any]) -> list[str]:
        runtime = self.runtimes[job["spec"]["runtimeRef"]["name"]]
        nnodes = job["spec"].get("trainer", {}).get("numNodes", 1)
        return [self._make_pod(job, runtime, rank) for rank in range(nnodes)]

    def _make_pod(self, job: dict[str, Any], runtime: dict[str, Any], rank: int) -> str:
        pod = node_pod(job, runtime, rank, f"{next(_POD_SUFFIX):05x}")
        pod["metadata"]["namespace"] = self.namespace
        self.pods.setdefault(job["metadata"]["name"], []).append(pod)
        self.core.create_namespaced_pod(self.namespace, pod)
        return pod["metadata"]["name"]

    # ------------------------------------------------------------------ play

    def _reconcile(self, job: dict[str, Any]) -> None:
        """Play ``job``; a job deleted meanwhile (or the API stopped) ends it quietly, as a
        controller stops reconciling what is gone."""
        try:
            self._play(job)
        except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError):
            if not self.stopping.is_set() and self._exists(job["metadata"]["name"]):
                raise
        finally:
            self.done.set()

    def _exists(self, name: str) -> bool:
        try:
            self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except kubernetes.client.ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def _play(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        if self.outcome == "suspend":
            self._condition(name, "Suspended", "Suspended", "TrainJob is suspended")
            return
        pods = self._make_pods(job)
        n = len(pods)
        if self.outcome in PENDING:
            status, event = PENDING[self.outcome]
            for pod in pods:
                self._pod_status(pod, status)
                self._event(pod, "Pod", "Warning", *event)
            self._jobs_status(name, active=n)
            return
        self._jobs_status(name, active=n, ready=n)
        rank0 = pods[0]
        for step in range(3):
            self._log(name, rank0, f"step {step} loss {1.0 / (step + 1):.3f}")
            time.sleep(self.step_s)
        if self.outcome == "evict-replace":
            rank0 = self._evict_and_replace(job, rank0)
        if self.outcome in ("succeed", "evict-replace"):
            self._log(name, rank0, "saved autoencoder.pt")
            time.sleep(self.step_s)
            for pod in [rank0, *pods[1:]]:
                self._pod_status(pod, terminated("node", "Succeeded", 0, "Completed"))
            self._jobs_status(name, succeeded=1)
            self._condition(name, "Complete", "AllJobsCompleted", "jobset completed successfully")
        elif self.outcome == "fail":
            self._fail(name, pods)
        elif self.outcome == "deadline":
            self._condition(
                name, "Failed", "DeadlineExceeded", "TrainJob exceeded its active deadline"
            )
            for pod in pods:  # the JobSet is deleted: its Job and pods go
                self.core.delete_namespaced_pod(pod, self.namespace)
                self.api.logs.pop(pod, None)

    def _evict_and_replace(self, job: dict[str, Any], pod: str) -> str:
        """The kubelet evicts rank 0; the Job controller makes a new pod for the index."""
        self._pod_status(pod, evicted("node"))
        self._event(pod, "Pod", "Warning", "Evicted", EVICTION)
        time.sleep(self.step_s)
        runtime = self.runtimes[job["spec"]["runtimeRef"]["name"]]
        new = self._make_pod(job, runtime, 0)
        self._log(job["metadata"]["name"], new, "resumed from checkpoint step 2")
        time.sleep(self.step_s)
        return new

    def _fail(self, name: str, pods: list[str]) -> None:
        """Rank 0 exits 1; OnFailure restarts it in place until the Job's backoffLimit, then
        the Job fails (its pods are terminated), and with it the JobSet and the TrainJob."""
        rank0 = pods[0]
        self._log(name, rank0, "Traceback (most recent call last):")
        self._log(name, rank0, "RuntimeError: CUDA out of memory (simulated)")
        crashed = {"terminated": {"exitCode": 1, "reason": "Error"}}
        waiting = {
            "reason": "CrashLoopBackOff",
            "message": "back-off 10s restarting failed container",
        }
        self._pod_status(
            rank0,
            {
                "phase": "Running",
                "containerStatuses": [
                    container_status("node", waiting=waiting, restarts=1, last=crashed)
                ],
            },
        )
        self._event(
            rank0,
            "Pod",
            "Warning",
            "BackOff",
            f"Back-off restarting failed container node in pod {rank0}",
        )
        time.sleep(self.step_s)
        for pod in pods:
            self._pod_status(pod, terminated("node", "Failed", 1, "Error", restarts=6))
        self._event(
            f"{name}-node-0",
            "Job",
            "Warning",
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        )
        self._jobs_status(name, failed=1)
        self._condition(
            name, "Failed", "FailedJobs", "jobset failed due to one or more job failures"
        )


def serve_trainer(api: KubeApi) -> Admission:
    """Install the TrainJob admission chain with the torch-distributed runtime on ``api``."""
    admission = Admission(api, {"torch-distributed": TORCH_DISTRIBUTED})
    admission.install()
    return admission
