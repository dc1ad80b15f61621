"""Why a training pod cannot start (ldm_core.kube.pending.pending_problem), over pods shaped
as the scheduler and the kubelet leave them.

Shapes, from upstream:

- kube-scheduler, on a pod no node fits, sets condition ``PodScheduled=False`` with reason
  ``Unschedulable`` and the FitError text (pkg/scheduler/framework/types.go ``FitError.Error``):
  ``0/N nodes are available: `` then, per filter reason, ``"<count> <reason>"`` sorted as
  strings and joined by ``", "``, or a PreFilter plugin's message (VolumeBinding:
  ``pod has unbound immediate PersistentVolumeClaims``); then the PostFilter (preemption)
  message. Filter reasons: ``Insufficient <resource>`` (noderesources),
  ``node(s) had untolerated taint {<key>: <value>}`` (tainttoleration),
  ``node(s) didn't match Pod's node affinity/selector`` (nodeaffinity).
- A pod held by scheduling gates has ``PodScheduled=False`` with reason ``SchedulingGated``
  (KEP-3521): it waits on purpose.
- The kubelet, on a container it cannot start, leaves the pod ``Pending`` (scheduled) and sets
  the container's ``state.waiting`` (pkg/kubelet/images: ``ErrImagePull``, then
  ``ImagePullBackOff`` while it backs off, ``InvalidImageName`` for a reference it cannot
  parse; kuberuntime: ``CreateContainerConfigError`` when the env refers to a missing Secret
  or ConfigMap, message ``secret "<name>" not found``). While it works normally the reason is
  ``ContainerCreating``, or ``PodInitializing`` for app containers behind init containers.
"""

from __future__ import annotations

from typing import Any

import kubernetes.client as k8s
import pytest

from ldm_core.kube import pending

IMAGE = "registry.example/brain-ldm-training:0.1.0"
PREEMPTION = "preemption: 0/4 nodes are available: 4 Preemption is not helpful for scheduling."
CONTROL_PLANE_TAINT = "node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }"


def _scheduled(value: str, reason: str | None = None, message: str | None = None):
    return k8s.V1PodCondition(type="PodScheduled", status=value, reason=reason, message=message)


def _status(name: str, waiting: tuple[str, str] | None = None, running: bool = False):
    """A container status as the kubelet reports it: waiting (reason, message) or running."""
    state = k8s.V1ContainerState(
        waiting=k8s.V1ContainerStateWaiting(reason=waiting[0], message=waiting[1])
        if waiting
        else None,
        running=k8s.V1ContainerStateRunning() if running else None,
    )
    return k8s.V1ContainerStatus(
        name=name, image=IMAGE, image_id="", ready=running, restart_count=0, state=state
    )


def _pod(
    name: str = "train-ae-master-0",
    phase: str = "Pending",
    conditions: list[Any] | None = None,
    containers: list[Any] | None = None,
    init_containers: list[Any] | None = None,
) -> k8s.V1Pod:
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, namespace="brain-ldm"),
        status=k8s.V1PodStatus(
            phase=phase,
            conditions=conditions,
            container_statuses=containers,
            init_container_statuses=init_containers,
        ),
    )


def unschedulable(reasons: str, name: str = "train-ae-master-0") -> k8s.V1Pod:
    """A pod the scheduler could not place, with its FitError message."""
    message = f"0/4 nodes are available: {reasons}. {PREEMPTION}"
    return _pod(name, conditions=[_scheduled("False", "Unschedulable", message)])


def waiting(reason: str, message: str, name: str = "train-ae-master-0") -> k8s.V1Pod:
    """A scheduled pod whose training container the kubelet could not start."""
    return _pod(
        name,
        conditions=[_scheduled("True")],
        containers=[_status("pytorch", (reason, message))],
    )


# --------------------------------------------------------------------------- unschedulable


@pytest.mark.parametrize(
    "reasons,hint",
    [
        ("4 Insufficient nvidia.com/gpu", "ask for fewer GPUs or add GPU nodes"),
        # A kubeadm cluster: the control-plane node's taint is named beside the shortage.
        (f"1 {CONTROL_PLANE_TAINT}, 3 Insufficient nvidia.com/gpu", "ask for fewer GPUs"),
        # AKS's suggested taint of GPU node pools.
        ("4 node(s) had untolerated taint {sku: gpu}", "add the tolerations"),
        ("4 node(s) didn't match Pod's node affinity/selector", "change the node selector"),
        ("4 Insufficient cpu, 4 Insufficient memory", "lower the stage's resources or add nodes"),
        ("pod has unbound immediate PersistentVolumeClaims", "give it a storageClassName"),
    ],
)
def test_an_unschedulable_pod_is_named_with_the_schedulers_reason_and_a_hint(reasons, hint):
    problem = pending.pending_problem([unschedulable(reasons)])
    assert problem is not None
    assert problem.startswith("pod train-ae-master-0 cannot start: Unschedulable (0/4 nodes")
    assert reasons in problem, "the scheduler's own words are quoted"
    assert hint in problem


@pytest.mark.parametrize(
    "reasons,hint",
    [
        # The taint GKE puts on GPU node pools, on a pod without the toleration (no
        # ExtendedResourceToleration admission plugin, cluster.tolerations set to []).
        ("4 node(s) had untolerated taint {nvidia.com/gpu: present}", "add the tolerations"),
        (
            f"1 {CONTROL_PLANE_TAINT}, 3 node(s) didn't match Pod's node affinity/selector",
            "change the node selector",
        ),
        (f"1 {CONTROL_PLANE_TAINT}, 3 Insufficient cpu", "lower the stage's resources"),
    ],
)
def test_the_hint_follows_the_reason_that_blocks_the_workers(reasons, hint):
    """The reason that rules out the most nodes decides: a taint whose key is nvidia.com/gpu
    is a missing toleration, not a GPU shortage, and the control-plane node's taint, which
    kube-scheduler names in nearly every FitError of a kubeadm cluster, hides nothing."""
    problem = pending.pending_problem([unschedulable(reasons)])
    assert problem is not None and hint in problem, problem


def test_an_unschedulable_condition_without_a_message_still_reports():
    pod = _pod(conditions=[_scheduled("False", "Unschedulable")])
    problem = pending.pending_problem([pod])
    assert problem is not None and "Unschedulable (no message)" in problem


# --------------------------------------------------------------------------- the kubelet


@pytest.mark.parametrize(
    "reason,message",
    [
        (
            "ErrImagePull",
            f'rpc error: code = NotFound desc = failed to pull and unpack image "{IMAGE}": '
            f'failed to resolve reference "{IMAGE}": {IMAGE}: not found',
        ),
        ("ImagePullBackOff", f'Back-off pulling image "{IMAGE}"'),
        (
            "InvalidImageName",
            'Failed to apply default image tag "registry.example/Brain-LDM:0.1.0": couldn\'t '
            "parse image name: invalid reference format: repository name must be lowercase",
        ),
    ],
)
def test_an_image_that_cannot_be_pulled_points_at_the_image_and_pull_secrets(reason, message):
    problem = pending.pending_problem([waiting(reason, message)])
    assert problem is not None
    assert f"container pytorch: {reason} ({message})" in problem
    assert "check the image name and tag, and the imagePullSecrets" in problem


@pytest.mark.parametrize(
    "message",
    [
        'secret "brain-ldm-s3" not found',
        "couldn't find key AWS_ACCESS_KEY_ID in Secret brain-ldm/brain-ldm-s3",
        'configmap "brain-ldm-config" not found',
    ],
)
def test_a_missing_secret_or_configmap_says_to_create_it(message):
    problem = pending.pending_problem([waiting("CreateContainerConfigError", message)])
    assert problem is not None
    assert f"CreateContainerConfigError ({message})" in problem
    assert "create the Secret/ConfigMap it names in the job's namespace" in problem


def test_an_init_container_that_cannot_start_blocks_the_pod():
    """App containers wait behind init containers with reason PodInitializing; the init
    container's own waiting reason is the one that explains the pod."""
    pod = _pod(
        conditions=[_scheduled("True")],
        init_containers=[_status("storage-initializer", ("ErrImagePull", "not found"))],
        containers=[_status("pytorch", ("PodInitializing", None))],
    )
    problem = pending.pending_problem([pod])
    assert problem is not None and "container storage-initializer: ErrImagePull" in problem


def test_a_waiting_reason_without_message_still_reports():
    problem = pending.pending_problem([waiting("ImagePullBackOff", None)])
    assert problem is not None and "ImagePullBackOff (no message)" in problem


# --------------------------------------------------------------------------- fine pods


@pytest.mark.parametrize(
    "pod",
    [
        pytest.param(_pod(), id="just-created-no-conditions"),
        pytest.param(
            _pod(
                conditions=[
                    _scheduled(
                        "False",
                        "SchedulingGated",
                        "Scheduling is blocked due to non-empty scheduling gates",
                    )
                ]
            ),
            id="scheduling-gated",
        ),
        pytest.param(
            _pod(
                conditions=[_scheduled("True")],
                containers=[_status("pytorch", ("ContainerCreating", None))],
            ),
            id="container-creating",
        ),
        pytest.param(
            _pod(
                conditions=[_scheduled("True")],
                init_containers=[_status("init", running=True)],
                containers=[_status("pytorch", ("PodInitializing", None))],
            ),
            id="pod-initializing",
        ),
        pytest.param(
            _pod(
                phase="Running",
                conditions=[_scheduled("True")],
                containers=[_status("pytorch", running=True)],
            ),
            id="running",
        ),
        pytest.param(
            _pod(
                phase="Running",
                conditions=[_scheduled("True")],
                containers=[_status("pytorch", ("CrashLoopBackOff", "back-off 40s"))],
            ),
            id="running-crash-loop-is-a-failure-not-pending",
        ),
        # Started once; a restart that cannot pull the image again (imagePullPolicy Always,
        # registry down) is the running job's failure, not a pod that never started.
        pytest.param(
            _pod(
                phase="Running",
                conditions=[_scheduled("True")],
                containers=[
                    _status("pytorch", ("ImagePullBackOff", f'Back-off pulling "{IMAGE}"'))
                ],
            ),
            id="running-restart-cannot-pull",
        ),
        pytest.param(k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="p")), id="no-status-yet"),
    ],
)
def test_a_pod_that_is_fine_or_already_started_is_no_problem(pod):
    assert pending.pending_problem([pod]) is None


def test_no_pods_is_no_problem():
    """Before the operator made the pods, nothing blocks them yet."""
    assert pending.pending_problem([]) is None


def test_the_first_blocked_pod_among_fine_ones_is_named():
    pods = [
        _pod("train-ae-master-0", phase="Running", containers=[_status("pytorch", running=True)]),
        waiting("ImagePullBackOff", "Back-off", name="train-ae-worker-0"),
        unschedulable("4 Insufficient nvidia.com/gpu", name="train-ae-worker-1"),
    ]
    problem = pending.pending_problem(pods)
    assert problem is not None and problem.startswith("pod train-ae-worker-0 cannot start:")
