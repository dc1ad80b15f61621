"""The ``cluster`` section: how the pipeline's pods look on Kubernetes (sizes, placement,
identities, volumes, deadlines), the one place every pod the project creates is built from."""

from __future__ import annotations

import dataclasses
import decimal
import re
from dataclasses import dataclass, field

from ldm_core.config.errors import ConfigError

QUANTITY = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
"""A Kubernetes resource quantity in the forms people write (``2``, ``500m``, ``16Gi``)."""
TRAINER_APIS = ("auto", "v2.1", "v2.2")
"""The TrainJob APIs of Kubeflow Trainer the TrainJob launcher writes (``cluster.trainer_api``)."""


@dataclass
class StageResources:
    """What the pod of one stage asks the scheduler for (evaluate, the predictor)."""

    gpus: int = 0
    """GPUs (``nvidia.com/gpu``); 0 = CPU only."""
    cpu: str = "2"
    """CPU request (Kubernetes quantity: ``2``, ``500m``)."""
    memory: str = "4Gi"
    """Memory request and limit (``16Gi``): equal, so the pod is never OOM-killed for
    using what it was promised."""


@dataclass
class TrainingResources(StageResources):
    """What a training job's pods ask for, per training process.

    A pod runs ``nproc`` processes (pipeline parameter ``nproc``, torchrun's
    ``--nproc-per-node``) and asks ``nproc`` times each figure, so one setting fits a pod of
    1 or 8 GPUs. ``gpus`` is 0 or 1: one process drives one GPU. By default no CPU limit is
    set, so torch's threads are not throttled below what the node has free.
    """

    shm: str = "1Gi"
    """/dev/shm per process (a memory-backed emptyDir) for DataLoader workers and NCCL: the
    container runtime's default of 64 MiB is too small for either."""
    cpu_limit: str = ""
    """CPU limit per process; empty = none. Set it (at least ``cpu``) where the namespace's
    ResourceQuota counts ``limits.cpu``: the API server then refuses every pod without one
    (Kubeflow profiles with a resource quota do)."""

    def times(self, n: int) -> TrainingResources:
        """What a pod of ``n`` training processes asks for: each figure ``n`` times."""
        return TrainingResources(
            self.gpus * n,
            _times(self.cpu, n),
            _times(self.memory, n),
            _times(self.shm, n),
            _times(self.cpu_limit, n) if self.cpu_limit else "",
        )


def _times(quantity: str, n: int) -> str:
    """``n`` times a Kubernetes quantity, in its own unit (``"500m"`` x 3 = ``"1500m"``)."""
    match = QUANTITY.match(quantity)
    if match is None:
        raise ConfigError(f"{quantity!r} is not a Kubernetes quantity (e.g. 16Gi)")
    number = decimal.Decimal(match.group(1)) * n
    return f"{format(number.normalize(), 'f')}{match.group(2) or ''}"


@dataclass
class Toleration:
    """A Kubernetes toleration (``key``/``operator``/``value``/``effect``), e.g. for the
    ``nvidia.com/gpu:NoSchedule`` taint GPU node pools carry."""

    key: str = ""
    operator: str = "Exists"
    """Exists (any value) | Equal (``value`` must match)."""
    value: str = ""
    effect: str = ""
    """NoSchedule | PreferNoSchedule | NoExecute; empty = every effect."""

    def to_k8s(self) -> dict[str, str]:
        """The toleration as a pod spec takes it (empty fields left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v}


@dataclass
class ClusterConfig:
    """How the pipeline's pods look on a Kubernetes cluster: the one place for their sizes,
    placement, identities, volumes and deadlines. Training jobs (PyTorchJob / TrainJob),
    the evaluate step and the InferenceService's predictor are all built from it; pipeline
    parameters (image, pvc_name, ...) are folded in as ``cluster.*`` overrides
    (``ldm_core.stages.pipeline_overrides``). Ignored without a cluster."""

    image: str = "ghcr.io/brain-ldm/brain-ldm-training:0.1.0"
    """Image of the training pods and of the evaluate step, the pods that may drive a GPU
    (images/training, a CUDA build)."""
    step_image: str = "ghcr.io/brain-ldm/brain-ldm-pipeline:0.1.0"
    """Image of the pipeline's light steps (configure, download, preprocess, the training
    steps, which only start and follow their jobs, and deploy): the CPU build of
    images/training (images/README.md), so that a step asking for half a core does not pull
    a CUDA image of several GB."""
    serving_image: str = "brain-ldm-serving:0.1.0"
    """Image of the predictor (images/serving); used when the deploy creates the
    ServingRuntime or runs the predictor without one."""
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    """Secrets (names, in the run's namespace) to pull images from a private registry."""
    namespace: str = ""
    """Namespace of training jobs and the InferenceService; empty = the pipeline step's own
    (a training job must run where the run's PVC is)."""
    service_account: str = "training"
    """Identity of the training pods (manifests: no API token)."""
    serving_service_account: str = "serving"
    """Identity of the predictor; it lists s3_secret for KServe's storage initializer."""
    workdir: str = "/workspace"
    """Mount path of ``pvc_name`` in the training steps and in their job pods alike: data,
    checkpoints and run dirs live under it at the same path in both, so a task's arguments
    are valid paths everywhere. The compiled pipeline mounts the PVC at this default."""
    pvc_name: str = "brain-ldm-data"
    """The run's PVC, shared by the training steps and their job pods (manifests/base/pvc.yaml;
    its storageClassName and access mode are set there, see manifests/README.md)."""
    s3_secret: str = "brain-ldm-s3"
    """Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and S3_ENDPOINT, given to the
    training pods as environment (manifests/base/s3-secret.template.yaml); empty = none."""
    node_selector: dict[str, str] = field(default_factory=dict)
    """Node labels every training and predictor pod requires (the GPU presets: a GPU node)."""
    tolerations: tuple[Toleration, ...] = ()
    """Taints training and predictor pods tolerate (the GPU presets: ``nvidia.com/gpu``)."""
    priority_class: str = ""
    """priorityClassName of training and predictor pods; empty = the cluster's default."""
    pending_timeout_s: int = 900
    """How long a training pod may stay unable to start (unschedulable, image not pulled, a
    missing Secret, an unbound PVC) before the job is deleted and the step fails with the
    reason. Not zero: a cluster autoscaler adds a GPU node in minutes."""
    run_timeout_s: int = 86400
    """Deadline of one training job, from its creation (activeDeadlineSeconds; on Kubeflow
    Trainer v2.1, which has none, the launcher deletes the TrainJob past it)."""
    trainer_api: str = "auto"
    """Which TrainJob API the cluster's Kubeflow Trainer serves: ``v2.1`` (Kubeflow 1.11.0:
    the pod is shaped by ``podTemplateOverrides``), ``v2.2`` (v2.2 and later:
    ``runtimePatches``), or ``auto``: asked of the API server with a dry-run create, which
    the Role's ``create`` grant allows. Only the TrainJob backend reads it."""
    train_autoencoder: TrainingResources = field(
        default_factory=lambda: TrainingResources(cpu="2", memory="6Gi", shm="1Gi")
    )
    train_diffusion: TrainingResources = field(
        default_factory=lambda: TrainingResources(cpu="2", memory="6Gi", shm="1Gi")
    )
    evaluate: StageResources = field(default_factory=lambda: StageResources(cpu="2", memory="8Gi"))
    """The evaluate step's pod (the pipeline step itself: it samples and scores in-process)."""
    predictor: StageResources = field(default_factory=lambda: StageResources(cpu="1", memory="4Gi"))
    """One predictor replica (serving.min_replicas .. max_replicas of them)."""
