"""One way to reach the Kubernetes API, shared by every kube/ module.

Components run in three places: inside a cluster pod (service account token), on a
laptop against a cluster (kubeconfig), and in tests against an in-memory API on
loopback (explicit host). Building the client here keeps that choice in one spot
instead of in each launcher or rollout.
"""

from __future__ import annotations

import os

import kubernetes
from kubernetes.config.config_exception import ConfigException

from ldm_core.errors import LdmError
from ldm_core.pod import SERVICE_ACCOUNT_DIR, has_token, in_cluster


class KubeConfigError(LdmError):
    """No usable Kubernetes configuration (not in a pod, no kubeconfig, no host given)."""


def _kubeconfig() -> str | None:
    # Read at call time: the kubernetes package reads KUBECONFIG once, at import.
    return os.environ.get("KUBECONFIG") or None


def api_client(host: str | None = None, token: str | None = None) -> kubernetes.client.ApiClient:
    """Return an ApiClient: explicit ``host`` (and bearer ``token``) first, else the pod's
    service account when running in a cluster, else the current kubeconfig context.

    An explicit host is how tests point at a loopback API server and how a user targets a
    cluster without a kubeconfig; it skips every implicit lookup so nothing surprising is used.
    """
    configuration = kubernetes.client.Configuration()
    if host:
        configuration.host = host.rstrip("/")
        if token:
            configuration.api_key = {"authorization": token}
            configuration.api_key_prefix = {"authorization": "Bearer"}
        return kubernetes.client.ApiClient(configuration)
    try:
        if in_cluster() and has_token():
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        else:
            kubernetes.config.load_kube_config(
                config_file=_kubeconfig(), client_configuration=configuration
            )
    except (ConfigException, OSError) as exc:
        where = os.environ.get("KUBECONFIG", "~/.kube/config")
        raise KubeConfigError(
            "no Kubernetes configuration: not running in a pod, and kubeconfig "
            f"{where} is unusable ({exc}); pass an explicit API host"
        ) from exc
    if token:
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
    return kubernetes.client.ApiClient(configuration)


def current_namespace(default: str = "kubeflow") -> str:
    """The namespace this code should act in: the pod's own namespace in a cluster, else
    the namespace of the current kubeconfig context, else ``default``.

    Kubeflow runs pipeline pods in the profile namespace, so resources created next to the
    pod land where the user can see them.
    """
    ns_file = SERVICE_ACCOUNT_DIR / "namespace"
    try:
        namespace = ns_file.read_text().strip()
        if namespace:
            return namespace
    except OSError:
        pass
    try:
        _, active = kubernetes.config.list_kube_config_contexts(config_file=_kubeconfig())
        namespace = (active or {}).get("context", {}).get("namespace")
        if namespace:
            return str(namespace)
    except (ConfigException, OSError):
        pass
    return default
