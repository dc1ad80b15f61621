"""One mapping from failed Kubernetes API calls to brain-ldm errors.

The PyTorchJob launcher and the InferenceService rollout both send every API call through
:func:`call_api`. A refusal (401/403) then reads the same everywhere: which verb on which
resource in which namespace was refused, and which Role in ``manifests/`` grants it, so the
person on call fixes RBAC instead of reading a stack trace. An unreachable API server names
the host; any other answer names the call, the status and the server's message.

Each caller passes its own error type (``LaunchError``, ``RolloutError``), so a pipeline
step still fails with the error its backend promises.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

import urllib3
from kubernetes.client.exceptions import ApiException

from ldm_core.errors import LdmError

PIPELINE_ROLE = "brain-ldm-pipeline-runner"
"""The Role that grants the pipeline's service account every call in the kube modules'
``RBAC_RULES`` (tests/test_rbac.py holds the two equal)."""
RBAC_MANIFEST = "manifests/base/rbac.yaml"

E = TypeVar("E", bound=LdmError)


@dataclass(frozen=True)
class ApiCall:
    """What one request asks of the API server, in RBAC's terms."""

    verb: str
    """The RBAC verb: get, list, create, patch, delete."""
    resource: str
    """``plural.group`` for custom resources, ``plural[/subresource]`` for core ones."""
    namespace: str
    name: str = ""

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.name else f"in {self.namespace}"
        return f"{self.verb} {self.resource} {where}"


def api_message(err: ApiException, limit: int = 300) -> str:
    """The server's own explanation (a Status object's ``message``), else its raw body;
    at most ``limit`` characters."""
    try:
        return str(json.loads(err.body or "{}").get("message", ""))[:limit]
    except (ValueError, AttributeError):
        return str(err.body or "")[:limit]


def api_error(call: ApiCall, err: Exception, host: str, error: type[E]) -> E:
    """The ``error`` that explains why ``call`` failed with ``err``."""
    if isinstance(err, ApiException):
        detail = api_message(err)
        if err.status == 403 and detail.startswith("admission webhook"):
            # A validating webhook's refusal (controller-runtime answers 403 for any plain
            # error, kubernetes-sigs/controller-runtime#1046): its whole message is the
            # reason, not RBAC.
            return error(f"{call}: refused: {api_message(err, limit=1000)}")
        if err.status in (401, 403):
            return error(
                f"{call}: the API server refused ({err.status} {err.reason}); the pipeline's "
                f"service account needs the Role {PIPELINE_ROLE} ({RBAC_MANIFEST}) to allow "
                f"{call.verb!r} on {call.resource} in namespace {call.namespace}"
            )
        return error(f"{call}: {err.status} {err.reason}" + (f": {detail}" if detail else ""))
    return error(f"{call}: Kubernetes API at {host} unreachable ({type(err).__name__}: {err})")


def call_api(
    call: ApiCall,
    send: Callable[[], Any],
    *,
    host: str,
    error: type[E],
    absent_on: Collection[int] = (),
) -> Any:
    """Run ``send`` (one API request) and return its answer.

    An answer whose status is in ``absent_on`` (404 for a read, 409 for a create that may
    race a restarted attempt) returns None: the caller decides what absence means. Every
    other failure raises ``error`` with the reason (see :func:`api_error`).
    """
    try:
        return send()
    except ApiException as err:
        if err.status in absent_on:
            return None
        raise api_error(call, err, host, error) from None
    except (urllib3.exceptions.HTTPError, OSError) as err:
        raise api_error(call, err, host, error) from None
