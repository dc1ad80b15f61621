"""The cluster backend of :mod:`ldm_core.launcher`: a training stage as a Kubeflow PyTorchJob.

The component that calls :meth:`PyTorchJobLauncher.run` behaves like a careful operator:

- the job name is deterministic (pipeline run + task), so a restarted component finds and
  adopts the job its previous attempt created instead of starting a second one;
- it follows the job's status conditions by polling (one GET per interval: cheap, and it
  survives API server restarts that break watch streams) and streams the master pod's log
  to its own stdout, where the pipeline UI shows it;
- a Failed job, or an evicted pod, fails the task with the master pod's last log lines and
  the recent events in the error; success is only ever reported on a ``Succeeded`` condition;
- past the deadline, or when no training operator ever picks the job up, the job is deleted
  (foreground propagation: its pods go first) and the task fails.

Every pod runs ``torchrun -m ldm_core.cli VERB ...`` with no rendezvous flags: torchrun reads
them from the ``PET_*`` variables the training operator sets (``PET_NNODES``,
``PET_NPROC_PER_NODE`` from ``spec.nprocPerNode``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
``PET_MASTER_PORT``), so the command line is the same on every replica and as ``LocalLauncher``'s.

Tolerated gaps of in-memory API servers (kmock): a create answered with an empty body is
re-read; nothing relies on resourceVersion, generation, PUT or label/field selectors being
honoured server-side (selectors are re-applied here).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import kubernetes
import urllib3
from kubernetes.client.rest import ApiException

from ldm_core.kube.client import api_client as make_api_client
from ldm_core.kube.client import current_namespace
from ldm_core.launcher import LaunchError, TrainingTask

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER = "pytorch"
"""The training operator only treats the container with this name as the training process."""
JOB_LABEL = "training.kubeflow.org/job-name"
REPLICA_LABEL = "training.kubeflow.org/replica-type"
SPEC_HASH_ANNOTATION = "brain-ldm.kubeflow.org/spec-hash"
MANAGED_BY = "ldm-core"
MAX_NAME = 52
"""Job names stay at or below 52 characters: the operator names each replica's pod and headless
Service ``<job>-worker-<i>``, and a Service name must be a DNS-1035 label of at most 63."""

RBAC_RULES: list[tuple[str, str, tuple[str, ...]]] = [
    (GROUP, PLURAL, ("create", "delete", "get")),
    ("", "pods", ("list",)),
    ("", "pods/log", ("get",)),
    ("", "events", ("list",)),
]
"""Every (apiGroup, resource, verbs) this module calls; the Role in manifests/ must grant
exactly these (a test records the calls made against an API server and compares)."""

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def job_name(run_id: str, task_name: str) -> str:
    """Deterministic PyTorchJob name for one task of one pipeline run.

    Readable prefix (task, then run) + 8 hex of the SHA-256 of both, so two runs never
    collide even when the readable part is truncated; a DNS-1035 label of at most
    :data:`MAX_NAME` characters.
    """
    digest = hashlib.sha256(f"{run_id}\0{task_name}".encode()).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9]+", "-", f"{task_name}-{run_id}".lower()).strip("-")
    if not slug or not slug[0].isalpha():
        slug = f"ldm-{slug}".rstrip("-")
    slug = slug[: MAX_NAME - len(digest) - 1].rstrip("-")
    return f"{slug}-{digest}"


@dataclass
class PyTorchJobSettings:
    """How training pods look on this cluster; overlays/pipeline parameters fill these."""

    image: str
    """The training image (``images/training``); carries ldm_core and torchrun."""
    namespace: str = ""
    """Where the job goes; empty = the component pod's own namespace."""
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = field(default_factory=list)
    service_account: str = "training"
    """Training pods never call the API; their token is not mounted either."""
    pvc_name: str = "brain-ldm-data"
    workdir: str = "/workspace"
    """Mount path of the PVC; data and checkpoints live here, at the same path as in the
    component pod, so the task's arguments are valid paths in both."""
    s3_secret: str = ""
    """Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and S3_ENDPOINT) for s3:// URIs,
    passed as envFrom so its values never appear in the job object; empty = none."""
    gpu: bool = True
    """One GPU per process (``nvidia.com/gpu`` = nproc_per_node), GPU node selector and
    toleration; False runs on CPU nodes (gloo)."""
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    tolerations: list[dict[str, str]] = field(
        default_factory=lambda: [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    )
    cpu: str = "8"
    memory: str = "48Gi"
    shm_size: str = "16Gi"
    """/dev/shm for DataLoader workers and NCCL; the container default (64 MiB) is too small."""
    tmp_size: str = "8Gi"
    env: dict[str, str] = field(default_factory=dict)
    """Extra non-secret environment for every replica (added after the task's)."""
    master_port: int = 23456
    restart_policy: str = "ExitCode"
    """Restart on signals/preemption (exit code > 128), fail at once on an error in our code."""
    backoff_limit: int = 3
    active_deadline_s: int = 24 * 3600
    ttl_seconds_after_finished: int = 3600
    timeout_s: float | None = None
    """How long ``run`` waits for a result; None = active_deadline_s + start_timeout_s."""
    start_timeout_s: float = 600.0
    """A job that shows no status at all this long has no training operator: fail."""
    poll_s: float = 10.0
    log_reconnect_s: float = 5.0
    tail_lines: int = 40
    run_as_user: int = 1000


# --------------------------------------------------------------------------- build


def build_pytorchjob(task: TrainingTask, settings: PyTorchJobSettings) -> dict[str, Any]:
    """The PyTorchJob for ``task``: one Master, ``nnodes - 1`` Workers, same pod template."""
    if task.nnodes < 1 or task.nproc_per_node < 1:
        raise LaunchError(
            f"{task.name}: nnodes and nproc_per_node must be >= 1, "
            f"got {task.nnodes} and {task.nproc_per_node}"
        )
    if not _DNS1035.match(task.name) or len(task.name) > MAX_NAME:
        raise LaunchError(
            f"job name {task.name!r} is not a DNS-1035 label of at most {MAX_NAME} characters; "
            "build it with ldm_core.kube.pytorchjob.job_name(run_id, task)"
        )
    if not settings.image:
        raise LaunchError(f"{task.name}: no training image configured")
    template = _pod_template(task, settings)
    replicas: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": settings.restart_policy, "template": template}
    }
    if task.nnodes > 1:
        replicas["Worker"] = {
            "replicas": task.nnodes - 1,
            "restartPolicy": settings.restart_policy,
            "template": template,
        }
    job: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": task.name,
            "labels": _labels(task),
            "annotations": {},
        },
        "spec": {
            "nprocPerNode": str(task.nproc_per_node),
            "runPolicy": {
                # All: no pod (running or finished) outlives the job's completion.
                "cleanPodPolicy": "All",
                "backoffLimit": settings.backoff_limit,
                "activeDeadlineSeconds": settings.active_deadline_s,
                "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            },
            "pytorchReplicaSpecs": replicas,
        },
    }
    if settings.namespace:
        job["metadata"]["namespace"] = settings.namespace
    job["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = spec_hash(job)
    return job


def spec_hash(job: dict[str, Any]) -> str:
    """Hash of what the job runs, so an adopted job can be checked to be the same job."""
    return hashlib.sha256(json.dumps(job["spec"], sort_keys=True).encode()).hexdigest()[:16]


def _labels(task: TrainingTask) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "brain-ldm",
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/part-of": "brain-ldm",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "brain-ldm.kubeflow.org/verb": task.verb,
    }


def _pod_template(task: TrainingTask, s: PyTorchJobSettings) -> dict[str, Any]:
    env = {
        "PYTHONUNBUFFERED": "1",  # log lines reach the component as they are printed
        "HOME": "/tmp",  # read-only root filesystem: caches go to the /tmp emptyDir
        "XDG_CACHE_HOME": "/tmp/.cache",
        "MPLCONFIGDIR": "/tmp/.matplotlib",
        "NCCL_DEBUG": "WARN",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a dead peer fails the step, not a hang
        "LDM_JOB_NAME": task.name,
        **task.env,
        **s.env,
    }
    requests: dict[str, str] = {"cpu": s.cpu, "memory": s.memory}
    limits: dict[str, str] = {"memory": s.memory}
    if s.gpu:
        requests[s.gpu_resource] = limits[s.gpu_resource] = str(task.nproc_per_node)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["torchrun", *task.command()],
        "workingDir": s.workdir,
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "ports": [{"name": "pytorchjob-port", "containerPort": s.master_port, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [
            {"name": "workdir", "mountPath": s.workdir},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": s.run_as_user,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if s.s3_secret:
        container["envFrom"] = [{"secretRef": {"name": s.s3_secret}}]
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,  # time to finish writing a checkpoint
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": s.run_as_user,
            "runAsGroup": s.run_as_user,
            "fsGroup": s.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [
            {"name": "workdir", "persistentVolumeClaim": {"claimName": s.pvc_name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": s.shm_size}},
            {"name": "tmp", "emptyDir": {"sizeLimit": s.tmp_size}},
        ],
    }
    if s.service_account:
        pod_spec["serviceAccountName"] = s.service_account
    if s.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in s.image_pull_secrets]
    if s.gpu:
        if s.node_selector:
            pod_spec["nodeSelector"] = dict(s.node_selector)
        if s.tolerations:
            pod_spec["tolerations"] = [dict(t) for t in s.tolerations]
    return {
        "metadata": {
            "labels": _labels(task),
            # An Istio sidecar would intercept the rendezvous port and stall startup.
            "annotations": {"sidecar.istio.io/inject": "false"},
        },
        "spec": pod_spec,
    }


# --------------------------------------------------------------------------- status


def _conditions(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list((job.get("status") or {}).get("conditions") or [])


def _true(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in reversed(_conditions(job)):
        if cond.get("type") == kind and str(cond.get("status")) == "True":
            return cond
    return None


def _latest(job: dict[str, Any]) -> str:
    """The newest true condition (type: reason), for progress lines."""
    for cond in reversed(_conditions(job)):
        if str(cond.get("status")) == "True":
            return f"{cond.get('type')}" + (f" ({cond['reason']})" if cond.get("reason") else "")
    return ""


def _parse_ts(text: str) -> tuple[int, int] | None:
    """RFC3339(Nano) -> (epoch seconds, nanoseconds); kubelet trims trailing zeros, so the
    strings do not sort lexically."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z$", text)
    if not match:
        return None
    seconds = int(datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())
    return seconds, int((match[2] or "0").ljust(9, "0")[:9])


class _LogFollower(threading.Thread):
    """Follows one pod's log and copies it to ``out``, keeping the last lines for errors.

    A follow stream ends when the connection drops or the container restarts; it is reopened
    (with ``sinceSeconds`` just before the last line seen) and lines already printed are
    skipped by their kubelet timestamp, so each line shows once.
    """

    def __init__(
        self,
        core: kubernetes.client.CoreV1Api,
        namespace: str,
        pod: str,
        out: TextIO,
        tail_lines: int,
        reconnect_s: float,
    ) -> None:
        super().__init__(name=f"logs-{pod}", daemon=True)
        self.core, self.namespace, self.pod, self.out = core, namespace, pod, out
        self.reconnect_s = reconnect_s
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.stop = threading.Event()
        self._last: tuple[int, int] | None = None
        self._count_at_last = 0
        self._skip = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._follow_once()
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as err:
                log.debug("log stream of %s interrupted: %s", self.pod, err)
            self.stop.wait(self.reconnect_s)

    def finish(self, timeout_s: float) -> None:
        """Stop following, then read once more from the last line printed: a stream that was
        between reconnects when the pod finished would otherwise miss the final lines."""
        self.stop.set()
        self.join(timeout_s)
        if self.is_alive():  # still inside a stream: reading again would print lines twice
            return
        try:
            self._follow_once()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as err:
            log.debug("final log read of %s failed: %s", self.pod, err)

    def _follow_once(self) -> None:
        kwargs: dict[str, Any] = {}
        if self._last is not None:
            kwargs["since_seconds"] = max(1, int(time.time() - self._last[0]) + 5)
        response = self.core.read_namespaced_pod_log(
            self.pod,
            self.namespace,
            container=CONTAINER,
            follow=True,
            timestamps=True,
            _preload_content=False,
            _request_timeout=(10, None),
            **kwargs,
        )
        # Lines stamped exactly like the last one printed: the first few were printed already.
        self._skip = self._count_at_last
        buffer = b""
        try:
            # No early exit on stop: the stream ends by itself when the container does, and
            # its last lines are the ones that explain a failure.
            for chunk in response.stream(8192):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    self._emit(raw.decode(errors="replace"))
            if buffer:
                self._emit(buffer.decode(errors="replace"))
        finally:
            response.release_conn()

    def _emit(self, line: str) -> None:
        stamp_text, _, text = line.partition(" ")
        stamp = _parse_ts(stamp_text)
        if stamp is None:  # not timestamped (should not happen with timestamps=True): show it
            text = line
        elif self._last is not None and stamp < self._last:
            return
        elif stamp == self._last:
            if self._skip > 0:
                self._skip -= 1
                return
            self._count_at_last += 1
        else:
            self._last, self._count_at_last, self._skip = stamp, 1, 0
        self.tail.append(text)
        self.out.write(text + "\n")
        self.out.flush()


# --------------------------------------------------------------------------- launcher


class PyTorchJobLauncher:
    """Runs a :class:`TrainingTask` as a PyTorchJob and waits for its outcome."""

    def __init__(
        self,
        settings: PyTorchJobSettings,
        api_client: kubernetes.client.ApiClient | None = None,
        out: TextIO | None = None,
    ) -> None:
        if api_client is None:
            api_client = make_api_client()
        self.settings = settings
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.host = api_client.configuration.host
        self.out = out or sys.stdout
        self.namespace = settings.namespace or current_namespace()

    # ------------------------------------------------------------------ API calls

    def _api(self, what: str, call: Callable[[], Any]) -> Any:
        """Run one API call; turn refusals and unreachable servers into LaunchError."""
        try:
            return call()
        except ApiException as err:
            if err.status in (401, 403):
                raise LaunchError(
                    f"{what}: the API server refused ({err.status} {err.reason}); the pipeline's "
                    f"service account needs the Role in manifests/base/rbac.yaml in namespace "
                    f"{self.namespace}"
                ) from None
            raise
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise LaunchError(
                f"{what}: Kubernetes API at {self.host} unreachable ({type(err).__name__})"
            ) from None

    def _get_job(self, name: str) -> dict[str, Any] | None:
        try:
            return self._api(
                f"get PyTorchJob {self.namespace}/{name}",
                lambda: self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, name
                ),
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise LaunchError(
                f"get PyTorchJob {self.namespace}/{name}: {err.status} {err.reason}"
            ) from None

    def _create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        body = {**body, "metadata": {**body["metadata"], "namespace": self.namespace}}
        try:
            self._api(
                f"create PyTorchJob {self.namespace}/{name}",
                lambda: self.custom.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, body
                ),
            )
        except ApiException as err:
            if err.status != 409:
                raise LaunchError(
                    f"create PyTorchJob {self.namespace}/{name}: {err.status} {err.reason}: "
                    f"{_api_message(err)}"
                ) from None
            log.info("PyTorchJob %s appeared concurrently; adopting it", name)
        # Re-read instead of trusting the create response (some servers answer without a body).
        job = self._get_job(name)
        if job is None:
            raise LaunchError(f"PyTorchJob {self.namespace}/{name} vanished right after creation")
        return job

    def _delete_job(self, name: str) -> None:
        try:
            self._api(
                f"delete PyTorchJob {self.namespace}/{name}",
                lambda: self.custom.delete_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    name,
                    body=kubernetes.client.V1DeleteOptions(propagation_policy="Foreground"),
                ),
            )
        except ApiException as err:
            if err.status != 404:
                raise LaunchError(
                    f"delete PyTorchJob {self.namespace}/{name}: {err.status} {err.reason}"
                ) from None

    def _wait_deleted(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._get_job(name) is not None:
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"PyTorchJob {self.namespace}/{name} is still there {timeout_s:.0f}s after "
                    "deletion (finalizers?); delete it by hand and retry"
                )
            time.sleep(min(self.settings.poll_s, 2.0))

    def _pods(self, name: str) -> list[Any]:
        selector = f"{JOB_LABEL}={name}"
        pods = self._api(
            f"list pods of {name}",
            lambda: self.core.list_namespaced_pod(self.namespace, label_selector=selector),
        ).items
        # Apply the selector here too: not every API server (or emulator) honours it.
        return [p for p in pods if (p.metadata.labels or {}).get(JOB_LABEL) == name]

    @staticmethod
    def _master(pods: list[Any]) -> Any | None:
        for pod in pods:
            if (pod.metadata.labels or {}).get(REPLICA_LABEL, "").lower() == "master":
                return pod
        return None

    def _events(self, names: list[str]) -> list[str]:
        """Recent events about the job and its pods, oldest first, one line each."""
        found = []
        for obj in names:
            try:
                items = self.core.list_namespaced_event(
                    self.namespace, field_selector=f"involvedObject.name={obj}"
                ).items
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as err:
                return [f"(events unavailable: {type(err).__name__})"]
            for ev in items:
                if ev.involved_object is None or ev.involved_object.name != obj:
                    continue
                when = ev.last_timestamp or ev.event_time or ev.first_timestamp
                found.append(
                    (
                        str(when or ""),
                        f"{ev.type or ''} {ev.reason or ''} "
                        f"{(ev.involved_object.kind or '').lower()}/{obj}: {ev.message or ''}".strip(),
                    )
                )
        return [line for _, line in sorted(found)][-15:]

    # ------------------------------------------------------------------ diagnostics

    def _failure(
        self, name: str, reason: str, follower: _LogFollower | None, pods: list[Any]
    ) -> LaunchError:
        master = self._master(pods)
        lines: list[str] = []
        if master is not None:  # the kubelet's copy is complete; the streamed tail may lag
            try:
                text = self.core.read_namespaced_pod_log(
                    master.metadata.name,
                    self.namespace,
                    container=CONTAINER,
                    tail_lines=self.settings.tail_lines,
                )
                lines = str(text).splitlines()
            except (ApiException, urllib3.exceptions.HTTPError, OSError):
                lines = []
        if not lines and follower is not None:  # pod already cleaned up
            lines = list(follower.tail)
        parts = [f"PyTorchJob {self.namespace}/{name} failed: {reason}"]
        if master is not None:
            parts.append(f"master pod {master.metadata.name}: {_pod_state(master)}")
        parts.append(
            "last log lines of the master pod:\n"
            + ("\n".join(lines) if lines else "(none captured)")
        )
        events = self._events([name] + [p.metadata.name for p in pods])
        parts.append("recent events:\n" + ("\n".join(events) if events else "(none)"))
        return LaunchError("\n".join(parts))

    # ------------------------------------------------------------------ run

    def run(self, task: TrainingTask) -> None:
        """Create (or adopt) the job, follow it, and return only when it Succeeded."""
        s = self.settings
        body = build_pytorchjob(task, s)
        name = task.name
        want_hash = body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        job = self._get_job(name)
        if job is not None:
            have = ((job.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
            if have != want_hash:
                raise LaunchError(
                    f"a different PyTorchJob {self.namespace}/{name} already exists (spec hash "
                    f"{have} != {want_hash}); it was not started for this task, so it is left "
                    "alone: delete it or use another run id"
                )
            if _true(job, "Failed"):
                log.warning("PyTorchJob %s failed in an earlier attempt; starting it again", name)
                self._delete_job(name)
                self._wait_deleted(name, timeout_s=max(60.0, 10 * s.poll_s))
                self._create_job(body)
            else:
                log.info(
                    "adopting existing PyTorchJob %s/%s (%s)",
                    self.namespace,
                    name,
                    _latest(job) or "no status yet",
                )
        else:
            self._create_job(body)
            log.info(
                "created PyTorchJob %s/%s: %d node(s) x %d process(es), image %s",
                self.namespace,
                name,
                task.nnodes,
                task.nproc_per_node,
                s.image,
            )
        self._follow(name)

    def _follow(self, name: str) -> None:
        """Poll the job and its pods until an outcome; stream the master's log meanwhile."""
        s = self.settings
        start = time.monotonic()
        timeout = (
            s.timeout_s if s.timeout_s is not None else s.active_deadline_s + s.start_timeout_s
        )
        follower: _LogFollower | None = None
        last_state = ""
        api_failures = 0
        try:
            while True:
                try:
                    job, pods = self._get_job(name), self._pods(name)
                    api_failures = 0
                except LaunchError:
                    api_failures += 1
                    if api_failures > 5:  # not a blip: give up with the API's reason
                        raise
                    log.warning("API error while following %s; retrying", name, exc_info=True)
                    time.sleep(s.poll_s)
                    continue
                if job is None:
                    raise LaunchError(
                        f"PyTorchJob {self.namespace}/{name} was deleted by someone else"
                    )
                state = _latest(job)
                if state != last_state:
                    log.info("PyTorchJob %s: %s", name, state or "waiting for the operator")
                    last_state = state
                if _true(job, "Succeeded"):
                    self._drain(follower)
                    log.info("PyTorchJob %s succeeded", name)
                    return
                failed = _true(job, "Failed")
                if failed:
                    self._drain(follower)
                    reason = f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}"
                    raise self._failure(name, reason.rstrip(": "), follower, pods)
                evicted = [p for p in pods if _is_evicted(p)]
                if evicted:
                    # The operator may not fail the job for this; we do, and clean up.
                    self._drain(follower)
                    why = evicted[0].status.message or "no message"
                    err = self._failure(
                        name, f"pod {evicted[0].metadata.name} was evicted ({why})", follower, pods
                    )
                    self._delete_job(name)
                    raise err
                master = self._master(pods)
                if follower is None and master is not None and _started(master):
                    follower = _LogFollower(
                        self.core,
                        self.namespace,
                        master.metadata.name,
                        self.out,
                        s.tail_lines,
                        s.log_reconnect_s,
                    )
                    follower.start()
                elapsed = time.monotonic() - start
                if not _conditions(job) and elapsed > s.start_timeout_s:
                    self._delete_job(name)
                    raise LaunchError(
                        f"PyTorchJob {self.namespace}/{name} got no status in "
                        f"{s.start_timeout_s:.0f}s: is the Kubeflow training operator installed "
                        "and watching this namespace? The job was deleted."
                    )
                if elapsed > timeout:
                    err = self._failure(
                        name, f"no result after {timeout:.0f}s (timeout)", follower, pods
                    )
                    self._delete_job(name)
                    raise LaunchError(f"{err}\nThe job was deleted.")
                time.sleep(s.poll_s)
        finally:
            if follower is not None:
                follower.stop.set()

    def _drain(self, follower: _LogFollower | None) -> None:
        """Print what the pod wrote last before the outcome is reported."""
        if follower is not None:
            follower.finish(timeout_s=max(2.0, 2 * self.settings.log_reconnect_s))


def _started(pod: Any) -> bool:
    return (pod.status.phase if pod.status else None) in ("Running", "Succeeded", "Failed")


def _is_evicted(pod: Any) -> bool:
    return bool(pod.status) and pod.status.phase == "Failed" and pod.status.reason == "Evicted"


def _pod_state(pod: Any) -> str:
    status = pod.status
    if status is None:
        return "no status"
    parts = [status.phase or "Unknown"]
    if status.reason:
        parts.append(status.reason)
    for cs in status.container_statuses or []:
        if cs.name != CONTAINER or cs.state is None:
            continue
        term = cs.state.terminated or (cs.last_state.terminated if cs.last_state else None)
        if term is not None:
            parts.append(
                f"container exited with code {term.exit_code} ({term.reason or 'no reason'})"
            )
        elif cs.state.waiting is not None:
            parts.append(f"container waiting: {cs.state.waiting.reason}")
        parts.append(f"restarts {cs.restart_count}")
    return ", ".join(parts)


def _api_message(err: ApiException) -> str:
    try:
        return str(json.loads(err.body or "{}").get("message", ""))[:300]
    except ValueError:
        return str(err.body or "")[:300]
