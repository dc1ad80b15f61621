"""What only a PyTorchJob does: its shape, the training operator's environment, its status
conditions, and pods the operator restarts (or does not) under the job's restart policy.

The launcher runs against the training operator emulated on a loopback API
(tests/harness/training_operator.py); what it shares with the TrainJob launcher is tested
for both in tests/test_training_jobs.py.
"""

from __future__ import annotations

import io
from typing import Any

import kubernetes
import pytest

from ldm_core.kube import pytorchjob as pj
from ldm_core.kube.job_launcher import true_condition
from ldm_core.kube.training_job import SPEC_HASH_ANNOTATION, spec_hash
from ldm_core.launcher import LaunchError
from tests.harness import crdcheck
from tests.harness.training_jobs import PYTORCHJOB, STAGE, job_config, serve, training_task


@pytest.fixture
def cluster():
    with serve(PYTORCHJOB) as cluster:
        yield cluster


# --------------------------------------------------------------------------- builder


def test_single_node_job_shape_and_validity():
    job = pj.build_pytorchjob(training_task(), job_config(), STAGE)
    crdcheck.validate(job)
    spec = job["spec"]
    assert list(spec["pytorchReplicaSpecs"]) == ["Master"]
    assert spec["nprocPerNode"] == "2"
    assert spec["runPolicy"]["cleanPodPolicy"] == "All"
    assert spec["runPolicy"]["ttlSecondsAfterFinished"] > 0
    assert spec["runPolicy"]["activeDeadlineSeconds"] > 0
    assert spec["runPolicy"]["backoffLimit"] >= 0
    master = spec["pytorchReplicaSpecs"]["Master"]
    assert master["replicas"] == 1
    pod = master["template"]["spec"]
    (c,) = pod["containers"]
    assert c["name"] == "pytorch" and c["image"].endswith(":0.1.0")
    assert c["command"] == [
        "torchrun",
        "-m",
        "ldm_core.cli",
        "train-autoencoder",
        "--data",
        "/workspace/cache",
        "--output",
        "/workspace/runs/ae",
        "--preset",
        "gpu-16g",
    ]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert c["envFrom"] == [{"secretRef": {"name": "brain-ldm-s3"}}]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["LDM_SEED"] == "0" and env["NCCL_DEBUG"] and env["HOME"] == "/tmp"
    assert not any("SECRET" in k or "ACCESS_KEY" in k for k in env)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/workspace"]]["persistentVolumeClaim"]["claimName"] == "brain-ldm-data"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["sizeLimit"]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert c["ports"][0]["name"] == "pytorchjob-port"


def test_multi_node_job_has_master_and_workers():
    job = pj.build_pytorchjob(training_task(nnodes=4, nproc=8), job_config(), STAGE)
    crdcheck.validate(job)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == 3
    assert replicas["Worker"]["template"] == replicas["Master"]["template"]
    assert job["spec"]["nprocPerNode"] == "8"
    # A spec differing only in size hashes differently (adoption compares it).
    other = pj.build_pytorchjob(training_task(nnodes=2, nproc=8), job_config(), STAGE)
    assert spec_hash(job) != spec_hash(other)


def test_cpu_job_has_no_gpu_scheduling():
    job = pj.build_pytorchjob(
        training_task(), job_config("cluster.s3_secret=", preset="tiny-cpu"), STAGE
    )
    crdcheck.validate(job)
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "envFrom" not in pod["containers"][0]


def test_the_crd_check_refuses_a_second_master():
    """The CRD check the launcher tests run on every job created is not vacuous."""
    job = pj.build_pytorchjob(training_task(), job_config(), STAGE)
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    with pytest.raises(crdcheck.InvalidResource):
        crdcheck.validate(job)


def test_torchrun_reads_the_operator_environment(monkeypatch):
    """The container command carries no rendezvous flags: torchrun takes them from the PET_*
    variables the training operator sets on every replica."""
    from torch.distributed.run import get_args_parser

    for key, value in {
        "PET_NNODES": "3",
        "PET_NPROC_PER_NODE": "8",
        "PET_NODE_RANK": "2",
        "PET_MASTER_ADDR": "job-master-0",
        "PET_MASTER_PORT": "23456",
    }.items():
        monkeypatch.setenv(key, value)
    command = pj.build_pytorchjob(training_task(nnodes=3, nproc=8), job_config(), STAGE)["spec"][
        "pytorchReplicaSpecs"
    ]["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert command[0] == "torchrun"
    args = get_args_parser().parse_args(command[1:])
    assert (args.nnodes, args.nproc_per_node, int(args.node_rank)) == ("3", "8", 2)
    assert (args.master_addr, int(args.master_port)) == ("job-master-0", 23456)
    assert args.module and args.training_script == "ldm_core.cli"
    assert args.training_script_args[0] == "train-autoencoder"


# --------------------------------------------------------------------------- launcher


def test_evicted_pod_fails_the_task_and_deletes_the_job(cluster, monkeypatch):
    """restartPolicy Never: nothing brings an evicted pod back, so the task fails at once."""
    monkeypatch.setattr(pj, "RESTART_POLICY", "Never")
    cluster.controller("evict")
    with pytest.raises(LaunchError, match="evicted.*low on resource: memory"):
        cluster.launcher().run(training_task())
    assert cluster.jobs() == []


def test_an_evicted_pod_restarted_under_exit_code_policy_is_followed_to_success(cluster):
    """restartPolicy ExitCode: the eviction's 137 is retryable; the operator recreates the
    master (Restarting, then Running) and the job succeeds. The launcher goes on with it
    and streams the new pod's log too."""
    op = cluster.controller("evict", step_s=0.15)
    out = io.StringIO()
    cluster.launcher(out).run(training_task())
    assert op.done.wait(10) and cluster.creates() == 1
    (job,) = cluster.jobs()
    held = [(c["type"], c["status"]) for c in job["status"]["conditions"]]
    assert held == [("Created", "True"), ("Running", "False"), ("Succeeded", "True")]
    assert "resumed from checkpoint step 2" in out.getvalue()
    assert out.getvalue().rstrip().endswith("saved autoencoder.pt")


def test_pods_deleted_the_moment_the_job_succeeded_still_succeed(cluster):
    """The operator may delete the pods right after Succeeded: the final log read meets a
    404 and the task still succeeds, with every line it had seen."""
    op = cluster.controller("succeed-clean", step_s=0.05)
    out = io.StringIO()
    task = training_task()
    cluster.launcher(out).run(task)
    printed = out.getvalue().splitlines()
    assert printed == op.logged[task.name][: len(printed)]
    assert any(r.subresource == "log" for r in cluster.sent())
    (job,) = cluster.jobs()
    assert true_condition(job, "Succeeded")


# --------------------------------------------------------------------------- decisions (pure)


def _job(*conditions: tuple[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"annotations": {SPEC_HASH_ANNOTATION: "h"}},
        "status": {
            "conditions": [
                {"type": t, "status": s, "reason": f"PyTorchJob{t}"} for t, s in conditions
            ]
        },
    }


def _pod(phase: str, reason: str | None = None, message: str | None = None) -> Any:
    return kubernetes.client.V1Pod(
        metadata=kubernetes.client.V1ObjectMeta(
            name="job-master-0", labels={pj.REPLICA_LABEL: "master"}
        ),
        status=kubernetes.client.V1PodStatus(phase=phase, reason=reason, message=message),
    )


@pytest.mark.parametrize(
    "job,pods,elapsed,outcome,detail",
    [
        (_job(("Running", "True")), [_pod("Running")], 5, "running", "Running (PyTorchJobRunning)"),
        (_job(("Running", "True"), ("Succeeded", "True")), [], 5, "succeeded", "Succeeded"),
        (_job(("Failed", "True")), [], 5, "failed", "PyTorchJobFailed"),
        (
            _job(("Running", "True")),
            [_pod("Failed", "Evicted", "low on memory")],
            5,
            "evicted",
            "pod job-master-0 was evicted (low on memory)",
        ),
        (_job(), [], 61, "no-operator", "got no status in 60s"),
        (_job(), [], 59, "running", ""),
        (_job(("Created", "True")), [], 61, "running", "Created (PyTorchJobCreated)"),
        (_job(("Running", "True")), [_pod("Running")], 121, "timeout", "no result after 120s"),
        # A Succeeded condition wins over an overdue clock: the work is done.
        (_job(("Succeeded", "True")), [], 500, "succeeded", "Succeeded"),
        # As the operator leaves a finished job: Running kept, with status False.
        (
            _job(("Created", "True"), ("Running", "False"), ("Succeeded", "True")),
            [],
            5,
            "succeeded",
            "Succeeded",
        ),
        # Suspended (Kueue) then resumed: Running and Suspended both stay, False, and the
        # newest condition is one that no longer holds; progress names the newest that does.
        (
            _job(("Created", "True"), ("Running", "False"), ("Suspended", "False")),
            [],
            5,
            "running",
            "Created (PyTorchJobCreated)",
        ),
    ],
)
def test_job_state_decision(job, pods, elapsed, outcome, detail):
    state = pj.job_state(job, pods, elapsed, start_timeout_s=60, timeout_s=120)
    assert state.outcome == outcome and state.detail.startswith(detail)


@pytest.mark.parametrize(
    "policy,outcome",
    [("ExitCode", "running"), ("Never", "evicted"), ("OnFailure", "evicted")],
)
def test_an_eviction_is_retried_only_under_the_exit_code_policy(policy, outcome):
    """An evicted pod exits 137; under ExitCode the operator recreates it (Restarting)."""
    job = _job(("Created", "True"), ("Restarting", "True"))
    evicted = [_pod("Failed", "Evicted", "low on memory")]
    state = pj.job_state(job, evicted, 5, start_timeout_s=60, timeout_s=120, restart_policy=policy)
    assert state.outcome == outcome
    if outcome == "running":
        assert state.detail == "Restarting (PyTorchJobRestarting)"
