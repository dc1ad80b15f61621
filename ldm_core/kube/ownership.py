"""Tie a training job's lifetime to the pipeline step that launched it: no leaked GPUs.

A run terminated from the Kubeflow UI sends SIGTERM to the step's pod; a step can also die
outright (OOM-killed, node lost). Either way the PyTorchJob it created would otherwise run
on, holding its GPUs, until its active deadline. Two guards, each for one of those cases:

- :func:`launcher_owner_reference`: the job names the launcher's pod as its owner, so
  Kubernetes' garbage collector deletes the job once that pod is gone, whatever killed it.
  The pod is found by name from the downward API (``POD_NAME``) or ``HOSTNAME`` (a pod's
  hostname is its name) and read for its uid; outside a pod that read finds nothing and
  the job simply has no owner.
- :func:`delete_on_sigterm`: while the launcher follows the job, SIGTERM deletes the job
  before the process exits, so the GPUs are freed within the pod's grace period rather
  than after garbage collection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes

from ldm_core.errors import LdmError
from ldm_core.kube.errors import ApiCall, call_api
from ldm_core.launcher import LaunchError

log = logging.getLogger(__name__)

POD_NAME_ENV = ("POD_NAME", "HOSTNAME")
"""Where the launcher's own pod name is read from, first match wins."""


class Terminated(LdmError):
    """The launcher got SIGTERM while a job ran; the job was deleted.

    Not a LaunchError: the launcher retries those as API blips, and a SIGTERM that lands
    inside an API call must end the run, not be retried."""


def launcher_pod_name() -> str | None:
    """The name this process's pod has, if the environment says (downward API first)."""
    for var in POD_NAME_ENV:
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return None


def launcher_owner_reference(
    core: kubernetes.client.CoreV1Api, namespace: str, host: str
) -> dict[str, Any] | None:
    """An ownerReference to the launcher's pod, or None when no such pod can be read.

    ``blockOwnerDeletion`` is left unset: setting it needs update on pods/finalizers, a
    grant the pipeline's Role should not carry, and the job need not outlive the pod.
    A refused read (no ``get pods`` grant) only costs the reference, so it is logged and
    the launch goes on; the SIGTERM guard still applies.
    """
    name = launcher_pod_name()
    if name is None:
        return None
    call = ApiCall("get", "pods", namespace, name)
    try:
        pod = call_api(
            call,
            lambda: core.read_namespaced_pod(name, namespace),
            host=host,
            error=LaunchError,
            absent_on=(404,),
        )
    except LaunchError as exc:
        log.warning("the training job will have no owner: %s", exc)
        return None
    uid = getattr(getattr(pod, "metadata", None), "uid", None)
    if not uid:
        return None  # not running in a pod of that namespace (a laptop's HOSTNAME)
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


@contextlib.contextmanager
def delete_on_sigterm(what: str, delete: Callable[[], object]) -> Iterator[None]:
    """Within the block, SIGTERM calls ``delete`` and raises :class:`Terminated`.

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
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not stop the delete
        delete()
        raise Terminated(f"{exc}; {what} was deleted") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
