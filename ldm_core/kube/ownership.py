"""Tie a training job's lifetime to the pipeline steps that follow it: no leaked GPUs, and no
job deleted under another run.

A run terminated from the Kubeflow UI sends SIGTERM to the step's pod; a step can also die
outright (OOM-killed, node lost). Either way the job it created would otherwise run on,
holding its GPUs, until its deadline. And a job's name is keyed by its content, so two runs
with the same inputs (a re-run, a retry) follow one job. So:

- every launcher that creates or adopts a job records its pod as one of the job's
  ``ownerReferences`` (:func:`launcher_owner_reference`; the pod is found by name from the
  downward API's ``POD_NAME`` or ``HOSTNAME``, which is a pod's name). Kubernetes' garbage
  collector deletes the job once every owner is gone, whatever killed them, and not while
  one remains;
- a pod that has ended still exists: Argo keeps a step's pod until the workflow's TTL (a
  day under KFP), so an OOM-killed launcher would keep its job alive as long. A launcher that
  adopts a job drops the owners that are not live launchers any more
  (:func:`live_owners`) and so takes over from them (:func:`owners_after_adoption`);
- SIGTERM (:func:`release_on_sigterm`) ends this launcher's claim: the job is deleted when no
  other live launcher owns it, and otherwise only loses this owner, so terminating one run
  never stops the job another run follows.

Owner lists are written as JSON merge patches of the whole list, and a launcher deletes the
job it decided nobody else follows: both are decided on the job as read, so each write
applies only to that version (the patch carries its ``metadata.resourceVersion``, the delete
preconditions on its uid and resourceVersion). Two launchers adopting in the same instant
then cannot drop each other's reference, nor a release delete a job adopted a moment before:
the API server refuses the later write (409 Conflict), and its launcher reads the job again
and decides anew (:class:`ldm_core.kube.job_launcher.JobLauncher`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import kubernetes

from ldm_core.errors import LdmError
from ldm_core.kube.errors import ApiCall, call_api
from ldm_core.launcher import LaunchError

log = logging.getLogger(__name__)

POD_NAME_ENV = ("POD_NAME", "HOSTNAME")
"""Where the launcher's own pod name is read from, first match wins."""
ENDED = ("Succeeded", "Failed")
"""Pod phases of a launcher that will never act again."""

OwnerRef = dict[str, Any]


class Terminated(LdmError):
    """The launcher got SIGTERM while a job ran; its claim on the job was released.

    Not a LaunchError: the launcher retries those as API blips, and a SIGTERM that lands
    inside an API call must end the run, not be retried."""


def launcher_pod_name() -> str | None:
    """The name this process's pod has, if the environment says (downward API first)."""
    for var in POD_NAME_ENV:
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return None


def _read_pod(core: kubernetes.client.CoreV1Api, namespace: str, host: str, name: str) -> Any:
    """The pod, or None when there is none of that name."""
    call = ApiCall("get", "pods", namespace, name)
    return call_api(
        call,
        lambda: core.read_namespaced_pod(name, namespace),
        host=host,
        error=LaunchError,
        absent_on=(404,),
    )


def launcher_owner_reference(
    core: kubernetes.client.CoreV1Api, namespace: str, host: str
) -> OwnerRef | None:
    """An ownerReference to the launcher's pod, or None when no such pod can be read.

    ``blockOwnerDeletion`` is left unset: setting it needs update on pods/finalizers, a
    grant the pipeline's Role should not carry, and the job need not outlive the pod.
    A refused read (no ``get pods`` grant) only costs the reference, so it is logged and
    the launch goes on; the SIGTERM guard still applies.
    """
    name = launcher_pod_name()
    if name is None:
        return None
    try:
        pod = _read_pod(core, namespace, host, name)
    except LaunchError as exc:
        log.warning("the training job will have no owner: %s", exc)
        return None
    uid = getattr(getattr(pod, "metadata", None), "uid", None)
    if not uid:
        return None  # not running in a pod of that namespace (a laptop's HOSTNAME)
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def owner_references(job: Mapping[str, Any]) -> list[OwnerRef]:
    return list((job.get("metadata") or {}).get("ownerReferences") or [])


def _is_pod(ref: Mapping[str, Any]) -> bool:
    return ref.get("kind") == "Pod" and ref.get("apiVersion") == "v1"


def live_owners(
    core: kubernetes.client.CoreV1Api, namespace: str, host: str, job: Mapping[str, Any]
) -> list[OwnerRef]:
    """The job's pod owners that are live launchers: the pod of that uid exists, is not
    being deleted and has not ended. A pod that cannot be read counts as live (keeping a
    job is the safe side)."""
    live = []
    for ref in filter(_is_pod, owner_references(job)):
        try:
            pod = _read_pod(core, namespace, host, ref["name"])
        except LaunchError:
            live.append(ref)
            continue
        if pod is None or pod.metadata.uid != ref.get("uid") or pod.metadata.deletion_timestamp:
            continue
        if (pod.status.phase if pod.status else None) not in ENDED:
            live.append(ref)
    return live


def owners_after_adoption(
    job: Mapping[str, Any], live: list[OwnerRef], me: OwnerRef | None
) -> list[OwnerRef]:
    """The ownerReferences a job should have once this launcher adopted it: what owns it
    besides pods, the pods of live launchers, and this launcher's pod."""
    keep = {ref.get("uid") for ref in live}
    out = [r for r in owner_references(job) if not _is_pod(r) or r.get("uid") in keep]
    if me is not None and me["uid"] not in {r.get("uid") for r in out}:
        out.append(me)
    return out


@contextlib.contextmanager
def release_on_sigterm(what: str, release: Callable[[], str]) -> Iterator[None]:
    """Within the block, SIGTERM calls ``release`` (which says what became of the job) and
    raises :class:`Terminated`.

    Only the main thread may install signal handlers; elsewhere (a test driving the
    launcher from a worker thread) the block runs unguarded and the ownerReference is the
    only guard. The previous handler is restored on the way out.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: object) -> None:
        raise Terminated(f"SIGTERM while {what} ran")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except Terminated as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not stop this
        raise Terminated(f"{exc}; {release()}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
