"""PyTorchJob builder and launcher against an in-memory Kubernetes API (kmock) on loopback.

A fake training operator (a thread speaking the same HTTP API) moves jobs through their
conditions, creates the master/worker pods, writes their logs and events, and cleans up
the pods the way ``cleanPodPolicy: All`` does. The launcher only sees the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import threading
import time
from datetime import UTC, datetime
from typing import Any

import kmock
import kubernetes
import pytest
from kmock._internal.apps import Server

from ldm_core.kube import pytorchjob as pj
from ldm_core.kube.client import api_client
from ldm_core.launcher import LaunchError, TrainingTask
from tests.harness import crdcheck

NS = "brain-ldm"
LAUNCHER_UA = "ldm-launcher-under-test"
OPERATOR_UA = "fake-training-operator"


# --------------------------------------------------------------------------- emulator


class Emulator:
    """kmock's KubernetesEmulator served on 127.0.0.1 from its own event loop thread."""

    def __init__(self) -> None:
        self.logs: dict[str, list[str]] = {}  # pod name -> timestamped log lines
        self.operators: list[FakeOperator] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(20), "emulator did not start"

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as emu, Server(emu) as server:
            self.emu = emu
            self.url = str(server.url).rstrip("/")
            emu.resources["kubeflow.org/v1/pytorchjobs"] = {
                "namespaced": True,
                "kind": "PyTorchJob",
            }
            emu.resources["v1/pods"] = {"namespaced": True, "kind": "Pod"}
            emu.resources["v1/events"] = {"namespaced": True, "kind": "Event"}
            emu["get", re.compile(r"/api/v1/namespaces/[^/]+/pods/[^/]+/log")] << self._pod_log
            self._ready.set()
            await self._stop.wait()

    def _pod_log(self, request: kmock.Request) -> bytes:
        """pods/log: the kubelet's view; honours tailLines and timestamps; 404 once the pod is gone."""
        lines = self.logs.get(request.name or "")
        if lines is None:
            raise kmock.KubernetesObjectNotFoundError()
        if request.params.get("timestamps") not in ("true", "True"):
            lines = [line.partition(" ")[2] for line in lines]
        if request.params.get("tailLines"):
            lines = lines[-int(request.params["tailLines"]) :]
        return "".join(f"{line}\n" for line in lines).encode()

    def client(self, user_agent: str) -> kubernetes.client.ApiClient:
        client = api_client(self.url)
        client.user_agent = user_agent
        return client

    def requests_from(self, user_agent: str) -> list[kmock.Request]:
        return [r for r in list(self.emu._requests) if r.headers.get("User-Agent") == user_agent]

    def operator(self, outcome: str, step_s: float = 0.15) -> FakeOperator:
        """Start a fake training operator; it is stopped before the emulator."""
        op = FakeOperator(self, outcome, step_s)
        self.operators.append(op)
        op.start()
        return op

    def stop(self) -> None:
        for op in self.operators:
            op.stopping.set()
            op.join(10)
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _rbac(request: kmock.Request) -> tuple[str, str, str]:
    """(apiGroup, resource[/subresource], verb) an API request needs under RBAC."""
    assert request.resource is not None, f"not a Kubernetes API request: {request.url}"
    resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
    method = request.method.value.upper()
    if method == "GET":
        verb = (
            "watch"
            if request.params.get("watch") in ("true", "1")
            else ("get" if request.name else "list")
        )
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method)
        if method == "DELETE":
            verb = "delete" if request.name else "deletecollection"
    return request.resource.group, resource, str(verb)


def _declared() -> set[tuple[str, str, str]]:
    return {(g, r, v) for g, r, verbs in pj.RBAC_RULES for v in verbs}


# --------------------------------------------------------------------------- fake operator


def _stamp() -> str:
    now = datetime.now(UTC)
    # RFC3339Nano with trailing zeros trimmed, as the kubelet writes it.
    frac = f"{now.microsecond:06d}".rstrip("0")
    return now.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


class FakeOperator(threading.Thread):
    """Plays the training operator for every PyTorchJob that appears, following ``outcome``:
    succeed | fail | hang | evict | absent (never touches anything)."""

    def __init__(self, emulator: Emulator, outcome: str, step_s: float = 0.15) -> None:
        super().__init__(daemon=True)
        self.em, self.outcome, self.step_s = emulator, outcome, step_s
        client = emulator.client(OPERATOR_UA)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)
        self.seen: set[str] = set()
        self.done = threading.Event()
        self.stopping = threading.Event()
        self.logged: dict[str, list[str]] = {}  # job -> log lines without stamps, in order

    def run(self) -> None:
        while not self.stopping.is_set():
            jobs = self.custom.list_namespaced_custom_object(pj.GROUP, pj.VERSION, NS, pj.PLURAL)[
                "items"
            ]
            for job in jobs:
                name = job["metadata"]["name"]
                if name not in self.seen and self.outcome != "absent" and not job.get("status"):
                    self.seen.add(name)
                    self._play(job)
            self.stopping.wait(0.05)

    def _conditions(self, name: str, *types: tuple[str, str, str]) -> None:
        conds = [
            {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": _stamp()}
            for t, r, m in types
        ]
        self.custom.patch_namespaced_custom_object_status(
            pj.GROUP, pj.VERSION, NS, pj.PLURAL, name, {"status": {"conditions": conds}}
        )

    def _log(self, job: str, pod: str, text: str) -> None:
        self.em.logs.setdefault(pod, []).append(f"{_stamp()} {text}")
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
                self.core.create_namespaced_pod(
                    NS,
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {
                            "name": pod,
                            "namespace": NS,
                            "labels": {pj.JOB_LABEL: name, pj.REPLICA_LABEL: rtype.lower()},
                        },
                        "spec": spec["template"]["spec"],
                        "status": {"phase": "Running"},
                    },
                )
        master = f"{name}-master-0"
        self._conditions(name, created, running)
        for step in range(3):
            self._log(name, master, f"step {step} loss {1.0 / (step + 1):.3f}")
            # Several lines within one timestamp must neither vanish nor repeat on reconnect.
            self._log(name, master, f"step {step} lr 1e-4")
            time.sleep(self.step_s)
        if self.outcome == "succeed":
            self._log(name, master, "saved autoencoder.pt")
            self._finish_pods(pods, "Succeeded", 0, "Completed")
            self._conditions(name, created, running, ("Succeeded", "PyTorchJobSucceeded", "done"))
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
            self.core.patch_namespaced_pod_status(
                master,
                NS,
                {
                    "status": {
                        "phase": "Failed",
                        "reason": "Evicted",
                        "message": "The node was low on resource: memory.",
                    }
                },
            )
            self._event(
                master, "Pod", "Warning", "Evicted", "The node was low on resource: memory."
            )
        self.done.set()

    def _finish_pods(self, pods: list[str], phase: str, code: int, reason: str) -> None:
        for pod in pods:
            terminated = {"exitCode": code, "reason": reason}
            status = {
                "phase": phase,
                "containerStatuses": [
                    {
                        "name": "pytorch",
                        "ready": False,
                        "restartCount": 0,
                        "image": "x",
                        "imageID": "",
                        "state": {"terminated": terminated},
                    }
                ],
            }
            self.core.patch_namespaced_pod_status(pod, NS, {"status": status})

    def _clean(self, pods: list[str]) -> None:
        for pod in pods:
            self.core.delete_namespaced_pod(pod, NS)
            self.em.logs.pop(pod, None)

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
def emulator():
    em = Emulator()
    yield em
    # Contract checks on everything the launcher did in the test.
    sent = em.requests_from(LAUNCHER_UA)
    used = {_rbac(r) for r in sent}
    assert used <= _declared(), f"calls outside RBAC_RULES: {sorted(used - _declared())}"
    for r in sent:
        if r.method.value.upper() == "POST" and r.resource and r.resource.plural == pj.PLURAL:
            crdcheck.validate(r.data)
    em.stop()


def _settings(**kw: Any) -> pj.PyTorchJobSettings:
    base = dict(
        image="registry.example/brain-ldm-training:0.1.0",
        namespace=NS,
        s3_secret="brain-ldm-s3",
        poll_s=0.05,
        log_reconnect_s=0.05,
        start_timeout_s=30.0,
        timeout_s=30.0,
    )
    base.update(kw)
    return pj.PyTorchJobSettings(**base)


def _task(name: str | None = None, nnodes: int = 1, nproc: int = 2) -> TrainingTask:
    return TrainingTask(
        name=name or pj.job_name("run-7f3a", "train-autoencoder"),
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


def _launcher(em: Emulator, out: io.StringIO | None = None, **kw: Any) -> pj.PyTorchJobLauncher:
    return pj.PyTorchJobLauncher(
        _settings(**kw), api_client=em.client(LAUNCHER_UA), out=out or io.StringIO()
    )


def _jobs(em: Emulator) -> list[dict[str, Any]]:
    custom = kubernetes.client.CustomObjectsApi(em.client("test-inspector"))
    return custom.list_namespaced_custom_object(pj.GROUP, pj.VERSION, NS, pj.PLURAL)["items"]


def _creates(em: Emulator) -> int:
    return sum(
        1
        for r in em.requests_from(LAUNCHER_UA)
        if r.method.value.upper() == "POST" and r.resource and r.resource.plural == pj.PLURAL
    )


# --------------------------------------------------------------------------- builder


def test_job_name_is_deterministic_dns1035_and_bounded():
    a = pj.job_name("run-7f3a", "train-autoencoder")
    assert a == pj.job_name("run-7f3a", "train-autoencoder")
    assert a != pj.job_name("run-7f3b", "train-autoencoder")
    assert a != pj.job_name("run-7f3a", "train-diffusion")
    assert a.startswith("train-autoencoder-run-7f3a-")
    odd = [
        ("0c5e9a1d-4b7e-4bb8-9d43-5a1b7b0ad3f1" * 3, "Train_Diffusion (retry #2)"),
        ("", ""),
        ("12345", "9-task"),
        ("RUN", "----"),
    ]
    for run_id, task in odd:
        name = pj.job_name(run_id, task)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
        assert len(name) <= pj.MAX_NAME
        # The operator's per-replica Service names must stay valid DNS-1035 labels too.
        assert len(f"{name}-worker-999") <= 63
    # Long run ids differing only at the end still differ (the hash covers everything).
    long = "x" * 200
    assert pj.job_name(long + "1", "t") != pj.job_name(long + "2", "t")


def test_single_node_job_shape_and_validity():
    job = pj.build_pytorchjob(_task(), _settings())
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
    job = pj.build_pytorchjob(_task(nnodes=4, nproc=8), _settings())
    crdcheck.validate(job)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == 3
    assert replicas["Worker"]["template"] == replicas["Master"]["template"]
    assert job["spec"]["nprocPerNode"] == "8"
    # A spec differing only in size hashes differently (adoption compares it).
    other = pj.build_pytorchjob(_task(nnodes=2, nproc=8), _settings())
    assert pj.spec_hash(job) != pj.spec_hash(other)


def test_cpu_job_has_no_gpu_scheduling():
    job = pj.build_pytorchjob(_task(), _settings(gpu=False, s3_secret=""))
    crdcheck.validate(job)
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "envFrom" not in pod["containers"][0]


def test_invalid_tasks_are_refused_before_any_api_call():
    with pytest.raises(LaunchError, match="DNS-1035"):
        pj.build_pytorchjob(_task(name="Train_AE"), _settings())
    with pytest.raises(LaunchError, match="must be >= 1"):
        pj.build_pytorchjob(_task(nnodes=0), _settings())
    with pytest.raises(crdcheck.InvalidResource):  # the checker itself catches a second Master
        job = pj.build_pytorchjob(_task(), _settings())
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
    command = pj.build_pytorchjob(_task(nnodes=3, nproc=8), _settings())["spec"][
        "pytorchReplicaSpecs"
    ]["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert command[0] == "torchrun"
    args = get_args_parser().parse_args(command[1:])
    assert (args.nnodes, args.nproc_per_node, int(args.node_rank)) == ("3", "8", 2)
    assert (args.master_addr, int(args.master_port)) == ("job-master-0", 23456)
    assert args.module and args.training_script == "ldm_core.cli"
    assert args.training_script_args[0] == "train-autoencoder"


# --------------------------------------------------------------------------- launcher


def test_create_follow_logs_and_succeed(emulator):
    op = emulator.operator("succeed")
    out = io.StringIO()
    task = _task()
    _launcher(emulator, out).run(task)
    assert _creates(emulator) == 1
    (job,) = _jobs(emulator)
    assert job["metadata"]["name"] == task.name
    crdcheck.validate({k: v for k, v in job.items() if k != "status"})
    # Every log line the master wrote reached our stdout exactly once, in order, across
    # several reconnects of the log stream.
    assert out.getvalue().splitlines() == op.logged[task.name]
    log_reads = [r for r in emulator.requests_from(LAUNCHER_UA) if r.subresource == "log"]
    assert len(log_reads) > 1


def test_failure_raises_with_logs_and_events(emulator):
    emulator.operator("fail")
    task = _task()
    with pytest.raises(LaunchError) as err:
        _launcher(emulator).run(task)
    text = str(err.value)
    assert f"PyTorchJob {NS}/{task.name} failed" in text
    assert "1 Master replica(s) failed" in text
    assert "RuntimeError: CUDA out of memory (simulated)" in text  # the master's last lines
    assert "step 2 loss" in text
    assert "BackOff" in text and "Back-off restarting failed container" in text  # events


def test_evicted_pod_fails_the_task_and_deletes_the_job(emulator):
    emulator.operator("evict")
    with pytest.raises(LaunchError, match="evicted.*low on resource: memory"):
        _launcher(emulator).run(_task())
    assert _jobs(emulator) == []


def test_timeout_deletes_the_job(emulator):
    emulator.operator("hang")
    t0 = time.monotonic()
    with pytest.raises(
        LaunchError, match=r"no result after 1s \(timeout\)[\s\S]*The job was deleted"
    ):
        _launcher(emulator, timeout_s=1.0).run(_task())
    assert time.monotonic() - t0 < 10
    assert _jobs(emulator) == []
    (delete,) = [
        r for r in emulator.requests_from(LAUNCHER_UA) if r.method.value.upper() == "DELETE"
    ]
    assert delete.data.get("propagationPolicy") == "Foreground"


def test_no_operator_fails_fast_with_a_hint(emulator):
    emulator.operator("absent")
    with pytest.raises(LaunchError, match="training operator installed"):
        _launcher(emulator, start_timeout_s=0.5).run(_task())
    assert _jobs(emulator) == []


def test_restarted_component_adopts_the_running_job(emulator):
    """A first component attempt created the job and died; the retry finds it by name."""
    task = _task()
    first = kubernetes.client.CustomObjectsApi(emulator.client("previous-attempt"))
    body = pj.build_pytorchjob(task, _settings())
    first.create_namespaced_custom_object(pj.GROUP, pj.VERSION, NS, pj.PLURAL, body)
    emulator.operator("succeed")
    out = io.StringIO()
    _launcher(emulator, out).run(task)
    assert _creates(emulator) == 0
    assert len(_jobs(emulator)) == 1
    assert "saved autoencoder.pt" in out.getvalue()

    # Running the finished task again (a retry after success) is a no-op.
    _launcher(emulator).run(task)
    assert _creates(emulator) == 0 and len(_jobs(emulator)) == 1


def test_adoption_refuses_a_different_job_with_the_same_name(emulator):
    task = _task()
    body = pj.build_pytorchjob(_task(nproc=1), _settings())  # same name, other spec
    kubernetes.client.CustomObjectsApi(emulator.client("someone")).create_namespaced_custom_object(
        pj.GROUP, pj.VERSION, NS, pj.PLURAL, body
    )
    with pytest.raises(LaunchError, match="a different PyTorchJob .* already exists"):
        _launcher(emulator).run(task)
    assert len(_jobs(emulator)) == 1 and _creates(emulator) == 0


def test_failed_earlier_attempt_is_replaced_not_duplicated(emulator):
    task = _task()
    custom = kubernetes.client.CustomObjectsApi(emulator.client("previous-attempt"))
    custom.create_namespaced_custom_object(
        pj.GROUP, pj.VERSION, NS, pj.PLURAL, pj.build_pytorchjob(task, _settings())
    )
    custom.patch_namespaced_custom_object_status(
        pj.GROUP,
        pj.VERSION,
        NS,
        pj.PLURAL,
        task.name,
        {
            "status": {
                "conditions": [{"type": "Failed", "status": "True", "reason": "PyTorchJobFailed"}]
            }
        },
    )
    emulator.operator("succeed")  # plays only jobs without status: the fresh one
    _launcher(emulator).run(task)
    assert _creates(emulator) == 1
    (job,) = _jobs(emulator)
    assert pj._true(job, "Succeeded")


def test_rbac_rules_are_exactly_what_the_launcher_calls(emulator):
    """Success, failure and timeout together exercise every call the launcher makes."""
    for outcome, kw in (("succeed", {}), ("fail", {}), ("hang", {"timeout_s": 0.5})):
        op = emulator.operator(outcome, step_s=0.05)
        task = _task(name=pj.job_name(f"rbac-{outcome}", "train"))
        with pytest.raises(LaunchError) if outcome != "succeed" else contextlib.nullcontext():
            _launcher(emulator, **kw).run(task)
        op.stopping.set()  # one operator per job
        op.join(10)
    used = {_rbac(r) for r in emulator.requests_from(LAUNCHER_UA)}
    assert used == _declared()


def test_job_deleted_by_someone_else_fails_the_task(emulator):
    emulator.operator("hang")
    task = _task()
    other = kubernetes.client.CustomObjectsApi(emulator.client("someone"))

    def delete_later() -> None:
        time.sleep(0.6)
        other.delete_namespaced_custom_object(pj.GROUP, pj.VERSION, NS, pj.PLURAL, task.name)

    deleter = threading.Thread(target=delete_later)
    deleter.start()
    with pytest.raises(LaunchError, match="deleted by someone else"):
        _launcher(emulator).run(task)
    deleter.join()


def test_forbidden_names_the_missing_rbac(emulator):
    task = _task()
    emulator.emu["get", f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs/{task.name}"] << 403
    with pytest.raises(LaunchError, match=r"refused \(403.*service account needs the Role"):
        _launcher(emulator).run(task)
    assert _creates(emulator) == 0
