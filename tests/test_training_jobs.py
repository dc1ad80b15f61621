"""What the PyTorchJob and the TrainJob launcher do alike, each test run against both.

Each kind's controller is emulated on a loopback Kubernetes API (tests/harness/
training_operator.py, tests/harness/trainer.py) and the launcher only sees the API: a job is
created once and adopted by a restarted launcher, refused when someone else's holds its
name, replaced when an earlier attempt failed; it is followed to its outcome through API
blips, deleted when it overruns, cannot start, has no controller or the launcher gets
SIGTERM; and a failure is reported with rank 0's last log lines and the events.
What differs between the kinds is in tests/test_pytorchjob.py and tests/test_trainjob.py.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import kmock
import pytest

from ldm_core.kube import job_launcher
from ldm_core.kube.client import api_client
from ldm_core.kube.job_launcher import true_condition
from ldm_core.kube.training_job import SPEC_HASH_ANNOTATION
from ldm_core.launcher import LaunchError
from tests.harness import crdcheck, kubelet
from tests.harness.kube import declared, rbac_triple
from tests.harness.training_jobs import (
    KINDS,
    LAUNCHER_UA,
    NS,
    STAGE,
    FakeClock,
    Kind,
    job_config,
    serve,
    step_pod,
    training_task,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=KINDS, ids=str)
def kind(request) -> Kind:
    return request.param


@pytest.fixture
def cluster(kind):
    with serve(kind) as cluster:
        yield cluster


def _closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# --------------------------------------------------------------------------- build


@pytest.mark.parametrize(
    ("change", "match"), [({"name": "Train_AE"}, "DNS-1035"), ({"nnodes": 0}, "must be >= 1")]
)
def test_invalid_tasks_are_refused_before_any_api_call(kind, change, match):
    task = training_task()
    for key, value in change.items():
        setattr(task, key, value)
    with pytest.raises(LaunchError, match=match):
        kind.build(task, job_config(), STAGE)


def test_names_fit_the_names_the_controllers_derive(kind):
    """The longest name a kind takes leaves its controllers' pod and Service names within
    the 63 characters of a DNS label; one character more is refused, naming the limit."""
    longest = "a" * kind.max_name
    assert len(kind.derived_name(longest)) <= 63
    crdcheck.validate(kind.build(training_task(name=longest), job_config(), STAGE))
    with pytest.raises(LaunchError, match=f"at most {kind.max_name}"):
        kind.build(training_task(name=longest + "b"), job_config(), STAGE)


def test_a_stage_that_sizes_no_pods_is_refused(kind):
    with pytest.raises(LaunchError, match="'evaluate' is not a training stage"):
        kind.build(training_task(), job_config(), "evaluate")
    with pytest.raises(LaunchError, match="'evaluate' is not a training stage"):
        kind.launcher(job_config(), "evaluate", api_client=api_client(_closed_url()))


# --------------------------------------------------------------------------- decisions (pure)


def _job(*conditions: tuple[str, str], spec_hash: str = "h") -> dict:
    return {
        "metadata": {"annotations": {SPEC_HASH_ANNOTATION: spec_hash}},
        "status": {"conditions": [{"type": t, "status": s} for t, s in conditions]},
    }


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


# --------------------------------------------------------------------------- follow


def test_create_follow_logs_and_succeed(cluster):
    controller = cluster.controller("succeed")
    out = io.StringIO()
    task = training_task(nnodes=2)
    cluster.launcher(out).run(task)
    assert cluster.creates() == 1
    (job,) = cluster.jobs()
    assert job["metadata"]["name"] == task.name
    assert true_condition(job, cluster.kind.succeeded)
    crdcheck.validate({k: v for k, v in job.items() if k != "status"})
    # Every log line rank 0 wrote reached our stdout exactly once, in order, across
    # several reconnects of the log stream.
    assert out.getvalue().splitlines() == controller.logged[task.name]
    assert len([r for r in cluster.sent() if r.subresource == "log"]) > 1


def test_failure_raises_with_logs_and_events(cluster):
    cluster.controller("fail")
    task = training_task()
    with pytest.raises(LaunchError) as err:
        cluster.launcher().run(task)
    text = str(err.value)
    assert f"{cluster.kind.resource.kind} {NS}/{task.name} failed" in text
    assert "RuntimeError: CUDA out of memory (simulated)" in text  # rank 0's last lines
    assert "step 2 loss" in text
    for evidence in cluster.kind.failure:  # the condition's reason, pod state, events
        assert evidence.format(name=task.name) in text
    assert cluster.jobs(), "a Failed job stays for inspection; nothing runs in it any more"


def test_timeout_deletes_the_job(cluster):
    cluster.controller("hang")
    t0 = time.monotonic()
    deleted = re.escape(cluster.kind.deleted)
    with pytest.raises(LaunchError, match=rf"no result after 1s \(timeout\)[\s\S]*{deleted}"):
        cluster.launcher(timeout_s=1.0).run(training_task())
    assert time.monotonic() - t0 < 10
    assert cluster.jobs() == []
    (delete,) = cluster.deletes()
    assert delete.data.get("propagationPolicy") == "Foreground"


def test_no_controller_fails_fast_with_a_hint_and_deletes_the_job(cluster):
    cluster.controller("absent")
    with pytest.raises(LaunchError, match=cluster.kind.no_controller) as err:
        cluster.launcher(start_timeout_s=0.5).run(training_task())
    assert cluster.kind.deleted in str(err.value)
    assert cluster.jobs() == []


def test_deadlines_run_on_the_injected_clock(cluster):
    """Ten minutes of waiting for a controller that never comes, in no real time: the
    launcher reads deadlines from its clock and waits through its sleep."""
    cluster.controller("absent")
    clock = FakeClock()
    launcher = cluster.launcher(clock=clock, start_timeout_s=600.0, timeout_s=None, poll_s=60.0)
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="got no status in 600s"):
        launcher.run(training_task())
    assert time.monotonic() - t0 < 20  # a dozen polls of real HTTP, not ten minutes
    assert clock.elapsed > 600 and set(clock.slept) == {60.0}
    assert cluster.jobs() == []


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
    """Fifteen minutes (``cluster.pending_timeout_s``) of pods that never start, in no real
    time: not failed at first sight (an autoscaler may add the node), failed once the
    pending timeout is spent, with the scheduler's or kubelet's reason, what to change, and
    the pods' events; the job is deleted so nothing waits for a node any longer.

    The run's own timeout is set a few polls past the pending timeout: should a blocked pod
    go unnoticed, the launcher ends on that timeout and the assertions say what is missing,
    instead of the test polling through a day of fake time."""
    controller = cluster.controller(outcome)
    clock = FakeClock()
    pending_s = job_config().cluster.pending_timeout_s
    launcher = cluster.launcher(
        clock=clock,
        # Time moves only once the controller has marked the pods.
        sleep=lambda seconds: (controller.done.wait(10), clock.sleep(seconds)),
        start_timeout_s=600.0,
        timeout_s=pending_s + 5 * 60.0,
        poll_s=60.0,
    )
    with pytest.raises(LaunchError) as err:
        launcher.run(training_task())
    text = str(err.value)
    assert re.search(f"cannot start: .*{reason}", text), text
    assert change in text and f"(for {pending_s}s)" in text and cluster.kind.deleted in text
    assert "recent events:\n" in text and kubelet.pending("")[outcome][1][0] in text
    # Blocked from the first look on: failed between the timeout and one poll later.
    assert pending_s <= clock.elapsed <= pending_s + 2 * 60
    assert cluster.jobs() == []


def _blips(first: int, count: int):
    """A reaction that answers the launcher's reads of the job with 503 (an API server
    restarting, an etcd leader change) from its ``first``-th read on, ``count`` times."""
    reads = [0]

    def react(request: kmock.Request):
        if request.headers.get("User-Agent") == LAUNCHER_UA:
            reads[0] += 1
            if first <= reads[0] < first + count:
                return kmock.KubernetesError(
                    status=503, reason="ServiceUnavailable", message="etcdserver: leader changed"
                )
        raise NotImplementedError  # the emulator answers

    return react


def test_api_blips_while_following_are_retried(cluster):
    """Five failed looks in a row are blips: the launcher waits them out and succeeds."""
    cluster.controller("succeed", step_s=0.3)
    # Reads 1 and 2 are the adoption check and the re-read after create; then it follows.
    cluster.api.emulator["get", cluster.path(training_task().name)] << _blips(3, 5)
    out = io.StringIO()
    cluster.launcher(out).run(training_task())
    assert out.getvalue().rstrip().endswith("saved autoencoder.pt")
    assert cluster.creates() == 1


def test_six_failed_looks_in_a_row_are_not_a_blip(cluster):
    cluster.controller("hang")
    cluster.api.emulator["get", cluster.path(training_task().name)] << _blips(3, 6)
    with pytest.raises(LaunchError, match="503 .*etcdserver: leader changed"):
        cluster.launcher().run(training_task())


def test_job_deleted_by_someone_else_fails_the_task(cluster):
    cluster.controller("hang")
    task = training_task()
    r = cluster.kind.resource
    other = cluster.custom("someone")

    def delete_later() -> None:
        time.sleep(0.6)
        other.delete_namespaced_custom_object(r.group, r.version, NS, r.plural, task.name)

    deleter = threading.Thread(target=delete_later)
    deleter.start()
    with pytest.raises(LaunchError, match="deleted by someone else"):
        cluster.launcher().run(task)
    deleter.join()


# --------------------------------------------------------------------------- identity


def test_restarted_component_adopts_the_running_job(cluster):
    """A first component attempt created the job and died; the retry finds it by name."""
    task = training_task()
    cluster.create(cluster.kind.build(task, job_config(), STAGE))
    cluster.controller("succeed")
    out = io.StringIO()
    cluster.launcher(out).run(task)
    assert cluster.creates() == 0
    assert len(cluster.jobs()) == 1
    assert "saved autoencoder.pt" in out.getvalue()

    # Running the finished task again (a retry after success) is a no-op.
    cluster.launcher().run(task)
    assert cluster.creates() == 0 and len(cluster.jobs()) == 1


def test_adoption_refuses_a_different_job_with_the_same_name(cluster):
    task = training_task()
    other = cluster.kind.build(training_task(nproc=1), job_config(), STAGE)  # same name
    cluster.create(other, agent="someone")
    what = f"{cluster.kind.resource.kind} {NS}/{task.name}"
    with pytest.raises(LaunchError, match=f"a different {what} already exists"):
        cluster.launcher().run(task)
    assert len(cluster.jobs()) == 1 and cluster.creates() == 0


def test_failed_earlier_attempt_is_replaced_not_duplicated(cluster):
    task = training_task()
    r = cluster.kind.resource
    cluster.create(cluster.kind.build(task, job_config(), STAGE))
    failed = {"type": "Failed", "status": "True", "reason": cluster.kind.failed_reason}
    cluster.custom("previous-attempt").patch_namespaced_custom_object_status(
        r.group, r.version, NS, r.plural, task.name, {"status": {"conditions": [failed]}}
    )
    cluster.controller("succeed")  # plays only jobs without status: the fresh one
    cluster.launcher().run(task)
    assert cluster.creates() == 1
    (job,) = cluster.jobs()
    assert true_condition(job, cluster.kind.succeeded)


# --------------------------------------------------------------------------- RBAC


def test_rbac_rules_are_exactly_what_the_launcher_calls(cluster, monkeypatch):
    """Success, failure and timeout together exercise every call the launcher makes, run
    from a pod as on a cluster (the runtime sets HOSTNAME to the pod's name)."""
    monkeypatch.delenv("POD_NAME", raising=False)
    monkeypatch.setenv("HOSTNAME", "brain-ldm-step-pod")
    for outcome, timing in (("succeed", {}), ("fail", {}), ("hang", {"timeout_s": 0.5})):
        controller = cluster.controller(outcome, step_s=0.05)
        task = training_task(name=f"ldm-rbac-{outcome}")
        if outcome == "succeed":
            cluster.launcher(**timing).run(task)
        else:
            with pytest.raises(LaunchError):
                cluster.launcher(**timing).run(task)
        controller.stopping.set()  # one controller per job
        controller.join(10)
    used = {rbac_triple(r) for r in cluster.sent()}
    assert used == declared(cluster.kind.rbac_rules)


def test_forbidden_read_names_the_missing_rbac(cluster):
    task = training_task()
    cluster.api.emulator["get", cluster.path(task.name)] << 403
    with pytest.raises(LaunchError, match=r"refused \(403.*service account needs the Role") as err:
        cluster.launcher().run(task)
    assert cluster.creates() == 0
    assert "the Role brain-ldm-pipeline-runner (manifests/base/rbac.yaml)" in str(err.value)
    rbac_name = cluster.kind.resource.rbac_name
    assert f"allow 'get' on {rbac_name} in namespace {NS}" in str(err.value)


def test_forbidden_create_names_the_missing_rbac(cluster):
    cluster.api.emulator["post", cluster.path()] << 403
    rbac_name = re.escape(cluster.kind.resource.rbac_name)
    with pytest.raises(LaunchError, match=f"create {rbac_name} .*needs the Role"):
        cluster.launcher().run(training_task())


def test_forbidden_pod_listing_names_the_core_resource(cluster):
    """A Role that lacks a core permission is named as precisely as a custom one."""
    cluster.controller("hang")
    cluster.api.emulator["get", f"/api/v1/namespaces/{NS}/pods"] << 403
    with pytest.raises(LaunchError) as err:
        cluster.launcher().run(training_task())
    assert f"list pods in {NS}: the API server refused (403" in str(err.value)
    assert f"allow 'list' on pods in namespace {NS}" in str(err.value)


def test_unreachable_api_names_the_host(kind):
    closed = _closed_url()
    launcher = kind.launcher(job_config(), STAGE, api_client=api_client(closed))
    with pytest.raises(LaunchError, match=f"Kubernetes API at {closed} unreachable"):
        launcher.run(training_task())


# --------------------------------------------------------------------------- no leaked GPUs


def test_sigterm_to_a_launcher_process_deletes_its_job(cluster, tmp_path):
    """A run terminated from the Kubeflow UI: the step's pod gets SIGTERM. The launcher, a
    real process following a job that never ends, deletes the job before it exits; the job
    also names the step's pod (read by the downward API's POD_NAME) as its owner, for the
    case where the launcher dies outright."""
    cluster.controller("hang")
    pod = "brain-ldm-run-7f3a-train-ae-driver"
    step_pod(cluster, pod, "0c9f7e4a-step-pod-uid")
    name = training_task().name
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POD_NAME": pod}
    argv = [sys.executable, "-m", "tests.harness.launcher_process"]
    argv += [cluster.api.url, LAUNCHER_UA, NS, name, cluster.kind.name]
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stderr=err, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not any(r.subresource == "log" for r in cluster.sent()):
                # Following the job (rank 0's log): past create, inside the guard.
                assert proc.poll() is None, (tmp_path / "stderr").read_text()
                assert time.monotonic() < deadline, "the launcher never followed its job"
                time.sleep(0.1)
            (job,) = cluster.jobs()
            assert job["metadata"]["ownerReferences"] == [
                {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": "0c9f7e4a-step-pod-uid"}
            ]
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    stderr = (tmp_path / "stderr").read_text()
    assert rc == 143, stderr
    what = f"{cluster.kind.resource.kind} {NS}/{name}"
    assert f"SIGTERM while {what} ran; {what} was deleted" in stderr
    assert cluster.jobs() == []
    (delete,) = cluster.deletes()
    assert delete.data.get("propagationPolicy") == "Foreground"


def test_a_launcher_outside_a_pod_creates_an_ownerless_job(cluster, monkeypatch):
    """HOSTNAME on a laptop names no pod in the namespace: the job gets no owner, and the
    launch goes on (the pod read answered 404)."""
    monkeypatch.delenv("POD_NAME", raising=False)
    monkeypatch.setenv("HOSTNAME", "a-laptop")
    cluster.controller("succeed", step_s=0.02)
    cluster.launcher().run(training_task())
    (job,) = cluster.jobs()
    assert "ownerReferences" not in job["metadata"]
    reads = [r for r in cluster.sent() if r.name == "a-laptop"]
    assert [rbac_triple(r) for r in reads] == [("", "pods", "get")]
