"""What only a TrainJob (Kubeflow Trainer v2) does: its shape and how the Trainer renders it
into pods, the admission it passes, its status, and a Job that replaces an evicted pod.

The Trainer's admission chain and controller (with JobSet, Job and kubelet under it) are
:mod:`tests.harness.trainer`; what the launcher shares with the PyTorchJob launcher is
tested for both in tests/test_training_jobs.py.
"""

from __future__ import annotations

import io
import json
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
from tests.harness.trainer import TORCH_DISTRIBUTED, TORCH_DISTRIBUTED_V2_1, node_pod
from tests.harness.training_jobs import (
    NS,
    STAGE,
    TRAINJOB,
    TRAINJOB_V2_1,
    FakeClock,
    PodAdmission,
    job_config,
    serve,
    training_task,
)

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


# --------------------------------------------------------------------------- each Trainer release


@pytest.fixture(params=[TRAINJOB_V2_1, TRAINJOB], ids=str)
def release(request):
    with serve(request.param) as cluster:
        yield cluster


@pytest.mark.parametrize(
    ("api", "crds", "other"), [("v2.1", "trainer-v2.1.0", ""), ("v2.2", "", "trainer-v2.1.0")]
)
def test_each_trainer_api_is_a_trainjob_of_its_release_only(api, crds, other):
    """Checked strictly (unknown fields are errors) against the CRD of each release:
    Trainer v2.1.0 (Kubeflow 1.11.0) and v2.2+ (master) share no way to shape the pod."""
    job = tj.build_trainjob(training_task(nnodes=2), job_config(), STAGE, api=api)
    crdcheck.validate(job, crds)
    with pytest.raises(crdcheck.InvalidResource, match="unknown field"):
        crdcheck.validate(job, other)


def test_the_pod_trainer_v2_1_makes_carries_the_pytorchjob_pod():
    """Rendered as Trainer v2.1.0 does (its torch-distributed runtime, the TrainJob's
    podTemplateOverrides, spec.trainer), the node pod has what the PyTorchJob's master pod
    has: sizing, the run's PVC, /dev/shm and /tmp, placement, identity and the Istio
    opt-out. The securityContext and grace period, which v2.1's overrides cannot carry, are
    the documented losses, nothing else."""
    task, cfg = training_task(nnodes=2, nproc=4), job_config("cluster.image_pull_secrets=[regcred]")
    job = tj.build_trainjob(task, cfg, STAGE, api="v2.1")
    pod = node_pod(job, TORCH_DISTRIBUTED_V2_1, rank=1, suffix="abcde")
    master = pj.build_pytorchjob(task, cfg, STAGE)["spec"]["pytorchReplicaSpecs"]["Master"]
    want, got = master["template"]["spec"], pod["spec"]
    (wc,), (gc,) = want["containers"], got["containers"]
    for key in ("image", "command", "resources", "volumeMounts"):
        assert gc[key] == wc[key], key
    for key in ("volumes", "nodeSelector", "tolerations", "serviceAccountName", "imagePullSecrets"):
        assert got[key] == want[key], key
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    plain = {e["name"]: e["value"] for e in gc["env"] if "value" in e}
    assert plain["PET_NPROC_PER_NODE"] == "4" and plain["PET_NODE_RANK"] == "1"
    lost = {k for k in want if k not in got} | {f"container {k}" for k in wc if k not in gc}
    assert lost == set(tj.NOT_CARRIED["v2.1"]) - {"container name"}


def test_on_trainer_v2_1_the_launched_pod_mounts_the_run_pvc():
    """Kubeflow 1.11.0 runs Trainer v2.1.0. The launcher finds that out by itself and shapes
    the pod with podTemplateOverrides: the pod the Trainer makes mounts the run's PVC at
    cluster.workdir (torchrun runs there), with /dev/shm, the GPU node selector and
    tolerations and the Istio opt-out."""
    with serve(TRAINJOB_V2_1) as cluster:
        trainer = cluster.controller("succeed", step_s=0.02)
        task = training_task()
        cluster.launcher().run(task)
    (pod,) = trainer.pods[task.name]
    spec, cfg = pod["spec"], job_config().cluster
    (container,) = spec["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts[cfg.workdir]]["persistentVolumeClaim"]["claimName"] == cfg.pvc_name
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert spec["nodeSelector"] == cfg.node_selector
    assert spec["tolerations"] == [t.to_k8s() for t in cfg.tolerations]
    assert spec["serviceAccountName"] == cfg.service_account
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


def test_auto_asks_the_api_server_which_trainer_it_runs(release):
    """``cluster.trainer_api: auto`` sends the v2.2 TrainJob as a server-side dry run with
    strict field validation (the ``create`` the Role grants; nothing is stored): refused
    for spec.runtimePatches, the cluster runs Trainer v2.1. The real create then carries the
    fields of the release found."""
    release.controller("succeed", step_s=0.02)
    release.launcher().run(training_task())
    posts = [r for r in release.sent() if release.is_write(r)]
    probe, create = posts
    assert probe.params.get("dryRun") == "All" and probe.params["fieldValidation"] == "Strict"
    assert "runtimePatches" in probe.data["spec"]
    field = "podTemplateOverrides" if release.kind is TRAINJOB_V2_1 else "runtimePatches"
    assert field in create.data["spec"] and "dryRun" not in create.params


@pytest.mark.parametrize("api", ["v2.1", "v2.2"])
def test_a_configured_trainer_api_is_used_without_asking(api):
    kind = TRAINJOB_V2_1 if api == "v2.1" else TRAINJOB
    with serve(kind) as cluster:
        cluster.controller("succeed", step_s=0.02)
        cluster.launcher(cfg=job_config(f"cluster.trainer_api={api}")).run(training_task())
        assert [r.params.get("dryRun") for r in cluster.sent() if cluster.is_write(r)] == [None]


def test_a_trainjob_for_another_trainer_is_refused_naming_the_field_and_release():
    """Told v2.2 on a v2.1 cluster, the strict create is refused by the API server instead
    of pruned to a pod without its PVC; the error names the field and the releases."""
    with serve(TRAINJOB_V2_1) as cluster:
        cfg = job_config("cluster.trainer_api=v2.2")
        with pytest.raises(LaunchError) as err:
            cluster.launcher(cfg=cfg).run(training_task())
        assert cluster.jobs() == []
    text = str(err.value)
    assert "spec.runtimePatches: unknown field (TrainJob of Trainer v2.2+" in text
    assert "cluster.trainer_api" in text


def test_a_bad_trainer_api_is_a_config_error():
    from ldm_core.config import ConfigError

    with pytest.raises(ConfigError, match="cluster.trainer_api: 'v2.0' is not one of"):
        job_config("cluster.trainer_api=v2.0")


def test_the_emulated_api_server_prunes_unknown_fields_unless_strict():
    """What a real API server does with fields its CRD lacks, which the tests above rely
    on: dropped silently by default, refused with fieldValidation=Strict."""
    job = tj.build_trainjob(training_task(), job_config(), STAGE, api="v2.2")
    r = tj.RESOURCE
    with serve(TRAINJOB_V2_1) as cluster:
        custom = cluster.custom("kubectl")
        with pytest.raises(kubernetes.client.ApiException) as err:
            custom.create_namespaced_custom_object(
                r.group, r.version, NS, r.plural, job, field_validation="Strict"
            )
        assert err.value.status == 400
        message = json.loads(err.value.body)["message"]
        assert 'strict decoding error: unknown field "spec.activeDeadlineSeconds"' in message
        custom.create_namespaced_custom_object(r.group, r.version, NS, r.plural, job)
        (stored,) = cluster.jobs()
    assert "runtimePatches" not in stored["spec"] and stored["spec"]["trainer"]


def test_on_trainer_v2_1_the_launcher_enforces_the_deadline():
    """Trainer v2.1 has no activeDeadlineSeconds: the launcher stops the TrainJob itself once
    cluster.run_timeout_s has passed since the job was created (here in fake time)."""
    with serve(TRAINJOB_V2_1) as cluster:
        cluster.controller("hang")
        clock = FakeClock()
        cfg = job_config("cluster.run_timeout_s=600")
        # A start timeout past the deadline: only the deadline may end this wait, whenever
        # the emulated controller's first status lands in fake time.
        launcher = cluster.launcher(
            cfg=cfg, clock=clock, timeout_s=None, poll_s=60.0, start_timeout_s=3600.0
        )
        with pytest.raises(LaunchError) as err:
            launcher.run(training_task())
        assert cluster.jobs() == []
    text = str(err.value)
    assert "cluster.run_timeout_s (600s)" in text and "The TrainJob was deleted" in text
    assert 600 <= clock.elapsed <= 600 + 2 * 60


def test_pod_security_restricted_refuses_only_the_v2_1_pod(release):
    """Trainer v2.1's overrides cannot carry a securityContext: in a namespace that
    enforces Pod Security "restricted", its pods are refused (FailedCreate on the Job) and
    the launcher fails at once saying so. On v2.2+ the runtimePatches carry it: admitted."""
    PodAdmission(release.api).pod_security()
    trainer = release.controller("succeed", step_s=0.02)
    if release.kind is TRAINJOB:
        release.launcher().run(training_task())
        return
    clock = FakeClock()
    launcher = release.launcher(
        clock=clock,
        sleep=lambda seconds: (trainer.done.wait(10), clock.sleep(seconds)),
        start_timeout_s=600.0,
        timeout_s=3600.0,
        poll_s=60.0,
    )
    with pytest.raises(LaunchError) as err:
        launcher.run(training_task())
    text = str(err.value)
    assert 'violates PodSecurity "restricted:latest"' in text
    assert "Trainer v2.1" in text and "securityContext" in text
    assert clock.elapsed <= 2 * 60
