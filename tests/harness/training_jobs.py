"""Both training-job kinds on the emulated Kubernetes API, for tests that hold the PyTorchJob
and the TrainJob launcher to the same behaviour.

A :class:`Kind` says what such a test needs to know of one kind: its launcher and builder,
the emulated controller that plays it (:mod:`tests.harness.training_operator`,
:mod:`tests.harness.trainer`), and the words its controller and launcher use where the two
differ (the success condition, the hint when no controller answers). :func:`serve` starts
the API with one kind's controller installed and, when the test is done, holds every call
the launcher made to the kind's ``RBAC_RULES``, every job it wrote to the CRD of the release
the kind plays (unknown fields as errors), and every such write to ``fieldValidation=Strict``.
The TrainJob is played as Trainer v2.1 (Kubeflow 1.11.0) and as v2.2+ (master).

:class:`PodAdmission` is what a namespace's policies make of the training pods the
controllers create: a ResourceQuota, a missing ServiceAccount, Pod Security admission.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import kmock
import kubernetes

from ldm_core.config import Config, load_config
from ldm_core.kube import pytorchjob as pj
from ldm_core.kube import trainjob as tj
from ldm_core.kube.job_launcher import JobLauncher, LauncherTiming
from ldm_core.kube.resources import CustomResource
from ldm_core.launcher import TrainingTask
from tests.harness import crdcheck, kubelet, trainer, training_operator
from tests.harness.kube import KubeApi, declared, rbac_triple

NS = "brain-ldm"
STAGE = "train_autoencoder"
LAUNCHER_UA = "ldm-launcher-under-test"
FAST = LauncherTiming(poll_s=0.05, log_reconnect_s=0.05, start_timeout_s=30.0, timeout_s=30.0)
"""Polling fast enough for the emulated API; a result within 30 s."""


def job_config(*overrides: str, preset: str = "gpu-16g") -> Config:
    """A training job as ``preset`` sizes it (default: one GPU per process), in :data:`NS`,
    with the image and S3 Secret the emulated kubelet knows."""
    return load_config(
        preset=preset,
        overrides=[
            f"cluster.image={kubelet.IMAGE}",
            f"cluster.namespace={NS}",
            f"cluster.s3_secret={kubelet.S3_SECRET}",
            *overrides,
        ],
    )


def training_task(
    name: str = "ldm-ae-0123456789ab", nnodes: int = 1, nproc: int = 2
) -> TrainingTask:
    """The autoencoder stage as the pipeline's ``train`` step hands it to a launcher."""
    return TrainingTask(
        name=name,
        verb="train-autoencoder",
        args=[
            "--data",
            "/workspace/cache",
            "--output",
            "/workspace/runs/ae",
            "--preset",
            "gpu-16g",
        ],
        nproc_per_node=nproc,
        nnodes=nnodes,
        env={"LDM_SEED": "0"},
    )


class FakeClock:
    """Monotonic time that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.start = self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    @property
    def elapsed(self) -> float:
        return self.now - self.start


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Kind:
    """One kind of training job, as the shared tests see it."""

    name: str
    resource: CustomResource
    launcher: type[JobLauncher]
    build: Callable[[TrainingTask, Config, str], dict[str, Any]]
    rbac_rules: list[tuple[str, str, tuple[str, ...]]]
    served: dict[str, str]
    """What the emulated API serves when this kind's controller is installed."""
    crds: str
    """The subfolder of tests/crds with the CRD of the release played."""
    install: Callable[[KubeApi], trainer.Admission | None]
    """Admission the API server runs for this kind (the Trainer's webhooks), if any."""
    controller: Callable[[JobCluster, str, float], Any]
    """The emulated controller thread for an outcome: ``succeed``, ``fail``, ``hang``,
    ``absent`` or a kind of :data:`tests.harness.kubelet.PENDING`."""
    succeeded: str
    """The condition that says the job succeeded."""
    failed_reason: str
    """The reason of the Failed condition the controller writes."""
    no_controller: str
    """What the error says (a regex) when nothing ever gives the job a status."""
    deleted: str
    """How the error says the launcher deleted the job."""
    failure: tuple[str, ...]
    """What the error of a failed job quotes from the controller (``{name}``: the job's)."""
    max_name: int
    derived_name: Callable[[str], str]
    """The longest name a controller derives from a job's name (its pods, Services)."""

    def __str__(self) -> str:
        return self.name


def _operator(cluster: JobCluster, outcome: str, step_s: float) -> training_operator.FakeOperator:
    return training_operator.FakeOperator(cluster.api, NS, outcome, step_s)


def _trainer(cluster: JobCluster, outcome: str, step_s: float) -> trainer.FakeTrainer:
    assert cluster.admission is not None
    return trainer.FakeTrainer(cluster.api, NS, outcome, step_s, cluster.admission.runtimes)


PYTORCHJOB = Kind(
    name="pytorchjob",
    resource=pj.RESOURCE,
    launcher=pj.PyTorchJobLauncher,
    build=pj.build_pytorchjob,
    rbac_rules=pj.RBAC_RULES,
    served=training_operator.RESOURCE,
    crds="training-operator-v1.9.1",
    install=lambda api: None,
    controller=_operator,
    succeeded="Succeeded",
    failed_reason="PyTorchJobFailed",
    no_controller="is the Kubeflow training operator installed",
    deleted="The job was deleted",
    failure=(
        "1 Master replica(s) failed",
        "BackOff",
        "Back-off restarting failed container",
    ),
    max_name=pj.MAX_NAME,
    derived_name=lambda name: f"{name}-worker-999",
)
_TRAINJOB_FAILURE = (
    "FailedJobs: jobset failed due to one or more job failures",
    "container exited with code 1 (Error), restarts 6",
    "BackOff pod/{name}-node-0-0-",
    "Back-off restarting failed container",
    "BackoffLimitExceeded job/{name}-node-0",
)
TRAINJOB = Kind(
    name="trainjob",
    resource=tj.RESOURCE,
    launcher=tj.TrainJobLauncher,
    build=tj.build_trainjob,
    rbac_rules=tj.RBAC_RULES,
    served=trainer.RESOURCE,
    crds=trainer.V2_2.crds,
    install=trainer.serve_trainer,
    controller=_trainer,
    succeeded="Complete",
    failed_reason="FailedJobs",
    no_controller="is Kubeflow Trainer .with JobSet. installed",
    deleted="The TrainJob was deleted.",
    failure=_TRAINJOB_FAILURE,
    max_name=tj.MAX_NAME,
    derived_name=lambda name: f"{name}-node-0-999-abcde",
)
TRAINJOB_V2_1 = dataclasses.replace(
    TRAINJOB,
    name="trainjob-v2.1",
    build=lambda task, cfg, stage: tj.build_trainjob(task, cfg, stage, api="v2.1"),
    crds=trainer.V2_1.crds,
    install=lambda api: trainer.serve_trainer(api, trainer.V2_1),
)
"""A TrainJob on Kubeflow 1.11.0's Trainer v2.1.0."""
KINDS = (PYTORCHJOB, TRAINJOB, TRAINJOB_V2_1)


# --------------------------------------------------------------------------- cluster


class JobCluster:
    """The emulated API with one kind's admission, and the controllers a test starts."""

    def __init__(self, api: KubeApi, kind: Kind) -> None:
        self.api, self.kind = api, kind
        self.admission = kind.install(api)
        self.controllers: list[Any] = []

    def controller(self, outcome: str, step_s: float = 0.1) -> Any:
        """Start the kind's controller playing ``outcome``; stopped before the API server."""
        thread = self.kind.controller(self, outcome, step_s)
        self.controllers.append(thread)
        thread.start()
        return thread

    def stop(self) -> None:
        for thread in self.controllers:
            thread.stopping.set()
            thread.join(10)

    def launcher(
        self,
        out: io.StringIO | None = None,
        cfg: Config | None = None,
        *,
        clock: FakeClock | None = None,
        sleep: Callable[[float], None] | None = None,
        **timing: Any,
    ) -> JobLauncher:
        """The kind's launcher on this API, :data:`FAST` unless ``timing`` says otherwise."""
        extra: dict[str, Any] = {}
        if clock is not None:
            extra = {"clock": clock, "sleep": sleep or clock.sleep}
        return self.kind.launcher(
            cfg or job_config(),
            STAGE,
            api_client=self.api.client(LAUNCHER_UA),
            out=out or io.StringIO(),
            timing=dataclasses.replace(FAST, **timing),
            **extra,
        )

    def custom(self, agent: str) -> kubernetes.client.CustomObjectsApi:
        """The custom objects API as another client (``agent``) sees it."""
        return kubernetes.client.CustomObjectsApi(self.api.client(agent))

    def create(self, body: dict[str, Any], agent: str = "previous-attempt") -> None:
        """Create a job of this kind as ``agent`` (an earlier attempt, someone else)."""
        r = self.kind.resource
        self.custom(agent).create_namespaced_custom_object(r.group, r.version, NS, r.plural, body)

    def jobs(self) -> list[dict[str, Any]]:
        r = self.kind.resource
        custom = self.custom("test-inspector")
        return custom.list_namespaced_custom_object(r.group, r.version, NS, r.plural)["items"]

    def path(self, name: str = "") -> str:
        """The API path of this kind's jobs in :data:`NS` (of one, given its name)."""
        r = self.kind.resource
        return f"/apis/{r.group}/{r.version}/namespaces/{NS}/{r.plural}" + (
            f"/{name}" if name else ""
        )

    def sent(self) -> list[kmock.Request]:
        """Every request the launcher under test made."""
        return self.api.requests(LAUNCHER_UA)

    def is_write(self, request: kmock.Request) -> bool:
        """A create or patch of a job of this kind."""
        resource = request.resource
        return (
            request.method.value.upper() in ("POST", "PATCH")
            and resource is not None
            and resource.plural == self.kind.resource.plural
            and not request.subresource
        )

    def is_create(self, request: kmock.Request) -> bool:
        """A create of a job of this kind that was meant to store it (not a dry run)."""
        return (
            self.is_write(request)
            and request.method.value.upper() == "POST"
            and request.params.get("dryRun") != "All"
        )

    def creates(self) -> int:
        return sum(1 for r in self.sent() if self.is_create(r))

    def deletes(self) -> list[kmock.Request]:
        return [r for r in self.sent() if r.method.value.upper() == "DELETE"]


@contextlib.contextmanager
def serve(kind: Kind) -> Iterator[JobCluster]:
    """The emulated API serving ``kind``; afterwards, the launcher's calls are checked
    against the kind's ``RBAC_RULES`` and each job it created against the CRD."""
    with KubeApi(kind.served) as api:
        cluster = JobCluster(api, kind)
        try:
            yield cluster
        finally:
            cluster.stop()
        used = {rbac_triple(r) for r in cluster.sent()}
        assert used <= declared(kind.rbac_rules), (
            f"calls outside RBAC_RULES: {sorted(used - declared(kind.rbac_rules))}"
        )
        refused = cluster.admission.refused if cluster.admission else []
        for r in cluster.sent():
            if cluster.is_write(r):
                assert r.params.get("fieldValidation") == "Strict", f"not strict: {r.url}"
            if cluster.is_create(r) and not any(r is x for x in refused):
                crdcheck.validate(r.data, kind.crds)


def step_pod(cluster: JobCluster, name: str, uid: str, phase: str = "Running") -> None:
    """The pipeline step's own pod (the launcher runs in it), as the kubelet reports it.
    Argo keeps a step's pod after it ended, ``Failed`` (OOM-killed, say) or ``Succeeded``,
    until the workflow's TTL."""
    core = kubernetes.client.CoreV1Api(cluster.api.client("kubelet"))
    core.create_namespaced_pod(
        NS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "uid": uid, "namespace": NS},
            "status": {"phase": phase},
        },
    )


# --------------------------------------------------------------------------- pod admission


class PodAdmission:
    """The API server's refusals of a training pod, as reactions on pod creates (the
    controllers then record FailedCreate, see the emulators). Each method adds one policy
    of the namespace; messages as the admission plugin writes them:

    - :meth:`quota_requires`: a ResourceQuota that counts ``limits.cpu`` refuses a pod one
      of whose containers sets no CPU limit (kubernetes plugin/pkg/admission/resourcequota,
      pkg/quota/v1/evaluator/core/pods.go ``enforcePodContainerConstraints``);
    - :meth:`no_service_account`: the ServiceAccount admission plugin refuses a pod whose
      ServiceAccount does not exist (plugin/pkg/admission/serviceaccount/admission.go);
    - :meth:`pod_security`: Pod Security admission at level ``restricted`` refuses a pod that
      lacks its securityContext settings (k8s.io/pod-security-admission policy checks
      allowPrivilegeEscalation, capabilities, runAsNonRoot, seccompProfile).
    """

    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self.rules: list[Callable[[dict[str, Any]], str | None]] = []

        def is_pod_create(r: kmock.Request) -> bool:
            return (
                r.action == kmock.action.CREATE
                and r.resource is not None
                and (r.resource.plural == "pods" and r.headers.get("User-Agent") != "kubelet")
            )

        api.emulator[is_pod_create] << self._admit

    def quota_requires(self, quota: str, resource: str = "limits.cpu") -> None:
        kind, name = resource.split(".")

        def rule(pod: dict[str, Any]) -> str | None:
            lacking = [
                c["name"]
                for c in pod["spec"]["containers"]
                if name not in (c.get("resources") or {}).get(kind, {})
            ]
            if lacking:
                return f"failed quota: {quota}: must specify {resource} for: {','.join(lacking)}"
            return None

        self.rules.append(rule)

    def no_service_account(self) -> None:
        def rule(pod: dict[str, Any]) -> str | None:
            account = pod["spec"].get("serviceAccountName", "default")
            return (
                f"error looking up service account {NS}/{account}: serviceaccount "
                f'"{account}" not found'
            )

        self.rules.append(rule)

    def pod_security(self) -> None:
        self.rules.append(_restricted)

    def _admit(self, request: kmock.Request) -> Any:
        pod = request.data
        for rule in self.rules:
            why = rule(pod)
            if why:
                key = (request.resource, request.namespace, pod["metadata"]["name"])
                self.api.emulator.objects[key].delete()  # stored before reactions run
                return kmock.KubernetesError(
                    status=403,
                    reason="Forbidden",
                    message=f'pods "{pod["metadata"]["name"]}" is forbidden: {why}',
                )
        raise NotImplementedError  # admitted


def _restricted(pod: dict[str, Any]) -> str | None:
    """The checks of the Pod Security Standard ``restricted`` our pods meet or miss, and
    Pod Security admission's message (k8s.io/pod-security-admission/policy)."""
    spec = pod["spec"]
    pod_sc = spec.get("securityContext") or {}
    failed = []
    for c in spec["containers"]:
        sc, name = c.get("securityContext") or {}, c["name"]
        if sc.get("allowPrivilegeEscalation") is not False:
            failed.append(
                f'allowPrivilegeEscalation != false (container "{name}" must set '
                "securityContext.allowPrivilegeEscalation=false)"
            )
        if "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
            failed.append(
                f'unrestricted capabilities (container "{name}" must set '
                'securityContext.capabilities.drop=["ALL"])'
            )
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            failed.append(
                f'runAsNonRoot != true (pod or container "{name}" must set '
                "securityContext.runAsNonRoot=true)"
            )
        profile = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if profile not in ("RuntimeDefault", "Localhost"):
            failed.append(
                f'seccompProfile (pod or container "{name}" must set '
                'securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")'
            )
    if failed:
        return 'violates PodSecurity "restricted:latest": ' + ", ".join(failed)
    return None
