"""TrainJob (Kubeflow Trainer v2) builder and launcher against an emulated API on loopback.

The Trainer's admission chain and controller (with JobSet, Job and kubelet under it) are
:mod:`tests.harness.trainer`; the launcher only sees the API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from ldm_core.config import Config, load_config
from ldm_core.kube import pytorchjob as pj
from ldm_core.kube import trainjob as tj
from ldm_core.kube.job_launcher import LauncherTiming, true_condition
from ldm_core.kube.training_job import SPEC_HASH_ANNOTATION, spec_hash
from ldm_core.launcher import LaunchError, TrainingTask
from tests.harness import crdcheck
from tests.harness.kube import KubeApi, declared, rbac_triple
from tests.harness.trainer import (
    GROUP,
    PENDING,
    PLURAL,
    RESOURCE,
    TORCH_DISTRIBUTED,
    VERSION,
    Admission,
    FakeTrainer,
    node_pod,
)

NS = "brain-ldm"
STAGE = "train_autoencoder"
IMAGE = "registry.example/brain-ldm-training:0.1.0"
LAUNCHER_UA = "ldm-trainjob-launcher-under-test"
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


class Cluster:
    """The emulated API with Trainer v2's admission chain, and the controllers a test starts."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self.admission = Admission(api, {"torch-distributed": TORCH_DISTRIBUTED})
        self.admission.install()
        self.trainers: list[FakeTrainer] = []

    def trainer(self, outcome: str, step_s: float = 0.1) -> FakeTrainer:
        trainer = FakeTrainer(self.api, NS, outcome, step_s, self.admission.runtimes)
        self.trainers.append(trainer)
        trainer.start()
        return trainer

    def stop(self) -> None:
        for trainer in self.trainers:
            trainer.stopping.set()
            trainer.join(10)

    def jobs(self) -> list[dict[str, Any]]:
        custom = kubernetes.client.CustomObjectsApi(self.api.client("test-inspector"))
        return custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["items"]

    def creates(self) -> int:
        return sum(1 for r in self.api.requests(LAUNCHER_UA) if _is_create(r))


def _is_create(r: Any) -> bool:
    return r.method.value.upper() == "POST" and r.resource and r.resource.plural == PLURAL


@pytest.fixture
def cluster():
    with KubeApi(RESOURCE) as api:
        cluster = Cluster(api)
        yield cluster
        cluster.stop()
        sent = api.requests(LAUNCHER_UA)
        used = {rbac_triple(r) for r in sent}
        assert used <= declared(tj.RBAC_RULES), sorted(used - declared(tj.RBAC_RULES))
        for r in sent:
            if _is_create(r):
                crdcheck.validate(r.data)


FAST = LauncherTiming(poll_s=0.05, log_reconnect_s=0.05, start_timeout_s=30.0, timeout_s=30.0)
"""Fast polling for the emulated API."""


def _config(*overrides: str, preset: str = "gpu-16g") -> Config:
    """A GPU job as the gpu-16g preset sizes it, in the test namespace."""
    return load_config(
        preset=preset,
        overrides=[
            f"cluster.image={IMAGE}",
            f"cluster.namespace={NS}",
            "cluster.s3_secret=brain-ldm-s3",
            *overrides,
        ],
    )


def _task(name: str = "ldm-ae-0123456789ab", nnodes: int = 1, nproc: int = 2) -> TrainingTask:
    return TrainingTask(
        name=name,
        verb="train-autoencoder",
        args=["--data", "/workspace/cache", "--output", "/workspace/runs/ae"],
        nproc_per_node=nproc,
        nnodes=nnodes,
        env={"LDM_SEED": "0"},
    )


def _launcher(
    cluster: Cluster, out: io.StringIO | None = None, cfg: Config | None = None, **timing: Any
) -> tj.TrainJobLauncher:
    return tj.TrainJobLauncher(
        cfg or _config(),
        STAGE,
        api_client=cluster.api.client(LAUNCHER_UA),
        out=out or io.StringIO(),
        timing=dataclasses.replace(FAST, **timing),
    )


# --------------------------------------------------------------------------- builder


def test_trainjob_shape_and_validity():
    job = tj.build_trainjob(_task(nnodes=2), _config(), STAGE)
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
    task, cfg = _task(nnodes=2, nproc=4), _config()
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
    job = tj.build_trainjob(_task(), _config("cluster.s3_secret=", preset="tiny-cpu"), STAGE)
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

    task = _task(nnodes=3, nproc=8)
    pod = node_pod(tj.build_trainjob(task, _config(), STAGE), TORCH_DISTRIBUTED, 2, "abcde")
    (container,) = pod["spec"]["containers"]
    for e in container["env"]:
        if e["name"].startswith("PET_"):
            monkeypatch.setenv(e["name"], e["value"])
    assert container["command"][0] == "torchrun"
    args = get_args_parser().parse_args(container["command"][1:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("3", "8", 2)
    assert (args.master_addr, args.master_port) == (f"{task.name}-node-0-0.{task.name}", 29500)
    assert args.module and args.training_script == "ldm_core.cli"


def test_names_fit_the_pods_jobset_derives():
    """JobSet's webhook refuses a JobSet whose pod names would pass 63 characters."""
    longest = "a" * tj.MAX_NAME
    assert len(f"{longest}-node-0-999-abcde") <= 63
    crdcheck.validate(tj.build_trainjob(_task(name=longest), _config(), STAGE))
    with pytest.raises(LaunchError, match="at most 46"):
        tj.build_trainjob(_task(name=longest + "b"), _config(), STAGE)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"name": "Train_AE"}, "DNS-1035"),
        ({"nnodes": 0}, "must be >= 1"),
        ({"env": {"PET_MASTER_ADDR": "x"}}, "PET_MASTER_ADDR is set by the Trainer"),
    ],
)
def test_invalid_tasks_are_refused_before_any_api_call(change, match):
    task = _task()
    for key, value in change.items():
        setattr(task, key, value)
    with pytest.raises(LaunchError, match=match):
        tj.build_trainjob(task, _config(), STAGE)


def test_a_pod_field_the_trainjob_cannot_carry_is_an_error_not_dropped():
    """cluster.priority_class reaches a PyTorchJob's pods; a TrainJob's patches cannot set
    it, so the launcher refuses rather than silently dropping it."""
    with pytest.raises(LaunchError, match="pod field.s. priorityClassName cannot be set"):
        tj.build_trainjob(_task(), _config("cluster.priority_class=training-high"), STAGE)


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
    job = tj.build_trainjob(_task(), _config(), STAGE)
    spoil(job)
    custom = kubernetes.client.CustomObjectsApi(cluster.api.client("someone"))
    with pytest.raises(kubernetes.client.ApiException) as err:
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, job)
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


def test_create_follow_logs_and_succeed(cluster):
    trainer = cluster.trainer("succeed")
    out = io.StringIO()
    _launcher(cluster, out).run(_task(nnodes=2))
    assert out.getvalue().splitlines() == trainer.logged["ldm-ae-0123456789ab"]
    assert cluster.creates() == 1
    (job,) = cluster.jobs()
    assert true_condition(job, "Complete")
    # The webhook stamped the patch's time; the spec hash we stored still identifies it.
    assert job["spec"]["runtimePatches"][0]["time"]
    assert len(trainer.pods["ldm-ae-0123456789ab"]) == 2


def test_failure_raises_with_logs_and_events(cluster):
    cluster.trainer("fail")
    with pytest.raises(LaunchError) as err:
        _launcher(cluster).run(_task())
    text = str(err.value)
    assert "FailedJobs: jobset failed due to one or more job failures" in text
    assert "RuntimeError: CUDA out of memory (simulated)" in text
    assert "container exited with code 1 (Error), restarts 6" in text
    assert "BackOff pod/ldm-ae-0123456789ab-node-0-0-" in text
    assert "BackoffLimitExceeded job/ldm-ae-0123456789ab-node-0" in text
    assert cluster.jobs(), "a Failed TrainJob stays for inspection; nothing else runs in it"


def test_an_evicted_rank0_is_replaced_by_the_job_and_followed_to_success(cluster):
    """Under JobSet's OnFailure pods the Job controller replaces an evicted pod: not an
    outcome. The launcher follows the new pod's log."""
    trainer = cluster.trainer("evict-replace")
    out = io.StringIO()
    _launcher(cluster, out).run(_task())
    assert "resumed from checkpoint step 2" in out.getvalue()
    assert out.getvalue().splitlines()[-1] == "saved autoencoder.pt"
    assert len(trainer.pods["ldm-ae-0123456789ab"]) == 2


def test_the_deadline_fails_with_the_controllers_reason(cluster):
    cluster.trainer("deadline")
    with pytest.raises(LaunchError, match="DeadlineExceeded: TrainJob exceeded its active"):
        _launcher(cluster).run(_task())


def test_no_trainer_fails_fast_with_a_hint_and_deletes_the_job(cluster):
    cluster.trainer("absent")
    with pytest.raises(LaunchError, match="is Kubeflow Trainer .with JobSet. installed") as err:
        _launcher(cluster, start_timeout_s=0.3).run(_task())
    assert "The TrainJob was deleted." in str(err.value)
    assert cluster.jobs() == []


def test_a_suspended_job_is_waited_for_not_taken_for_a_missing_controller(cluster, caplog):
    """Kueue queues a TrainJob by suspending it: the Trainer reports Suspended and makes no
    pods. Only the run's own timeout ends that wait."""
    cluster.trainer("suspend")
    caplog.set_level("INFO", logger=tj.__name__)
    with pytest.raises(LaunchError, match="no result after 1s") as err:
        _launcher(cluster, start_timeout_s=0.2, timeout_s=1.0).run(_task())
    assert "got no status" not in str(err.value)
    assert "Suspended (Suspended: TrainJob is suspended)" in caplog.text


def test_a_missing_runtime_is_the_webhooks_reason_not_rbac(cluster):
    cluster.admission.runtimes.clear()  # Trainer installed without its runtimes
    with pytest.raises(LaunchError) as err:
        _launcher(cluster).run(_task())
    text = str(err.value)
    assert "specified clusterTrainingRuntime must be created before the TrainJob" in text
    assert "needs the Role" not in text
    assert cluster.jobs() == []


@pytest.mark.parametrize("kind", sorted(PENDING))
def test_a_job_whose_pods_cannot_start_fails_after_the_pending_timeout(cluster, kind):
    cluster.trainer(kind)
    started = time.monotonic()
    with pytest.raises(LaunchError) as err:
        _launcher(cluster, cfg=_config("cluster.pending_timeout_s=1")).run(_task())
    assert time.monotonic() - started < 20
    text = str(err.value)
    assert "cannot start" in text and "The TrainJob was deleted." in text
    hint = {"pending-gpu": "Insufficient nvidia.com/gpu", "pending-secret": 'secret "brain-ldm-s3"'}
    assert hint[kind] in text
    assert cluster.jobs() == []


def test_restarted_component_adopts_the_running_job(cluster):
    cluster.trainer("succeed", step_s=0.3)
    first = _launcher(cluster, timeout_s=0.2)
    with pytest.raises(LaunchError, match="timeout"):
        first.run(_task())  # the component dies (here: times out, deleting the job) ...
    assert cluster.jobs() == []
    cluster.stop()
    # ... a real restart finds the job running: create one the way the first attempt did.
    cluster.trainer("hang")
    body = tj.build_trainjob(_task(), _config(), STAGE)
    custom = kubernetes.client.CustomObjectsApi(cluster.api.client("earlier-attempt"))
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
    with pytest.raises(LaunchError, match="no result after 0s"):
        _launcher(cluster, timeout_s=0.1).run(_task())
    assert cluster.creates() == 1  # only the first attempt's; the second adopted


def test_adoption_refuses_a_different_job_with_the_same_name(cluster):
    other = tj.build_trainjob(_task(nproc=1), _config(), STAGE)
    custom = kubernetes.client.CustomObjectsApi(cluster.api.client("someone"))
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, other)
    with pytest.raises(LaunchError, match="a different TrainJob brain-ldm/ldm-ae-0123456789ab"):
        _launcher(cluster).run(_task(nproc=2))
    assert cluster.creates() == 0 and len(cluster.jobs()) == 1


def test_failed_earlier_attempt_is_replaced_not_duplicated(cluster):
    cluster.trainer("fail", step_s=0.02)
    with pytest.raises(LaunchError):
        _launcher(cluster).run(_task())
    cluster.stop()
    cluster.trainer("succeed", step_s=0.02)
    _launcher(cluster).run(_task())
    assert cluster.creates() == 2
    (job,) = cluster.jobs()
    assert true_condition(job, "Complete")


def test_rbac_rules_are_exactly_what_the_launcher_calls(cluster, monkeypatch):
    monkeypatch.delenv("POD_NAME", raising=False)
    monkeypatch.setenv("HOSTNAME", "brain-ldm-step-pod")
    for i, (outcome, kw) in enumerate(
        (("succeed", {}), ("fail", {}), ("hang", {"timeout_s": 0.5}))
    ):
        trainer = cluster.trainer(outcome, step_s=0.05)
        task = _task(name=f"ldm-rbac-{i}")
        with pytest.raises(LaunchError) if outcome != "succeed" else contextlib.nullcontext():
            _launcher(cluster, **kw).run(task)
        trainer.stopping.set()
        trainer.join(10)
    used = {rbac_triple(r) for r in cluster.api.requests(LAUNCHER_UA)}
    assert used == declared(tj.RBAC_RULES)


def test_forbidden_create_names_the_missing_rbac(cluster):
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"
    cluster.api.emulator["post", path] << 403
    with pytest.raises(LaunchError, match="create trainjobs.trainer.kubeflow.org .*needs the Role"):
        _launcher(cluster).run(_task())


# --------------------------------------------------------------------------- no leaked GPUs

_LAUNCHER_PROCESS = """
import logging, sys
from ldm_core.config import load_config
from ldm_core.kube import trainjob as tj
from ldm_core.kube.client import api_client
from ldm_core.kube.job_launcher import LauncherTiming
from ldm_core.errors import LdmError
from ldm_core.launcher import TrainingTask

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
client = api_client(sys.argv[1])
client.user_agent = sys.argv[2]
cfg = load_config(overrides=[
    "cluster.image=registry.example/brain-ldm-training:0.1.0", f"cluster.namespace={sys.argv[3]}",
])
timing = LauncherTiming(poll_s=0.05, log_reconnect_s=0.05, start_timeout_s=60.0, timeout_s=120.0)
task = TrainingTask(name=sys.argv[4], verb="train-autoencoder",
                    args=["--data", "/d", "--output", "/o"], nproc_per_node=1)
try:
    tj.TrainJobLauncher(cfg, "train_autoencoder", api_client=client, timing=timing).run(task)
except LdmError as exc:
    print(f"launch failed: {exc}", file=sys.stderr)
    sys.exit(143)
"""


def test_sigterm_to_a_launcher_process_deletes_its_trainjob(cluster, tmp_path):
    """A run terminated from the Kubeflow UI: the step's pod gets SIGTERM; the TrainJob (and
    with it the Trainer's JobSet and pods) is deleted before the launcher exits, and names
    the step's pod as its owner for the case where the launcher dies outright."""
    cluster.trainer("hang")
    step_pod = "brain-ldm-run-7f3a-train-ae-driver"
    core = kubernetes.client.CoreV1Api(cluster.api.client("kubelet"))
    core.create_namespaced_pod(
        NS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": step_pod, "uid": "u-1"}}
    )
    name = "ldm-ae-0123456789ab"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POD_NAME": step_pod}
    argv = [sys.executable, "-c", _LAUNCHER_PROCESS, cluster.api.url, LAUNCHER_UA, NS, name]
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(argv, env=env, stderr=err, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not any(r.subresource == "log" for r in cluster.api.requests(LAUNCHER_UA)):
                assert proc.poll() is None, (tmp_path / "stderr").read_text()
                assert time.monotonic() < deadline, "the launcher never followed its job"
                time.sleep(0.1)
            (job,) = cluster.jobs()
            assert job["metadata"]["ownerReferences"] == [
                {"apiVersion": "v1", "kind": "Pod", "name": step_pod, "uid": "u-1"}
            ]
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    stderr = (tmp_path / "stderr").read_text()
    assert rc == 143, stderr
    assert f"SIGTERM while TrainJob {NS}/{name} ran; TrainJob {NS}/{name} was deleted" in stderr
    assert cluster.jobs() == []
    (delete,) = [r for r in cluster.api.requests(LAUNCHER_UA) if r.method.value.upper() == "DELETE"]
    assert delete.data.get("propagationPolicy") == "Foreground"
