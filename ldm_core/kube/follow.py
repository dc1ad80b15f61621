"""The polling loop both training-job launchers share (PyTorchJob and Trainer v2 TrainJob).

The two custom resources differ in how their status reads and in which pod carries rank 0's
log; what happens between two looks at them does not: an API that does not answer is
retried, a pod that cannot start is warned about once and fails the job when the problem
lasts ``pending_timeout_s`` (an autoscaler may still add the node), and every other outcome
than ``running`` ends the loop. The launchers pass in what differs as functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ldm_core.kube.pending import pending_problem
from ldm_core.kube.podlog import PodLogFollower

Observation = tuple[Mapping[str, Any], list[Any]]
"""One look at a job: its object and its pods."""


@dataclass(frozen=True)
class JobState:
    """Where a followed job stands: ``running`` (keep polling), ``succeeded``, ``failed``,
    ``evicted`` (a pod was, and no restart policy brings it back), ``no-operator``
    (nothing ever gave the job a status), ``pending`` (a pod could not start for too long)
    or ``timeout``; ``detail`` says why."""

    outcome: str
    detail: str = ""


def follow_job(
    what: str,
    *,
    observe: Callable[[int], Observation | None],
    state_of: Callable[[Mapping[str, Any], list[Any], float], JobState],
    refollow: Callable[[PodLogFollower | None, list[Any]], PodLogFollower | None],
    conclude: Callable[[JobState, PodLogFollower | None, list[Any]], None],
    poll_s: float,
    pending_timeout_s: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    log: logging.Logger,
    waiting: str,
) -> None:
    """Poll a job until an outcome, streaming a pod's log meanwhile.

    Args:
        what: the job as log lines name it, e.g. ``PyTorchJob ns/name``.
        observe: one look, given how many looks in a row failed; None when this one did too
            (it raises when failures have lasted too long).
        state_of: the job's state from one look and the seconds since following began.
        refollow: the log follower for these pods (start one when rank 0's pod runs, switch
            when a new pod replaced it), or the one passed in.
        conclude: act on an outcome other than ``running``; returns on success, else raises.
        poll_s, pending_timeout_s: seconds between looks; how long a pod may be unable to
            start before the job fails.
        clock, sleep: time, injectable so tests run without waiting.
        log: the launcher's logger, so its records keep their origin.
        waiting: what to log while the job has no progress to report yet.
    """
    start = clock()
    follower: PodLogFollower | None = None
    last, failures = "", 0
    blocked_since: float | None = None  # since when a pod has been unable to start
    try:
        while True:
            seen = observe(failures)
            if seen is None:
                failures += 1
                sleep(poll_s)
                continue
            failures = 0
            job, pods = seen
            state = state_of(job, pods, clock() - start)
            problem = pending_problem(pods) if state.outcome == "running" else None
            if problem is None:
                blocked_since = None
            elif blocked_since is None:
                log.warning("%s: %s", what, problem)
                blocked_since = clock()
            elif clock() - blocked_since >= pending_timeout_s:
                state = JobState("pending", f"{problem} (for {pending_timeout_s:.0f}s)")
            if state.outcome != "running":
                conclude(state, follower, pods)
                return
            if state.detail != last:
                log.info("%s: %s", what, state.detail or waiting)
                last = state.detail
            follower = refollow(follower, pods)
            sleep(poll_s)
    finally:
        if follower is not None:
            follower.stop.set()
