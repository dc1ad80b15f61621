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
  missing Secret) fails the task after ``cluster.pending_timeout_s`` with the reason and
  what to change (:mod:`ldm_core.kube.pending`);
- past the deadline, or when no training operator ever picks the job up, or past the
  pending timeout, the job is deleted (foreground propagation: its pods go first) and the
  task fails; SIGTERM deletes it too, and it is owned by the launcher's pod
  (:mod:`ldm_core.kube.ownership`).

Every replica runs the pod of :func:`ldm_core.kube.training_job.pod_template`: ``torchrun -m
ldm_core.cli VERB ...`` with no rendezvous flags. torchrun reads them from the ``PET_*``
variables the training operator sets (``PET_NNODES``, ``PET_NPROC_PER_NODE`` from
``spec.nprocPerNode``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT`` from the
container port named ``pytorchjob-port``), so the command line is the same on every replica
and as ``LocalLauncher``'s.

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

import logging
from collections.abc import Mapping
from typing import Any

from ldm_core.config import Config
from ldm_core.kube.job_launcher import (
    JobLauncher,
    JobState,
    conditions,
    rbac_rules,
    true_condition,
    true_conditions,
)
from ldm_core.kube.podlog import PodLogFollower
from ldm_core.kube.resources import CustomResource
from ldm_core.kube.training_job import check_task, job_object, pod_template
from ldm_core.launcher import LaunchError, TrainingTask

log = logging.getLogger(__name__)

RESOURCE = CustomResource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
CONTAINER = "pytorch"
"""The training operator only treats the container with this name as the training process."""
PORT_NAME = "pytorchjob-port"
"""The operator reads the master's rendezvous port from the container port of this name."""
MASTER_PORT = 23456
JOB_LABEL = "training.kubeflow.org/job-name"
REPLICA_LABEL = "training.kubeflow.org/replica-type"
MAX_NAME = 52
"""Job names stay at or below 52 characters: the operator names each replica's pod and headless
Service ``<job>-worker-<i>``, and a Service name must be a DNS-1035 label of at most 63."""
RESTART_POLICY = "ExitCode"
"""Restart on signals/preemption (exit code > 128), fail at once on an error in our code."""
BACKOFF_LIMIT = 3
TTL_AFTER_FINISHED_S = 3600

RBAC_RULES = rbac_rules(RESOURCE)
"""What the launcher calls; the Role in manifests/base/rbac.yaml grants exactly these."""


# --------------------------------------------------------------------------- build


def build_pytorchjob(task: TrainingTask, cfg: Config, stage: str) -> dict[str, Any]:
    """The PyTorchJob for ``task``: one Master, ``nnodes - 1`` Workers, all running the pod
    of :func:`~ldm_core.kube.training_job.pod_template` sized for ``cfg.cluster.<stage>``;
    ``cfg.cluster.run_timeout_s`` is its active deadline."""
    check_task(
        task, RESOURCE.kind, MAX_NAME, "the operator names its pods and Services <name>-worker-<i>"
    )
    template = pod_template(task, cfg, stage, CONTAINER)
    (container,) = template["spec"]["containers"]
    container["ports"] = [{"name": PORT_NAME, "containerPort": MASTER_PORT, "protocol": "TCP"}]
    replicas: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": RESTART_POLICY, "template": template}
    }
    if task.nnodes > 1:
        replicas["Worker"] = {
            "replicas": task.nnodes - 1,
            "restartPolicy": RESTART_POLICY,
            "template": template,
        }
    spec = {
        "nprocPerNode": str(task.nproc_per_node),
        "runPolicy": {
            # All: no pod (running or finished) outlives the job's completion.
            "cleanPodPolicy": "All",
            "backoffLimit": BACKOFF_LIMIT,
            "activeDeadlineSeconds": cfg.cluster.run_timeout_s,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
        },
        "pytorchReplicaSpecs": replicas,
    }
    return job_object(RESOURCE, task, cfg, spec)


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


def master_restart_policy(job: Mapping[str, Any]) -> str:
    """The Master's restartPolicy, as the job was created (the operator acts on that one)."""
    replicas = (job.get("spec") or {}).get("pytorchReplicaSpecs") or {}
    return str((replicas.get("Master") or {}).get("restartPolicy", ""))


def _started(pod: Any) -> bool:
    return (pod.status.phase if pod.status else None) in ("Running", "Succeeded", "Failed")


def _is_evicted(pod: Any) -> bool:
    return bool(pod.status) and pod.status.phase == "Failed" and pod.status.reason == "Evicted"


def _master(pods: list[Any]) -> Any | None:
    for pod in pods:
        if (pod.metadata.labels or {}).get(REPLICA_LABEL, "").lower() == "master":
            return pod
    return None


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
        return build_pytorchjob(task, self.cfg, self.stage)

    def progress(self, job: Mapping[str, Any]) -> str:
        return _latest(job)

    def state(self, job: Mapping[str, Any], pods: list[Any], elapsed_s: float) -> JobState:
        policy = master_restart_policy(job)
        return job_state(job, pods, elapsed_s, self.timing.start_timeout_s, self.wait_s, policy)

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
