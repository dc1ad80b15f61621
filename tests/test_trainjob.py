"""What only a TrainJob (Kubeflow Trainer v2) does: its shape and how the Trainer renders it
into pods, the admission it passes, its status, and a Job that replaces an evicted pod.

The Trainer's admission chain and controller (with JobSet, Job and kubelet under it) are
:mod:`tests.harness.trainer`; what the launcher shares with the PyTorchJob launcher is
tested for both in tests/test_training_jobs.py.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from ldm_core.kube import pytorchjob as pj
from ldm_core.kube import trainjob as tj
from ldm_core.kube.job_launcher import true_condition
from ldm_core.kube.training_job import SPEC_HASH_ANNOTATION, spec_hash
from ldm_core.launcher import LaunchError
from tests.harness import crdcheck
from tests.harness.trainer import TORCH_DISTRIBUTED, node_pod
from tests.harness.training_jobs import STAGE, TRAINJOB, job_config, serve, training_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster():
    with serve(TRAINJOB) as cluster:
        yield cluster


# --------------------------------------------------------------------------- builder


def test_trainjob_shape_and_validity():
    job = tj.build_trainjob(training_task(nnodes=2), job_config(), STAGE)
    crdcheck.validate(job)
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 2
    assert trainer["image"] == "registry.example/brain-ldm-training:0.1.0"
    assert trainer["command"][:4] == ["torchrun", "-m", "ldm_core.cli", "train-autoencoder"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
    env = {e["name"]: e for e in trainer["env"]}
    assert env["LDM_SEED"]["value"] == "0" and env["HOME"]["value"] == "/tmp"
    assert not set(env) & set(tj.RESERVED_ENV)
    # The S3 Secret's keys by reference (trainer.env has no envFrom); never its values.
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "brain-ldm-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert env["S3_ENDPOINT"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert all("value" not in env[k] for k in tj.S3_SECRET_KEYS)
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == tj.PATCH_MANAGER
    assert spec["activeDeadlineSeconds"] == 24 * 3600
    assert job["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == spec_hash(job)


def test_the_pod_the_trainer_makes_is_the_pytorchjob_pod():
    """Rendered as the Trainer does (runtime template + runtimePatches + spec.trainer), the
    node pod asks for what the PyTorchJob's master pod asks for: the same sizing, volumes,
    security and scheduling, under the runtime's container name."""
    task, cfg = training_task(nnodes=2, nproc=4), job_config()
    job = tj.build_trainjob(task, cfg, STAGE)
    pod = node_pod(job, TORCH_DISTRIBUTED, rank=1, suffix="abcde")
    master = pj.build_pytorchjob(task, cfg, STAGE)["spec"]["pytorchReplicaSpecs"]["Master"]
    want, got = master["template"]["spec"], pod["spec"]
    (wc,), (gc,) = want["containers"], got["containers"]
    assert gc["name"] == "node"
    for key in ("image", "command", "resources", "securityContext", "volumeMounts"):
        assert gc[key] == wc[key], key
    for key in ("volumes", "securityContext", "nodeSelector", "tolerations"):
        assert got[key] == want[key], key
    assert got["serviceAccountName"] == want["serviceAccountName"]
    assert got["terminationGracePeriodSeconds"] == want["terminationGracePeriodSeconds"]
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    plain = {e["name"]: e["value"] for e in gc["env"] if "value" in e}
    assert {e["name"]: e["value"] for e in wc["env"]}.items() <= plain.items()
    assert plain["PET_NODE_RANK"] == "1" and plain["PET_NNODES"] == "2"
    assert plain["PET_MASTER_ADDR"] == f"{task.name}-node-0-0.{task.name}"
    # What envFrom gave the PyTorchJob pod, secretKeyRefs give this one.
    (source,) = wc["envFrom"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in gc["env"] if "valueFrom" in e}
    assert refs == {source["secretRef"]["name"]}


def test_every_key_the_s3_secret_template_documents_reaches_the_training_pod():
    template = yaml.safe_load((ROOT / "manifests/base/s3-secret.template.yaml").read_text())
    assert set(template["stringData"]) <= set(tj.S3_SECRET_KEYS)


def test_cpu_job_has_no_gpu_scheduling():
    job = tj.build_trainjob(
        training_task(), job_config("cluster.s3_secret=", preset="tiny-cpu"), STAGE
    )
    crdcheck.validate(job)
    (patch,) = job["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = rjob["template"]["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "nvidia.com/gpu" not in job["spec"]["trainer"]["resourcesPerNode"]["limits"]
    assert not any("valueFrom" in e for e in job["spec"]["trainer"]["env"])


def test_torchrun_reads_the_trainer_environment(monkeypatch):
    """The torch runtime runs the command as given and sets PET_*: torchrun reads its
    rendezvous from them (trainer plugins/torch/torch.go), as under a PyTorchJob."""
    from torch.distributed.run import get_args_parser

    task = training_task(nnodes=3, nproc=8)
    pod = node_pod(tj.build_trainjob(task, job_config(), STAGE), TORCH_DISTRIBUTED, 2, "abcde")
    (container,) = pod["spec"]["containers"]
    for e in container["env"]:
        if e["name"].startswith("PET_"):
            monkeypatch.setenv(e["name"], e["value"])
    assert container["command"][0] == "torchrun"
    args = get_args_parser().parse_args(container["command"][1:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("3", "8", 2)
    assert (args.master_addr, args.master_port) == (f"{task.name}-node-0-0.{task.name}", 29500)
    assert args.module and args.training_script == "ldm_core.cli"


def test_env_the_torch_runtime_sets_is_refused_before_any_api_call():
    task = training_task()
    task.env = {"PET_MASTER_ADDR": "x"}
    with pytest.raises(LaunchError, match="PET_MASTER_ADDR is set by the Trainer"):
        tj.build_trainjob(task, job_config(), STAGE)


def test_a_pod_field_the_trainjob_cannot_carry_is_an_error_not_dropped():
    """cluster.priority_class reaches a PyTorchJob's pods; a TrainJob's patches cannot set
    it, so the launcher refuses rather than silently dropping it."""
    with pytest.raises(LaunchError, match="pod field.s. priorityClassName cannot be set"):
        tj.build_trainjob(
            training_task(), job_config("cluster.priority_class=training-high"), STAGE
        )


def _node_patch(job: dict[str, Any]) -> dict[str, Any]:
    (patch,) = job["spec"]["runtimePatches"]
    return patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]


def _node_container(job: dict[str, Any]) -> dict[str, Any]:
    return _node_patch(job)["template"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("spoil", "status", "match"),
    [
        (
            lambda j: j["spec"]["trainer"]["env"].append({"name": "PET_NODE_RANK", "value": "0"}),
            403,
            "must not have reserved envs",
        ),
        (lambda j: j["spec"]["runtimePatches"][0].update(manager="brain-ldm"), 403, "manager"),
        (lambda j: _node_patch(j).update(name="worker"), 403, "replicated job that doesn't"),
        (
            lambda j: _node_container(j).update(env=[{"name": "A", "value": "1"}]),
            403,
            "must not have envs for the",
        ),
        (lambda j: j["spec"]["trainer"].update(numProcPerNode="2"), 422, "is not of type"),
        (lambda j: j["metadata"].update(name="A_B"), 422, "DNS-1035"),
    ],
)
def test_the_emulated_admission_refuses_what_the_trainer_refuses(cluster, spoil, status, match):
    """The admission chain the launcher's TrainJobs pass in the other tests is not vacuous:
    it refuses, as the Trainer's webhooks and the CRD schema do, what a TrainJob may not be."""
    job = tj.build_trainjob(training_task(), job_config(), STAGE)
    spoil(job)
    with pytest.raises(kubernetes.client.ApiException) as err:
        cluster.create(job, agent="someone")
    assert err.value.status == status and re.search(match, err.value.body)
    assert cluster.jobs() == []


# --------------------------------------------------------------------------- status (pure)


def _job(*conds: tuple[str, str], jobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {
        "conditions": [{"type": t, "status": "True", "reason": r, "message": "m"} for t, r in conds]
    }
    if jobs is not None:
        status["jobsStatus"] = jobs
    return {"metadata": {"annotations": {SPEC_HASH_ANNOTATION: "h"}}, "status": status}


@pytest.mark.parametrize(
    ("job", "pods", "elapsed", "outcome", "detail"),
    [
        (_job(("Complete", "AllJobsCompleted")), [], 1, "succeeded", "Complete"),
        (_job(("Failed", "FailedJobs")), [], 1, "failed", "FailedJobs: m"),
        (_job(("Failed", "DeadlineExceeded")), [], 1, "failed", "DeadlineExceeded: m"),
        ({}, [], 31, "no-operator", "got no status in 30s"),
        ({}, [object()], 31, "running", ""),  # pods but no status yet: a controller is there
        (_job(("Suspended", "Suspended")), [], 31, "running", "Suspended (Suspended: m)"),
        (_job(jobs=[{"name": "node", "active": 2, "ready": 1}]), [], 31, "running", "node: 2 act"),
        (_job(jobs=[{"name": "node", "active": 1}]), [], 61, "timeout", "no result after 60s"),
    ],
)
def test_job_state_decision(job, pods, elapsed, outcome, detail):
    state = tj.job_state(job, pods, elapsed, start_timeout_s=30, timeout_s=60)
    assert state.outcome == outcome and state.detail.startswith(detail)


def test_a_completed_condition_whose_status_is_false_is_not_success():
    job = _job()
    job["status"]["conditions"] = [{"type": "Complete", "status": "False", "reason": "x"}]
    assert tj.job_state(job, [object()], 1, 30, 60).outcome == "running"


# --------------------------------------------------------------------------- launcher


def test_the_webhook_stamps_the_patch_and_every_node_gets_a_pod(cluster):
    """The Trainer's defaulter stamps ``runtimePatches[].time`` on create: the stored spec
    is no longer the one we hashed, and the annotation still identifies the job."""
    trainer = cluster.controller("succeed")
    task = training_task(nnodes=2)
    cluster.launcher().run(task)
    (job,) = cluster.jobs()
    assert job["spec"]["runtimePatches"][0]["time"]
    assert job["metadata"]["annotations"][SPEC_HASH_ANNOTATION] != spec_hash(job)
    assert true_condition(job, "Complete")
    assert len(trainer.pods[task.name]) == 2


def test_an_evicted_rank0_is_replaced_by_the_job_and_followed_to_success(cluster):
    """Under JobSet's OnFailure pods the Job controller replaces an evicted pod: not an
    outcome. The launcher follows the new pod's log."""
    trainer = cluster.controller("evict-replace")
    out = io.StringIO()
    cluster.launcher(out).run(training_task())
    assert "resumed from checkpoint step 2" in out.getvalue()
    assert out.getvalue().splitlines()[-1] == "saved autoencoder.pt"
    assert len(trainer.pods["ldm-ae-0123456789ab"]) == 2


def test_the_deadline_fails_with_the_controllers_reason(cluster):
    cluster.controller("deadline")
    with pytest.raises(LaunchError, match="DeadlineExceeded: TrainJob exceeded its active"):
        cluster.launcher().run(training_task())


def test_a_suspended_job_is_waited_for_not_taken_for_a_missing_controller(cluster, caplog):
    """Kueue queues a TrainJob by suspending it: the Trainer reports Suspended and makes no
    pods. Only the run's own timeout ends that wait."""
    cluster.controller("suspend")
    caplog.set_level("INFO", logger=tj.__name__)
    with pytest.raises(LaunchError, match="no result after 1s") as err:
        cluster.launcher(start_timeout_s=0.2, timeout_s=1.0).run(training_task())
    assert "got no status" not in str(err.value)
    assert "Suspended (Suspended: TrainJob is suspended)" in caplog.text


def test_a_missing_runtime_is_the_webhooks_reason_not_rbac(cluster):
    cluster.admission.runtimes.clear()  # Trainer installed without its runtimes
    with pytest.raises(LaunchError) as err:
        cluster.launcher().run(training_task())
    text = str(err.value)
    assert "specified clusterTrainingRuntime must be created before the TrainJob" in text
    assert "needs the Role" not in text
    assert cluster.jobs() == []
