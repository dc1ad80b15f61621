"""Kubeflow Trainer v2 on the emulated Kubernetes API: what a TrainJob launcher can observe.

:class:`Admission` adds the API server's handling of a TrainJob create and the Trainer's
admission webhook, and a :class:`FakeTrainer` thread plays the Trainer controller with the
JobSet controller, the Job controller and the kubelet under it, for every TrainJob that
appears. Two releases of the TrainJob API are played, as :class:`Release` says:

- ``v2.1``: kubeflow/trainer v2.1.0, the Trainer Kubeflow 1.11.0 installs (its CRD and its
  ``torch-distributed`` ClusterTrainingRuntime are copied in tests/crds/trainer-v2.1.0/);
  the pod is shaped by ``spec.podTemplateOverrides`` and there is no deadline field;
- ``v2.2``: kubeflow/trainer 8c0f505 (master; v2.2 and v2.3 have the same TrainJob API,
  tests/crds/trainer.kubeflow.org_trainjobs.yaml): ``spec.runtimePatches`` and
  ``spec.activeDeadlineSeconds``.

What the API server does with a create (k8s.io/apiserver handlers/create.go, the CRD
handler of apiextensions-apiserver): fields the release's CRD does not declare are refused
with 400 BadRequest ``TrainJob in version "v1alpha1" cannot be handled as a TrainJob:
strict decoding error: unknown field "spec.runtimePatches"`` under ``fieldValidation=Strict``
and silently pruned otherwise (:func:`tests.harness.crdcheck.prune`); then the mutating
webhook (v2.2: the defaulter stamps ``runtimePatches[].time``), the schema (422 Invalid),
the validating webhook (403 Forbidden, ``admission webhook ... denied the request``:
controller-runtime's ``Denied`` for a plain error); ``dryRun=All`` stops there and stores
nothing; a stored object gets its ``uid`` and ``creationTimestamp``
(``rest.FillObjectMetaSystemFields``), and the controller acts only on stored objects.

The validating webhook (pkg/webhooks/trainjob_webhook.go) refuses a runtime that does not
exist (runtime/core/clustertrainingruntime.go ``ValidateObjects``), reserved ``PET_*`` env
in ``spec.trainer.env`` (plugins/torch/torch.go ``Validate``), and (plugins/jobset/jobset.go
``Validate``) a patch or override of a replicated Job or container the runtime lacks or of
the ``node`` container's env; on v2.2 also a ``runtimePatches[].manager`` that is not a
domain-prefixed path.

Pods (jobset ``GenPodName`` + the Job controller's suffix): ``<name>-node-0-<rank>-xxxxx``,
labelled with the JobSet name, the replicated Job name and the completion index (the node
rank). Their spec is the runtime's pod template strategically merged (k8s.io/api core/v1
patch keys) with the TrainJob's overrides (v2.1: runtime/core/trainingruntime.go
``mergePodTemplateOverrides``, pod metadata labels and annotations and the override's pod
spec; v2.2: ``mergeRuntimePatches``), then ``spec.trainer`` image, command, env and
resourcesPerNode on the ``node`` container (plugins/jobset/builder.go ``Trainer``), the torch
plugin's ``PET_*`` env and port 29500, and restartPolicy OnFailure (jobset v0.10.1
pkg/webhooks/jobset_webhook.go ``Default``). A pod the API server refuses (a ResourceQuota, a
missing ServiceAccount, Pod Security admission) is never made: the Job controller records a
Warning ``FailedCreate`` "Error creating: <the API server's message>" on the JobSet's Job
``<name>-node-0`` (kubernetes pkg/controller/controller_utils.go ``createPods``) and keeps
retrying, and nothing else changes: the TrainJob has no condition and its Job no pods.

Status (trainjob_controller.go, plugins/jobset ``Status``): no condition while running,
``jobsStatus`` mirrors the Job's pod counts, the JobSet's terminal condition is copied as
``Complete``/``AllJobsCompleted`` or ``Failed``/``FailedJobs``, a deadline (v2.2) gives
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
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import kmock
import kubernetes
import urllib3
import yaml

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
NODE = "node"
"""The runtime's replicated Job and its training container (trainer constants.Node)."""
WEBHOOK = "validator.trainjob.trainer.kubeflow.org"

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
TORCH_DISTRIBUTED_V2_1: dict[str, Any] = yaml.safe_load(
    (crdcheck.CRD_DIR / "trainer-v2.1.0" / "runtimes" / "torch_distributed.yaml").read_text()
)["spec"]
"""spec of the torch-distributed ClusterTrainingRuntime Trainer v2.1.0 installs
(``mlPolicy.torch.numProcPerNode: auto``, image pytorch/pytorch:2.7.1)."""
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
    "volumeMounts": "mountPath",
    "env": "name",
    "imagePullSecrets": "name",
    "schedulingGates": "name",
    "ports": "containerPort",
}
"""List fields a strategic merge patch merges, by their patchMergeKey in k8s.io/api core/v1
types.go (volumeMounts by mountPath); every other list (tolerations) is replaced."""
_POD_SUFFIX = itertools.count(0xA0000)
"""The Job controller's random pod-name suffix; a counter keeps names unique across tests."""


@dataclass(frozen=True)
class Release:
    """One release of Kubeflow Trainer, as far as a TrainJob of ours can tell them apart."""

    api: str
    """``v2.1`` or ``v2.2``: which TrainJob fields it has."""
    source: str
    """Where it is modelled from."""
    crds: str
    """The subfolder of tests/crds with its TrainJob CRD ("" for the top level)."""
    runtime: dict[str, Any]
    """The spec of the torch-distributed ClusterTrainingRuntime it installs."""


V2_1 = Release("v2.1", "kubeflow/trainer v2.1.0", "trainer-v2.1.0", TORCH_DISTRIBUTED_V2_1)
V2_2 = Release("v2.2", "kubeflow/trainer 8c0f505", "", TORCH_DISTRIBUTED)
RELEASES = {r.api: r for r in (V2_1, V2_2)}


# --------------------------------------------------------------------------- admission


class Admission:
    """The TrainJob admission chain, as reactions on the emulator (install with :meth:`install`).

    Args:
        api: the emulated API server.
        runtimes: ClusterTrainingRuntime name -> spec installed on the cluster.
        release: which Trainer (its CRD and webhook).
    """

    def __init__(
        self, api: KubeApi, runtimes: dict[str, dict[str, Any]], release: Release = V2_2
    ) -> None:
        self.api, self.runtimes, self.release = api, runtimes, release
        self.refused: list[kmock.Request] = []
        """The creates this chain refused (never stored)."""

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
        obj, unknown = crdcheck.prune(request.data, self.release.crds)
        if unknown and request.params.get("fieldValidation") == "Strict":
            fields = ", ".join(f'unknown field "{path}"' for path in unknown)
            return self._refuse(
                request,
                400,
                "BadRequest",
                f'{KIND} in version "{VERSION}" cannot be handled as a {KIND}: strict decoding '
                f"error: {fields}",
            )
        if self.release.api == "v2.2":
            for patch in obj.get("spec", {}).get("runtimePatches", []):
                patch.setdefault("time", stamp())  # the defaulter (mutating webhook)
        name = obj.get("metadata", {}).get("name")
        try:
            crdcheck.validate(obj, self.release.crds)
        except crdcheck.InvalidResource as err:
            return self._refuse(
                request, 422, "Invalid", f'TrainJob.{GROUP} "{name}" is invalid: {err}'
            )
        denied = self._validate(obj)
        if denied:
            message = f'admission webhook "{WEBHOOK}" denied the request: {denied}'
            return self._refuse(request, 403, "Forbidden", message)
        stored = self.api.emulator.objects[self._key(request)]
        stored.delete()
        if request.params.get("dryRun") == "All":
            return obj  # what would be stored; nothing is
        obj["metadata"]["uid"] = str(uuid.uuid4())
        obj["metadata"]["creationTimestamp"] = stamp().split(".")[0].rstrip("Z") + "Z"
        stored.create(obj)
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

    def _key(self, request: kmock.Request) -> tuple[Any, str, str]:
        meta = request.data.get("metadata", {})
        return (request.resource, request.namespace or meta.get("namespace"), meta.get("name"))

    def _refuse(self, request: kmock.Request, status: int, reason: str, message: str) -> Any:
        # The emulator stores a create before reactions run; a refused one never existed.
        self.api.emulator.objects[self._key(request)].delete()
        self.refused.append(request)
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
        if self.release.api == "v2.1":
            return _overrides_denied(spec, containers)
        return _patches_denied(spec, containers)


def _patches_denied(spec: dict[str, Any], containers: dict[str, set[str]]) -> str | None:
    """kubeflow/trainer 8c0f505 plugins/jobset/jobset.go ``Validate`` on runtimePatches."""
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
                if c.get("env") and c["name"] == NODE:
                    return "spec.runtimePatches: must not have envs for the node containers"
    return None


def _overrides_denied(spec: dict[str, Any], containers: dict[str, set[str]]) -> str | None:
    """kubeflow/trainer v2.1.0 plugins/jobset/jobset.go:124-150 ``Validate`` on
    podTemplateOverrides."""
    where = "spec.podTemplateOverrides: Invalid value: ..."
    for override in spec.get("podTemplateOverrides", []):
        for target in override["targetJobs"]:
            if target["name"] not in containers:
                return (
                    f"{where}: must not have targetJob that doesn't exist in the runtime job "
                    "template"
                )
            for c in override.get("spec", {}).get("containers", []):
                if c["name"] not in containers[target["name"]]:
                    return (
                        f"{where}: must not have container that doesn't exist in the runtime "
                        f"job {target['name']}"
                    )
                if c.get("env") and c["name"] == NODE:
                    return (
                        f"{where}: must not have envs for the dataset-initializer, "
                        "model-initializer, node containers"
                    )
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


def _upsert(items: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """trainer pkg/apply ``UpsertEnvVars``: replace by name, else append."""
    out = [dict(i) for i in items]
    for item in new:
        names = [i for i, o in enumerate(out) if o["name"] == item["name"]]
        if names:
            out[names[0]] = dict(item)
        else:
            out.append(dict(item))
    return out


def pod_template(job: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The ``node`` pod template of ``runtime`` after the TrainJob's overrides (v2.1) or
    patches (v2.2): the stored TrainJob has only the one its release knows."""
    spec = job["spec"]
    (rjob,) = runtime["template"]["spec"]["replicatedJobs"]
    template = copy.deepcopy(rjob["template"]["spec"]["template"])
    for override in spec.get("podTemplateOverrides", []):
        if not any(t["name"] == rjob["name"] for t in override["targetJobs"]):
            continue
        meta = override.get("metadata") or {}
        patch: dict[str, Any] = {}
        if meta.get("labels") or meta.get("annotations"):
            patch["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        if "spec" in override:
            patch["spec"] = override["spec"]
        template = strategic_merge(template, patch)
    for patch in spec.get("runtimePatches", []):
        for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if rj["name"] == rjob["name"]:
                template = strategic_merge(template, rj["template"]["spec"]["template"])
    return template


def node_pod(
    job: dict[str, Any], runtime: dict[str, Any], rank: int, suffix: str
) -> dict[str, Any]:
    """The pod the Trainer, JobSet and Job controllers make for node ``rank`` of ``job``."""
    name, spec = job["metadata"]["name"], job["spec"]
    template = pod_template(job, runtime)
    trainer = spec.get("trainer", {})
    nnodes = trainer.get("numNodes", runtime["mlPolicy"]["numNodes"])
    nproc = trainer.get(
        "numProcPerNode", runtime["mlPolicy"]["torch"].get("numProcPerNode", "auto")
    )
    pet = {
        "PET_NNODES": str(nnodes),
        "PET_NPROC_PER_NODE": str(nproc),
        "PET_NODE_RANK": str(rank),  # a fieldRef to the completion index, resolved
        "PET_MASTER_ADDR": f"{name}-{NODE}-0-0.{name}",
        "PET_MASTER_PORT": str(MASTER_PORT),
    }
    for c in template["spec"]["containers"]:
        if c["name"] != NODE:
            continue
        for k in ("image", "command", "args"):
            if k in trainer:
                c[k] = trainer[k]
        if "resourcesPerNode" in trainer:
            c["resources"] = trainer["resourcesPerNode"]
        env = _upsert(c.get("env", []), trainer.get("env", []))
        c["env"] = _upsert(env, [{"name": k, "value": v} for k, v in pet.items()])
        c["ports"] = [{"containerPort": MASTER_PORT}]
    template["spec"].setdefault("restartPolicy", "OnFailure")
    labels = {
        **template.get("metadata", {}).get("labels", {}),
        "jobset.sigs.k8s.io/jobset-name": name,
        "jobset.sigs.k8s.io/replicatedjob-name": NODE,
        "jobset.sigs.k8s.io/job-index": "0",
        "batch.kubernetes.io/job-name": f"{name}-{NODE}-0",
        "batch.kubernetes.io/job-completion-index": str(rank),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-{NODE}-0-{rank}-{suffix}",
            "labels": labels,
            "annotations": {
                **template.get("metadata", {}).get("annotations", {}),
                "batch.kubernetes.io/job-completion-index": str(rank),
            },
        },
        "spec": template["spec"],
        "status": {"phase": "Running"},
    }


PENDING = pending(NODE)
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
                # Only what the API server stored (it has a uid), each object once.
                uid = job["metadata"].get("uid")
                if (
                    uid
                    and uid not in self.seen
                    and self.outcome != "absent"
                    and not job.get("status")
                ):
                    self.seen.add(uid)
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
        """The node pods the Job controller could create (a refused one is not there)."""
        runtime = self.runtimes[job["spec"]["runtimeRef"]["name"]]
        nnodes = job["spec"].get("trainer", {}).get("numNodes", 1)
        made = [self._make_pod(job, runtime, rank) for rank in range(nnodes)]
        return [pod for pod in made if pod]

    def _make_pod(self, job: dict[str, Any], runtime: dict[str, Any], rank: int) -> str:
        """Create one node pod, or record the Job controller's FailedCreate event on the
        JobSet's Job when the API server refuses it ("" then)."""
        name = job["metadata"]["name"]
        pod = node_pod(job, runtime, rank, f"{next(_POD_SUFFIX):05x}")
        pod["metadata"]["namespace"] = self.namespace
        self.pods.setdefault(name, []).append(pod)
        try:
            self.core.create_namespaced_pod(self.namespace, pod)
        except kubernetes.client.ApiException as err:
            if err.status not in (403, 422):
                raise
            message = json.loads(err.body)["message"]
            self._event(
                f"{name}-{NODE}-0", "Job", "Warning", "FailedCreate", f"Error creating: {message}"
            )
            return ""
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
        if not pods:  # the Job controller retries with a backoff; nothing else moves
            self._jobs_status(name)
            return
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
        assert new, "the replacement pod was refused"
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


def serve_trainer(api: KubeApi, release: Release = V2_2) -> Admission:
    """Install the TrainJob admission chain of ``release``, with its torch-distributed
    runtime, on ``api``."""
    admission = Admission(api, {"torch-distributed": release.runtime}, release)
    admission.install()
    return admission
