"""A training stage as a Kubeflow Trainer v2 ``TrainJob`` on the ``torch-distributed`` runtime.

Training Operator v1 (PyTorchJob, :mod:`ldm_core.kube.pytorchjob`) is in maintenance;
Kubeflow 1.11 ships Trainer v2 instead. This launcher runs the same :class:`TrainingTask`
with the same semantics: a deterministic name that a restarted component adopts (same spec
hash) or refuses (another spec), a failure reported with the rank-0 pod's last log lines and
the events, deletion (foreground) on timeout, on a pod that cannot start for
``cluster.pending_timeout_s`` and on SIGTERM, and its launchers' pods as owners.

Two TrainJob APIs are in use (``cluster.trainer_api``), and they share no way to shape the pod:

- **v2.1** (kubeflow/trainer v2.1.0, what Kubeflow 1.11.0 installs): ``spec.podTemplateOverrides``
  (pkg/apis/trainer/v1alpha1/trainjob_types.go:266-363). Each override names its
  ``targetJobs`` (the runtime's replicated Job ``node``) and carries pod ``metadata``
  (labels, annotations: the Istio opt-out) and a pod ``spec`` of serviceAccountName,
  nodeSelector, affinity, tolerations, volumes, initContainers, schedulingGates,
  imagePullSecrets and containers of only name, env and volumeMounts (env refused for
  ``node``). The controller strategically merges it into the runtime's pod template
  (pkg/runtime/core/trainingruntime.go:190-238 ``mergePodTemplateOverrides``). There is no
  securityContext (pod or container), no terminationGracePeriodSeconds and no
  ``activeDeadlineSeconds``: the pods run under the runtime's securityContext (the default
  torch-distributed has none; the image's user is uid 1000, non-root), which Pod Security
  "baseline" (Kubeflow 1.11.0's profiles) admits and "restricted" refuses, and the launcher
  itself deletes the TrainJob once ``cluster.run_timeout_s`` has passed since its creation;
- **v2.2** and later (kubeflow/trainer master, 8c0f505, the CRD in tests/crds):
  ``spec.runtimePatches``, a strategic merge patch of the runtime's JobSet spec keyed by
  ``manager`` (pkg/runtime/core/trainingruntime.go ``mergeRuntimePatches``) that can also set
  the securityContexts and the grace period, and ``spec.activeDeadlineSeconds``.

A create for the wrong one is refused (every write is strict, :mod:`ldm_core.kube.resources`)
with the field and the release that has it; written without strict validation it would be
accepted with the pod settings pruned away, and torchrun would fail in a pod without the
run's volume. ``auto`` asks the API server which one it serves, with the ``create`` grant
the Role has: a server-side dry-run create of the v2.2 TrainJob under strict validation is
refused for ``spec.runtimePatches`` by a v2.1 server and accepted by a v2.2 one
(:meth:`TrainJobLauncher.served_api`). Reading the served schema (``/openapi/v3``) would
need the cluster-wide ``system:discovery`` binding, which hardened clusters remove.

How Trainer v2 runs it otherwise (both releases):

- the TrainJob names a runtime (``spec.runtimeRef``); the controller renders the runtime's
  JobSet template with the TrainJob's ``spec.trainer`` (image, command, env, numNodes,
  resourcesPerNode; plugins/jobset/builder.go ``Trainer``) and its overrides, and creates a
  JobSet of the same name;
- ``torch-distributed`` has one replicated Job named ``node`` whose container is ``node``; the
  torch plugin sets ``PET_NNODES``, ``PET_NPROC_PER_NODE`` (``numProcPerNode``),
  ``PET_NODE_RANK`` (the pod's completion index), ``PET_MASTER_ADDR`` (``<name>-node-0-0.<name>``)
  and ``PET_MASTER_PORT`` (29500) and runs the command as given: ``torchrun -m ldm_core.cli ...``
  takes its rendezvous from those, exactly as in a PyTorchJob (the webhook refuses a TrainJob
  that sets them itself);
- status: the controller copies the JobSet's terminal conditions as ``Complete``
  (``AllJobsCompleted``) or ``Failed`` (``FailedJobs``, ``ReachedMaxRestarts``...), adds
  (v2.2) ``Failed``/``DeadlineExceeded`` past ``activeDeadlineSeconds`` and ``Suspended``
  while suspended (Kueue queues a job that way), and mirrors the child Jobs in ``jobsStatus``.
  A running TrainJob has no condition at all: no status at all for ``start_timeout_s`` means
  no controller (or a JobSet it could not create: the events say which);
- pods are the JobSet's: labels ``jobset.sigs.k8s.io/jobset-name=<name>``,
  ``jobset.sigs.k8s.io/replicatedjob-name=node`` and ``batch.kubernetes.io/job-completion-index``
  (the node rank); JobSet defaults their restartPolicy to OnFailure and the Job retries up to
  its backoffLimit, so an evicted pod is replaced and only the conditions end the job; a pod
  the API server refuses leaves a ``FailedCreate`` event on the Job ``<name>-node-0``.

The pod is the PyTorchJob's (:func:`ldm_core.kube.training_job.pod_template`, from the same
config), expressed in the fields of the API (:func:`build_trainjob`); what the API cannot
carry is listed with its consequence in :data:`NOT_CARRIED`, and any other pod field is an
error, not silently dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ldm_core.config import Config
from ldm_core.kube.job_launcher import (
    JobLauncher,
    JobState,
    conditions,
    created_at,
    rbac_rules,
    true_condition,
)
from ldm_core.kube.podlog import PodLogFollower
from ldm_core.kube.resources import PROBE_NAME, CustomResource
from ldm_core.kube.training_job import check_task, job_object, pod_template
from ldm_core.launcher import LaunchError, TrainingTask

log = logging.getLogger(__name__)

_V2_2_ONLY = (
    "TrainJob of Trainer v2.2+; this cluster's Trainer is older (Kubeflow 1.11.0 ships "
    "v2.1): set cluster.trainer_api to auto or v2.1"
)
_V2_1_ONLY = (
    "TrainJob of Trainer v2.1, removed in v2.2; this cluster's Trainer is newer: set "
    "cluster.trainer_api to auto or v2.2"
)
RESOURCE = CustomResource(
    "trainer.kubeflow.org",
    "v1alpha1",
    "trainjobs",
    "TrainJob",
    field_releases=(
        ("spec.runtimePatches", _V2_2_ONLY),
        ("spec.activeDeadlineSeconds", _V2_2_ONLY),
        ("spec.podTemplateOverrides", _V2_1_ONLY),
    ),
)
V2_2_FIELDS = frozenset({"spec.runtimePatches", "spec.activeDeadlineSeconds"})
"""What a v2.1 API server refuses of a v2.2 TrainJob."""
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

CARRIED = {
    "v2.1": (
        ("nodeSelector", "tolerations", "volumes", "serviceAccountName", "imagePullSecrets"),
        ("volumeMounts",),
    ),
    "v2.2": (
        (
            "nodeSelector",
            "tolerations",
            "volumes",
            "securityContext",
            "serviceAccountName",
            "imagePullSecrets",
            "terminationGracePeriodSeconds",
        ),
        ("securityContext", "volumeMounts"),
    ),
}
"""(pod fields, container fields) of the training pod each API's overrides carry as they are."""
_EVERYWHERE = {
    "automountServiceAccountToken": "the training ServiceAccount sets it false",
    "enableServiceLinks": "only adds Service variables to the environment",
    "container name": "the override names the runtime's container 'node'",
    "container workingDir": "every path in the command is absolute; the image's WORKDIR is /tmp",
    "container imagePullPolicy": "Kubernetes defaults a tagged image to IfNotPresent",
    "container envFrom": "the S3 Secret's keys reach trainer.env as secretKeyRefs",
}
NOT_CARRIED = {
    "v2.1": {
        **_EVERYWHERE,
        "securityContext": (
            "the pod runs as the image's non-root user 1000, without fsGroup, a seccomp "
            "profile or runAsNonRoot: Pod Security 'baseline' admits it, 'restricted' refuses it"
        ),
        "container securityContext": (
            "no read-only root filesystem, capabilities kept, privilege escalation allowed"
        ),
        "terminationGracePeriodSeconds": "Kubernetes' 30 s instead of 60 s to write a checkpoint",
    },
    "v2.2": dict(_EVERYWHERE),
}
"""Per API, the training pod's fields a TrainJob cannot set, and what becomes of them."""


# --------------------------------------------------------------------------- build


def build_trainjob(
    task: TrainingTask, cfg: Config, stage: str, api: str = "v2.2"
) -> dict[str, Any]:
    """The TrainJob for ``task`` in TrainJob API ``api`` (``v2.1`` or ``v2.2``):
    ``nnodes`` pods of ``nproc_per_node`` processes each, the pod of
    :func:`~ldm_core.kube.training_job.pod_template` sized for ``cfg.cluster.<stage>`` and
    expressed in ``spec.trainer`` and the API's overrides."""
    if api not in CARRIED:
        raise LaunchError(f"TrainJob API {api!r} is not one of {', '.join(CARRIED)}")
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
    trainer, container = _trainer(pod, cfg.cluster.s3_secret, api)
    pod_spec = _pod_spec(pod["spec"], api)
    pod_spec["containers"] = [{"name": NODE, **container}]
    spec: dict[str, Any] = {
        "runtimeRef": {
            "apiGroup": RESOURCE.group,
            "kind": "ClusterTrainingRuntime",
            "name": RUNTIME,
        },
        "trainer": {**trainer, "numNodes": task.nnodes, "numProcPerNode": task.nproc_per_node},
    }
    if api == "v2.1":
        spec["podTemplateOverrides"] = [
            {"targetJobs": [{"name": NODE}], "metadata": pod["metadata"], "spec": pod_spec}
        ]
    else:
        spec["runtimePatches"] = [_runtime_patch(pod["metadata"], pod_spec)]
        spec["activeDeadlineSeconds"] = cfg.cluster.run_timeout_s
    return job_object(RESOURCE, task, cfg, spec)


def _runtime_patch(metadata: dict[str, Any], pod_spec: dict[str, Any]) -> dict[str, Any]:
    """The v2.2 ``runtimePatches`` entry that patches the ``node`` Job's pod template."""
    job = {"template": {"spec": {"template": {"metadata": metadata, "spec": pod_spec}}}}
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{"name": NODE, **job}]}}},
    }


def _trainer(
    pod: Mapping[str, Any], s3_secret: str, api: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split the pod's one container into ``spec.trainer`` and what the override carries."""
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
    override = {k: container[k] for k in CARRIED[api][1] if k in container}
    carried = {"image", "command", "env", "resources", *override}
    lost = {f"container {k}" for k in set(container) - carried}
    _refuse_uncarried(api, "container", lost - set(NOT_CARRIED[api]))
    return trainer, override


def _pod_spec(spec: Mapping[str, Any], api: str) -> dict[str, Any]:
    fields = CARRIED[api][0]
    _refuse_uncarried(api, "pod", set(spec) - {*fields, *NOT_CARRIED[api], "containers"})
    return {k: spec[k] for k in fields if k in spec}


def _refuse_uncarried(api: str, where: str, fields: set[str]) -> None:
    if fields:
        names = ", ".join(sorted(f.removeprefix("container ") for f in fields))
        raise LaunchError(
            f"TrainJob: {where} field(s) {names} cannot be set through spec.trainer or the "
            f"overrides of TrainJob API {api} (trainer.kubeflow.org/v1alpha1); set them in the "
            f"{RUNTIME} ClusterTrainingRuntime or use backend=kubeflow (PyTorchJob)"
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
    """Runs a :class:`TrainingTask` as a TrainJob of the API the cluster serves
    (``cluster.trainer_api``, asked of the API server when ``auto``) and waits for its
    outcome (arguments: :class:`~ldm_core.kube.job_launcher.JobLauncher`)."""

    resource = RESOURCE
    pod_label = JOBSET_LABEL
    container = NODE
    pod_role = "rank-0"
    created_on = f" on runtime {RUNTIME}"
    waiting = "waiting for pods"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        api = self.cfg.cluster.trainer_api
        self.api: str | None = None if api == "auto" else api
        """The TrainJob API in use, once known."""
        self.age_s: float | None = None
        """How old the job was when following began (v2.1: the deadline counts from creation)."""

    def build(self, task: TrainingTask) -> dict[str, Any]:
        if self.api is None:
            self.api = self.served_api(task)
        if self.api == "v2.1":
            log.warning(
                "Kubeflow Trainer v2.1: the TrainJob cannot set the pods' securityContext "
                "(they run as the image's non-root user; a namespace that enforces Pod "
                "Security 'restricted' refuses them) nor an active deadline (this launcher "
                "deletes the TrainJob past cluster.run_timeout_s)"
            )
        return build_trainjob(task, self.cfg, self.stage, self.api)

    def served_api(self, task: TrainingTask) -> str:
        """The TrainJob API of this cluster's Trainer: ``v2.1`` when a strict server-side
        dry run of the v2.2 TrainJob (under a name no job has) is refused for the fields
        only v2.2 has, else ``v2.2``."""
        probe = build_trainjob(task, self.cfg, self.stage, "v2.2")
        probe["metadata"] = {**probe["metadata"], "name": PROBE_NAME}
        unknown = set(self.jobs.unknown_fields(probe))
        api = "v2.1" if unknown & V2_2_FIELDS else "v2.2"
        log.info(
            "TrainJob API of this cluster: Trainer %s (%s)",
            api,
            f"the API server does not know {', '.join(sorted(unknown))}"
            if unknown
            else "the API server takes spec.runtimePatches",
        )
        return api

    def refusal_hint(self, problem: str) -> str:
        if self.api == "v2.1" and "PodSecurity" in problem:
            return (
                "a Trainer v2.1 TrainJob cannot set the pods' securityContext "
                "(podTemplateOverrides has none): enforce Pod Security 'baseline' in this "
                "namespace, as Kubeflow 1.11.0's profiles do, or give the torch-distributed "
                "runtime a securityContext"
            )
        return ""

    def state(self, job: Mapping[str, Any], pods: list[Any], elapsed_s: float) -> JobState:
        state = job_state(job, pods, elapsed_s, self.timing.start_timeout_s, self.wait_s)
        if self.api != "v2.1" or state.outcome != "running":
            return state
        if self.age_s is None:
            born = created_at(job)
            self.age_s = max(0.0, (datetime.now(UTC) - born).total_seconds()) if born else 0.0
        deadline = self.cfg.cluster.run_timeout_s
        if self.age_s + elapsed_s > deadline:
            return JobState(
                "timeout",
                f"still running past cluster.run_timeout_s ({deadline}s) after its creation; "
                "a Trainer v2.1 TrainJob has no activeDeadlineSeconds, so the launcher stops it",
            )
        return state

    def progress(self, job: Mapping[str, Any]) -> str:
        return _progress(job)

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
