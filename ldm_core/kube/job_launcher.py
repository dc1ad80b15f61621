"""How a training job is run, whatever its kind (PyTorchJob or Trainer v2 TrainJob).

The two custom resources differ in how they are built, how their status reads and which pod
carries rank 0's log. The rest is :class:`JobLauncher`: a job's identity is its
deterministic name plus the hash of its spec (:func:`adoption` decides, before starting,
whether a job found under that name is ours to adopt, ours to replace, going away, or
someone else's, and decides again on the job read anew when a write finds it changed since
it was read: another launcher adopted or created it in between); the launchers that follow
a job own it, and SIGTERM releases this one's claim (:mod:`ldm_core.kube.ownership`); and it
is followed by polling: an API that does not answer is retried, a pod that cannot start, or
that the API server refuses to create, is warned about once and fails the job when the
problem lasts ``cluster.pending_timeout_s`` (an autoscaler may still add the node), at once
when waiting cannot help (:mod:`ldm_core.kube.pending`), and every other outcome than
``running`` ends the loop.

Adoption is also how a pipeline is re-run by hand: the same inputs give the same job name,
so a re-run finds the job of the run before it, running (followed from where it is),
finished (its result taken), failed (started again; training resumes from the checkpoints
on the PVC) or being deleted (waited for, then created again), and takes over from a
launcher that has ended.

The launcher reads its pods' settings and deadlines from the run's config; only its own
mechanics (how often it polls, how much log it quotes) are :class:`LauncherTiming`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, TextIO

import kubernetes

from ldm_core.config import Config
from ldm_core.kube.client import api_client as make_api_client
from ldm_core.kube.client import current_namespace
from ldm_core.kube.diagnostics import events_about, log_tail, pod_state, recent_events
from ldm_core.kube.errors import ApiCall, call_api
from ldm_core.kube.ownership import (
    launcher_owner_reference,
    live_owners,
    owner_references,
    owners_after_adoption,
    release_on_sigterm,
)
from ldm_core.kube.pending import Blocked, failed_create, pending_problem
from ldm_core.kube.podlog import PodLogFollower
from ldm_core.kube.resources import CustomObjects, CustomResource
from ldm_core.kube.training_job import SPEC_HASH_ANNOTATION, stage_resources, stored_spec_hash
from ldm_core.launcher import LaunchError, TrainingTask

RbacRules = list[tuple[str, str, tuple[str, ...]]]
WRITE_ATTEMPTS = 5
"""How often a write decided on a job as read is tried again, on the job read anew, after the
job changed under it (409 Conflict); more races than that in a row are not a race."""


def rbac_rules(resource: CustomResource) -> RbacRules:
    """Every (apiGroup, resource, verbs) a :class:`JobLauncher` of ``resource`` calls; the
    Role in manifests/ must grant exactly these (the launcher tests record the calls made
    against an API server and compare)."""
    return [
        (resource.group, resource.plural, ("create", "delete", "get", "patch")),
        ("", "pods", ("get", "list")),
        ("", "pods/log", ("get",)),
        ("", "events", ("list",)),
    ]


@dataclass(frozen=True)
class LauncherTiming:
    """The launcher's own mechanics, which no pod sees (tests pass fast values).

    Args:
        poll_s: seconds between two looks at the job and its pods.
        log_reconnect_s: seconds before a dropped log stream is reopened.
        tail_lines: log lines of rank 0 quoted in a failure.
        start_timeout_s: a job that shows no status this long has no controller: fail.
        timeout_s: how long :meth:`JobLauncher.run` waits for a result; None: the job's
            deadline (``cluster.run_timeout_s``) plus ``start_timeout_s``.
    """

    poll_s: float = 10.0
    log_reconnect_s: float = 5.0
    tail_lines: int = 40
    start_timeout_s: float = 600.0
    timeout_s: float | None = None


@dataclass(frozen=True)
class JobState:
    """Where a followed job stands: ``running`` (keep polling), ``succeeded``, ``failed``,
    ``evicted`` (a pod was, and no restart policy brings it back), ``no-operator``
    (nothing ever gave the job a status), ``pending`` (a pod could not start for too long)
    or ``timeout``; ``detail`` says why."""

    outcome: str
    detail: str = ""


# --------------------------------------------------------------------------- decisions (pure)


def conditions(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list((job.get("status") or {}).get("conditions") or [])


def true_conditions(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conditions that hold, oldest first. The operators keep the others with status
    "False" (Running once the job Succeeded or Failed or was suspended; Suspended once
    resumed), and the newest of those is often a condition that no longer holds."""
    return [c for c in conditions(job) if str(c.get("status")) == "True"]


def true_condition(job: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    """The newest condition of type ``kind`` whose status is True, if any."""
    for cond in reversed(true_conditions(job)):
        if cond.get("type") == kind:
            return cond
    return None


def created_at(job: Mapping[str, Any]) -> datetime | None:
    """When the API server stored the job (``metadata.creationTimestamp``), if it says."""
    stamp = (job.get("metadata") or {}).get("creationTimestamp")
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")) if stamp else None


def adoption(job: Mapping[str, Any] | None, want_hash: str) -> str:
    """What to do about the job of our name found before starting: ``create`` (none there),
    ``await-deletion`` (being deleted, say by the garbage collector after its owners went:
    create it again once it is gone), ``adopt`` (ours, still running or done), ``replace``
    (ours, failed in an earlier attempt) or ``conflict`` (another spec under our name: not
    ours to touch)."""
    if job is None:
        return "create"
    if (job.get("metadata") or {}).get("deletionTimestamp"):
        return "await-deletion"
    if stored_spec_hash(job) != want_hash:
        return "conflict"
    return "replace" if true_condition(job, "Failed") else "adopt"


# --------------------------------------------------------------------------- launcher


class JobLauncher:
    """Runs a :class:`TrainingTask` as one training job and waits for its outcome.

    A subclass names the custom resource, the label its pods carry and the container that
    trains, and fills in the hooks below: how the job is built, how one look at it reads,
    which pod's log to follow, and what each outcome does.

    Args:
        cfg: the run's resolved config; ``cfg.cluster`` is how the training pods look on
            this cluster, where the job goes (``namespace``, empty: the launcher pod's own)
            and its deadlines.
        stage: ``train_autoencoder`` or ``train_diffusion``: which ``cfg.cluster`` section
            sizes the pods.
        api_client: the API to use; default: the pod's service account or the kubeconfig.
        out: where rank 0's pod log is copied (default: stdout, the component's log).
        timing: polling and log mechanics.
        clock: monotonic seconds, for deadlines (tests pass a fake one).
        sleep: waits between polls (tests pass one that advances their clock).
    """

    resource: ClassVar[CustomResource]
    pod_label: ClassVar[str]
    """The label whose value is the job's name on every pod of the job."""
    container: ClassVar[str]
    """The training container, whose log is followed and quoted."""
    pod_role: ClassVar[str]
    """How messages call the pod whose log is followed."""
    created_on: ClassVar[str] = ""
    """Said after the job's name when it is created (e.g. the runtime it runs on)."""
    waiting: ClassVar[str]
    """Logged while the job has no progress to report yet."""

    def __init__(
        self,
        cfg: Config,
        stage: str,
        api_client: kubernetes.client.ApiClient | None = None,
        out: TextIO | None = None,
        *,
        timing: LauncherTiming = LauncherTiming(),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        stage_resources(cfg, stage)  # a stage that sizes no pods fails here, not mid-run
        if api_client is None:
            api_client = make_api_client()
        self.cfg, self.stage, self.timing = cfg, stage, timing
        self.namespace = cfg.cluster.namespace or current_namespace()
        self.jobs = CustomObjects(api_client, self.resource, self.namespace, LaunchError)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.host = str(api_client.configuration.host)
        self.out = out or sys.stdout
        self.clock, self.sleep = clock, sleep
        self.log = logging.getLogger(type(self).__module__)
        """The subclass's module logger, so that records keep their origin."""
        self.owner: dict[str, Any] | None = None
        """An ownerReference to this launcher's pod, once :meth:`run` has read it."""

    # ------------------------------------------------------------------ hooks

    def build(self, task: TrainingTask) -> dict[str, Any]:
        """The job object for ``task``, its spec hash annotated."""
        raise NotImplementedError

    def progress(self, job: Mapping[str, Any]) -> str:
        """One line on how far the job is, for logs."""
        raise NotImplementedError

    def state(self, job: Mapping[str, Any], pods: list[Any], elapsed_s: float) -> JobState:
        """The job's state from one look and the seconds since following began."""
        raise NotImplementedError

    def log_pod(self, pods: list[Any]) -> Any | None:
        """The pod whose log shows progress (rank 0), if it exists."""
        raise NotImplementedError

    def refollow(self, follower: PodLogFollower | None, pods: list[Any]) -> PodLogFollower | None:
        """The log follower for these pods: the one passed in, or a new one once the log pod
        runs (or a replacement of it)."""
        raise NotImplementedError

    def conclude(
        self, name: str, state: JobState, follower: PodLogFollower | None, pods: list[Any]
    ) -> None:
        """Act on an outcome other than ``running``: return on success, else raise."""
        raise NotImplementedError

    def event_names(self, name: str) -> list[str]:
        """The objects whose events explain a failure, besides the pods."""
        return [name]

    def refusal_hint(self, problem: str) -> str:
        """What this kind adds to a refusal of its pods (``problem``), if anything."""
        return ""

    # ------------------------------------------------------------------ run

    @property
    def wait_s(self) -> float:
        """How long :meth:`run` waits for a result: ``timing.timeout_s``, else the job's
        deadline plus the time its pods may take to start."""
        if self.timing.timeout_s is not None:
            return self.timing.timeout_s
        return self.cfg.cluster.run_timeout_s + self.timing.start_timeout_s

    def what(self, name: str) -> str:
        """The job as messages name it."""
        return f"{self.resource.kind} {self.namespace}/{name}"

    def run(self, task: TrainingTask) -> None:
        """Create (or adopt) the job, follow it, and return only when it succeeded."""
        body = self.build(task)
        name = task.name
        want_hash = body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        job = self.jobs.get(name)
        if adoption(job, want_hash) == "conflict":
            raise self._conflict(name, job or {}, want_hash)
        self.owner = launcher_owner_reference(self.core, self.namespace, self.host)
        with release_on_sigterm(self.what(name), lambda: self._release(name, want_hash)):
            self._claim(task, body, job)
            self._follow(name, task.nnodes)

    def _conflict(self, name: str, job: Mapping[str, Any], want_hash: str) -> LaunchError:
        return LaunchError(
            f"a different {self.what(name)} already exists (spec hash "
            f"{stored_spec_hash(job)} != {want_hash}); it was not started for this task, so "
            "it is left alone: delete it or use another run id"
        )

    # ------------------------------------------------------------------ owners

    def _claim(self, task: TrainingTask, body: dict[str, Any], job: dict[str, Any] | None) -> None:
        """Become one of the owners of the job of ``task``: adopt the job found under its
        name (``job``, as read), or start it (anew).

        Every write applies only to the job as it was read. One that finds it changed (409
        Conflict: another launcher adopted it a moment ago, created it first, or its
        controller wrote its status) reads it again and decides anew, as on a job found
        before starting; a few races in a row, and the launch fails."""
        name, want_hash = task.name, body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        for _ in range(WRITE_ATTEMPTS):
            decision = adoption(job, want_hash)
            if decision == "conflict":
                raise self._conflict(name, job or {}, want_hash)
            if decision == "adopt":
                status = self.progress(job or {}) or "no status yet"
                self.log.info("adopting existing %s (%s)", self.what(name), status)
                claimed = self._adopt(name, job or {})
            else:
                claimed = self._start(task, body, decision, job)
            if claimed:
                return
            job = self.jobs.get(name)
        raise LaunchError(
            f"{self.what(name)} changed under each of {WRITE_ATTEMPTS} attempts to create or "
            "adopt it; try again"
        )

    def _start(
        self, task: TrainingTask, body: dict[str, Any], decision: str, job: Mapping[str, Any] | None
    ) -> bool:
        """Create the job, first clearing the way for it: delete the failed one read
        (``replace``), or wait for one being deleted to go. False when the job changed since
        it was read (the failed one taken over by another launcher) or another launcher
        created it first."""
        name = task.name
        if decision == "replace":
            self.log.warning("%s failed in an earlier attempt; starting it again", self.what(name))
            if not self.jobs.delete(name, seen=job):
                return False
        elif decision == "await-deletion":
            self.log.info("%s is being deleted; creating it again once it is gone", self.what(name))
        if decision != "create":
            self._wait_deleted(name, timeout_s=max(60.0, 10 * self.timing.poll_s))
        if not self._create(body):
            self.log.info("%s appeared concurrently; deciding on it anew", self.what(name))
            return False
        self.log.info(
            "created %s%s: %d node(s) x %d process(es), image %s",
            self.what(name),
            self.created_on,
            task.nnodes,
            task.nproc_per_node,
            self.cfg.cluster.image,
        )
        return True

    def _adopt(self, name: str, job: Mapping[str, Any]) -> bool:
        """Record this launcher among the job's owners and drop the launchers that ended
        (:func:`~ldm_core.kube.ownership.owners_after_adoption`). False when the job changed
        since it was read."""
        live = live_owners(self.core, self.namespace, self.host, job)
        owners = owners_after_adoption(job, live, self.owner)
        if owners == owner_references(job):
            return True
        ended = {r["name"] for r in owner_references(job)} - {r["name"] for r in owners}
        if ended:
            self.log.info(
                "%s: taking over from launcher pod(s) %s, which ended",
                self.what(name),
                ", ".join(sorted(ended)),
            )
        patch = {"metadata": {"ownerReferences": owners}}
        return self.jobs.patch(name, patch, seen=job) is not None

    def _release(self, name: str, want_hash: str) -> str:
        """SIGTERM: delete the job unless another live launcher owns it; then only drop this
        launcher from its owners. Says which. Both writes apply only to the job as read: one
        that finds it changed (another launcher adopted it a moment ago) decides anew. A job
        of another spec under the name (it took the name while this launcher created its
        own) is not this launcher's to touch."""
        mine = self.owner["uid"] if self.owner else None
        for _ in range(WRITE_ATTEMPTS):
            job = self.jobs.get(name)
            if job is None:
                return f"{self.what(name)} was already gone"
            if stored_spec_hash(job) != want_hash:
                return f"{self.what(name)} is another task's job; it is left alone"
            live = live_owners(self.core, self.namespace, self.host, job)
            others = [r for r in live if r["uid"] != mine]
            if not others:
                if self.jobs.delete(name, seen=job):
                    return f"{self.what(name)} was deleted"
                continue
            kept = {"ownerReferences": [r for r in owner_references(job) if r.get("uid") != mine]}
            if self.jobs.patch(name, {"metadata": kept}, seen=job) is not None:
                names = ", ".join(r["name"] for r in others)
                return f"{self.what(name)} is left to launcher pod {names}, which follows it too"
        return (
            f"{self.what(name)} changed under each of {WRITE_ATTEMPTS} attempts to release it; "
            "it is left to its owners"
        )

    # ------------------------------------------------------------------ API calls

    def _create(self, body: dict[str, Any]) -> bool:
        """Create the job, owned by this launcher; False when a job of its name is there
        already (409 AlreadyExists: another launcher created it since it was looked for)."""
        name = body["metadata"]["name"]
        if self.owner is not None:
            # Deleted by the garbage collector with the launcher's pod, however it ended
            # (and whatever the job owns with it), unless another launcher adopts it.
            body = {**body, "metadata": {**body["metadata"], "ownerReferences": [self.owner]}}
        if self.jobs.create(body, exist_ok=True) is None:
            return False
        # Re-read instead of trusting the create response (some servers answer without a body).
        if self.jobs.get(name) is None:
            raise LaunchError(f"{self.what(name)} vanished right after creation")
        return True

    def _wait_deleted(self, name: str, timeout_s: float) -> None:
        deadline = self.clock() + timeout_s
        while self.jobs.get(name) is not None:
            if self.clock() > deadline:
                raise LaunchError(
                    f"{self.what(name)} is still there {timeout_s:.0f}s after deletion "
                    "(finalizers?); delete it by hand and retry"
                )
            self.sleep(min(self.timing.poll_s, 2.0))

    def _pods(self, name: str) -> list[Any]:
        selector = f"{self.pod_label}={name}"
        pods = call_api(
            ApiCall("list", "pods", self.namespace),
            lambda: self.core.list_namespaced_pod(self.namespace, label_selector=selector),
            host=self.host,
            error=LaunchError,
        ).items
        # Apply the selector here too: not every API server (or emulator) honours it.
        return [p for p in pods if (p.metadata.labels or {}).get(self.pod_label) == name]

    def _observe(self, name: str, failures: int) -> tuple[dict[str, Any], list[Any]] | None:
        """One look at the job and its pods; None after an API blip (raised once it is the
        sixth in a row: not a blip)."""
        try:
            job, pods = self.jobs.get(name), self._pods(name)
        except LaunchError:
            if failures >= 5:
                raise
            self.log.warning("API error while following %s; retrying", name, exc_info=True)
            return None
        if job is None:
            raise LaunchError(f"{self.what(name)} was deleted by someone else")
        return job, pods

    # ------------------------------------------------------------------ follow

    def _blocked(
        self, name: str, job: Mapping[str, Any], pods: list[Any], nnodes: int
    ) -> Blocked | None:
        """Why the job's pods cannot run: a pod that cannot start, or, while pods are
        missing, the controller's record that the API server refused to create them."""
        problem = pending_problem(pods)
        if problem is not None:
            return Blocked(problem)
        if len(pods) >= nnodes:
            return None
        try:
            events = events_about(self.core, self.namespace, self.host, self.event_names(name))
        except LaunchError:
            return None  # the failure report will say the events could not be read
        blocked = failed_create(events, self.stage, created_at(job))
        if blocked is None:
            return None
        more = self.refusal_hint(blocked.problem)
        return Blocked(f"{blocked.problem}; {more}" if more else blocked.problem, blocked.lasts)

    def _follow(self, name: str, nnodes: int) -> None:
        """Poll the job and its pods until an outcome, streaming the log pod's log meanwhile."""
        what, poll_s = self.what(name), self.timing.poll_s
        pending_timeout_s = self.cfg.cluster.pending_timeout_s
        start = self.clock()
        follower: PodLogFollower | None = None
        last, failures = "", 0
        blocked_since: float | None = None  # since when the pods have been unable to run
        try:
            while True:
                seen = self._observe(name, failures)
                if seen is None:
                    failures += 1
                    self.sleep(poll_s)
                    continue
                failures = 0
                job, pods = seen
                state = self.state(job, pods, self.clock() - start)
                blocked = (
                    self._blocked(name, job, pods, nnodes) if state.outcome == "running" else None
                )
                if blocked is None:
                    blocked_since = None
                elif blocked.lasts:
                    state = JobState("pending", blocked.problem)
                elif blocked_since is None:
                    self.log.warning("%s: %s", what, blocked.problem)
                    blocked_since = self.clock()
                elif self.clock() - blocked_since >= pending_timeout_s:
                    state = JobState("pending", f"{blocked.problem} (for {pending_timeout_s:.0f}s)")
                if state.outcome != "running":
                    self.conclude(name, state, follower, pods)
                    return
                if state.detail != last:
                    self.log.info("%s: %s", what, state.detail or self.waiting)
                    last = state.detail
                follower = self.refollow(follower, pods)
                self.sleep(poll_s)
        finally:
            if follower is not None:
                follower.stop.set()

    def start_log(self, pod: Any) -> PodLogFollower:
        """Start copying the training container's log of ``pod`` to ``out``."""
        t = self.timing
        follower = PodLogFollower(
            self.core,
            self.namespace,
            pod.metadata.name,
            self.container,
            self.out,
            t.tail_lines,
            t.log_reconnect_s,
        )
        follower.start()
        return follower

    def finish_log(self, follower: PodLogFollower | None) -> None:
        """Print what the log pod wrote last, before an outcome is reported."""
        if follower is not None:
            follower.finish(timeout_s=max(2.0, 2 * self.timing.log_reconnect_s))

    def failure(
        self, name: str, reason: str, follower: PodLogFollower | None, pods: list[Any]
    ) -> LaunchError:
        """The error for a job that did not succeed: ``reason``, the log pod's state and
        last log lines, and the recent events of the job and its pods."""
        pod = self.log_pod(pods)
        lines = (
            log_tail(
                self.core,
                self.namespace,
                self.host,
                pod.metadata.name,
                self.container,
                self.timing.tail_lines,
            )
            if pod is not None
            else []
        )
        if not lines and follower is not None:  # pod already gone
            lines = list(follower.tail)
        parts = [f"{self.what(name)} failed: {reason}"]
        if pod is not None:
            parts.append(
                f"{self.pod_role} pod {pod.metadata.name}: {pod_state(pod, self.container)}"
            )
        parts.append(
            f"last log lines of the {self.pod_role} pod:\n"
            + ("\n".join(lines) if lines else "(none captured)")
        )
        names = [*self.event_names(name), *(p.metadata.name for p in pods)]
        events = recent_events(self.core, self.namespace, self.host, names)
        parts.append("recent events:\n" + ("\n".join(events) if events else "(none)"))
        return LaunchError("\n".join(parts))
