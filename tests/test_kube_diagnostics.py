"""What a failed training job is reported with (ldm_core.kube.diagnostics): the log pod's
state, the kubelet's last log lines and the recent events, read from an in-memory API server.

Shapes, from upstream:

- Pod status (k8s.io/api/core/v1 ``ContainerStatus``): a container's ``state`` is one of
  ``waiting`` / ``running`` / ``terminated``; after a restart ``lastState.terminated`` keeps
  how the previous run ended while ``state.waiting.reason`` is ``CrashLoopBackOff``; the
  kubelet's OOM kill reads ``exitCode: 137, reason: OOMKilled``. A pod's own ``reason`` is
  set by the kubelet for an eviction (``Evicted``).
- Events: components using the core/v1 recorder (the kubelet, the training operator) fill
  ``firstTimestamp`` / ``lastTimestamp``; kube-scheduler writes through events.k8s.io/v1, which
  the core/v1 view shows with ``eventTime`` and no ``lastTimestamp``. ``involvedObject`` names
  the object (``kind``, ``name``).
- ``pods/log`` with ``tailLines`` answers the last lines; a pod that is gone answers 404.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import kubernetes
import kubernetes.client as k8s
import pytest

from ldm_core.kube import diagnostics
from ldm_core.kube.client import api_client
from tests.harness.kube import KubeApi

NS = "brain-ldm"
JOB = "train-ae"
MASTER = "train-ae-master-0"


@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as api:
        yield api


def _core(api: KubeApi) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api.client("diagnostics-under-test"))


# --------------------------------------------------------------------------- pod_state


def _container(name: str, state: Any, last: Any = None, restarts: int = 0):
    return k8s.V1ContainerStatus(
        name=name,
        image="registry.example/brain-ldm-training:0.1.0",
        image_id="",
        ready=False,
        restart_count=restarts,
        state=state,
        last_state=last,
    )


def _terminated(code: int, reason: str | None):
    return k8s.V1ContainerState(
        terminated=k8s.V1ContainerStateTerminated(exit_code=code, reason=reason)
    )


def _pod(phase: str, *statuses: Any, reason: str | None = None) -> k8s.V1Pod:
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=MASTER),
        status=k8s.V1PodStatus(phase=phase, reason=reason, container_statuses=list(statuses)),
    )


RUNNING = k8s.V1ContainerState(running=k8s.V1ContainerStateRunning())


@pytest.mark.parametrize(
    "pod,state",
    [
        (_pod("Running", _container("pytorch", RUNNING)), "Running, restarts 0"),
        (
            _pod("Failed", _container("pytorch", _terminated(1, "Error"))),
            "Failed, container exited with code 1 (Error), restarts 0",
        ),
        (
            _pod("Failed", _container("pytorch", _terminated(137, "OOMKilled"))),
            "Failed, container exited with code 137 (OOMKilled), restarts 0",
        ),
        # A crash loop: how the last run ended says more than "CrashLoopBackOff".
        (
            _pod(
                "Running",
                _container(
                    "pytorch",
                    k8s.V1ContainerState(
                        waiting=k8s.V1ContainerStateWaiting(reason="CrashLoopBackOff")
                    ),
                    last=_terminated(1, "Error"),
                    restarts=3,
                ),
            ),
            "Running, container exited with code 1 (Error), restarts 3",
        ),
        (
            _pod(
                "Pending",
                _container(
                    "pytorch",
                    k8s.V1ContainerState(
                        waiting=k8s.V1ContainerStateWaiting(reason="ImagePullBackOff")
                    ),
                ),
            ),
            "Pending, container waiting: ImagePullBackOff, restarts 0",
        ),
        (
            _pod("Failed", _container("pytorch", _terminated(137, None)), reason="Evicted"),
            "Failed, Evicted, container exited with code 137 (no reason), restarts 0",
        ),
        # Before the kubelet reports any container.
        (_pod("Pending"), "Pending"),
        (k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=MASTER)), "no status"),
        (k8s.V1Pod(status=k8s.V1PodStatus()), "Unknown"),
    ],
)
def test_pod_state_says_how_the_training_container_ended_or_waits(pod, state):
    assert diagnostics.pod_state(pod, "pytorch") == state


def test_pod_state_reads_only_the_named_container():
    """An injected sidecar (istio-proxy) that was killed says nothing about training."""
    pod = _pod(
        "Failed",
        _container("istio-proxy", _terminated(0, "Completed")),
        _container("pytorch", _terminated(1, "Error"), restarts=2),
    )
    assert diagnostics.pod_state(pod, "pytorch") == (
        "Failed, container exited with code 1 (Error), restarts 2"
    )


# --------------------------------------------------------------------------- log_tail


def _stamped(n: int) -> list[str]:
    return [
        f"2026-03-01T10:00:{i:02d}.000000000Z step {i} loss {1 / (i + 1):.3f}" for i in range(n)
    ]


def test_log_tail_reads_the_last_lines_of_the_training_container(api):
    api.logs[MASTER] = _stamped(10)
    lines = diagnostics.log_tail(_core(api), NS, api.url, MASTER, "pytorch", 3)
    assert lines == ["step 7 loss 0.125", "step 8 loss 0.111", "step 9 loss 0.100"]
    (read,) = [r for r in api.requests() if r.subresource == "log"]
    # A pod with a sidecar answers 400 to a log read that names no container.
    assert read.namespace == NS and read.name == MASTER
    assert read.params.get("container") == "pytorch" and read.params.get("tailLines") == "3"
    assert read.params.get("follow") in (None, "false")


def test_log_tail_of_a_pod_that_is_gone_is_empty(api):
    """cleanPodPolicy All deletes the pods when the job fails: their logs go with them."""
    assert diagnostics.log_tail(_core(api), NS, api.url, MASTER, "pytorch", 3) == []


def test_log_tail_refused_by_rbac_is_empty(api):
    api.logs[MASTER] = _stamped(3)
    api.emulator["get", f"/api/v1/namespaces/{NS}/pods/{MASTER}/log"] << 403
    assert diagnostics.log_tail(_core(api), NS, api.url, MASTER, "pytorch", 3) == []


def _closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_diagnostics_of_an_unreachable_api_do_not_raise():
    """The failure being explained is the error that matters; a diagnostic that cannot be
    read must not replace it."""
    url = _closed_url()
    core = kubernetes.client.CoreV1Api(api_client(url))
    assert diagnostics.log_tail(core, NS, url, MASTER, "pytorch", 3) == []
    (line,) = diagnostics.recent_events(core, NS, url, [JOB])
    assert line.startswith("(events unavailable: ") and f"Kubernetes API at {url}" in line


# --------------------------------------------------------------------------- recent_events


def _event(obj: str, kind: str, type_: str, reason: str, message: str, **when: str) -> dict:
    """An Event as its recorder writes it: ``lastTimestamp`` (core/v1 recorders) or
    ``eventTime`` (events.k8s.io/v1 recorders such as kube-scheduler)."""
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{obj}.{reason.lower()}.{len(when)}", "namespace": NS},
        "involvedObject": {"kind": kind, "name": obj, "namespace": NS},
        "type": type_,
        "reason": reason,
        "message": message,
        **when,
    }


def _record(api: KubeApi, *events: dict) -> None:
    core = kubernetes.client.CoreV1Api(api.client("recorder"))
    for event in events:
        core.create_namespaced_event(NS, event)


UNSCHEDULABLE = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."


def test_events_of_the_job_and_its_pods_are_merged_oldest_first(api):
    _record(
        api,
        _event(
            MASTER,
            "Pod",
            "Warning",
            "BackOff",
            "Back-off restarting failed container pytorch",
            lastTimestamp="2026-03-01T10:05:00Z",
        ),
        _event(
            JOB,
            "PyTorchJob",
            "Normal",
            "SuccessfulCreatePod",
            f"Created pod: {MASTER}",
            firstTimestamp="2026-03-01T10:00:00Z",
            lastTimestamp="2026-03-01T10:00:00Z",
        ),
        _event(
            MASTER,
            "Pod",
            "Warning",
            "FailedScheduling",
            UNSCHEDULABLE,
            eventTime="2026-03-01T10:00:01.500000Z",
        ),
        _event(
            MASTER,
            "Pod",
            "Normal",
            "Scheduled",
            f"Successfully assigned {NS}/{MASTER} to gpu-node-1",
            eventTime="2026-03-01T10:00:30.250000Z",
        ),
        _event(
            JOB,
            "PyTorchJob",
            "Normal",
            "PyTorchJobFailed",
            f"PyTorchJob {JOB} is failed",
            lastTimestamp="2026-03-01T10:06:00Z",
        ),
        # Not ours: another job's pod, and a job whose name only starts like ours.
        _event(
            "other-master-0", "Pod", "Warning", "BackOff", "x", lastTimestamp="2026-03-01T10:03:00Z"
        ),
        _event(
            "train-ae-2",
            "PyTorchJob",
            "Normal",
            "Created",
            "y",
            lastTimestamp="2026-03-01T10:04:00Z",
        ),
    )
    events = diagnostics.recent_events(_core(api), NS, api.url, [JOB, MASTER])
    assert events == [
        f"Normal SuccessfulCreatePod pytorchjob/{JOB}: Created pod: {MASTER}",
        f"Warning FailedScheduling pod/{MASTER}: {UNSCHEDULABLE}",
        f"Normal Scheduled pod/{MASTER}: Successfully assigned {NS}/{MASTER} to gpu-node-1",
        f"Warning BackOff pod/{MASTER}: Back-off restarting failed container pytorch",
        f"Normal PyTorchJobFailed pytorchjob/{JOB}: PyTorchJob {JOB} is failed",
    ]
    lists = [r for r in api.requests("diagnostics-under-test") if r.resource.plural == "events"]
    assert [r.params.get("fieldSelector") for r in lists] == [
        f"involvedObject.name={JOB}",
        f"involvedObject.name={MASTER}",
    ]


def test_only_the_most_recent_events_are_quoted(api):
    """A crash loop writes an event per restart; the error keeps the newest ones."""
    _record(
        api,
        *(
            _event(
                MASTER,
                "Pod",
                "Warning",
                f"BackOff{i:02d}",
                f"restart {i}",
                lastTimestamp=f"2026-03-01T10:{i:02d}:00Z",
            )
            for i in range(diagnostics.MAX_EVENTS + 5)
        ),
    )
    events = diagnostics.recent_events(_core(api), NS, api.url, [MASTER])
    assert len(events) == diagnostics.MAX_EVENTS
    assert events[0].endswith("restart 5") and events[-1].endswith(
        f"restart {diagnostics.MAX_EVENTS + 4}"
    )


def test_no_events_is_an_empty_list(api):
    assert diagnostics.recent_events(_core(api), NS, api.url, [JOB, MASTER]) == []


def test_events_refused_by_rbac_say_so_in_one_line(api):
    _record(
        api,
        _event(JOB, "PyTorchJob", "Normal", "Created", "x", lastTimestamp="2026-03-01T10:00:00Z"),
    )
    api.emulator["get", f"/api/v1/namespaces/{NS}/events"] << 403
    (line,) = diagnostics.recent_events(_core(api), NS, api.url, [JOB, MASTER])
    assert line.startswith(f"(events unavailable: list events in {NS}: the API server refused (403")
    assert "'list' on events" in line
