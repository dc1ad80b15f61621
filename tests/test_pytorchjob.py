"""PyTorchJob builder and launcher against an in-memory Kubernetes API (kmock) on loopback.

A fake training operator (a thread speaking the same HTTP API) moves jobs through their
conditions, creates the master/worker pods, writes their logs and events, and cleans up
the pods the way ``cleanPodPolicy: All`` does. The launcher only sees the API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

import kubernetes
import pytest

from ldm_core.config import Config, load_config
from ldm_core.kube import job_launcher
from ldm_core.kube import pytorchjob as pj
from ldm_core.kube.client import api_client
from ldm_core.kube.job_launcher import LauncherTiming, true_condition
from ldm_core.kube.training_job import SPEC_HASH_ANNOTATION, spec_hash
from ldm_core.launcher import LaunchError, TrainingTask
from tests.harness import crdcheck
from tests.harness.kube import KubeApi, declared, rbac_triple

NS = "brain-ldm"
GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
STAGE = "train_autoencoder"
IMAGE = "registry.example/brain-ldm-training:0.1.0"
LAUNCHER_UA = "ldm-launcher-under-test"
OPERATOR_UA = "fake-training-operator"


# --------------------------------------------------------------------------- cluster


class Cluster:
    """The emulated API server plus the fake training operators a test starts."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self.operators: list[FakeOperator] = []

    def operator(self, outcome: str, step_s: float = 0.15) -> FakeOperator:
        """Start a fake training operator; it is stopped before the API server."""
        op = FakeOperator(self.api, outcome, step_s)
        self.operators.append(op)
        op.start()
        return op

    def stop(self) -> None:
        for op in self.operators:
            op.stopping.set()
            op.join(10)


# --------------------------------------------------------------------------- fake operator


def _stamp() -> str:
    now = datetime.now(UTC)
    # RFC3339Nano with trailing zeros trimmed, as the kubelet writes it.
    frac = f"{now.microsecond:06d}".rstrip("0")
    return now.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def _waiting(reason: str, message: str) -> dict[str, Any]:
    scheduled = {"type": "PodScheduled", "status": "True"}
    waiting = {"waiting": {"reason": reason, "message": message}}
    container = {"name": "pytorch", "ready": False, "restartCount": 0, "image": "x"}
    return {
        "phase": "Pending",
        "conditions": [scheduled],
        "containerStatuses": [{**container, "imageID": "", "state": waiting}],
    }


def _unschedulable(message: str) -> dict[str, Any]:
    cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    return {"phase": "Pending", "conditions": [{**cond, "message": message}]}


PENDING: dict[str, tuple[dict[str, Any], tuple[str, str]]] = {
    "pending-gpu": (
        _unschedulable(
            "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes "
            "are available: 4 No preemption victims found for incoming pod."
        ),
        ("FailedScheduling", "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."),
    ),
    "pending-pvc": (
        _unschedulable(
            "0/4 nodes are available: pod has unbound immediate PersistentVolumeClaims. "
            "preemption: 0/4 nodes are available: 4 Preemption is not helpful for scheduling."
        ),
        ("FailedScheduling", "pod has unbound immediate PersistentVolumeClaims"),
    ),
    "pending-image": (
        _waiting(
            "ImagePullBackOff",
            'Back-off pulling image "registry.example/brain-ldm-training:0.1.0"',
        ),
        ("Failed", 'Failed to pull image "registry.example/brain-ldm-training:0.1.0": not found'),
    ),
    "pending-secret": (
        _waiting("CreateContainerConfigError", 'secret "brain-ldm-s3" not found'),
        ("Failed", 'Error: secret "brain-ldm-s3" not found'),
    ),
}
"""Pods that never start, as the scheduler (PodScheduled=False, Unschedulable) or the
kubelet (a container's waiting reason) marks them, with the event each writes."""


def _terminated(phase: str, code: int, reason: str) -> dict[str, Any]:
    """A pod status whose one container ended with ``code``, as the kubelet reports it."""
    terminated = {"exitCode": code, "reason": reason}
    container = {
        "name": "pytorch",
        "ready": False,
        "restartCount": 0,
        "image": "x",
        "imageID": "",
        "state": {"terminated": terminated},
    }
    return {"phase": phase, "containerStatuses": [container]}


class FakeOperator(threading.Thread):
    """Plays the training operator for every PyTorchJob that appears, following ``outcome``:
    succeed | succeed-clean (pods deleted the moment the job Succeeded) | fail | hang |
    evict (the master is evicted; nothing recreates it) | evict-restart (under
    ``restartPolicy: ExitCode``: the evicted master, exit code 137, is deleted and
    recreated, the job goes Restarting -> Running -> Succeeded) | absent (never touches
    anything).

    Conditions follow the training operator's ``UpdateJobConditions``: one condition per
    type, a changed one moves to the end; Running and Restarting replace each other; when
    Succeeded or Failed is set, Running stays with status "False".
    """

    def __init__(self, api: KubeApi, outcome: str, step_s: float = 0.15) -> None:
        super().__init__(daemon=True)
        self.api, self.outcome, self.step_s = api, outcome, step_s
        client = api.client(OPERATOR_UA)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)
        self.seen: set[str] = set()
        self.done = threading.Event()
        self.stopping = threading.Event()
        self.logged: dict[str, list[str]] = {}  # job -> log lines without stamps, in order
        self.conditions: dict[str, list[dict[str, Any]]] = {}

    def run(self) -> None:
        while not self.stopping.is_set():
            jobs = self.custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["items"]
            for job in jobs:
                name = job["metadata"]["name"]
                if name not in self.seen and self.outcome != "absent" and not job.get("status"):
                    self.seen.add(name)
                    self._play(job)
            self.stopping.wait(0.05)

    def _conditions(self, name: str, *types: tuple[str, str, str]) -> None:
        """Set each condition (status True) in turn, as the operator's reconciles would."""
        for kind, reason, message in types:
            self._set(name, kind, reason, message)
        self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            NS,
            PLURAL,
            name,
            {"status": {"conditions": self.conditions[name]}},
        )

    def _set(self, name: str, kind: str, reason: str, message: str) -> None:
        current = self.conditions.setdefault(name, [])
        if any(c["type"] == kind and c["status"] == "True" for c in current):
            return  # unchanged: the operator does not rewrite it
        kept = []
        for c in current:
            if c["type"] == kind or {c["type"], kind} == {"Running", "Restarting"}:
                continue
            if kind in ("Succeeded", "Failed") and c["type"] == "Running":
                c = {**c, "status": "False"}
            kept.append(c)
        stamp = _stamp()
        new = {"type": kind, "status": "True", "reason": reason, "message": message}
        self.conditions[name] = [
            *kept,
            {**new, "lastUpdateTime": stamp, "lastTransitionTime": stamp},
        ]

    def _log(self, job: str, pod: str, text: str) -> None:
        self.api.logs.setdefault(pod, []).append(f"{_stamp()} {text}")
        self.logged.setdefault(job, []).append(text)

    def _play(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        replicas = job["spec"]["pytorchReplicaSpecs"]
        created = ("Created", "PyTorchJobCreated", f"PyTorchJob {name} is created.")
        running = ("Running", "PyTorchJobRunning", f"PyTorchJob {name} is running.")
        self._conditions(name, created)
        pods = []
        for rtype, spec in replicas.items():
            for i in range(spec.get("replicas", 1)):
                pod = f"{name}-{rtype.lower()}-{i}"
                pods.append(pod)
                self._pod(name, pod, rtype, spec)
        master = f"{name}-master-0"
        if self.outcome in PENDING:
            self._block(pods, *PENDING[self.outcome])
            self.done.set()
            return  # the job stays Created: no pod ever runs
        self._conditions(name, created, running)
        for step in range(3):
            self._log(name, master, f"step {step} loss {1.0 / (step + 1):.3f}")
            # Several lines within one timestamp must neither vanish nor repeat on reconnect.
            self._log(name, master, f"step {step} lr 1e-4")
            time.sleep(self.step_s)
        if self.outcome == "evict-restart":
            self._evict(master)
            time.sleep(self.step_s)
            # ExitCode policy, exit code 137 >= 128: retryable. The pod is deleted and made
            # again under the same name; the job says Restarting until it runs.
            self._clean([master])
            restarting = (
                "Restarting",
                "PyTorchJobRestarting",
                f"PyTorchJob {name} is restarting because 1 Master replica(s) failed.",
            )
            self._conditions(name, restarting)
            time.sleep(self.step_s)
            self._pod(name, master, "Master", replicas["Master"])
            self._conditions(name, running)
            self._log(name, master, "resumed from checkpoint step 2")
            time.sleep(self.step_s)
        if self.outcome in ("succeed", "succeed-clean", "evict-restart"):
            self._log(name, master, "saved autoencoder.pt")
            self._finish_pods(pods, "Succeeded", 0, "Completed")
            self._conditions(name, ("Succeeded", "PyTorchJobSucceeded", "done"))
            if self.outcome != "succeed-clean":
                time.sleep(self.step_s)
            self._clean(pods)
        elif self.outcome == "fail":
            self._log(name, master, "Traceback (most recent call last):")
            self._log(name, master, "RuntimeError: CUDA out of memory (simulated)")
            self._finish_pods(pods, "Failed", 1, "Error")
            self._event(
                master, "Pod", "Warning", "BackOff", "Back-off restarting failed container pytorch"
            )
            self._event(
                name, "PyTorchJob", "Normal", "PyTorchJobFailed", f"PyTorchJob {name} is failed"
            )
            failed = (
                "Failed",
                "PyTorchJobFailed",
                f"PyTorchJob {name} is failed because 1 Master replica(s) failed.",
            )
            self._conditions(name, created, running, failed)
            time.sleep(3 * self.step_s)
            self._clean(pods)  # cleanPodPolicy All: the master's logs are gone from the API
        elif self.outcome == "evict":
            self._evict(master)
        self.done.set()

    def _pod(self, job: str, pod: str, rtype: str, spec: dict[str, Any]) -> None:
        self.core.create_namespaced_pod(
            NS,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod,
                    "namespace": NS,
                    "labels": {pj.JOB_LABEL: job, pj.REPLICA_LABEL: rtype.lower()},
                },
                "spec": spec["template"]["spec"],
                "status": {"phase": "Running"},
            },
        )

    def _block(self, pods: list[str], status: dict[str, Any], event: tuple[str, str]) -> None:
        """What the scheduler or kubelet writes on pods that cannot start."""
        for pod in pods:
            self.core.patch_namespaced_pod_status(pod, NS, {"status": status})
            self._event(pod, "Pod", "Warning", *event)

    def _evict(self, pod: str) -> None:
        """The kubelet's eviction: the pod Failed/Evicted, its container killed (137)."""
        status = {
            **_terminated("Failed", 137, "Error"),
            "reason": "Evicted",
            "message": "The node was low on resource: memory.",
        }
        self.core.patch_namespaced_pod_status(pod, NS, {"status": status})
        self._event(pod, "Pod", "Warning", "Evicted", "The node was low on resource: memory.")

    def _finish_pods(self, pods: list[str], phase: str, code: int, reason: str) -> None:
        for pod in pods:
            status = _terminated(phase, code, reason)
            self.core.patch_namespaced_pod_status(pod, NS, {"status": status})

    def _clean(self, pods: list[str]) -> None:
        for pod in pods:
            self.core.delete_namespaced_pod(pod, NS)
            self.api.logs.pop(pod, None)

    def _event(self, obj: str, kind: str, type_: str, reason: str, message: str) -> None:
        self.core.create_namespaced_event(
            NS,
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{obj}.{reason.lower()}", "namespace": NS},
                "involvedObject": {"kind": kind, "name": obj, "namespace": NS},
                "type": type_,
                "reason": reason,
                "message": message,
                "lastTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def cluster():
    with KubeApi({f"{GROUP}/{VERSION}/{PLURAL}": KIND}) as api:
        cluster = Cluster(api)
        yield cluster
        cluster.stop()
        # Contract checks on everything the launcher did in the test.
        sent = api.requests(LAUNCHER_UA)
        used = {rbac_triple(r) for r in sent}
        assert used <= declared(pj.RBAC_RULES), (
            f"calls outside RBAC_RULES: {sorted(used - declared(pj.RBAC_RULES))}"
        )
        for r in sent:
            if r.method.value.upper() == "POST" and r.resource and r.resource.plural == PLURAL:
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


def _task(name: str | None = None, nnodes: int = 1, nproc: int = 2) -> TrainingTask:
    return TrainingTask(
        name=name or "ldm-ae-0123456789ab",
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


def _launcher(
    cluster: Cluster, out: io.StringIO | None = None, **timing: Any
) -> pj.PyTorchJobLauncher:
    return pj.PyTorchJobLauncher(
        _config(),
        STAGE,
        api_client=cluster.api.client(LAUNCHER_UA),
        out=out or io.StringIO(),
        timing=dataclasses.replace(FAST, **timing),
    )


def _jobs(cluster: Cluster) -> list[dict[str, Any]]:
    custom = kubernetes.client.CustomObjectsApi(cluster.api.client("test-inspector"))
    return custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["items"]


def _creates(cluster: Cluster) -> int:
    return sum(
        1
        for r in cluster.api.requests(LAUNCHER_UA)
        if r.method.value.upper() == "POST" and r.resource and r.resource.plural == PLURAL
    )


# --------------------------------------------------------------------------- builder


def test_single_node_job_shape_and_validity():
    job = pj.build_pytorchjob(_task(), _config(), STAGE)
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
    job = pj.build_pytorchjob(_task(nnodes=4, nproc=8), _config(), STAGE)
    crdcheck.validate(job)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == 3
    assert replicas["Worker"]["template"] == replicas["Master"]["template"]
    assert job["spec"]["nprocPerNode"] == "8"
    # A spec differing only in size hashes differently (adoption compares it).
    other = pj.build_pytorchjob(_task(nnodes=2, nproc=8), _config(), STAGE)
    assert spec_hash(job) != spec_hash(other)


def test_cpu_job_has_no_gpu_scheduling():
    job = pj.build_pytorchjob(_task(), _config("cluster.s3_secret=", preset="tiny-cpu"), STAGE)
    crdcheck.validate(job)
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "envFrom" not in pod["containers"][0]


def test_invalid_tasks_are_refused_before_any_api_call():
    with pytest.raises(LaunchError, match="DNS-1035"):
        pj.build_pytorchjob(_task(name="Train_AE"), _config(), STAGE)
    with pytest.raises(LaunchError, match="must be >= 1"):
        pj.build_pytorchjob(_task(nnodes=0), _config(), STAGE)
    with pytest.raises(crdcheck.InvalidResource):  # the checker itself catches a second Master
        job = pj.build_pytorchjob(_task(), _config(), STAGE)
        job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
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
    command = pj.build_pytorchjob(_task(nnodes=3, nproc=8), _config(), STAGE)["spec"][
        "pytorchReplicaSpecs"
    ]["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert command[0] == "torchrun"
    args = get_args_parser().parse_args(command[1:])
    assert (args.nnodes, args.nproc_per_node, int(args.node_rank)) == ("3", "8", 2)
    assert (args.master_addr, int(args.master_port)) == ("job-master-0", 23456)
    assert args.module and args.training_script == "ldm_core.cli"
    assert args.training_script_args[0] == "train-autoencoder"


# --------------------------------------------------------------------------- launcher


def test_create_follow_logs_and_succeed(cluster):
    op = cluster.operator("succeed")
    out = io.StringIO()
    task = _task()
    _launcher(cluster, out).run(task)
    assert _creates(cluster) == 1
    (job,) = _jobs(cluster)
    assert job["metadata"]["name"] == task.name
    crdcheck.validate({k: v for k, v in job.items() if k != "status"})
    # Every log line the master wrote reached our stdout exactly once, in order, across
    # several reconnects of the log stream.
    assert out.getvalue().splitlines() == op.logged[task.name]
    log_reads = [r for r in cluster.api.requests(LAUNCHER_UA) if r.subresource == "log"]
    assert len(log_reads) > 1


def test_failure_raises_with_logs_and_events(cluster):
    cluster.operator("fail")
    task = _task()
    with pytest.raises(LaunchError) as err:
        _launcher(cluster).run(task)
    text = str(err.value)
    assert f"PyTorchJob {NS}/{task.name} failed" in text
    assert "1 Master replica(s) failed" in text
    assert "RuntimeError: CUDA out of memory (simulated)" in text  # the master's last lines
    assert "step 2 loss" in text
    assert "BackOff" in text and "Back-off restarting failed container" in text  # events


def test_evicted_pod_fails_the_task_and_deletes_the_job(cluster, monkeypatch):
    """restartPolicy Never: nothing brings an evicted pod back, so the task fails at once."""
    monkeypatch.setattr(pj, "RESTART_POLICY", "Never")
    cluster.operator("evict")
    with pytest.raises(LaunchError, match="evicted.*low on resource: memory"):
        _launcher(cluster).run(_task())
    assert _jobs(cluster) == []


def test_an_evicted_pod_restarted_under_exit_code_policy_is_followed_to_success(cluster):
    """restartPolicy ExitCode: the eviction's 137 is retryable; the operator recreates the
    master (Restarting, then Running) and the job succeeds. The launcher goes on with it
    and streams the new pod's log too."""
    op = cluster.operator("evict-restart")
    out = io.StringIO()
    task = _task()
    _launcher(cluster, out).run(task)
    assert op.done.wait(10) and _creates(cluster) == 1
    (job,) = _jobs(cluster)
    held = [(c["type"], c["status"]) for c in job["status"]["conditions"]]
    assert held == [("Created", "True"), ("Running", "False"), ("Succeeded", "True")]
    assert "resumed from checkpoint step 2" in out.getvalue()
    assert out.getvalue().rstrip().endswith("saved autoencoder.pt")


def test_pods_deleted_the_moment_the_job_succeeded_still_succeed(cluster):
    """The operator may delete the pods right after Succeeded: the final log read meets a
    404 and the task still succeeds, with every line it had seen."""
    op = cluster.operator("succeed-clean", step_s=0.05)
    out = io.StringIO()
    task = _task()
    _launcher(cluster, out).run(task)
    printed = out.getvalue().splitlines()
    assert printed == op.logged[task.name][: len(printed)]
    assert any(r.subresource == "log" for r in cluster.api.requests(LAUNCHER_UA))


def test_timeout_deletes_the_job(cluster):
    cluster.operator("hang")
    t0 = time.monotonic()
    with pytest.raises(
        LaunchError, match=r"no result after 1s \(timeout\)[\s\S]*The job was deleted"
    ):
        _launcher(cluster, timeout_s=1.0).run(_task())
    assert time.monotonic() - t0 < 10
    assert _jobs(cluster) == []
    (delete,) = [r for r in cluster.api.requests(LAUNCHER_UA) if r.method.value.upper() == "DELETE"]
    assert delete.data.get("propagationPolicy") == "Foreground"


def test_no_operator_fails_fast_with_a_hint(cluster):
    cluster.operator("absent")
    with pytest.raises(LaunchError, match="training operator installed"):
        _launcher(cluster, start_timeout_s=0.5).run(_task())
    assert _jobs(cluster) == []


def test_restarted_component_adopts_the_running_job(cluster):
    """A first component attempt created the job and died; the retry finds it by name."""
    task = _task()
    first = kubernetes.client.CustomObjectsApi(cluster.api.client("previous-attempt"))
    body = pj.build_pytorchjob(task, _config(), STAGE)
    first.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
    cluster.operator("succeed")
    out = io.StringIO()
    _launcher(cluster, out).run(task)
    assert _creates(cluster) == 0
    assert len(_jobs(cluster)) == 1
    assert "saved autoencoder.pt" in out.getvalue()

    # Running the finished task again (a retry after success) is a no-op.
    _launcher(cluster).run(task)
    assert _creates(cluster) == 0 and len(_jobs(cluster)) == 1


def test_adoption_refuses_a_different_job_with_the_same_name(cluster):
    task = _task()
    body = pj.build_pytorchjob(_task(nproc=1), _config(), STAGE)  # same name, other spec
    kubernetes.client.CustomObjectsApi(
        cluster.api.client("someone")
    ).create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
    with pytest.raises(LaunchError, match="a different PyTorchJob .* already exists"):
        _launcher(cluster).run(task)
    assert len(_jobs(cluster)) == 1 and _creates(cluster) == 0


def test_failed_earlier_attempt_is_replaced_not_duplicated(cluster):
    task = _task()
    custom = kubernetes.client.CustomObjectsApi(cluster.api.client("previous-attempt"))
    custom.create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, pj.build_pytorchjob(task, _config(), STAGE)
    )
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        NS,
        PLURAL,
        task.name,
        {
            "status": {
                "conditions": [{"type": "Failed", "status": "True", "reason": "PyTorchJobFailed"}]
            }
        },
    )
    cluster.operator("succeed")  # plays only jobs without status: the fresh one
    _launcher(cluster).run(task)
    assert _creates(cluster) == 1
    (job,) = _jobs(cluster)
    assert true_condition(job, "Succeeded")


def test_rbac_rules_are_exactly_what_the_launcher_calls(cluster, monkeypatch):
    """Success, failure and timeout together exercise every call the launcher makes, run
    from a pod as on a cluster (the runtime sets HOSTNAME to the pod's name)."""
    monkeypatch.delenv("POD_NAME", raising=False)
    monkeypatch.setenv("HOSTNAME", "brain-ldm-step-pod")
    for outcome, kw in (("succeed", {}), ("fail", {}), ("hang", {"timeout_s": 0.5})):
        op = cluster.operator(outcome, step_s=0.05)
        task = _task(name=f"ldm-rbac-{outcome}")
        with pytest.raises(LaunchError) if outcome != "succeed" else contextlib.nullcontext():
            _launcher(cluster, **kw).run(task)
        op.stopping.set()  # one operator per job
        op.join(10)
    used = {rbac_triple(r) for r in cluster.api.requests(LAUNCHER_UA)}
    assert used == declared(pj.RBAC_RULES)


def test_job_deleted_by_someone_else_fails_the_task(cluster):
    cluster.operator("hang")
    task = _task()
    other = kubernetes.client.CustomObjectsApi(cluster.api.client("someone"))

    def delete_later() -> None:
        time.sleep(0.6)
        other.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, task.name)

    deleter = threading.Thread(target=delete_later)
    deleter.start()
    with pytest.raises(LaunchError, match="deleted by someone else"):
        _launcher(cluster).run(task)
    deleter.join()


def test_forbidden_names_the_missing_rbac(cluster):
    task = _task()
    (
        cluster.api.emulator[
            "get", f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs/{task.name}"
        ]
        << 403
    )
    with pytest.raises(LaunchError, match=r"refused \(403.*service account needs the Role") as err:
        _launcher(cluster).run(task)
    assert _creates(cluster) == 0
    assert "the Role brain-ldm-pipeline-runner (manifests/base/rbac.yaml)" in str(err.value)
    assert f"allow 'get' on pytorchjobs.kubeflow.org in namespace {NS}" in str(err.value)


def test_forbidden_pod_listing_names_the_core_resource(cluster):
    """A Role that lacks a core permission is named as precisely as a custom one."""
    cluster.operator("hang")
    cluster.api.emulator["get", f"/api/v1/namespaces/{NS}/pods"] << 403
    with pytest.raises(LaunchError) as err:
        _launcher(cluster).run(_task())
    assert f"list pods in {NS}: the API server refused (403" in str(err.value)
    assert f"allow 'list' on pods in namespace {NS}" in str(err.value)


def test_unreachable_api_names_the_host():
    closed = _closed_url()
    with pytest.raises(LaunchError, match=f"Kubernetes API at {closed} unreachable"):
        pj.PyTorchJobLauncher(_config(), STAGE, api_client=api_client(closed)).run(_task())


class FakeClock:
    """Monotonic time that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_deadlines_run_on_the_injected_clock(cluster):
    """Ten minutes of waiting for an operator that never comes, in no real time: the
    launcher reads deadlines from its clock and waits through its sleep."""
    cluster.operator("absent")
    clock = FakeClock()
    launcher = pj.PyTorchJobLauncher(
        _config(),
        STAGE,
        api_client=cluster.api.client(LAUNCHER_UA),
        out=io.StringIO(),
        timing=dataclasses.replace(FAST, start_timeout_s=600.0, timeout_s=None, poll_s=60.0),
        clock=clock,
        sleep=clock.sleep,
    )
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="got no status in 600s"):
        launcher.run(_task())
    assert time.monotonic() - t0 < 20  # a dozen polls of real HTTP, not ten minutes
    assert clock.now - 1000.0 > 600 and set(clock.slept) == {60.0}
    assert _jobs(cluster) == []


@pytest.mark.parametrize(
    "outcome,reason,change",
    [
        ("pending-gpu", "Insufficient nvidia.com/gpu", "ask for fewer GPUs or add GPU nodes"),
        ("pending-pvc", "unbound immediate PersistentVolumeClaims", "storageClassName"),
        ("pending-image", "ImagePullBackOff", "imagePullSecrets"),
        (
            "pending-secret",
            'CreateContainerConfigError \\(secret "brain-ldm-s3" not found',
            "create the Secret",
        ),
    ],
)
def test_a_job_whose_pods_cannot_start_fails_after_the_pending_timeout(
    cluster, outcome, reason, change
):
    """Fifteen minutes of pods that never start, in no real time: not failed at first
    sight (an autoscaler may add the node), failed once the pending timeout is spent, with
    the scheduler's or kubelet's reason, what to change, and the pods' events; the job is
    deleted so nothing waits for a node any longer."""
    op = cluster.operator(outcome)
    clock = FakeClock()
    launcher = pj.PyTorchJobLauncher(
        _config(),
        STAGE,
        api_client=cluster.api.client(LAUNCHER_UA),
        out=io.StringIO(),
        timing=dataclasses.replace(FAST, start_timeout_s=600.0, timeout_s=None, poll_s=60.0),
        clock=clock,
        sleep=lambda seconds: (op.done.wait(10), clock.sleep(seconds)),
    )
    with pytest.raises(LaunchError) as err:
        launcher.run(_task())
    text = str(err.value)
    assert re.search(f"cannot start: .*{reason}", text), text
    assert change in text and "(for 900s)" in text and "The job was deleted" in text
    assert "recent events:\n" in text and PENDING[outcome][1][0] in text
    # Blocked from the first look on: failed between 900 s and one poll later.
    assert 900 <= clock.now - 1000.0 <= 900 + 2 * 60
    assert _jobs(cluster) == []


# --------------------------------------------------------------------------- decisions (pure)


def _job(*conditions: tuple[str, str], spec_hash: str = "h") -> dict[str, Any]:
    return {
        "metadata": {"annotations": {SPEC_HASH_ANNOTATION: spec_hash}},
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
    "job,want,decision",
    [
        (None, "h", "create"),
        (_job(("Running", "True")), "h", "adopt"),
        (_job(("Succeeded", "True")), "h", "adopt"),
        (_job(("Running", "True"), ("Failed", "True")), "h", "replace"),
        (_job(("Failed", "False")), "h", "adopt"),
        (_job(("Running", "True"), spec_hash="other"), "h", "conflict"),
        ({"metadata": {}}, "h", "conflict"),
    ],
)
def test_adoption_decision(job, want, decision):
    assert job_launcher.adoption(job, want) == decision


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


def _closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# --------------------------------------------------------------------------- no leaked GPUs

_LAUNCHER_PROCESS = """
import logging, sys
from ldm_core.config import load_config
from ldm_core.kube import pytorchjob as pj
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
    pj.PyTorchJobLauncher(cfg, "train_autoencoder", api_client=client, timing=timing).run(task)
except LdmError as exc:
    print(f"launch failed: {exc}", file=sys.stderr)
    sys.exit(143)
"""


def _step_pod(cluster: Cluster, name: str, uid: str) -> None:
    """The pipeline step's own pod, as the kubelet made it (the launcher runs in it)."""
    core = kubernetes.client.CoreV1Api(cluster.api.client(OPERATOR_UA))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "uid": uid}}
    core.create_namespaced_pod(NS, {**pod, "metadata": {**pod["metadata"], "namespace": NS}})


def test_sigterm_to_a_launcher_process_deletes_its_job(cluster, tmp_path):
    """A run terminated from the Kubeflow UI: the step's pod gets SIGTERM. The launcher, a
    real process following a job that never ends, deletes the job before it exits; the job
    also names the step's pod (read by the downward API's POD_NAME) as its owner."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    cluster.operator("hang")
    _step_pod(cluster, "brain-ldm-run-7f3a-train-ae-driver", "0c9f7e4a-step-pod-uid")
    task = "ldm-ae-0123456789ab"
    root = Path(__file__).parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "POD_NAME": "brain-ldm-run-7f3a-train-ae-driver",
    }
    argv = [sys.executable, "-c", _LAUNCHER_PROCESS, cluster.api.url, LAUNCHER_UA, NS, task]
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(argv, env=env, stderr=err, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not any(
                r.method.value.upper() == "GET" and r.subresource == "log"
                for r in cluster.api.requests(LAUNCHER_UA)
            ):  # following the job (its master's log): past create, inside the guard
                assert proc.poll() is None, (tmp_path / "stderr").read_text()
                assert time.monotonic() < deadline, "the launcher never followed its job"
                time.sleep(0.1)
            (job,) = _jobs(cluster)
            assert job["metadata"]["ownerReferences"] == [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": "brain-ldm-run-7f3a-train-ae-driver",
                    "uid": "0c9f7e4a-step-pod-uid",
                }
            ]
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    stderr = (tmp_path / "stderr").read_text()
    assert rc == 143, stderr
    assert f"SIGTERM while PyTorchJob {NS}/{task} ran; PyTorchJob {NS}/{task} was deleted" in stderr
    assert _jobs(cluster) == []
    (delete,) = [r for r in cluster.api.requests(LAUNCHER_UA) if r.method.value.upper() == "DELETE"]
    assert delete.data.get("propagationPolicy") == "Foreground"


def test_a_launcher_outside_a_pod_creates_an_ownerless_job(cluster, monkeypatch):
    """HOSTNAME on a laptop names no pod in the namespace: the job gets no owner, and the
    launch goes on (the pod read answered 404)."""
    monkeypatch.delenv("POD_NAME", raising=False)
    monkeypatch.setenv("HOSTNAME", "a-laptop")
    cluster.operator("succeed", step_s=0.02)
    _launcher(cluster).run(_task())
    (job,) = _jobs(cluster)
    assert "ownerReferences" not in job["metadata"]
    reads = [r for r in cluster.api.requests(LAUNCHER_UA) if r.name == "a-laptop"]
    assert [rbac_triple(r) for r in reads] == [("", "pods", "get")]
