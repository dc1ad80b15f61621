"""A training stage as a Kubeflow Trainer v2 ``TrainJob`` on the ``torch-distributed`` runtime.

Training Operator v1 (PyTorchJob, :mod:`ldm_core.kube.pytorchjob`) is in maintenance; new
Kubeflow releases ship Trainer v2. This launcher runs the same :class:`TrainingTask` with
the same semantics: a deterministic name that a restarted component adopts (same spec hash)
or refuses (another spec), a failure reported with the rank-0 pod's last log lines and the
events, deletion (foreground) on timeout, on a pod that cannot start for
``cluster.pending_timeout_s`` and on SIGTERM, and an ownerReference to the launcher's pod.

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

The pod is the PyTorchJob's (:func:`ldm_core.kube.training_job.pod_template`, from the same
config), expressed in those fields (:func:`build_trainjob`); a pod field the TrainJob cannot
carry is an error, not silently dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ldm_core.config import Config
from ldm_core.kube.job_launcher import JobLauncher, JobState, conditions, rbac_rules, true_condition
from ldm_core.kube.podlog import PodLogFollower
from ldm_core.kube.resources import CustomResource
from ldm_core.kube.training_job import check_task, job_object, pod_template
from ldm_core.launcher import LaunchError, TrainingTask

log = logging.getLogger(__name__)

RESOURCE = CustomResource("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
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

RBAC_RULES = rbac_rules(RESOURCE)
"""What the launcher calls; the Role in manifests/base/rbac.yaml grants exactly these."""

_POD_PATCH_FIELDS = (
    "nodeSelector",
    "tolerations",
    "volumes",
    "securityContext",
    "serviceAccountName",
    "imagePullSecrets",
    "terminationGracePeriodSeconds",
)
"""Pod fields of the training pod that ``runtimePatches`` carries as they are."""
_NOT_CARRIED = {
    "automountServiceAccountToken": "the training ServiceAccount sets it false",
    "enableServiceLinks": "only adds Service variables to the environment",
}
"""Pod fields the TrainJob cannot set, and why losing them is harmless."""
_CONTAINER_NOT_CARRIED = {
    "name": "the patch names the runtime's container 'node'",
    "workingDir": "every path in the command is absolute; the image's WORKDIR is /tmp",
    "imagePullPolicy": "Kubernetes defaults a tagged image to IfNotPresent",
}


# --------------------------------------------------------------------------- build


def build_trainjob(task: TrainingTask, cfg: Config, stage: str) -> dict[str, Any]:
    """The TrainJob for ``task``: ``nnodes`` pods of ``nproc_per_node`` processes each, the
    pod of :func:`~ldm_core.kube.training_job.pod_template` sized for ``cfg.cluster.<stage>``
    and expressed in ``spec.trainer`` and ``spec.runtimePatches``."""
    check_task(
        task, RESOURCE.kind, MAX_NAME, "JobSet derives pod names <name>-node-0-<rank>-xxxxx from it"
    )
    reserved = sorted(set(RESERVED_ENV) & set(task.env))
    if reserved:
        raise LaunchError(
            f"{task.name}: env {', '.join(reserved)} is set by the Trainer's torch runtime; "
            "remove it from the task's environment"
        )
    pod = pod_template(task, cfg, stage, NODE)
    trainer, container_patch = _trainer(pod, cfg.cluster.s3_secret)
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
    spec = {
        "runtimeRef": {
            "apiGroup": RESOURCE.group,
            "kind": "ClusterTrainingRuntime",
            "name": RUNTIME,
        },
        "trainer": {**trainer, "numNodes": task.nnodes, "numProcPerNode": task.nproc_per_node},
        "runtimePatches": [patch],
        "activeDeadlineSeconds": cfg.cluster.run_timeout_s,
    }
    return job_object(RESOURCE, task, cfg, spec)


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


# --------------------------------------------------------------------------- launcher


class TrainJobLauncher(JobLauncher):
    """Runs a :class:`TrainingTask` as a TrainJob and waits for its outcome (arguments:
    :class:`~ldm_core.kube.job_launcher.JobLauncher`)."""

    resource = RESOURCE
    pod_label = JOBSET_LABEL
    container = NODE
    pod_role = "rank-0"
    created_on = f" on runtime {RUNTIME}"
    waiting = "waiting for pods"

    def build(self, task: TrainingTask) -> dict[str, Any]:
        return build_trainjob(task, self.cfg, self.stage)

    def progress(self, job: Mapping[str, Any]) -> str:
        return _progress(job)

    def state(self, job: Mapping[str, Any], pods: list[Any], elapsed_s: float) -> JobState:
        return job_state(job, pods, elapsed_s, self.timing.start_timeout_s, self.wait_s)

    def log_pod(self, pods: list[Any]) -> Any | None:
        return rank0(pods)

    def event_names(self, name: str) -> list[str]:
        # The TrainJob, its JobSet (same name) and the JobSet's Job.
        return [name, f"{name}-{NODE}-0"]

    def refollow(self, follower: PodLogFollower | None, pods: list[Any]) -> PodLogFollower | None:
        """Keep following rank 0's pod; when the Job replaced it (an eviction), finish the
        old pod's log and follow the new pod."""
        pod = rank0(pods)
        if follower is not None and pod is not None and follower.pod != pod.metadata.name:
            self.finish_log(follower)
            follower = None
        if follower is not None:
            return follower
        if pod is None or (pod.status.phase if pod.status else None) not in (
            "Running",
            "Succeeded",
            "Failed",
        ):
            return None
        return self.start_log(pod)

    def conclude(
        self, name: str, state: JobState, follower: PodLogFollower | None, pods: list[Any]
    ) -> None:
        """Return on success; otherwise delete what should not run on (an overdue, blocked or
        uncontrolled job) and raise with the evidence."""
        if state.outcome in ("succeeded", "failed"):
            self.finish_log(follower)
        if state.outcome == "succeeded":
            log.info("%s is Complete", self.what(name))
            return
        err = self.failure(name, state.detail, follower, pods)
        if state.outcome == "failed":
            raise err
        self.jobs.delete(name)
        raise LaunchError(f"{err}\nThe TrainJob was deleted.")
