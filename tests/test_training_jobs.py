"""What the PyTorchJob and the TrainJob launcher do alike, each test run against both.

Each kind's controller is emulated on a loopback Kubernetes API (tests/harness/
training_operator.py, tests/harness/trainer.py) and the launcher only sees the API: a job is
created once and adopted by a restarted launcher, refused when someone else's holds its
name, replaced when an earlier attempt failed, owned by every launcher that adopts it even
when they race (writes interleaved by the emulated API's ``hold``); it is followed to its outcome through API
blips, deleted when it overruns, cannot start, has no controller or the launcher gets
SIGTERM; and a failure is reported with rank 0's last log lines and the events.
What differs between the kinds is in tests/test_pytorchjob.py and tests/test_trainjob.py.
"""

from __future__ import annotations

import io
import json
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
    PodAdmission,
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
    crdcheck.validate(kind.build(training_task(name=longest), job_config(), STAGE), kind.crds)
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
        (
            {**_job(("Running", "True")), "metadata": {"deletionTimestamp": "t"}},
            "h",
            "await-deletion",
        ),
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
    crdcheck.validate({k: v for k, v in job.items() if k != "status"}, cluster.kind.crds)
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
    """Success, failure, timeout and a retried step that adopts the finished job together
    exercise every call the launcher makes, run from a pod as on a cluster (the runtime sets
    HOSTNAME to the pod's name)."""
    monkeypatch.delenv("POD_NAME", raising=False)
    monkeypatch.setenv("HOSTNAME", "brain-ldm-step-pod")
    step_pod(cluster, "brain-ldm-step-pod", "uid-step")
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
    monkeypatch.setenv("HOSTNAME", "brain-ldm-step-pod-retry")
    step_pod(cluster, "brain-ldm-step-pod-retry", "uid-retry")
    cluster.launcher().run(training_task(name="ldm-rbac-succeed"))
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
    with open(tmp_path / "stderr", "wb") as err:
        proc = _launcher_process(cluster, pod, name, err)
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


# --------------------------------------------------------------------------- strict writes


def test_every_write_asks_for_strict_field_validation(cluster):
    """A real API server drops the fields its CRD lacks unless the request asks
    ``fieldValidation=Strict``; the launcher always asks (``serve`` holds every write of
    every test to it, and validates what it created against the release's CRD)."""
    cluster.controller("succeed", step_s=0.02)
    cluster.launcher().run(training_task())
    writes = [r for r in cluster.sent() if cluster.is_write(r)]
    assert writes and all(r.params.get("fieldValidation") == "Strict" for r in writes)


# --------------------------------------------------------------------------- pods never created


def _blocked_launcher(cluster, controller, clock, cfg=None):
    """A launcher whose fake time moves only once the controller has tried the pods."""
    return cluster.launcher(
        cfg=cfg,
        clock=clock,
        sleep=lambda seconds: (controller.done.wait(10), clock.sleep(seconds)),
        start_timeout_s=600.0,
        timeout_s=job_config().cluster.pending_timeout_s + 5 * 60.0,
        poll_s=60.0,
    )


def test_a_quota_that_needs_a_cpu_limit_fails_at_once_naming_the_setting(cluster):
    """A ResourceQuota that counts limits.cpu refuses every pod without a CPU limit, and
    ours set none by default: the controller records FailedCreate (on the PyTorchJob; on
    the TrainJob's Job) and nothing else moves. Waiting would not help, so the launcher
    fails at its first look, quoting the API server and naming the setting to change."""
    PodAdmission(cluster.api).quota_requires("kf-resource-quota")
    controller = cluster.controller("succeed")
    clock = FakeClock()
    with pytest.raises(LaunchError) as err:
        _blocked_launcher(cluster, controller, clock).run(training_task())
    text = str(err.value)
    assert "failed quota: kf-resource-quota: must specify limits.cpu" in text
    assert f"cluster.{STAGE}.cpu_limit" in text
    assert clock.elapsed <= 2 * 60
    assert cluster.kind.deleted in text and cluster.jobs() == []


def test_a_cpu_limit_from_the_config_passes_the_quota(cluster):
    PodAdmission(cluster.api).quota_requires("kf-resource-quota")
    cluster.controller("succeed", step_s=0.02)
    cfg = job_config(f"cluster.{STAGE}.cpu_limit=8")  # the preset asks for 6 per process
    cluster.launcher(cfg=cfg).run(training_task(nproc=2))
    (job,) = cluster.jobs()
    assert true_condition(job, cluster.kind.succeeded)
    (request,) = [r for r in cluster.sent() if cluster.is_create(r)]
    assert '"cpu": "16"' in json.dumps(request.data)  # 8 per process, 2 processes


def test_a_missing_service_account_fails_after_the_pending_timeout(cluster):
    """The ServiceAccount may yet be created (the manifests applied late): the launcher
    waits ``cluster.pending_timeout_s``, then fails with the reason and the fix."""
    PodAdmission(cluster.api).no_service_account()
    controller = cluster.controller("succeed")
    clock = FakeClock()
    pending_s = job_config().cluster.pending_timeout_s
    with pytest.raises(LaunchError) as err:
        _blocked_launcher(cluster, controller, clock).run(training_task())
    text = str(err.value)
    assert 'serviceaccount "training" not found' in text
    assert "cluster.service_account" in text and f"(for {pending_s}s)" in text
    assert pending_s <= clock.elapsed <= pending_s + 2 * 60
    assert cluster.jobs() == []


# --------------------------------------------------------------------------- re-runs and owners


def _job_owners(cluster) -> list[str]:
    (job,) = cluster.jobs()
    return [o["name"] for o in job["metadata"].get("ownerReferences", [])]


def _created_by(cluster, task, owner: str, uid: str) -> None:
    """The job an earlier launcher (pod ``owner``) created, owned by that pod."""
    body = cluster.kind.build(task, job_config(), STAGE)
    body["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "Pod", "name": owner, "uid": uid}
    ]
    cluster.create(body)


@pytest.mark.parametrize("phase", ["Failed", "Succeeded", None])
def test_a_launcher_takes_over_a_job_whose_launcher_ended(cluster, monkeypatch, phase):
    """Argo keeps a step's pod after it ended (an OOM-killed launcher: Failed) until the
    workflow's TTL; a re-run or retry of the step finds the job by its name and becomes its
    only owner, so the job is neither left to an ended pod nor collected with it. ``None``:
    the old pod is gone already."""
    task = training_task()
    if phase:
        step_pod(cluster, "old-step-pod", "uid-old", phase=phase)
    _created_by(cluster, task, "old-step-pod", "uid-old")
    step_pod(cluster, "new-step-pod", "uid-new")
    monkeypatch.setenv("POD_NAME", "new-step-pod")
    cluster.controller("succeed", step_s=0.02)
    cluster.launcher().run(task)
    assert cluster.creates() == 0
    assert _job_owners(cluster) == ["new-step-pod"]


def test_a_second_launcher_adopts_beside_a_live_one(cluster, monkeypatch):
    """Job names are keyed by content: another run with the same inputs adopts the job a
    live run follows. Both are recorded as owners; neither takes it from the other."""
    task = training_task()
    step_pod(cluster, "run-a-step", "uid-a")
    _created_by(cluster, task, "run-a-step", "uid-a")
    step_pod(cluster, "run-b-step", "uid-b")
    monkeypatch.setenv("POD_NAME", "run-b-step")
    cluster.controller("succeed", step_s=0.02)
    cluster.launcher().run(task)
    assert _job_owners(cluster) == ["run-a-step", "run-b-step"]


def test_a_rerun_waits_for_a_job_being_deleted_then_starts_anew(cluster):
    """A job under deletion (its owner's garbage collection, a finalizer holding it) is not
    adopted: the launcher waits until it is gone, then creates the job again."""
    task = training_task()
    body = cluster.kind.build(task, job_config(), STAGE)
    body["metadata"]["finalizers"] = ["example.org/hold"]
    cluster.create(body)
    r = cluster.kind.resource
    other = cluster.custom("garbage-collector")
    other.delete_namespaced_custom_object(r.group, r.version, NS, r.plural, task.name)

    def release() -> None:
        time.sleep(0.5)
        other.patch_namespaced_custom_object(
            r.group, r.version, NS, r.plural, task.name, {"metadata": {"finalizers": None}}
        )

    releaser = threading.Thread(target=release)
    releaser.start()
    cluster.controller("succeed", step_s=0.02)
    cluster.launcher().run(task)
    releaser.join()
    assert cluster.creates() == 1
    (job,) = cluster.jobs()
    assert true_condition(job, cluster.kind.succeeded)


def _in_thread(run) -> tuple[threading.Thread, list[BaseException]]:
    """``run`` in a thread of its own, started; what it raised is in the list."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as exc:  # reported to the test
            raised.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, raised


def _is_patch(cluster, request) -> bool:
    return cluster.is_write(request) and request.method.value.upper() == "PATCH"


def test_two_launchers_adopting_at_once_both_become_owners(cluster, monkeypatch):
    """Runs B and C adopt the job run A follows in the same instant (same inputs, same
    name): each reads the owners and writes the whole list with itself added. The write
    carries the resourceVersion it was computed from, so the API server refuses the later
    one (409 Conflict) instead of letting it drop the other's owner, and that launcher reads
    again. Here C's whole adoption lands between B's read and B's write."""
    task = training_task()
    for run in "abc":
        step_pod(cluster, f"run-{run}-step", f"uid-{run}")
    _created_by(cluster, task, "run-a-step", "uid-a")
    cluster.controller("succeed", step_s=0.02)
    write = cluster.api.hold(lambda r: _is_patch(cluster, r))  # B's, held
    monkeypatch.setenv("POD_NAME", "run-b-step")
    b, raised = _in_thread(lambda: cluster.launcher().run(task))
    write.wait()
    monkeypatch.setenv("POD_NAME", "run-c-step")
    cluster.launcher().run(task)
    assert _job_owners(cluster) == ["run-a-step", "run-c-step"]
    write.release()
    b.join(30)
    assert not b.is_alive() and raised == []
    assert _job_owners(cluster) == ["run-a-step", "run-c-step", "run-b-step"]
    patches = [r for r in cluster.sent() if _is_patch(cluster, r)]
    # B's refused write, C's, B's again (again if the controller wrote in between).
    assert len(patches) >= 3
    assert all(r.data["metadata"]["resourceVersion"] for r in patches)


def test_a_job_adopted_while_its_launcher_releases_it_is_not_deleted(cluster, tmp_path):
    """Run A, the job's only owner, gets SIGTERM and decides to delete the job; before the
    delete lands, run B adopts it. The delete names the job as A read it (preconditions on
    uid and resourceVersion), so the API server refuses it (409 Conflict); A reads again,
    finds B, and only removes itself."""
    cluster.controller("hang")
    name = training_task().name
    step_pod(cluster, "run-a-step", "uid-a")
    step_pod(cluster, "run-b-step", "uid-b")
    delete = cluster.api.hold(lambda r: r.method.value.upper() == "DELETE" and r.name == name)
    res = cluster.kind.resource
    b_owner = {"apiVersion": "v1", "kind": "Pod", "name": "run-b-step", "uid": "uid-b"}
    with open(tmp_path / "a", "wb") as log:
        a = _launcher_process(cluster, "run-a-step", name, log)
        try:
            _wait_for(lambda: any(r.subresource == "log" for r in cluster.sent()), "followed", [a])
            a.send_signal(signal.SIGTERM)
            delete.wait()
            (job,) = cluster.jobs()
            owners = [*job["metadata"]["ownerReferences"], b_owner]
            meta = {
                "resourceVersion": job["metadata"]["resourceVersion"],
                "ownerReferences": owners,
            }
            cluster.custom("run-b").patch_namespaced_custom_object(
                res.group, res.version, NS, res.plural, name, {"metadata": meta}
            )
            delete.release()
            assert a.wait(30) == 143
        finally:
            if a.poll() is None:
                a.kill()
                a.wait(10)
    assert _job_owners(cluster) == ["run-b-step"]
    what = f"{res.kind} {NS}/{name}"
    assert f"{what} is left to launcher pod run-b-step" in (tmp_path / "a").read_text()
    (refused, *_) = cluster.deletes()
    assert refused.data["preconditions"]["uid"] == job["metadata"]["uid"]


def test_a_job_created_concurrently_is_adopted(cluster, monkeypatch):
    """Runs A and B start the same job in the same instant: both find none and create it,
    and B's create answers 409 AlreadyExists. B then decides on the job as on any it finds
    under its name: the same spec, so it adopts it and becomes an owner beside A."""
    task = training_task()
    step_pod(cluster, "run-a-step", "uid-a")
    step_pod(cluster, "run-b-step", "uid-b")
    cluster.controller("succeed", step_s=0.02)
    create = cluster.api.hold(cluster.is_create)
    monkeypatch.setenv("POD_NAME", "run-b-step")
    b, raised = _in_thread(lambda: cluster.launcher().run(task))
    create.wait()
    _created_by(cluster, task, "run-a-step", "uid-a")
    create.release()
    b.join(30)
    assert not b.is_alive() and raised == []
    assert cluster.creates() == 1 and _job_owners(cluster) == ["run-a-step", "run-b-step"]


def test_a_different_job_created_concurrently_is_left_alone(cluster):
    """A job of another spec that takes our name between our read and our create is not
    ours: refused as when found before starting, and left as it is."""
    task = training_task()
    cluster.controller("succeed", step_s=0.02)
    create = cluster.api.hold(cluster.is_create)
    b, raised = _in_thread(lambda: cluster.launcher().run(task))
    create.wait()
    cluster.create(cluster.kind.build(training_task(nproc=1), job_config(), STAGE), agent="someone")
    create.release()
    b.join(30)
    assert not b.is_alive()
    what = f"{cluster.kind.resource.kind} {NS}/{task.name}"
    assert [type(e) for e in raised] == [LaunchError]
    assert f"a different {what} already exists" in str(raised[0])
    (job,) = cluster.jobs()
    assert "ownerReferences" not in job["metadata"] and not cluster.deletes()


def test_sigterm_while_creating_leaves_a_different_job_of_the_name_alone(cluster, tmp_path):
    """A job of another spec takes the name while the launcher's create is on its way, and
    the launcher gets SIGTERM then: its release must not delete the job it never had."""
    name = training_task().name
    step_pod(cluster, "run-a-step", "uid-a")
    create = cluster.api.hold(cluster.is_create)
    with open(tmp_path / "a", "wb") as log:
        a = _launcher_process(cluster, "run-a-step", name, log)
        try:
            create.wait()
            other = cluster.kind.build(training_task(nproc=1), job_config(), STAGE)
            cluster.create(other, agent="someone")
            a.send_signal(signal.SIGTERM)
            assert a.wait(30) == 143
        finally:
            create.release()
            if a.poll() is None:
                a.kill()
                a.wait(10)
    what = f"{cluster.kind.resource.kind} {NS}/{name}"
    assert f"{what} is another task's job; it is left alone" in (tmp_path / "a").read_text()
    assert not cluster.deletes()
    (job,) = cluster.jobs()
    assert job["metadata"]["annotations"] == other["metadata"]["annotations"]


def _launcher_process(cluster, pod: str, name: str, stderr) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POD_NAME": pod}
    argv = [sys.executable, "-m", "tests.harness.launcher_process"]
    argv += [cluster.api.url, LAUNCHER_UA, NS, name, cluster.kind.name.split("-")[0]]
    return subprocess.Popen(argv, env=env, cwd=ROOT, stderr=stderr, stdout=subprocess.DEVNULL)


def _wait_for(check, what: str, procs) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert all(p.poll() is None for p in procs), f"a launcher ended before {what}"
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.1)


def test_sigterm_to_one_of_two_adopters_leaves_the_job_to_the_other(cluster, tmp_path):
    """Runs A and B follow the same job (same inputs, same name). Terminating run A must not
    delete the job B follows: A only removes itself from the owners. Terminating B, the
    last owner that lives, deletes it."""
    cluster.controller("hang")
    name = training_task().name
    step_pod(cluster, "run-a-step", "uid-a")
    step_pod(cluster, "run-b-step", "uid-b")
    logs = {p: open(tmp_path / p, "wb") for p in ("a", "b")}
    a = _launcher_process(cluster, "run-a-step", name, logs["a"])
    procs = [a]
    try:
        _wait_for(lambda: len(cluster.jobs()) == 1, "created the job", procs)
        b = _launcher_process(cluster, "run-b-step", name, logs["b"])
        procs.append(b)
        _wait_for(lambda: _job_owners(cluster) == ["run-a-step", "run-b-step"], "B adopted", procs)
        a.send_signal(signal.SIGTERM)
        assert a.wait(30) == 143
        assert _job_owners(cluster) == ["run-b-step"]
        assert not cluster.deletes()
        b.send_signal(signal.SIGTERM)
        assert b.wait(30) == 143
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for f in logs.values():
            f.close()
    what = f"{cluster.kind.resource.kind} {NS}/{name}"
    assert f"{what} is left to launcher pod run-b-step" in (tmp_path / "a").read_text()
    assert f"SIGTERM while {what} ran; {what} was deleted" in (tmp_path / "b").read_text()
    assert cluster.jobs() == []
