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

What to do is decided by pure functions over what the API shows (:func:`adoption` before
starting, :func:`job_state` on every poll); the launcher only carries it out. The clock and
sleep are injected, and API failures read as the InferenceService rollout's do
(:mod:`ldm_core.kube.errors`).

Tolerated gaps of in-memory API servers (kmock): a create answered with an empty body is
re-read; nothing relies on resourceVersion, generation, PUT or label/field selectors being
honoured server-side (selectors are re-applied here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import kubernetes

from ldm_core.config import ClusterConfig, Config, TrainingResources
from ldm_core.kube.client import KubeConfigError, current_namespace
from ldm_core.kube.client import api_client as make_api_client
from ldm_core.kube.diagnostics import log_tail, pod_state, recent_events
from ldm_core.kube.errors import ApiCall, call_api
from ldm_core.kube.follow import JobState, follow_job
from ldm_core.kube.ownership import delete_on_sigterm, launcher_owner_reference
from ldm_core.kube.podlog import PodLogFollower
from ldm_core.kube.resources import CustomObjects, CustomResource, api_served
from ldm_core.kube.security import RUN_AS, container_security_context, pod_security_context
from ldm_core.launcher import LaunchError, TrainingTask

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
RESOURCE = CustomResource(GROUP, VERSION, PLURAL, KIND)
CONTAINER = "pytorch"
"""The training operator only treats the container with this name as the training process."""
JOB_LABEL = "training.kubeflow.org/job-name"
REPLICA_LABEL = "training.kubeflow.org/replica-type"
SPEC_HASH_ANNOTATION = "brain-ldm.kubeflow.org/spec-hash"
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


def spec_hash(job: dict[str, Any]) -> str:
    """Hash of what the job runs, so an adopted job can be checked to be the same job."""
    return hashlib.sha256(json.dumps(job["spec"], sort_keys=True).encode()).hexdigest()[:16]


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


def conditions(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list((job.get("status") or {}).get("conditions") or [])


def _true_conditions(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conditions that hold, oldest first. The operator keeps the others with status
    "False" (Running once the job Succeeded or Failed or was suspended; Suspended once
    resumed), and the newest of those is often a condition that no longer holds."""
    return [c for c in conditions(job) if str(c.get("status")) == "True"]


def true_condition(job: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    """The newest condition of type ``kind`` whose status is True, if any."""
    for cond in reversed(_true_conditions(job)):
        if cond.get("type") == kind:
            return cond
    return None


def _latest(job: Mapping[str, Any]) -> str:
    """The newest true condition (type: reason), for progress lines."""
    held = _true_conditions(job)
    if not held:
        return ""
    cond = held[-1]
    return f"{cond.get('type')}" + (f" ({cond['reason']})" if cond.get("reason") else "")


def adoption(job: Mapping[str, Any] | None, want_hash: str) -> str:
    """What to do about the job of our name found before starting: ``create`` (none there),
    ``adopt`` (ours, still running or done), ``replace`` (ours, failed in an earlier
    attempt) or ``conflict`` (another spec under our name: not ours to touch)."""
    if job is None:
        return "create"
    if stored_spec_hash(job) != want_hash:
        return "conflict"
    return "replace" if true_condition(job, "Failed") else "adopt"


def stored_spec_hash(job: Mapping[str, Any]) -> str | None:
    """The spec hash an existing job was created with (None: not created by us)."""
    return ((job.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)


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


class PyTorchJobLauncher:
    """Runs a :class:`TrainingTask` as a PyTorchJob and waits for its outcome.

    Args:
        settings: how the training pods look on this cluster.
        api_client: the API to use; default: the pod's service account or the kubeconfig.
        out: where the master pod's log is copied (default: stdout, the component's log).
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

    # ------------------------------------------------------------------ API calls

    def _core(self, verb: str, resource: str, send: Callable[[], Any], name: str = "") -> Any:
        call = ApiCall(verb, resource, self.namespace, name)
        return call_api(call, send, host=self.host, error=LaunchError)

    def _create(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        owner = launcher_owner_reference(self.core, self.namespace, self.host)
        if owner is not None:
            # Deleted by the garbage collector with the launcher's pod, however it ended.
            body = {**body, "metadata": {**body["metadata"], "ownerReferences": [owner]}}
        if self.jobs.create(body, exist_ok=True) is None:
            log.info("PyTorchJob %s appeared concurrently; adopting it", name)
        # Re-read instead of trusting the create response (some servers answer without a body).
        if self.jobs.get(name) is None:
            raise LaunchError(f"PyTorchJob {self.namespace}/{name} vanished right after creation")

    def _wait_deleted(self, name: str, timeout_s: float) -> None:
        deadline = self.clock() + timeout_s
        while self.jobs.get(name) is not None:
            if self.clock() > deadline:
                raise LaunchError(
                    f"PyTorchJob {self.namespace}/{name} is still there {timeout_s:.0f}s after "
                    "deletion (finalizers?); delete it by hand and retry"
                )
            self.sleep(min(self.settings.poll_s, 2.0))

    def _pods(self, name: str) -> list[Any]:
        selector = f"{JOB_LABEL}={name}"
        pods = self._core(
            "list",
            "pods",
            lambda: self.core.list_namespaced_pod(self.namespace, label_selector=selector),
        ).items
        # Apply the selector here too: not every API server (or emulator) honours it.
        return [p for p in pods if (p.metadata.labels or {}).get(JOB_LABEL) == name]

    # ------------------------------------------------------------------ diagnostics

    def _failure(
        self, name: str, reason: str, follower: PodLogFollower | None, pods: list[Any]
    ) -> LaunchError:
        master = _master(pods)
        lines = (
            log_tail(
                self.core,
                self.namespace,
                self.host,
                master.metadata.name,
                CONTAINER,
                self.settings.tail_lines,
            )
            if master is not None
            else []
        )
        if not lines and follower is not None:  # pod already cleaned up
            lines = list(follower.tail)
        parts = [f"PyTorchJob {self.namespace}/{name} failed: {reason}"]
        if master is not None:
            parts.append(f"master pod {master.metadata.name}: {pod_state(master, CONTAINER)}")
        parts.append(
            "last log lines of the master pod:\n"
            + ("\n".join(lines) if lines else "(none captured)")
        )
        names = [name] + [p.metadata.name for p in pods]
        events = recent_events(self.core, self.namespace, self.host, names)
        parts.append("recent events:\n" + ("\n".join(events) if events else "(none)"))
        return LaunchError("\n".join(parts))

    # ------------------------------------------------------------------ run

    def run(self, task: TrainingTask) -> None:
        """Create (or adopt) the job, follow it, and return only when it Succeeded."""
        s = self.settings
        body = build_pytorchjob(task, s)
        name = task.name
        want_hash = body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        job = self.jobs.get(name)
        decision = adoption(job, want_hash)
        if decision == "conflict":
            raise LaunchError(
                f"a different PyTorchJob {self.namespace}/{name} already exists (spec hash "
                f"{stored_spec_hash(job or {})} != {want_hash}); it was not started for "
                "this task, so it is left alone: delete it or use another run id"
            )
        what = f"PyTorchJob {self.namespace}/{name}"
        with delete_on_sigterm(what, lambda: self.jobs.delete(name)):
            self._start(task, body, decision, job)
            self._follow(name)

    def _start(
        self, task: TrainingTask, body: dict[str, Any], decision: str, job: dict[str, Any] | None
    ) -> None:
        """Carry out ``decision`` (create, replace or adopt) for the job ``body`` describes."""
        s = self.settings
        name = task.name
        if decision == "replace":
            log.warning("PyTorchJob %s failed in an earlier attempt; starting it again", name)
            self.jobs.delete(name)
            self._wait_deleted(name, timeout_s=max(60.0, 10 * s.poll_s))
            self._create(body)
        elif decision == "adopt":
            log.info(
                "adopting existing PyTorchJob %s/%s (%s)",
                self.namespace,
                name,
                _latest(job or {}) or "no status yet",
            )
        else:
            self._create(body)
            log.info(
                "created PyTorchJob %s/%s: %d node(s) x %d process(es), image %s",
                self.namespace,
                name,
                task.nnodes,
                task.nproc_per_node,
                s.image,
            )

    def _observe(self, name: str, failures: int) -> tuple[dict[str, Any], list[Any]] | None:
        """One look at the job and its pods; None after an API blip (raised once it is
        ``failures`` > 5 in a row: not a blip)."""
        try:
            job, pods = self.jobs.get(name), self._pods(name)
        except LaunchError:
            if failures >= 5:
                raise
            log.warning("API error while following %s; retrying", name, exc_info=True)
            return None
        if job is None:
            raise LaunchError(f"PyTorchJob {self.namespace}/{name} was deleted by someone else")
        return job, pods

    def _follow(self, name: str) -> None:
        """Poll the job and its pods until an outcome; stream the master's log meanwhile."""
        s = self.settings
        follow_job(
            f"PyTorchJob {name}",
            observe=lambda failures: self._observe(name, failures),
            state_of=lambda job, pods, elapsed: job_state(
                job, pods, elapsed, s.start_timeout_s, s.wait_s, s.restart_policy
            ),
            refollow=lambda follower, pods: follower or self._follower(pods),
            conclude=lambda state, follower, pods: self._conclude(name, state, follower, pods),
            poll_s=s.poll_s,
            pending_timeout_s=s.pending_timeout_s,
            clock=self.clock,
            sleep=self.sleep,
            log=log,
            waiting="waiting for the operator",
        )

    def _follower(self, pods: list[Any]) -> PodLogFollower | None:
        """Start copying the master pod's log once it runs; None until then."""
        master = _master(pods)
        if master is None or not _started(master):
            return None
        s = self.settings
        follower = PodLogFollower(
            self.core,
            self.namespace,
            master.metadata.name,
            CONTAINER,
            self.out,
            s.tail_lines,
            s.log_reconnect_s,
        )
        follower.start()
        return follower

    def _conclude(
        self, name: str, state: JobState, follower: PodLogFollower | None, pods: list[Any]
    ) -> None:
        """Act on an outcome: return on success; otherwise clean up what the operator will
        not (an evicted, ownerless or overdue job is deleted) and raise with the evidence."""
        if state.outcome in ("succeeded", "failed", "evicted") and follower is not None:
            # Print what the pod wrote last before the outcome is reported.
            follower.finish(timeout_s=max(2.0, 2 * self.settings.log_reconnect_s))
        if state.outcome == "succeeded":
            log.info("PyTorchJob %s succeeded", name)
            return
        if state.outcome == "no-operator":
            self.jobs.delete(name)
            raise LaunchError(
                f"PyTorchJob {self.namespace}/{name} {state.detail} The job was deleted."
            )
        err = self._failure(name, state.detail, follower, pods)
        if state.outcome == "failed":
            raise err
        self.jobs.delete(name)
        deleted = state.outcome in ("timeout", "pending")
        raise LaunchError(f"{err}\nThe job was deleted.") if deleted else err
