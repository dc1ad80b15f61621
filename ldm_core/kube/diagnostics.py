"""What a failed training job is reported with: its pod's state, last log lines and events.

A job that fails is explained by three things the API still shows for a while: the state of
the pod that ran rank 0 (phase, exit code, restarts), the kubelet's last lines of its log,
and the recent events about the job, its child objects and its pods (``BackOff``,
``FailedScheduling``, ``BackoffLimitExceeded``...). These functions read them with the
``get pods/log`` and ``list events`` grants every launcher's Role carries, and never raise
for a diagnostic that cannot be read: the failure they explain is the error that matters.
"""

from __future__ import annotations

from typing import Any

import kubernetes

from ldm_core.kube.errors import ApiCall, call_api
from ldm_core.launcher import LaunchError

MAX_EVENTS = 15
"""Events quoted in an error: enough to show a restart loop, short enough to read."""


def pod_state(pod: Any, container: str) -> str:
    """One line: phase, reason, and how ``container`` last ended or why it waits."""
    status = pod.status
    if status is None:
        return "no status"
    parts = [status.phase or "Unknown"]
    if status.reason:
        parts.append(status.reason)
    for cs in status.container_statuses or []:
        if cs.name != container or cs.state is None:
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


def log_tail(
    core: kubernetes.client.CoreV1Api,
    namespace: str,
    host: str,
    pod: str,
    container: str,
    lines: int,
) -> list[str]:
    """The kubelet's last ``lines`` of ``container`` in ``pod`` (complete, unlike a streamed
    tail); empty when the log cannot be read (the pod is gone, or the read was refused)."""
    call = ApiCall("get", "pods/log", namespace, pod)
    try:
        text = call_api(
            call,
            lambda: core.read_namespaced_pod_log(
                pod, namespace, container=container, tail_lines=lines
            ),
            host=host,
            error=LaunchError,
        )
    except LaunchError:
        return []
    return str(text).splitlines()


def events_about(
    core: kubernetes.client.CoreV1Api, namespace: str, host: str, names: list[str]
) -> list[Any]:
    """The events about the objects ``names`` (any kind: a job, its JobSet, a Job, pods).

    One list per name with a field selector on ``involvedObject.name``, re-applied here
    because not every API server (or emulator) honours field selectors. Raises LaunchError
    when a list fails or is refused."""
    found: list[Any] = []
    for obj in dict.fromkeys(names):
        selector = f"involvedObject.name={obj}"
        items = call_api(
            ApiCall("list", "events", namespace),
            lambda s=selector: core.list_namespaced_event(namespace, field_selector=s),
            host=host,
            error=LaunchError,
        ).items
        found += [
            e for e in items if e.involved_object is not None and e.involved_object.name == obj
        ]
    return found


def recent_events(
    core: kubernetes.client.CoreV1Api, namespace: str, host: str, names: list[str]
) -> list[str]:
    """Recent events about the objects ``names``, oldest first, one line each; a refused
    or failed list gives one line that says so instead of the events."""
    try:
        events = events_about(core, namespace, host, names)
    except LaunchError as err:
        return [f"(events unavailable: {err})"]
    found: list[tuple[str, str]] = []
    for ev in events:
        when = ev.last_timestamp or ev.event_time or ev.first_timestamp
        obj = f"{(ev.involved_object.kind or '').lower()}/{ev.involved_object.name}"
        line = f"{ev.type or ''} {ev.reason or ''} {obj}: {ev.message or ''}"
        found.append((str(when or ""), line.strip()))
    return [line for _, line in sorted(found)][-MAX_EVENTS:]
