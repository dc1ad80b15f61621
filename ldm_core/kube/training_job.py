"""What a training job is, whatever its kind (PyTorchJob or Trainer v2 TrainJob).

Both kinds run the same pod on every node: ``torchrun -m ldm_core.cli VERB ...`` with no
rendezvous flags (the training operator or the Trainer's torch plugin sets the ``PET_*``
variables torchrun reads), the run's PVC at ``cluster.workdir``, a memory-backed
``/dev/shm`` and a ``/tmp`` emptyDir under a read-only root filesystem, the stage's
resources times the processes per pod, and the cluster's placement. Only the object around
that pod differs (:mod:`ldm_core.kube.pytorchjob`, :mod:`ldm_core.kube.trainjob`).

Everything here is read from the resolved config (``cfg.cluster``, the one source of the
pods' settings) and the :class:`~ldm_core.launcher.TrainingTask` of one run; what the
config does not hold is a constant of this module. A job is identified by its name and the
hash of its spec (:func:`spec_hash`), which a restarted launcher compares before adopting.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from ldm_core.config import Config, TrainingResources
from ldm_core.kube.resources import CustomResource
from ldm_core.kube.security import RUN_AS, container_security_context, pod_security_context
from ldm_core.launcher import LaunchError, TrainingTask

STAGES = ("train_autoencoder", "train_diffusion")
"""The training stages; each names the ``cfg.cluster`` section that sizes its pods."""
SPEC_HASH_ANNOTATION = "brain-ldm.kubeflow.org/spec-hash"
MANAGED_BY = "ldm-core"
GPU_RESOURCE = "nvidia.com/gpu"
TMP_SIZE = "8Gi"
"""The ``/tmp`` emptyDir: caches and matplotlib's config under a read-only root filesystem."""
TERMINATION_GRACE_S = 60
"""Time a SIGTERMed training process has to finish writing a checkpoint."""

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# --------------------------------------------------------------------------- identity


def spec_hash(job: Mapping[str, Any]) -> str:
    """Hash of what the job runs, so an adopted job can be checked to be the same job."""
    return hashlib.sha256(json.dumps(job["spec"], sort_keys=True).encode()).hexdigest()[:16]


def stored_spec_hash(job: Mapping[str, Any]) -> str | None:
    """The spec hash an existing job was created with (None: not created by us)."""
    return ((job.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)


def labels(task: TrainingTask) -> dict[str, str]:
    """The labels of a training job and of its pods."""
    return {
        "app.kubernetes.io/name": "brain-ldm",
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/part-of": "brain-ldm",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "brain-ldm.kubeflow.org/verb": task.verb,
    }


def job_object(
    resource: CustomResource, task: TrainingTask, cfg: Config, spec: dict[str, Any]
) -> dict[str, Any]:
    """The job of kind ``resource`` named after ``task``, with ``spec`` and its hash."""
    metadata: dict[str, Any] = {"name": task.name, "labels": labels(task)}
    if cfg.cluster.namespace:
        metadata["namespace"] = cfg.cluster.namespace
    job = {"apiVersion": resource.api_version, "kind": resource.kind, "metadata": metadata}
    job["spec"] = spec
    metadata["annotations"] = {SPEC_HASH_ANNOTATION: spec_hash(job)}
    return job


# --------------------------------------------------------------------------- checks


def stage_resources(cfg: Config, stage: str) -> TrainingResources:
    """What one training process of ``stage`` asks for (``cfg.cluster.<stage>``)."""
    if stage not in STAGES:
        raise LaunchError(
            f"{stage!r} is not a training stage: use one of {', '.join(STAGES)} "
            "(it picks the cfg.cluster section that sizes the pods)"
        )
    return getattr(cfg.cluster, stage)


def check_task(task: TrainingTask, kind: str, max_name: int, derived: str) -> None:
    """Refuse, before any API call, a task no job of ``kind`` can run: a size below one,
    or a name that is not a DNS-1035 label of at most ``max_name`` characters (``derived``
    says which names the controllers derive from it)."""
    if task.nnodes < 1 or task.nproc_per_node < 1:
        raise LaunchError(
            f"{task.name}: nnodes and nproc_per_node must be >= 1, "
            f"got {task.nnodes} and {task.nproc_per_node}"
        )
    if not _DNS1035.match(task.name) or len(task.name) > max_name:
        raise LaunchError(
            f"{kind} name {task.name!r} is not a DNS-1035 label of at most {max_name} "
            f"characters ({derived})"
        )


# --------------------------------------------------------------------------- the pod


def _container(
    task: TrainingTask, cfg: Config, pod: TrainingResources, name: str
) -> dict[str, Any]:
    """The training container: ``torchrun`` over the task's command in ``cluster.workdir``."""
    c = cfg.cluster
    env = {
        "PYTHONUNBUFFERED": "1",  # log lines reach the component as they are printed
        "HOME": "/tmp",  # read-only root filesystem: caches go to the /tmp emptyDir
        "XDG_CACHE_HOME": "/tmp/.cache",
        "MPLCONFIGDIR": "/tmp/.matplotlib",
        "NCCL_DEBUG": "WARN",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a dead peer fails the step, not a hang
        "LDM_JOB_NAME": task.name,
        **task.env,
    }
    requests: dict[str, str] = {"cpu": pod.cpu, "memory": pod.memory}
    limits: dict[str, str] = {"memory": pod.memory}
    if pod.cpu_limit:
        limits["cpu"] = pod.cpu_limit
    if pod.gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(pod.gpus)
    container: dict[str, Any] = {
        "name": name,
        "image": c.image,
        "imagePullPolicy": c.image_pull_policy,
        "command": ["torchrun", *task.command()],
        "workingDir": c.workdir,
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [
            {"name": "workdir", "mountPath": c.workdir},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": container_security_context(RUN_AS),
    }
    if c.s3_secret:
        # envFrom: the Secret's values never appear in the job object.
        container["envFrom"] = [{"secretRef": {"name": c.s3_secret}}]
    return container


def pod_template(task: TrainingTask, cfg: Config, stage: str, container: str) -> dict[str, Any]:
    """The pod every node of ``task`` runs, its one container named ``container``: the
    stage's resources for ``task.nproc_per_node`` processes, the run's PVC, and the
    cluster's identity and placement (``cfg.cluster``), locked down."""
    c = cfg.cluster
    pod = stage_resources(cfg, stage).times(task.nproc_per_node)
    spec: dict[str, Any] = {
        "containers": [_container(task, cfg, pod, container)],
        "automountServiceAccountToken": False,  # training pods never call the API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": pod_security_context(RUN_AS),
        "volumes": [
            {"name": "workdir", "persistentVolumeClaim": {"claimName": c.pvc_name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": pod.shm}},
            {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}},
        ],
    }
    if c.service_account:
        spec["serviceAccountName"] = c.service_account
    if c.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in c.image_pull_secrets]
    if c.node_selector:
        spec["nodeSelector"] = dict(c.node_selector)
    if c.tolerations:
        spec["tolerations"] = [t.to_k8s() for t in c.tolerations]
    if c.priority_class:
        spec["priorityClassName"] = c.priority_class
    return {
        "metadata": {
            "labels": labels(task),
            # An Istio sidecar would intercept the rendezvous port and stall startup.
            "annotations": {"sidecar.istio.io/inject": "false"},
        },
        "spec": spec,
    }
