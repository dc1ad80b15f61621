"""What a process can tell about the Kubernetes pod it may be running in.

One answer for every caller: the stages choose their backend with :func:`in_cluster`, and
the Kubernetes client chooses between the pod's service account and a kubeconfig with it.
This module imports no Kubernetes library, so the engine can ask without loading one.
"""

from __future__ import annotations

import os
from pathlib import Path

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
"""Where the kubelet mounts the pod's service-account token, CA and namespace."""


def in_cluster() -> bool:
    """True inside a Kubernetes pod: the kubelet sets ``KUBERNETES_SERVICE_HOST`` for every
    pod, whether or not a service-account token is mounted (see :func:`has_token`)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def has_token() -> bool:
    """True when the pod's service-account token is mounted, so the API can be called with
    the pod's own identity. A pod may opt out (``automountServiceAccountToken: false``, as
    the training pods do) and still reach the API with a kubeconfig it carries."""
    return (SERVICE_ACCOUNT_DIR / "token").is_file()
