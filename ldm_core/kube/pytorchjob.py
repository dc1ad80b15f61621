"""The cluster backend of :mod:`ldm_core.launcher`: a training stage as a Kubeflow PyTorchJob.

The component that calls :meth:`PyTorchJobLauncher.run` behaves like a careful operator:

- the job name is deterministic (pipeline run + task), so a restarted component finds and
  adopts the job its previous attempt created instead of starting a second one;
- it follows the job's status conditions by polling (one GET per interval: cheap, and it
  survives API server restarts that break watch streams) and streams the master pod's log
  to its own stdout, where the pipeline UI shows it;
- a Failed job fails the task with the master pod's last log lines and the recent events in
  the error; so does an evicted pod, unless ``restartPolicy: ExitCode`` has the operator
  recreate it (an eviction exits 137, a retryable code: the job shows ``Restarting`` and goes
  on); success is only ever reported on a ``Succeeded`` condition whose status is True;
- a pod that cannot start (unschedulable, an unbound PVC, an image that does not pull, a
  missing Secret) fails the task after ``pending_timeout_s`` with the reason and what to
  change (:mod:`ldm_core.kube.pending`);
- past the deadline, or when no training operator ever picks the job up, or past the
  pending timeout, the job is deleted (foreground propagation: its pods go first) and the
  task fails; SIGTERM deletes it too, and it is owned by the launcher's pod
  (:mod:`ldm_core.kube.ownership`).

Every pod runs ``torchrun -m ldm_core.cli VERB ...`` with no rendezvous flags: torchrun reads
them from the ``PET_*`` variables the training operator sets (``PET_NNODES``,
``PET_NPROC_PER_NODE`` from ``spec.nprocPerNode``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
``PET_MASTER_PORT``), so the command line is the same on every replica and as ``LocalLauncher``'s.

What to do is decided by pure functions over what the API shows
(:func:`~ldm_core.kube.job_launcher.adoption` before starting, :func:`job_state` on every
poll); the launcher (:class:`~ldm_core.kube.job_launcher.JobLauncher`) only carries it out.
The clock and sleep are injected, and API failures read as the InferenceService rollout's do
(:mod:`ldm_core.kube.errors`).

Tolerated gaps of in-memory API servers (kmock): a create answered with an empty body is
re-read; nothing relies on resourceVersion, generation, PUT or label/field selectors being
honoured server-side (selectors are re-applied here).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ldm_core.config import ClusterConfig, Config, TrainingResources
from ldm_core.kube.client import KubeConfigError, current_namespace
from ldm_core.kube.client import api_client as make_api_client
from ldm_core.kube.job_launcher import (
    SPEC_HASH_ANNOTATION,
    JobLauncher,
    JobState,
    conditions,
    spec_hash,
    true_condition,
    true_conditions,
)
from ldm_core.kube.podlog import PodLogFollower
from ldm_core.kube.resources import CustomResource, api_served
from ldm_core.kube.security import RUN_AS, container_security_context, pod_security_context
from ldm_core.launcher import LaunchError, TrainingTask

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
RESOURCE = CustomResource(GROUP, VERSION, PLURAL, KIND)
CONTAINER = "pytorch"
"""The training operator only treats the container with this name as the training process."""
JOB_LABEL = "training.kubeflow.org/job-name"
REPLICA_LABEL = "training.kubeflow.org/replica-type"
MANAGED_BY = "ldm-core"
MAX_NAME = 52
"""Job names stay at or below 52 characters: the operator names each replica's pod and headless
Service ``<job>-worker-<i>``, and a Service name must be a DNS-1035 label of at most 63."""

RBAC_RULES: list[tuple[str, str, tuple[str, ...]]] = [
    (GROUP, PLURAL, ("create", "delete", "get")),
    ("", "pods", ("get", "list")),
    ("", "pods/log", ("get",)),
    ("", "events", ("list",)),
]
"""Every (apiGroup, resource, verbs) this module calls; the Role in manifests/ must grant
exactly these (a test records the calls made against an API server and compares)."""

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def job_name(run_id: str, task_name: str) -> str:
    """Deterministic PyTorchJob name for one task of one pipeline run.

    Readable prefix (task, then run) + 8 hex of the SHA-256 of both, so two runs never
    collide even when the readable part is truncated; a DNS-1035 label of at most
    :data:`MAX_NAME` characters.
    """
    digest = hashlib.sha256(f"{run_id}\0{task_name}".encode()).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9]+", "-", f"{task_name}-{run_id}".lower()).strip("-")
    if not slug or not slug[0].isalpha():
        slug = f"ldm-{slug}".rstrip("-")
    slug = slug[: MAX_NAME - len(digest) - 1].rstrip("-")
    return f"{slug}-{digest}"


_CLUSTER = ClusterConfig()


@dataclass
class PyTorchJobSettings:
    """How the training pods of one stage look on this cluster.

    Built from the run's config with :meth:`from_config` (``cluster`` section: the one source
    of truth); the defaults of the cluster-facing fields are ``ClusterConfig``'s, the rest
    are the launcher's own mechanics (polling, log streaming, restart policy).
    """

    image: str
    """The training image (``images/training``); carries ldm_core and torchrun."""
    namespace: str = ""
    """Where the job goes; empty = the component pod's own namespace."""
    image_pull_policy: str = _CLUSTER.image_pull_policy
    image_pull_secrets: list[str] = field(default_factory=list)
    service_account: str = _CLUSTER.service_account
    """Training pods never call the API; their token is not mounted either."""
    pvc_name: str = _CLUSTER.pvc_name
    workdir: str = "/workspace"
    """Mount path of the PVC; data and checkpoints live here, at the same path as in the
    component pod, so the task's arguments are valid paths in both."""
    s3_secret: str = ""
    """Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and S3_ENDPOINT for s3:// URIs,
    passed as envFrom so its values never appear in the job object; empty = none."""
    resources: TrainingResources = field(default_factory=lambda: ClusterConfig().train_autoencoder)
    """Per training process: a pod of ``nproc_per_node`` processes asks that many times
    each figure (one GPU per process)."""
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    priority_class: str = ""
    tmp_size: str = "8Gi"
    env: dict[str, str] = field(default_factory=dict)
    """Extra non-secret environment for every replica (added after the task's)."""
    master_port: int = 23456
    restart_policy: str = "ExitCode"
    """Restart on signals/preemption (exit code > 128), fail at once on an error in our code."""
    backoff_limit: int = 3
    active_deadline_s: int = _CLUSTER.run_timeout_s
    ttl_seconds_after_finished: int = 3600
    timeout_s: float | None = None
    """How long ``run`` waits for a result; None = active_deadline_s + start_timeout_s."""
    start_timeout_s: float = 600.0
    """A job that shows no status at all this long has no training operator: fail."""
    pending_timeout_s: float = _CLUSTER.pending_timeout_s
    """How long a pod may stay unable to start before the job is deleted and the task fails
    with the reason (``cluster.pending_timeout_s``)."""
    poll_s: float = 10.0
    log_reconnect_s: float = 5.0
    tail_lines: int = 40
    run_as_user: int = RUN_AS

    @property
    def wait_s(self) -> float:
        """How long ``run`` waits for a result: ``timeout_s``, else the job's deadline plus
        the time its pods may take to start."""
        return (
            self.timeout_s
            if self.timeout_s is not None
            else (self.active_deadline_s + self.start_timeout_s)
        )

    @classmethod
    def from_config(cls, cfg: Config, stage: str, workdir: str) -> PyTorchJobSettings:
        """The settings of training stage ``stage`` (``train_autoencoder`` or
        ``train_diffusion``) from ``cfg.cluster``, with the PVC mounted at ``workdir``."""
        c = cfg.cluster
        return cls(
            image=c.image,
            namespace=c.namespace,
            image_pull_policy=c.image_pull_policy,
            image_pull_secrets=list(c.image_pull_secrets),
            service_account=c.service_account,
            pvc_name=c.pvc_name,
            workdir=workdir,
            s3_secret=c.s3_secret,
            resources=getattr(c, stage),
            node_selector=dict(c.node_selector),
            tolerations=[t.to_k8s() for t in c.tolerations],
            priority_class=c.priority_class,
            active_deadline_s=c.run_timeout_s,
            pending_timeout_s=float(c.pending_timeout_s),
        )


# --------------------------------------------------------------------------- build


def build_pytorchjob(task: TrainingTask, settings: PyTorchJobSettings) -> dict[str, Any]:
    """The PyTorchJob for ``task``: one Master, ``nnodes - 1`` Workers, same pod template."""
    if task.nnodes < 1 or task.nproc_per_node < 1:
        raise LaunchError(
            f"{task.name}: nnodes and nproc_per_node must be >= 1, "
            f"got {task.nnodes} and {task.nproc_per_node}"
        )
    if not _DNS1035.match(task.name) or len(task.name) > MAX_NAME:
        raise LaunchError(
            f"job name {task.name!r} is not a DNS-1035 label of at most {MAX_NAME} characters; "
            "build it with ldm_core.kube.pytorchjob.job_name(run_id, task)"
        )
    if not settings.image:
        raise LaunchError(f"{task.name}: no training image configured")
    template = pod_template(task, settings)
    replicas: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": settings.restart_policy, "template": template}
    }
    if task.nnodes > 1:
        replicas["Worker"] = {
            "replicas": task.nnodes - 1,
            "restartPolicy": settings.restart_policy,
            "template": template,
        }
    job: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": task.name,
            "labels": _labels(task),
            "annotations": {},
        },
        "spec": {
            "nprocPerNode": str(task.nproc_per_node),
            "runPolicy": {
                # All: no pod (running or finished) outlives the job's completion.
                "cleanPodPolicy": "All",
                "backoffLimit": settings.backoff_limit,
                "activeDeadlineSeconds": settings.active_deadline_s,
                "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            },
            "pytorchReplicaSpecs": replicas,
        },
    }
    if settings.namespace:
        job["metadata"]["namespace"] = settings.namespace
    job["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = spec_hash(job)
    return job


def _labels(task: TrainingTask) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "brain-ldm",
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/part-of": "brain-ldm",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "brain-ldm.kubeflow.org/verb": task.verb,
    }


def pod_template(task: TrainingTask, s: PyTorchJobSettings) -> dict[str, Any]:
    """The pod every replica of ``task`` runs: ``torchrun`` over the task's command, the
    shared PVC at ``s.workdir``, the resources and scheduling of ``s``, locked down.

    Public because every training-job backend (PyTorchJob here, Trainer v2's TrainJob)
    runs the same pod; only the object around it differs.
    """
    env = {
        "PYTHONUNBUFFERED": "1",  # log lines reach the component as they are printed
        "HOME": "/tmp",  # read-only root filesystem: caches go to the /tmp emptyDir
        "XDG_CACHE_HOME": "/tmp/.cache",
        "MPLCONFIGDIR": "/tmp/.matplotlib",
        "NCCL_DEBUG": "WARN",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a dead peer fails the step, not a hang
        "LDM_JOB_NAME": task.name,
        **task.env,
        **s.env,
    }
    pod = s.resources.times(task.nproc_per_node)
    requests: dict[str, str] = {"cpu": pod.cpu, "memory": pod.memory}
    limits: dict[str, str] = {"memory": pod.memory}
    if pod.gpus:
        requests[s.gpu_resource] = limits[s.gpu_resource] = str(pod.gpus)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["torchrun", *task.command()],
        "workingDir": s.workdir,
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "ports": [{"name": "pytorchjob-port", "containerPort": s.master_port, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [
            {"name": "workdir", "mountPath": s.workdir},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": container_security_context(s.run_as_user),
    }
    if s.s3_secret:
        container["envFrom"] = [{"secretRef": {"name": s.s3_secret}}]
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,  # time to finish writing a checkpoint
        "securityContext": pod_security_context(s.run_as_user),
        "volumes": [
            {"name": "workdir", "persistentVolumeClaim": {"claimName": s.pvc_name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": pod.shm}},
            {"name": "tmp", "emptyDir": {"sizeLimit": s.tmp_size}},
        ],
    }
    if s.service_account:
        pod_spec["serviceAccountName"] = s.service_account
    if s.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in s.image_pull_secrets]
    if s.node_selector:
        pod_spec["nodeSelector"] = dict(s.node_selector)
    if s.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in s.tolerations]
    if s.priority_class:
        pod_spec["priorityClassName"] = s.priority_class
    return {
        "metadata": {
            "labels": _labels(task),
            # An Istio sidecar would intercept the rendezvous port and stall startup.
            "annotations": {"sidecar.istio.io/inject": "false"},
        },
        "spec": pod_spec,
    }


# --------------------------------------------------------------------------- status (pure)


def _latest(job: Mapping[str, Any]) -> str:
    """The newest true condition (type: reason), for progress lines."""
    held = true_conditions(job)
    if not held:
        return ""
    cond = held[-1]
    return f"{cond.get('type')}" + (f" ({cond['reason']})" if cond.get("reason") else "")


def job_state(
    job: Mapping[str, Any],
    pods: list[Any],
    elapsed_s: float,
    start_timeout_s: float,
    timeout_s: float,
    restart_policy: str = "Never",
) -> JobState:
    """Decide from one observation of the job and its pods; success only ever comes from a
    ``Succeeded`` condition.

    Under ``restart_policy`` ExitCode the training operator deletes and recreates a pod that
    exited with a retryable code (128 and above; an eviction's SIGKILL is 137) and marks the
    job ``Restarting``: an evicted pod is then not the end, the job's conditions decide.
    Under any other policy nothing recreates it, so the eviction fails the task at once."""
    if true_condition(job, "Succeeded"):
        return JobState("succeeded", "Succeeded")
    failed = true_condition(job, "Failed")
    if failed:
        reason = f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}"
        return JobState("failed", reason.rstrip(": "))
    evicted = [p for p in pods if _is_evicted(p)] if restart_policy != "ExitCode" else []
    if evicted:
        why = evicted[0].status.message or "no message"
        return JobState("evicted", f"pod {evicted[0].metadata.name} was evicted ({why})")
    if not conditions(job) and elapsed_s > start_timeout_s:
        return JobState(
            "no-operator",
            f"got no status in {start_timeout_s:.0f}s: is the Kubeflow training operator "
            "installed and watching this namespace?",
        )
    if elapsed_s > timeout_s:
        return JobState("timeout", f"no result after {timeout_s:.0f}s (timeout)")
    return JobState("running", _latest(job))


def _started(pod: Any) -> bool:
    return (pod.status.phase if pod.status else None) in ("Running", "Succeeded", "Failed")


def _is_evicted(pod: Any) -> bool:
    return bool(pod.status) and pod.status.phase == "Failed" and pod.status.reason == "Evicted"


def _master(pods: list[Any]) -> Any | None:
    for pod in pods:
        if (pod.metadata.labels or {}).get(REPLICA_LABEL, "").lower() == "master":
            return pod
    return None


def pytorchjob_api_served(namespace: str = "") -> tuple[bool, str]:
    """Whether the cluster of the current credentials serves PyTorchJobs (a training
    operator is installed), and why it seems so; never raises."""
    try:
        client = make_api_client()
    except KubeConfigError as err:
        return False, str(err)
    return api_served(client, RESOURCE, namespace or current_namespace())


# --------------------------------------------------------------------------- launcher


class PyTorchJobLauncher(JobLauncher):
    """Runs a :class:`TrainingTask` as a PyTorchJob and waits for its outcome (arguments:
    :class:`~ldm_core.kube.job_launcher.JobLauncher`)."""

    resource = RESOURCE
    pod_label = JOB_LABEL
    container = CONTAINER
    pod_role = "master"
    waiting = "waiting for the operator"

    def build(self, task: TrainingTask) -> dict[str, Any]:
        return build_pytorchjob(task, self.settings)

    def progress(self, job: Mapping[str, Any]) -> str:
        return _latest(job)

    def state(self, job: Mapping[str, Any], pods: list[Any], elapsed_s: float) -> JobState:
        s = self.settings
        return job_state(job, pods, elapsed_s, s.start_timeout_s, s.wait_s, s.restart_policy)

    def log_pod(self, pods: list[Any]) -> Any | None:
        return _master(pods)

    def refollow(self, follower: PodLogFollower | None, pods: list[Any]) -> PodLogFollower | None:
        """Start copying the master pod's log once it runs."""
        if follower is not None:
            return follower
        master = _master(pods)
        if master is None or not _started(master):
            return None
        return self.start_log(master)

    def conclude(
        self, name: str, state: JobState, follower: PodLogFollower | None, pods: list[Any]
    ) -> None:
        """Return on success; otherwise clean up what the operator will not (an evicted,
        ownerless or overdue job is deleted) and raise with the evidence."""
        if state.outcome in ("succeeded", "failed", "evicted"):
            self.finish_log(follower)
        if state.outcome == "succeeded":
            log.info("%s succeeded", self.what(name))
            return
        if state.outcome == "no-operator":
            self.jobs.delete(name)
            raise LaunchError(f"{self.what(name)} {state.detail} The job was deleted.")
        err = self.failure(name, state.detail, follower, pods)
        if state.outcome == "failed":
            raise err
        self.jobs.delete(name)
        deleted = state.outcome in ("timeout", "pending")
        raise LaunchError(f"{err}\nThe job was deleted.") if deleted else err
