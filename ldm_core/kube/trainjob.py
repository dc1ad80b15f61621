"""A training stage as a Kubeflow Trainer v2 ``TrainJob`` on the ``torch-distributed`` runtime.

Training Operator v1 (PyTorchJob, :mod:`ldm_core.kube.pytorchjob`) is in maintenance; new
Kubeflow releases ship Trainer v2. This launcher runs the same :class:`TrainingTask` with
the same semantics: a deterministic name that a restarted component adopts (same spec hash)
or refuses (another spec), a failure reported with the rank-0 pod's last log lines and the
events, deletion (foreground) on timeout, on a pod that cannot start for
``pending_timeout_s`` and on SIGTERM, and an ownerReference to the launcher's pod.

How Trainer v2 runs it (kubeflow/trainer at 8c0f505, the commit of the CRD in tests/crds):

- the TrainJob names a runtime (``spec.runtimeRef``); the controller renders the runtime's
  JobSet template with the TrainJob's ``spec.trainer`` (image, command, env, numNodes,
  resourcesPerNode) and its ``spec.runtimePatches`` (a strategic merge patch, keyed by
  ``manager``, of the pod fields the CRD lists: nodeSelector, tolerations, volumes,
  securityContext, serviceAccountName, imagePullSecrets, terminationGracePeriodSeconds, and a
  container's volumeMounts and securityContext), and creates a JobSet of the same name;
- ``torch-distributed`` has one replicated Job named ``node`` whose container is ``node``; the
  torch plugin sets ``PET_NNODES``, ``PET_NPROC_PER_NODE`` (``numProcPerNode``),
  ``PET_NODE_RANK`` (the pod's completion index), ``PET_MASTER_ADDR`` (``<name>-node-0-0.<name>``)
  and ``PET_MASTER_PORT`` (29500) and runs the command as given: ``torchrun -m ldm_core.cli ...``
  takes its rendezvous from those, exactly as in a PyTorchJob (the webhook refuses a TrainJob
  that sets them itself);
- status: the controller copies the JobSet's terminal conditions as ``Complete``
  (``AllJobsCompleted``) or ``Failed`` (``FailedJobs``, ``ReachedMaxRestarts``...), adds
  ``Failed``/``DeadlineExceeded`` past ``activeDeadlineSeconds`` and ``Suspended`` while
  suspended (Kueue queues a job that way), and mirrors the child Jobs in ``jobsStatus``. A
  running TrainJob has no condition at all: no status at all for ``start_timeout_s`` means no
  controller (or a JobSet it could not create: the events say which);
- pods are the JobSet's: labels ``jobset.sigs.k8s.io/jobset-name=<name>``,
  ``jobset.sigs.k8s.io/replicatedjob-name=node`` and ``batch.kubernetes.io/job-completion-index``
  (the node rank); JobSet defaults their restartPolicy to OnFailure and the Job retries up to
  its backoffLimit, so an evicted pod is replaced and only the conditions end the job.

Pod sizing is :class:`~ldm_core.kube.pytorchjob.PyTorchJobSettings`, and the pod is built by
the same function as the PyTorchJob's, then expressed in those fields (:func:`build_trainjob`);
a pod field the TrainJob cannot carry is an error, not silently dropped.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import kubernetes

from ldm_core.kube.client import KubeConfigError, current_namespace
from ldm_core.kube.client import api_client as make_api_client
from ldm_core.kube.diagnostics import log_tail, pod_state, recent_events
from ldm_core.kube.errors import ApiCall, call_api
from ldm_core.kube.follow import JobState, follow_job
from ldm_core.kube.ownership import delete_on_sigterm, launcher_owner_reference
from ldm_core.kube.podlog import PodLogFollower
from ldm_core.kube.pytorchjob import (
    SPEC_HASH_ANNOTATION,
    PyTorchJobSettings,
    adoption,
    conditions,
    pod_template,
    spec_hash,
    stored_spec_hash,
    true_condition,
)
from ldm_core.kube.resources import CustomObjects, CustomResource, api_served
from ldm_core.launcher import LaunchError, TrainingTask

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RESOURCE = CustomResource(GROUP, VERSION, PLURAL, KIND)
RUNTIME = "torch-distributed"
"""The ClusterTrainingRuntime Kubeflow Trainer installs for PyTorch (manifests/base/runtimes)."""
NODE = "node"
"""Name of the runtime's replicated Job and of its training container (trainer constants.Node)."""
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
RANK_LABEL = "batch.kubernetes.io/job-completion-index"
PATCH_MANAGER = "brain-ldm.kubeflow.org/launcher"
"""``runtimePatches[].manager``: a domain-prefixed path, as the Trainer webhook requires."""
RESERVED_ENV = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)
"""Set by the torch plugin; the Trainer webhook refuses a TrainJob whose trainer.env has them."""
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT")
"""Keys of the S3 Secret passed to the training container (``spec.trainer.env`` has no
``envFrom``): the credentials are required, as ``envFrom`` would make the Secret; the
endpoint may be absent (then the storage config names it)."""
MAX_NAME = 46
"""JobSet refuses a JobSet whose pod names ``<name>-node-0-<rank>-xxxxx`` would pass 63
characters; 46 leaves room for three-digit node ranks."""

RBAC_RULES: list[tuple[str, str, tuple[str, ...]]] = [
    (GROUP, PLURAL, ("create", "delete", "get")),
    ("", "pods", ("get", "list")),
    ("", "pods/log", ("get",)),
    ("", "events", ("list",)),
]
"""Every (apiGroup, resource, verbs) this module calls; the Role in manifests/ must grant
exactly these (a test records the calls made against an API server and compares)."""

_POD_PATCH_FIELDS = (
    "nodeSelector",
    "tolerations",
    "volumes",
    "securityContext",
    "serviceAccountName",
    "imagePullSecrets",
    "terminationGracePeriodSeconds",
)
"""Pod fields of the PyTorchJob pod that ``runtimePatches`` carries as they are."""
_NOT_CARRIED = {
    "automountServiceAccountToken": "the training ServiceAccount sets it false",
    "enableServiceLinks": "only adds Service variables to the environment",
}
"""Pod fields the TrainJob cannot set, and why losing them is harmless."""
_CONTAINER_NOT_CARRIED = {
    "name": "the runtime's container is 'node'",
    "workingDir": "every path in the command is absolute; the image's WORKDIR is /tmp",
    "imagePullPolicy": "Kubernetes defaults a tagged image to IfNotPresent",
    "ports": "the torch plugin adds the rendezvous port 29500",
}
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# --------------------------------------------------------------------------- build


def build_trainjob(task: TrainingTask, settings: PyTorchJobSettings) -> dict[str, Any]:
    """The TrainJob for ``task``: ``nnodes`` pods of ``nproc_per_node`` processes each, sized
    and secured like the PyTorchJob's pods."""
    if task.nnodes < 1 or task.nproc_per_node < 1:
        raise LaunchError(
            f"{task.name}: nnodes and nproc_per_node must be >= 1, "
            f"got {task.nnodes} and {task.nproc_per_node}"
        )
    if not _DNS1035.match(task.name) or len(task.name) > MAX_NAME:
        raise LaunchError(
            f"TrainJob name {task.name!r} is not a DNS-1035 label of at most {MAX_NAME} "
            "characters (JobSet derives pod names <name>-node-0-<rank>-xxxxx from it)"
        )
    if not settings.image:
        raise LaunchError(f"{task.name}: no training image configured")
    reserved = sorted(set(RESERVED_ENV) & {*task.env, *settings.env})
    if reserved:
        raise LaunchError(
            f"{task.name}: env {', '.join(reserved)} is set by the Trainer's torch runtime; "
            "remove it from the task's environment"
        )
    pod = pod_template(task, settings)
    trainer, container_patch = _trainer(pod, settings.s3_secret)
    pod_patch = _pod_patch(pod["spec"])
    pod_patch["containers"] = [{"name": NODE, **container_patch}]
    patch = {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": NODE,
                            "template": {
                                "spec": {
                                    "template": {"metadata": pod["metadata"], "spec": pod_patch}
                                }
                            },
                        }
                    ]
                }
            }
        },
    }
    job: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": task.name, "labels": dict(pod["metadata"]["labels"])},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": RUNTIME},
            "trainer": {**trainer, "numNodes": task.nnodes, "numProcPerNode": task.nproc_per_node},
            "runtimePatches": [patch],
            "activeDeadlineSeconds": settings.active_deadline_s,
        },
    }
    if settings.namespace:
        job["metadata"]["namespace"] = settings.namespace
    job["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: spec_hash(job)}
    return job


def _trainer(pod: Mapping[str, Any], s3_secret: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split the pod's one container into ``spec.trainer`` and the container's patch."""
    (container,) = pod["spec"]["containers"]
    env = list(container.get("env", []))
    for source in container.get("envFrom", []):
        if source.get("secretRef", {}).get("name") != s3_secret or not s3_secret:
            raise LaunchError(f"TrainJob: envFrom {source} cannot be carried (trainer.env only)")
        env += [
            {
                "name": key,
                "valueFrom": {
                    "secretKeyRef": {
                        "name": s3_secret,
                        "key": key,
                        **({"optional": True} if key == "S3_ENDPOINT" else {}),
                    }
                },
            }
            for key in S3_SECRET_KEYS
        ]
    trainer = {
        "image": container["image"],
        "command": list(container["command"]),
        "env": env,
        "resourcesPerNode": container["resources"],
    }
    patch = {k: container[k] for k in ("securityContext", "volumeMounts") if k in container}
    carried = {"image", "command", "env", "envFrom", "resources", *patch}
    _refuse_uncarried("container", set(container) - carried - set(_CONTAINER_NOT_CARRIED))
    return trainer, patch


def _pod_patch(spec: Mapping[str, Any]) -> dict[str, Any]:
    _refuse_uncarried("pod", set(spec) - {*_POD_PATCH_FIELDS, *_NOT_CARRIED, "containers"})
    return {k: spec[k] for k in _POD_PATCH_FIELDS if k in spec}


def _refuse_uncarried(where: str, fields: set[str]) -> None:
    if fields:
        raise LaunchError(
            f"TrainJob: {where} field(s) {', '.join(sorted(fields))} cannot be set through "
            "spec.trainer or spec.runtimePatches (trainer.kubeflow.org/v1alpha1); set them in "
            f"the {RUNTIME} ClusterTrainingRuntime or use backend=kubeflow (PyTorchJob)"
        )


# --------------------------------------------------------------------------- status (pure)


def _progress(job: Mapping[str, Any]) -> str:
    """A progress line: Suspended while queued, else the child Jobs' pod counts."""
    suspended = true_condition(job, "Suspended")
    if suspended:
        return f"Suspended ({suspended.get('reason', '')}: {suspended.get('message', '')})"
    lines = []
    for js in (job.get("status") or {}).get("jobsStatus") or []:
        counts = ", ".join(
            f"{js.get(k, 0)} {k}" for k in ("active", "ready", "succeeded", "failed")
        )
        lines.append(f"{js.get('name')}: {counts}")
    return "; ".join(lines)


def job_state(
    job: Mapping[str, Any],
    pods: list[Any],
    elapsed_s: float,
    start_timeout_s: float,
    timeout_s: float,
) -> JobState:
    """Decide from one observation of the TrainJob and its pods; success only ever comes
    from a ``Complete`` condition whose status is True."""
    if true_condition(job, "Complete"):
        return JobState("succeeded", "Complete")
    failed = true_condition(job, "Failed")
    if failed:
        reason = f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}"
        return JobState("failed", reason.rstrip(": "))
    started = bool(conditions(job) or (job.get("status") or {}).get("jobsStatus") or pods)
    if not started and elapsed_s > start_timeout_s:
        return JobState(
            "no-operator",
            f"got no status in {start_timeout_s:.0f}s: is Kubeflow Trainer (with JobSet) "
            f"installed, with the {RUNTIME} ClusterTrainingRuntime, and could it create the "
            "JobSet (see the events)?",
        )
    if elapsed_s > timeout_s:
        return JobState("timeout", f"no result after {timeout_s:.0f}s (timeout)")
    return JobState("running", _progress(job))


def rank0(pods: list[Any]) -> Any | None:
    """The pod running node rank 0 (the one whose log shows progress); a replacement pod
    (after an eviction) is preferred over the failed one it replaces."""
    candidates = [
        p
        for p in pods
        if (p.metadata.labels or {}).get(REPLICATED_JOB_LABEL) == NODE
        and (p.metadata.labels or {}).get(RANK_LABEL) == "0"
    ]
    live = [p for p in candidates if not (p.status and p.status.phase == "Failed")]
    return (live or candidates or [None])[0]


def trainjob_api_served(namespace: str = "") -> tuple[bool, str]:
    """Whether the cluster of the current credentials serves TrainJobs (Kubeflow Trainer v2
    is installed), and why it seems so; never raises."""
    try:
        client = make_api_client()
    except KubeConfigError as err:
        return False, str(err)
    return api_served(client, RESOURCE, namespace or current_namespace())


# --------------------------------------------------------------------------- launcher


class TrainJobLauncher:
    """Runs a :class:`TrainingTask` as a TrainJob and waits for its outcome.

    Args:
        settings: how the training pods look on this cluster (the PyTorchJob launcher's).
        api_client: the API to use; default: the pod's service account or the kubeconfig.
        out: where the rank-0 pod's log is copied (default: stdout, the component's log).
        clock: monotonic seconds, for deadlines (tests pass a fake one).
        sleep: waits between polls (tests pass one that advances their clock).
    """

    def __init__(
        self,
        settings: PyTorchJobSettings,
        api_client: kubernetes.client.ApiClient | None = None,
        out: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if api_client is None:
            api_client = make_api_client()
        self.settings = settings
        self.namespace = settings.namespace or current_namespace()
        self.jobs = CustomObjects(api_client, RESOURCE, self.namespace, LaunchError)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.host = str(api_client.configuration.host)
        self.out = out or sys.stdout
        self.clock, self.sleep = clock, sleep

    def _what(self, name: str) -> str:
        return f"TrainJob {self.namespace}/{name}"

    def run(self, task: TrainingTask) -> None:
        """Create (or adopt) the TrainJob, follow it, and return only when it is Complete."""
        body = build_trainjob(task, self.settings)
        name = task.name
        want_hash = body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        job = self.jobs.get(name)
        decision = adoption(job, want_hash)
        if decision == "conflict":
            raise LaunchError(
                f"a different {self._what(name)} already exists (spec hash "
                f"{stored_spec_hash(job or {})} != {want_hash}); it was not started for "
                "this task, so it is left alone: delete it or use another run id"
            )
        with delete_on_sigterm(self._what(name), lambda: self.jobs.delete(name)):
            if decision == "replace":
                log.warning("%s failed in an earlier attempt; starting it again", self._what(name))
                self.jobs.delete(name)
                self._wait_deleted(name, timeout_s=max(60.0, 10 * self.settings.poll_s))
            if decision == "adopt":
                log.info("adopting existing %s (%s)", self._what(name), _progress(job or {}))
            else:
                self._create(body)
                log.info(
                    "created %s on runtime %s: %d node(s) x %d process(es), image %s",
                    self._what(name),
                    RUNTIME,
                    task.nnodes,
                    task.nproc_per_node,
                    self.settings.image,
                )
            self._follow(name)

    # ------------------------------------------------------------------ API calls

    def _create(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        owner = launcher_owner_reference(self.core, self.namespace, self.host)
        if owner is not None:
            # Deleted by the garbage collector with the launcher's pod, however it ended
            # (and the JobSet and its pods with it: the TrainJob owns them).
            body = {**body, "metadata": {**body["metadata"], "ownerReferences": [owner]}}
        if self.jobs.create(body, exist_ok=True) is None:
            log.info("%s appeared concurrently; adopting it", self._what(name))
        if self.jobs.get(name) is None:
            raise LaunchError(f"{self._what(name)} vanished right after creation")

    def _wait_deleted(self, name: str, timeout_s: float) -> None:
        deadline = self.clock() + timeout_s
        while self.jobs.get(name) is not None:
            if self.clock() > deadline:
                raise LaunchError(
                    f"{self._what(name)} is still there {timeout_s:.0f}s after deletion "
                    "(finalizers?); delete it by hand and retry"
                )
            self.sleep(min(self.settings.poll_s, 2.0))

    def _pods(self, name: str) -> list[Any]:
        selector = f"{JOBSET_LABEL}={name}"
        pods = call_api(
            ApiCall("list", "pods", self.namespace),
            lambda: self.core.list_namespaced_pod(self.namespace, label_selector=selector),
            host=self.host,
            error=LaunchError,
        ).items
        # Apply the selector here too: not every API server (or emulator) honours it.
        return [p for p in pods if (p.metadata.labels or {}).get(JOBSET_LABEL) == name]

    def _observe(self, name: str, failures: int) -> tuple[dict[str, Any], list[Any]] | None:
        """One look at the TrainJob and its pods; None after an API blip (raised once it
        is the sixth in a row: not a blip)."""
        try:
            job, pods = self.jobs.get(name), self._pods(name)
        except LaunchError:
            if failures >= 5:
                raise
            log.warning("API error while following %s; retrying", name, exc_info=True)
            return None
        if job is None:
            raise LaunchError(f"{self._what(name)} was deleted by someone else")
        return job, pods

    # ------------------------------------------------------------------ follow

    def _follow(self, name: str) -> None:
        """Poll the TrainJob and its pods until an outcome; stream rank 0's log meanwhile."""
        s = self.settings
        follow_job(
            self._what(name),
            observe=lambda failures: self._observe(name, failures),
            state_of=lambda job, pods, elapsed: job_state(
                job, pods, elapsed, s.start_timeout_s, s.wait_s
            ),
            refollow=self._refollow,
            conclude=lambda state, follower, pods: self._conclude(name, state, follower, pods),
            poll_s=s.poll_s,
            pending_timeout_s=s.pending_timeout_s,
            clock=self.clock,
            sleep=self.sleep,
            log=log,
            waiting="waiting for pods",
        )

    def _refollow(self, follower: PodLogFollower | None, pods: list[Any]) -> PodLogFollower | None:
        """Keep following rank 0's pod; when the Job replaced it (an eviction), finish the
        old pod's log and follow the new pod."""
        pod = rank0(pods)
        if follower is not None and pod is not None and follower.pod != pod.metadata.name:
            follower.finish(timeout_s=max(2.0, 2 * self.settings.log_reconnect_s))
            follower = None
        return follower or self._follower(pod)

    def _follower(self, pod: Any | None) -> PodLogFollower | None:
        """Start copying ``pod``'s log once it runs; None until then."""
        if pod is None or (pod.status.phase if pod.status else None) not in (
            "Running",
            "Succeeded",
            "Failed",
        ):
            return None
        s = self.settings
        follower = PodLogFollower(
            self.core,
            self.namespace,
            pod.metadata.name,
            NODE,
            self.out,
            s.tail_lines,
            s.log_reconnect_s,
        )
        follower.start()
        return follower

    def _conclude(
        self, name: str, state: JobState, follower: PodLogFollower | None, pods: list[Any]
    ) -> None:
        """Act on an outcome: return on success; otherwise delete what should not run on
        (an overdue, blocked or uncontrolled job) and raise with the evidence."""
        if state.outcome in ("succeeded", "failed") and follower is not None:
            # Print what the pod wrote last before the outcome is reported.
            follower.finish(timeout_s=max(2.0, 2 * self.settings.log_reconnect_s))
        if state.outcome == "succeeded":
            log.info("%s is Complete", self._what(name))
            return
        err = self._failure(name, state.detail, follower, pods)
        if state.outcome == "failed":
            raise err
        self.jobs.delete(name)
        raise LaunchError(f"{err}\nThe TrainJob was deleted.")

    def _failure(
        self, name: str, reason: str, follower: PodLogFollower | None, pods: list[Any]
    ) -> LaunchError:
        pod = rank0(pods)
        s = self.settings
        lines = (
            log_tail(self.core, self.namespace, self.host, pod.metadata.name, NODE, s.tail_lines)
            if pod is not None
            else []
        )
        if not lines and follower is not None:  # pod already gone
            lines = list(follower.tail)
        parts = [f"{self._what(name)} failed: {reason}"]
        if pod is not None:
            parts.append(f"rank-0 pod {pod.metadata.name}: {pod_state(pod, NODE)}")
        parts.append(
            "last log lines of the rank-0 pod:\n"
            + ("\n".join(lines) if lines else "(none captured)")
        )
        # The TrainJob, its JobSet (same name), the JobSet's Job and the pods.
        names = [name, f"{name}-{NODE}-0", *(p.metadata.name for p in pods)]
        events = recent_events(self.core, self.namespace, self.host, names)
        parts.append("recent events:\n" + ("\n".join(events) if events else "(none)"))
        return LaunchError("\n".join(parts))
