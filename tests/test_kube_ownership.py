"""Tying a training job to the pipeline step that launched it (ldm_core.kube.ownership).

- The launcher's pod name comes from the downward API (``POD_NAME``, set by the step's pod
  spec ``fieldRef: metadata.name``) or ``HOSTNAME``, which the kubelet sets to the pod's name
  (pod's ``spec.hostname`` aside).
- The owner reference is read from the API server: a real pod has ``metadata.uid``; the
  garbage collector matches owners by uid (k8s.io/apimachinery ``OwnerReference``:
  apiVersion, kind, name and uid are required). ``blockOwnerDeletion`` needs update on the
  owner's finalizers (the OwnerReferencesPermissionEnforcement admission plugin), a grant
  the pipeline's Role does not carry.
- ``release_on_sigterm``: the kubelet stops a pod by sending SIGTERM to its containers'
  PID 1 and waits the grace period before SIGKILL.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Iterator

import kubernetes
import pytest

from ldm_core.kube import ownership
from ldm_core.kube.client import api_client
from ldm_core.launcher import LaunchError
from tests.harness.kube import KubeApi, rbac_triple

NS = "brain-ldm"
STEP_POD = "brain-ldm-run-7f3a-train-ae-driver"
STEP_UID = "0c9f7e4a-5b1d-4c3e-9a7f-2d8e6b1c0f11"
AGENT = "ownership-under-test"


@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as api:
        yield api


def _core(api: KubeApi) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api.client(AGENT))


def _step_pod(api: KubeApi, namespace: str = NS) -> None:
    """The pipeline step's own pod, as the API server holds it (uid assigned at creation)."""
    core = kubernetes.client.CoreV1Api(api.client("kubelet"))
    meta = {"name": STEP_POD, "namespace": namespace, "uid": STEP_UID}
    core.create_namespaced_pod(namespace, {"apiVersion": "v1", "kind": "Pod", "metadata": meta})


@pytest.fixture
def in_step_pod(monkeypatch):
    monkeypatch.setenv("POD_NAME", STEP_POD)
    monkeypatch.setenv("HOSTNAME", STEP_POD)


# --------------------------------------------------------------------------- pod name


@pytest.mark.parametrize(
    "env,name",
    [
        ({"POD_NAME": "from-downward-api", "HOSTNAME": "from-hostname"}, "from-downward-api"),
        ({"HOSTNAME": "from-hostname"}, "from-hostname"),
        ({"POD_NAME": "  ", "HOSTNAME": "from-hostname"}, "from-hostname"),
        ({"POD_NAME": " padded \n"}, "padded"),
        ({}, None),
        ({"POD_NAME": "", "HOSTNAME": ""}, None),
    ],
)
def test_the_launcher_pod_name_prefers_the_downward_api(monkeypatch, env, name):
    for var in ("POD_NAME", "HOSTNAME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert ownership.launcher_pod_name() == name


# --------------------------------------------------------------------------- owner reference


def test_the_owner_is_the_launcher_pod_by_uid(api, in_step_pod):
    _step_pod(api)
    owner = ownership.launcher_owner_reference(_core(api), NS, api.url)
    assert owner == {"apiVersion": "v1", "kind": "Pod", "name": STEP_POD, "uid": STEP_UID}
    # What the API accepts as an ownerReference (the client checks the required fields).
    ref = kubernetes.client.V1OwnerReference(
        api_version=owner["apiVersion"], kind=owner["kind"], name=owner["name"], uid=owner["uid"]
    )
    assert ref.block_owner_deletion is None and ref.controller is None
    reads = [rbac_triple(r) for r in api.requests(AGENT)]
    assert reads == [("", "pods", "get")], "one read, covered by the Role's get on pods"
    (read,) = api.requests(AGENT)
    assert read.namespace == NS and read.name == STEP_POD


def test_no_pod_name_means_no_owner_and_no_api_call(api, monkeypatch):
    monkeypatch.delenv("POD_NAME", raising=False)
    monkeypatch.delenv("HOSTNAME", raising=False)
    assert ownership.launcher_owner_reference(_core(api), NS, api.url) is None
    assert api.requests(AGENT) == []


def test_a_laptop_hostname_names_no_pod_so_the_job_has_no_owner(api, monkeypatch):
    """Outside a cluster HOSTNAME is the machine's name: the read answers 404."""
    monkeypatch.delenv("POD_NAME", raising=False)
    monkeypatch.setenv("HOSTNAME", "a-laptop")
    assert ownership.launcher_owner_reference(_core(api), NS, api.url) is None


def test_a_pod_of_that_name_in_another_namespace_is_not_the_owner(api, in_step_pod):
    """ownerReferences are namespace-local: an owner in another namespace would make the
    garbage collector delete the job at once."""
    _step_pod(api, namespace="kubeflow")
    assert ownership.launcher_owner_reference(_core(api), NS, api.url) is None


def test_a_refused_pod_read_costs_only_the_owner(api, in_step_pod, caplog):
    _step_pod(api)
    api.emulator["get", f"/api/v1/namespaces/{NS}/pods/{STEP_POD}"] << 403
    with caplog.at_level(logging.WARNING, logger=ownership.__name__):
        assert ownership.launcher_owner_reference(_core(api), NS, api.url) is None
    (record,) = caplog.records
    assert "the training job will have no owner" in record.getMessage()
    assert f"allow 'get' on pods in namespace {NS}" in record.getMessage()


def test_an_unreachable_api_costs_only_the_owner(in_step_pod):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    core = kubernetes.client.CoreV1Api(api_client(url))
    assert ownership.launcher_owner_reference(core, NS, url) is None


# --------------------------------------------------------------------------- SIGTERM


class Handler:
    """Stands in as the process's SIGTERM handler before the guard installs its own, so a
    guard that failed to install one records the signal instead of ending pytest."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.calls += 1


@pytest.fixture
def previous() -> Iterator[Handler]:
    assert threading.current_thread() is threading.main_thread()
    handler = Handler()
    saved = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGTERM, saved)


def _release(log: list, what: str = "PyTorchJob brain-ldm/train-ae was deleted"):
    """A release that records its call and says what became of the job, as the launcher's do."""

    def release() -> str:
        log.append(1)
        return what

    return release


def test_sigterm_inside_the_block_releases_then_raises(previous):
    deleted = []
    with pytest.raises(ownership.Terminated) as err:
        with ownership.release_on_sigterm("PyTorchJob brain-ldm/train-ae", _release(deleted)):
            signal.raise_signal(signal.SIGTERM)
            pytest.fail("SIGTERM did not interrupt the block")
    assert deleted == [1]
    assert str(err.value) == (
        "SIGTERM while PyTorchJob brain-ldm/train-ae ran; PyTorchJob brain-ldm/train-ae was deleted"
    )
    assert previous.calls == 0
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_second_sigterm_does_not_stop_the_release(previous):
    """The kubelet may signal again; the release (a delete, or dropping our claim) must
    still finish."""
    steps = []

    def release() -> str:
        steps.append("started")
        signal.raise_signal(signal.SIGTERM)
        steps.append("finished")
        return "job was deleted"

    with pytest.raises(ownership.Terminated):
        with ownership.release_on_sigterm("job", release):
            signal.raise_signal(signal.SIGTERM)
    assert steps == ["started", "finished"]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_without_sigterm_nothing_is_released_and_the_handler_is_restored(previous):
    deleted = []
    with ownership.release_on_sigterm("job", _release(deleted)):
        assert signal.getsignal(signal.SIGTERM) is not previous, "no guard installed"
    assert deleted == []
    assert signal.getsignal(signal.SIGTERM) is previous
    signal.raise_signal(signal.SIGTERM)  # after the block: the previous handler's again
    assert previous.calls == 1


def test_another_error_leaves_the_job_alone(previous):
    """A LaunchError (the job failed, an API error) is reported; deleting the job is the
    caller's decision, not the guard's."""
    deleted = []
    with pytest.raises(LaunchError):
        with ownership.release_on_sigterm("job", _release(deleted)):
            raise LaunchError("job failed")
    assert deleted == []
    assert signal.getsignal(signal.SIGTERM) is previous


def test_terminated_is_not_a_launch_error():
    """The launcher retries LaunchErrors as API blips; a SIGTERM must end the run."""
    assert not issubclass(ownership.Terminated, LaunchError)


def test_off_the_main_thread_the_block_runs_unguarded(previous):
    """Only the main thread may install signal handlers; a launcher driven from a worker
    thread still runs (the ownerReference is then its only guard)."""
    seen: list[object] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with ownership.release_on_sigterm("job", _release(seen)):
                seen.append(signal.getsignal(signal.SIGTERM))
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and errors == []
    assert seen == [previous]
