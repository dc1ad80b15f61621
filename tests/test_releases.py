"""Everything brain-ldm creates on a cluster, checked against each supported Kubeflow release.

manifests/releases.yaml lists what Kubeflow 1.10.0, 1.10.2 and 1.11.0 install. For each:

- every custom resource the builders emit validates against that release's CRDs, strictly (a
  field the release's schema does not declare is an error: its API server would prune it):
  the PyTorchJob where the Training Operator is installed, the TrainJob where Trainer v2 is,
  the InferenceService (both ways of serving, both deployment modes, a canary) and the
  ServingRuntime, for every preset;
- every pod we create passes the Pod Security level of the release's profile namespaces:
  the training pods of both kinds, the predictor as KServe and Knative render it, and the
  pipeline's step pods as the KFP backend renders them;
- the pipeline's retry policies sit where the release's KFP backend applies them.

The kustomize output of manifests/ is checked per release in tests/test_manifests.py, the
compiled pipeline against each backend's protos in tests/test_kfp_backend_compat.py.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import yaml

from ldm_core.config import PRESETS, Config, load_config
from ldm_core.kube import isvc_build
from ldm_core.kube.pytorchjob import build_pytorchjob
from ldm_core.kube.trainjob import build_trainjob
from ldm_core.launcher import TrainingTask
from tests.harness import crdcheck
from tests.harness.pod_security import violations
from tests.harness.releases import RELEASES, ROOT, Release
from tests.harness.trainer import node_pod, strategic_merge

PACKAGE = ROOT / "pipelines" / "brain_ldm.yaml"
NS = "brain-ldm"
STAGES = ("train_autoencoder", "train_diffusion")
COMPONENT_LEVELS = ROOT / "manifests" / "components" / "pod-security" / "namespace-labels.yaml"


def _with(what: str) -> list[Release]:
    return [r for r in RELEASES if r.entries[what]["version"]]


def _task(nnodes: int) -> TrainingTask:
    return TrainingTask(
        name="ldm-ae-0123456789ab",
        verb="train-autoencoder",
        args=["--data", "/workspace/cache", "--output", "/workspace/runs/ae"],
        nproc_per_node=2,
        nnodes=nnodes,
        env={"LDM_SEED": "0"},
    )


def _configs() -> list[Config]:
    """Every preset, and one that sets every optional placement field."""
    extra = [
        "cluster.image_pull_secrets=[regcred]",
        "serving.deployment_mode=RawDeployment",
        "serving.scale_metric=cpu",
    ]
    return [load_config(preset=p) for p in sorted(PRESETS)] + [load_config(overrides=extra)]


def _training_jobs(build) -> list[dict[str, Any]]:
    return [
        build(_task(nnodes), cfg, stage)
        for cfg, stage, nnodes in itertools.product(_configs(), STAGES, (1, 2))
    ]


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("release", RELEASES, ids=str)
def test_every_entry_of_the_release_table_names_its_source(release):
    for name, entry in release.entries.items():
        source = entry.get("source") or {}
        assert {"repo", "tag", "path"} <= set(source), f"{release} {name}: source {source}"
        assert all(source[k] for k in ("repo", "tag", "path")), f"{release} {name}"
    assert {p.name for p in release.crd_files} >= {
        "serving.kserve.io_inferenceservices.yaml",
        "serving.kserve.io_servingruntimes.yaml",
    }
    assert all(p.is_file() for p in release.crd_files)


@pytest.mark.parametrize("release", RELEASES, ids=str)
def test_the_release_serves_the_training_api_auto_finds(release):
    """``backend=auto`` takes PyTorchJobs where that API is served, else TrainJobs: the
    release's CRDs serve exactly the kind the table says ``auto`` finds."""
    kinds = {kind for _, kind in crdcheck.known_kinds(release)}
    assert release.training_api in kinds
    assert len({"PyTorchJob", "TrainJob"} & kinds) == 1, kinds


# --------------------------------------------------------------------------- CRDs


@pytest.mark.parametrize("release", _with("training_operator"), ids=str)
def test_pytorchjobs_validate_against_the_release(release):
    for job in _training_jobs(build_pytorchjob):
        crdcheck.validate(job, release=release)


@pytest.mark.parametrize("release", _with("trainer"), ids=str)
def test_trainjobs_validate_against_the_release(release):
    """The TrainJob API a release's Trainer serves (``cluster.trainer_api``, found at run time
    with ``auto``): v2.1.x's has ``podTemplateOverrides`` where v2.2+ has ``runtimePatches``
    and ``activeDeadlineSeconds``; a TrainJob for the other API is refused (or pruned)."""
    version = release.entries["trainer"]["version"]
    api = "v2.1" if version.startswith("v2.1.") else "v2.2"
    other = "v2.2" if api == "v2.1" else "v2.1"
    for job in _training_jobs(lambda task, cfg, stage: build_trainjob(task, cfg, stage, api)):
        crdcheck.validate(job, release=release)
    wrong = build_trainjob(_task(1), _configs()[0], STAGES[0], other)
    with pytest.raises(crdcheck.InvalidResource, match="unknown field"):
        crdcheck.validate(wrong, release=release)


def _inference_services(cfg: Config) -> list[dict[str, Any]]:
    def build(**deploy: Any) -> dict[str, Any]:
        return isvc_build.build_inference_service(
            cfg, name="brain-ldm", namespace=NS, storage_uri="s3://b/m/1", **deploy
        )

    return [
        build(bundle_digest="ab" * 32),
        build(bundle_digest="ab" * 32, runtime=None),
        build(canary_percent=10),
    ]


@pytest.mark.parametrize("release", RELEASES, ids=str)
def test_inference_services_and_serving_runtimes_validate_against_the_release(release):
    for cfg in _configs():
        for obj in _inference_services(cfg):
            crdcheck.validate(obj, release=release)
        crdcheck.validate(isvc_build.build_serving_runtime(cfg, "brain-ldm", NS), release=release)


def test_a_field_newer_than_the_release_is_an_error_there_only():
    """The check is release-aware: ``predictor.autoScaling`` came with KServe 0.15.0, so
    Kubeflow 1.10.0 (KServe 0.14.1) would prune it while 1.10.2 keeps it."""
    by_name = {r.name: r for r in RELEASES}
    isvc = _inference_services(load_config())[0]
    isvc["spec"]["predictor"]["autoScaling"] = {
        "metrics": [
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 80},
                },
            }
        ]
    }
    crdcheck.validate(isvc, release=by_name["1.10.2"])
    with pytest.raises(crdcheck.InvalidResource, match=r"\.spec\.predictor\.autoScaling"):
        crdcheck.validate(isvc, release=by_name["1.10.0"])


# --------------------------------------------------------------------------- Pod Security


def _levels(release: Release) -> list[str]:
    """What our pods must pass on ``release``: its profile namespaces' level, and the level
    our own opt-in component (manifests/components/pod-security) enforces."""
    labels = yaml.safe_load(COMPONENT_LEVELS.read_text())["metadata"]["labels"]
    return [release.pod_security, labels["pod-security.kubernetes.io/enforce"]]


def _assert_admitted(pods: dict[str, dict[str, Any]], release: Release) -> None:
    assert pods
    for level in _levels(release):
        refused = {where: violations(spec, level) for where, spec in pods.items()}
        refused = {where: why for where, why in refused.items() if why}
        assert not refused, f"Kubeflow {release}, Pod Security {level!r} refuses: {refused}"


def _pytorchjob_pods() -> dict[str, dict[str, Any]]:
    """Every replica's pod template: the Training Operator adds only env, ports and labels."""
    return {
        f"{job['metadata']['name']}/{rtype}": replica["template"]["spec"]
        for job in _training_jobs(build_pytorchjob)
        for rtype, replica in job["spec"]["pytorchReplicaSpecs"].items()
    }


def _trainjob_pods(release: Release) -> dict[str, dict[str, Any]]:
    """Node 0's pod as the Trainer renders it (tests/harness/trainer.py ``node_pod``) from
    the release's own torch-distributed ClusterTrainingRuntime."""
    runtime_file = ROOT / release.entries["trainer"]["runtimes"] / "torch_distributed.yaml"
    runtime = yaml.safe_load(runtime_file.read_text())["spec"]
    return {
        f"trainjob-{i}": node_pod(job, runtime, 0, "x")["spec"]
        for i, job in enumerate(_training_jobs(build_trainjob))
    }


@pytest.mark.parametrize("release", RELEASES, ids=str)
def test_training_pods_pass_the_release_pod_security(release):
    pods = _pytorchjob_pods() if release.training_api == "PyTorchJob" else _trainjob_pods(release)
    _assert_admitted(pods, release)


STORAGE_INITIALIZER = {
    "name": "storage-initializer",
    "image": "kserve/storage-initializer",
    "args": ["s3://b/m/1", "/mnt/models"],
    "terminationMessagePolicy": "FallbackToLogsOnError",
    "volumeMounts": [{"name": "kserve-provision-location", "mountPath": "/mnt/models"}],
}
"""KServe's storage-initializer init container, as its webhook injects it for a storageUri:
no securityContext (kserve pkg/webhook/admission/pod/storage_initializer_injector.go,
``initContainer`` at :368 in v0.14.1 and :377 in v0.15.0/v0.15.2; only a runAsUser with Istio
CNI, ``SetIstioCniSecurityContext``)."""
QUEUE_PROXY = {
    "name": "queue-proxy",
    "image": "knative/queue",
    "securityContext": {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    },
}
"""Knative's queue-proxy sidecar in Serverless mode (knative/serving knative-v1.16.2, which all
three releases install: pkg/reconciler/revision/resources/queue.go:83-93)."""
MODEL_FIELDS = ("modelFormat", "runtime", "runtimeVersion", "protocolVersion", "storageUri")
COMPONENT_FIELDS = (
    "minReplicas",
    "maxReplicas",
    "scaleMetric",
    "scaleTarget",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "model",
)
"""Predictor fields that are KServe's own, not the pod's (ComponentExtensionSpec, model)."""


def predictor_pod(isvc: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The predictor's pod spec as KServe and Knative make it from our InferenceService and
    ServingRuntime: the runtime's container with the model's container fields merged over it
    (``MergeRuntimeContainers``) and the runtime's pod fields under the predictor's
    (``MergePodSpec``; kserve pkg/controller/v1beta1/inferenceservice/utils/utils.go:186,224 in
    v0.14.1, :195,233 in v0.15.x), or the predictor's own containers; then the storage
    initializer, and in Serverless mode Knative's queue-proxy."""
    pred = isvc["spec"]["predictor"]
    spec = {k: v for k, v in pred.items() if k not in COMPONENT_FIELDS}
    if "model" in pred:
        rt = runtime["spec"]
        model = {k: v for k, v in pred["model"].items() if k not in MODEL_FIELDS}
        runtime_pod = {
            k: rt[k] for k in ("nodeSelector", "affinity", "tolerations", "volumes") if k in rt
        }
        spec = strategic_merge(runtime_pod, spec)
        spec["containers"] = [strategic_merge(rt["containers"][0], model)]
    spec = copy.deepcopy(spec)
    spec["initContainers"] = [STORAGE_INITIALIZER]
    spec.setdefault("volumes", []).append({"name": "kserve-provision-location", "emptyDir": {}})
    if isvc["metadata"]["annotations"][isvc_build.DEPLOYMENT_MODE_ANNOTATION] == "Serverless":
        spec["containers"].append(QUEUE_PROXY)
    return spec


@pytest.mark.parametrize("release", RELEASES, ids=str)
def test_the_predictor_passes_the_release_pod_security(release):
    pods = {}
    for i, cfg in enumerate(_configs()):
        runtime = isvc_build.build_serving_runtime(cfg, "brain-ldm", NS)
        for j, isvc in enumerate(_inference_services(cfg)):
            pods[f"{cfg.serving.deployment_mode}-{i}-{j}"] = predictor_pod(isvc, runtime)
    assert {"Serverless", "RawDeployment"} == {name.split("-")[0] for name in pods}
    _assert_admitted(pods, release)


def test_only_kserves_storage_initializer_misses_restricted():
    """Our containers meet ``restricted`` (the level components/pod-security warns on) in both
    modes; KServe's storage initializer, which has no securityContext, does not, so a namespace
    enforcing ``restricted`` refuses every predictor that loads a storageUri."""
    for cfg in _configs():
        runtime = isvc_build.build_serving_runtime(cfg, "brain-ldm", NS)
        for isvc in _inference_services(cfg):
            problems = violations(predictor_pod(isvc, runtime), "restricted")
            assert problems and all("initContainers[0]" in p for p in problems), problems
    for where, pod in _pytorchjob_pods().items():
        assert violations(pod, "restricted") == [], where


def _step_pods() -> dict[str, dict[str, Any]]:
    """Each pipeline step's pod as the KFP backend makes it from the compiled YAML: the
    executor's image, the task's kfp-kubernetes volumes and tolerations, the launcher's
    emptyDirs. No securityContext anywhere: the backend's Argo compiler sets none on the
    containers, and on the pod only a runAsUser where the API server is configured with one
    (kubeflow/pipelines backend/src/v2/compiler/argocompiler/container.go; argo.go:128-131 at
    2.5.0, :153-156 at 2.15.0, absent at 2.4.1)."""
    spec, platform = yaml.safe_load_all(PACKAGE.read_text())
    settings = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    pods = {}
    for name, executor in spec["deploymentSpec"]["executors"].items():
        k8s = settings.get(name, {})
        volumes = [{"name": "kfp-launcher", "emptyDir": {}}]
        volumes += [
            {"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": "x"}}
            for i, _ in enumerate(k8s.get("pvcMount", []))
        ]
        volumes += [
            {"name": f"secret-{i}", "secret": {"secretName": s["secretName"]}}
            for i, s in enumerate(k8s.get("secretAsVolume", []))
        ]
        volumes += [
            {"name": f"empty-{i}", "emptyDir": {}}
            for i, _ in enumerate(k8s.get("emptyDirMounts", []))
        ]
        pods[name] = {
            "initContainers": [{"name": "kfp-launcher", "image": "kfp-launcher"}],
            "containers": [{"name": "main", "image": executor["container"]["image"]}],
            "volumes": volumes,
            "tolerations": k8s.get("tolerations", []),
        }
    return pods


@pytest.mark.parametrize("release", RELEASES, ids=str)
def test_the_pipeline_step_pods_pass_the_release_pod_security(release):
    _assert_admitted(_step_pods(), release)


def test_step_pods_do_not_meet_restricted_so_the_component_enforces_baseline():
    """Why components/pod-security enforces ``baseline`` and only warns on ``restricted``: the
    step pods KFP makes carry no securityContext, which ``restricted`` refuses."""
    labels = yaml.safe_load(COMPONENT_LEVELS.read_text())["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert all(violations(pod, "restricted") for pod in _step_pods().values())


# --------------------------------------------------------------------------- KFP retries


@pytest.mark.parametrize("release", RELEASES, ids=str)
def test_retried_tasks_are_where_the_release_backend_applies_retries(release):
    """Backends 2.4.1 and 2.5.0 look a task's retryPolicy up among the root DAG's tasks only
    (the table's ``kfp_retry_policy``), so a retried task inside a ``dsl.If`` would run once."""
    spec, _ = yaml.safe_load_all(PACKAGE.read_text())
    dags = {"root": spec["root"]["dag"]}
    dags |= {name: c["dag"] for name, c in spec["components"].items() if "dag" in c}
    retried = {
        (dag, task)
        for dag, d in dags.items()
        for task, t in d["tasks"].items()
        if "retryPolicy" in t
    }
    assert retried, "the training tasks retry (a retried component adopts its job)"
    if release.entries["kfp_retry_policy"]["applies_to"] == "root-dag-tasks":
        assert {dag for dag, _ in retried} == {"root"}, retried
