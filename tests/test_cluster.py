"""The ``cluster`` config section is the one source of the pods' sizes and placement.

Each preset sizes its pods for its card; the training jobs, the evaluate step and the
InferenceService's predictor are built from the config alone; pipeline parameters reach it
through one function (``stages.configure_stage``); every object emitted validates against the
real CRDs (tests/harness/crdcheck.py) and a bad value is refused naming its field.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from ldm_core import stages
from ldm_core.config import PRESETS, ConfigError, TrainingResources, load_config
from ldm_core.deploy import deploy, deploy_kserve
from ldm_core.kube import isvc_build
from ldm_core.kube import pytorchjob as pj
from ldm_core.launcher import TrainingTask
from tests.harness import crdcheck

GPU_PRESETS = ("gpu-16g", "gpu-32g", "multi-gpu")


def _quantity(text: str) -> float:
    """A Kubernetes quantity in base units (enough of the grammar for these tests)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def _job(preset: str, nproc: int = 1, nnodes: int = 1, *extra: str) -> dict[str, Any]:
    cfg = load_config(preset=preset, overrides=list(extra))
    task = TrainingTask(
        name="ldm-ldm-0123456789ab",
        verb="train-diffusion",
        args=["--data", "/workspace/d", "--output", "/workspace/o"],
        nproc_per_node=nproc,
        nnodes=nnodes,
    )
    job = pj.build_pytorchjob(task, cfg, "train_diffusion")
    crdcheck.validate(job)
    return job


def _pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


# --------------------------------------------------------------------------- presets


def test_tiny_cpu_asks_for_no_gpu_anywhere():
    cfg = load_config(preset="tiny-cpu")
    for stage in ("train_autoencoder", "train_diffusion", "evaluate", "predictor"):
        res = getattr(cfg.cluster, stage)
        assert res.gpus == 0, stage
        assert _quantity(res.cpu) <= 2 and _quantity(res.memory) <= 8 * 2**30, stage
    assert not cfg.cluster.node_selector and not cfg.cluster.tolerations
    pod = _pod(_job("tiny-cpu", nproc=2))
    (container,) = pod["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert stages.configure_stage("tiny-cpu", []).evaluate_gpus == "0"


@pytest.mark.parametrize(
    "preset, node_cpu, node_memory_gi",
    # The smallest common node of each card: n1-standard-8 + T4 (8 vCPU, 30 GiB), an
    # a2-highgpu-1g (12 vCPU, 85 GiB), an 8-GPU A100/H100 node (96 vCPU, 1152 GiB).
    [("gpu-16g", 8, 30), ("gpu-32g", 12, 85), ("multi-gpu", 96, 1152)],
)
def test_gpu_presets_fit_their_node(preset, node_cpu, node_memory_gi):
    cfg = load_config(preset=preset)
    gpus_per_node = 8 if preset == "multi-gpu" else 1
    for stage in ("train_autoencoder", "train_diffusion"):
        pod = getattr(cfg.cluster, stage).times(gpus_per_node)
        assert pod.gpus == gpus_per_node, stage
        assert _quantity(pod.cpu) <= node_cpu, stage
        # Memory limit and /dev/shm (memory-backed) together stay on the node.
        assert _quantity(pod.memory) + _quantity(pod.shm) <= node_memory_gi * 2**30, stage
    for stage in ("evaluate", "predictor"):
        res = getattr(cfg.cluster, stage)
        assert res.gpus == 1 and _quantity(res.memory) <= node_memory_gi * 2**30, stage
    assert cfg.cluster.node_selector == {"nvidia.com/gpu.present": "true"}
    assert cfg.cluster.tolerations[0].to_k8s() == {
        "key": "nvidia.com/gpu",
        "operator": "Exists",
        "effect": "NoSchedule",
    }


def test_multi_gpu_pods_ask_for_nproc_gpus_and_scale_the_rest():
    one = load_config(preset="multi-gpu").cluster.train_diffusion
    for nproc in (1, 4, 8):
        (container,) = _pod(_job("multi-gpu", nproc, 2))["containers"]
        res = container["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == str(nproc)
        assert _quantity(res["requests"]["cpu"]) == nproc * _quantity(one.cpu)
        assert res["requests"]["memory"] == res["limits"]["memory"]
        assert _quantity(res["limits"]["memory"]) == nproc * _quantity(one.memory)
        assert "cpu" not in res["limits"]  # no throttling of torch's threads
        volumes = {v["name"]: v for v in _pod(_job("multi-gpu", nproc))["volumes"]}
        assert _quantity(volumes["dshm"]["emptyDir"]["sizeLimit"]) == nproc * _quantity(one.shm)


def test_times_keeps_each_quantity_in_its_unit():
    res = TrainingResources(gpus=1, cpu="500m", memory="12Gi", shm="1.5Gi").times(3)
    assert res == TrainingResources(gpus=3, cpu="1500m", memory="36Gi", shm="4.5Gi")


# --------------------------------------------------------------------------- training pods


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_training_pods_come_from_the_config(preset):
    cfg = load_config(
        preset=preset,
        overrides=[
            "cluster.priority_class=research-low",
            "cluster.image_pull_secrets=[regcred]",
            "cluster.run_timeout_s=7200",
            "cluster.image=registry.example/brain-ldm-training:2",
        ],
    )
    job = pj.build_pytorchjob(
        TrainingTask(name="ldm-ae-0123456789ab", verb="train-autoencoder"),
        cfg,
        "train_autoencoder",
    )
    crdcheck.validate(job)
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 7200
    pod = _pod(job)
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/brain-ldm-training:2"
    assert pod["priorityClassName"] == "research-low"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "training"
    # The non-root user writes to NFS-like volumes through its group.
    assert pod["securityContext"]["fsGroup"] == container["securityContext"]["runAsUser"]
    # The S3 credentials and endpoint the training code reads, from the Secret by name.
    assert container["envFrom"] == [{"secretRef": {"name": "brain-ldm-s3"}}]
    claim = {v["name"]: v for v in pod["volumes"]}["workdir"]["persistentVolumeClaim"]
    assert claim == {"claimName": "brain-ldm-data"}
    gpus = cfg.cluster.train_autoencoder.gpus
    assert container["resources"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)


def test_no_s3_secret_means_no_env_from():
    (container,) = _pod(_job("tiny-cpu", 1, 1, "cluster.s3_secret="))["containers"]
    assert "envFrom" not in container


# --------------------------------------------------------------------------- predictor


def _isvc(preset: str, *extra: str) -> dict[str, Any]:
    cfg = load_config(preset=preset, overrides=list(extra))
    obj = isvc_build.build_inference_service(
        cfg, name="brain-ldm", namespace="ns", storage_uri="s3://b/m/1", bundle_digest="ab" * 32
    )
    crdcheck.validate(obj)
    return obj


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_predictor_capacity_comes_from_the_config(preset):
    cfg = load_config(preset=preset)
    obj = _isvc(preset)
    pred = obj["spec"]["predictor"]
    assert (pred["minReplicas"], pred["maxReplicas"]) == (1, 1)
    # What the server generates at once: its loops, each a batch of requests.
    assert pred["containerConcurrency"] == cfg.serving.max_concurrency * cfg.serving.max_batch_size
    # A replica scales out once its batch is full, not at its second request.
    assert (pred["scaleMetric"], pred["scaleTarget"]) == (
        "concurrency",
        pred["containerConcurrency"],
    )
    res = pred["model"]["resources"]
    assert res["requests"] == {
        "cpu": cfg.cluster.predictor.cpu,
        "memory": cfg.cluster.predictor.memory,
    }
    if preset in GPU_PRESETS:
        assert res["limits"]["nvidia.com/gpu"] == "1"
        assert pred["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pred["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert "nvidia.com/gpu" not in res["limits"] and "nodeSelector" not in pred
    assert obj["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    assert "securityContext" not in pred  # Knative refuses it without a feature flag


def test_scale_to_zero_and_raw_deployment():
    pred = _isvc("tiny-cpu", "serving.min_replicas=0", "serving.max_replicas=3")["spec"][
        "predictor"
    ]
    assert (pred["minReplicas"], pred["maxReplicas"]) == (0, 3)
    raw = _isvc(
        "gpu-16g",
        "serving.deployment_mode=RawDeployment",
        "serving.scale_metric=cpu",
        "serving.scale_target=70",
        "serving.max_concurrency=2",
        "serving.max_batch_size=1",
        "cluster.predictor.gpus=2",
    )
    assert raw["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    pred = raw["spec"]["predictor"]
    assert (pred["scaleMetric"], pred["scaleTarget"], pred["containerConcurrency"]) == (
        "cpu",
        70,
        2,
    )
    assert pred["model"]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pred["securityContext"]["fsGroup"] == 1000


def test_deploy_kserve_takes_no_sizing_arguments():
    """Sizes come from the config only: no keyword list repeating its defaults."""
    params = set(inspect.signature(deploy_kserve).parameters)
    assert not params & {"gpus", "cpu", "memory", "min_replicas", "max_replicas", "namespace"}
    with pytest.raises(Exception, match="gpus: not a setting of the kserve backend"):
        deploy(load_config(), "/nonexistent", backend="kserve", storage_prefix="s3://b", gpus=1)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.train_autoencoder.gpus=2", "cluster.train_autoencoder.gpus: 2 must be 0 or 1"),
        ("cluster.evaluate.gpus=-1", "cluster.evaluate.gpus: -1 must be 0 or 1"),
        ("cluster.predictor.gpus=-1", "cluster.predictor.gpus: -1 must be >= 0"),
        ("cluster.train_diffusion.memory=48GB", "cluster.train_diffusion.memory: '48GB' is not"),
        ("cluster.predictor.cpu=two", "cluster.predictor.cpu: 'two' is not a Kubernetes quantity"),
        ("cluster.train_autoencoder.shm=lots", "cluster.train_autoencoder.shm: 'lots'"),
        ("cluster.pvc_name=Data_PVC", "cluster.pvc_name: 'Data_PVC' is not a Kubernetes"),
        ("cluster.namespace=Team.A", "cluster.namespace: 'Team.A' is not a namespace"),
        ("cluster.tolerations=[{key: a, operator: Exist}]", "cluster.tolerations[0].operator"),
        ("cluster.tolerations=[{key: a, effect: NoExec}]", "cluster.tolerations[0].effect"),
        ("cluster.node_selector=[a]", "cluster.node_selector: expected a mapping"),
        ("cluster.pending_timeout_s=0", "cluster.pending_timeout_s: must be positive"),
        ("cluster.trian_autoencoder.gpus=1", "did you mean 'train_autoencoder'"),
        ("serving.min_replicas=-1", "serving.min_replicas: -1 is not possible"),
        ("serving.max_replicas=0", "serving.max_replicas: 0 is below"),
        ("serving.deployment_mode=Raw", "serving.deployment_mode: 'Raw' is not one of"),
        ("serving.scale_metric=latency", "serving.scale_metric: 'latency' is not one of"),
    ],
)
def test_bad_cluster_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_what_kserve_cannot_do_in_raw_deployment_is_refused():
    raw = "serving.deployment_mode=RawDeployment"
    assert load_config(overrides=[raw]).serving.autoscale_metric == "cpu"  # the mode alone
    with pytest.raises(ConfigError, match="serving.scale_metric: concurrency needs Knative"):
        load_config(overrides=[raw, "serving.scale_metric=concurrency"])
    with pytest.raises(ConfigError, match="no scale to zero without Knative"):
        load_config(overrides=[raw, "serving.scale_metric=cpu", "serving.min_replicas=0"])


def test_a_gpu_training_device_needs_a_gpu_pod():
    with pytest.raises(ConfigError, match="cluster.train_autoencoder.gpus: 0, but train.device"):
        load_config(preset="gpu-16g", overrides=["cluster.train_autoencoder.gpus=0"])
    # Evaluate samples on train.device: a CPU evaluate pod needs a device that can be a CPU.
    with pytest.raises(ConfigError, match="cluster.evaluate.gpus: 0, but train.device is cuda"):
        load_config(preset="gpu-16g", overrides=["cluster.evaluate.gpus=0"])
    cpu_eval = ["cluster.evaluate.gpus=0", "train.device=auto"]
    assert load_config(preset="gpu-16g", overrides=cpu_eval).cluster.evaluate.gpus == 0


# --------------------------------------------------------------------------- pipeline parameters


def test_parameters_fold_into_overrides_and_user_overrides_win(tmp_path):
    params = {
        "image": "registry.example/ldm:3",
        "pvc_name": "brain-ldm-data",
        "nproc": 2,
        "eval_gpus": 0,
        "deployment_mode": "Serverless",
        "min_replicas": 0,
        "max_replicas": 4,
    }
    out = stages.configure_stage(
        "gpu-16g",
        ["serving.max_replicas=2", "cluster.evaluate.memory=20Gi", "train.device=auto"],
        tmp_path / "config",
        **params,
    )
    assert out.overrides == [
        "cluster.image=registry.example/ldm:3",
        "cluster.pvc_name=brain-ldm-data",
        "train.nproc=2",
        "cluster.evaluate.gpus=0",
        "serving.deployment_mode=Serverless",
        "serving.min_replicas=0",
        "serving.max_replicas=4",
        "serving.max_replicas=2",
        "cluster.evaluate.memory=20Gi",
        "train.device=auto",
    ]
    assert (out.evaluate_cpu, out.evaluate_memory, out.evaluate_gpus) == ("4", "20Gi", "0")
    cfg = stages.resolve_config("gpu-16g", out.overrides)
    assert cfg.cluster.image == "registry.example/ldm:3"
    assert (cfg.serving.min_replicas, cfg.serving.max_replicas) == (0, 2)
    saved = load_config(tmp_path / "config" / "config.yaml")
    assert saved.cluster == cfg.cluster and saved.serving == cfg.serving
    assert cfg.train.nproc == 2
    # The data and training steps get the overrides of the sections they read, in order.
    assert out.data_overrides == []
    assert out.training_overrides == [
        "cluster.image=registry.example/ldm:3",
        "cluster.pvc_name=brain-ldm-data",
        "train.nproc=2",
        "cluster.evaluate.gpus=0",
        "cluster.evaluate.memory=20Gi",
        "train.device=auto",
    ]
    # Unset parameters (each field's own "as the config says" value) leave the preset alone.
    unset = {name: unset for name, (_, unset) in stages.PIPELINE_PARAMETERS.items()}
    assert stages.parameter_overrides(unset) == []
    assert stages.configure_stage("gpu-16g", [], **unset).evaluate_gpus == "1"


def test_every_pipeline_parameter_reaches_the_config_field_it_names():
    """Each parameter set to a valid value lands in its field, and only there: the table is
    the one route from the Kubeflow UI to the config."""
    values = {
        "image": "registry.example/ldm:4",
        "step_image": "registry.example/ldm-cpu:4",
        "pvc_name": "other-pvc",
        "nproc": 3,
        "nnodes": 2,
        "eval_samples": 5,
        "eval_steps": 7,
        "eval_gpus": 1,
        "gate_min_ms_ssim_ratio": 0.4,
        "gate_max_mmd": 0.25,
        "gate_min_mask_dice": 0.65,
        "gate_max_hist_distance": 0.2,
        "deployment_mode": "RawDeployment",
        "min_replicas": 2,
        "max_replicas": 3,
    }
    assert set(values) == set(stages.PIPELINE_PARAMETERS)
    default = load_config(preset="tiny-cpu")
    # RawDeployment's HPA scales on cpu or memory (ldm_core.config.validation).
    cfg = stages.resolve_config(
        "tiny-cpu",
        [
            *stages.parameter_overrides(values),
            "serving.scale_metric=cpu",
            "serving.scale_target=80",
        ],
    )
    for name, (key, _) in stages.PIPELINE_PARAMETERS.items():
        section, *rest = key.split(".")
        got, was = getattr(cfg, section), getattr(default, section)
        for part in rest:
            got, was = getattr(got, part), getattr(was, part)
        assert got == values[name] and got != was, name


def test_each_step_reads_its_sections_as_the_full_config_says():
    """The data and training steps resolve their config from part of the overrides: the
    sections each reads must come out exactly as the whole run's config has them, and
    what they do not read (here the gate, serving) must be left out, or a gate change
    would re-run them (their inputs are their KFP cache key)."""
    user = [
        "data.val_fraction=0.25",
        "storage.part_size_mb=32",
        "model.unet.num_res_blocks=2",
        "train.seed=7",
        "cluster.train_diffusion.memory=12Gi",
        "evaluation.gate_min_detail_ratio=0.8",
        "serving.max_queue=12",
        "sampling.steps=20",
    ]
    out = stages.configure_stage("tiny-cpu", user, nproc=2, gate_max_mmd=0.2)
    full = stages.resolve_config("tiny-cpu", out.overrides)
    for step, overrides in (("data", out.data_overrides), ("training", out.training_overrides)):
        part = stages.resolve_config("tiny-cpu", overrides)
        for section in stages.STEP_SECTIONS[step]:
            assert getattr(part, section) == getattr(full, section), (step, section)
        assert part.evaluation != full.evaluation and part.serving != full.serving, step
        assert part.sampling != full.sampling, step


def test_configure_fails_the_run_on_a_bad_config_or_a_pvc_it_cannot_mount():
    with pytest.raises(ConfigError, match="cluster.predictor.memory"):
        stages.configure_stage("", ["cluster.predictor.memory=lots"])
    with pytest.raises(stages.StageError, match="cluster.pvc_name: 'other' differs"):
        stages.configure_stage("", ["cluster.pvc_name=other"], pvc_name="brain-ldm-data")
    with pytest.raises(stages.StageError, match="cluster.workdir: '/data' differs"):
        stages.configure_stage("", ["cluster.workdir=/data"], mount_path="/workspace")
    with pytest.raises(stages.StageError, match="pipeline parameters nprocs: not config"):
        stages.configure_stage("", [], nprocs=2)
