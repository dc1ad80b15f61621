"""Register a deployed bundle in the Kubeflow Model Registry, when the config turns it on.

A gated bundle becomes one *model version* of the registered model ``registry.model_name``
(else ``serving.model_name``): named by the bundle's digest (the same 16 characters as its
storage prefix, so deploying the same bundle again finds the same version), with one model
artifact (the storage URI and model format the InferenceService serves) and the bundle's
lineage (:mod:`ldm_core.lineage`) as custom properties, which the registry's UI lists on
the version's page. After the rollout the version's properties also say where it serves.

The InferenceService then carries the ids in the labels the registry's own KServe
integration reads (:func:`labels`): its InferenceService controller
(kubeflow/model-registry v0.2.19 and v0.3.4, pkg/inferenceservice-controller/controller.go,
``Reconcile``; label names in manifests/kustomize/options/controller/overlays/base/params.env)
records a deployment of that version for an InferenceService labelled with the registered
model's id, and finds the registry by the Service named in ``modelregistry.kubeflow.org/name``
and ``.../namespace``, or by the ``modelregistry.kubeflow.org/url`` annotation.

Registration is not the rollout: a registry that is down or refuses raises
:class:`RegistryError` with the reason, and the deploy goes on without it (the lineage record
says registration failed, and why). The registry is reached with its Python client
(``model-registry``, the ``registry`` extra), imported only when registration is on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import warnings
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ldm_core import lineage
from ldm_core.config import Config
from ldm_core.errors import LdmError
from ldm_core.pod import SERVICE_ACCOUNT_DIR

log = logging.getLogger(__name__)

LABEL_PREFIX = "modelregistry.kubeflow.org/"
REGISTERED_MODEL_ID_LABEL = LABEL_PREFIX + "registered-model-id"
MODEL_VERSION_ID_LABEL = LABEL_PREFIX + "model-version-id"
NAME_LABEL = LABEL_PREFIX + "name"
"""The registry's Service, in :data:`NAMESPACE_LABEL`'s namespace (the controller's default:
``kubeflow``)."""
NAMESPACE_LABEL = LABEL_PREFIX + "namespace"
URL_ANNOTATION = LABEL_PREFIX + "url"
"""The registry's base URL, for a registry the controller cannot find as a Service."""
DIGEST_PROPERTY = "bundle.digest"
"""The version property that says which bundle a version is."""


class RegistryError(LdmError):
    """The Model Registry could not be reached, or refused the registration."""


def model_name(cfg: Config) -> str:
    """The registered model a bundle becomes a version of."""
    return cfg.registry.model_name or cfg.serving.model_name


def version_name(record: Mapping[str, Any]) -> str:
    """The model version a bundle becomes: its digest's first 16 characters (its storage
    prefix's name too), so one bundle is one version however often it is deployed."""
    return str(record["bundle"]["digest"])[:16]


def properties(record: Mapping[str, Any]) -> dict[str, str | float | bool]:
    """The lineage as a version's custom properties: one per :func:`ldm_core.lineage.rows`
    field, metrics as numbers and the gate's verdict as a bool (the registry's UI shows
    each as a property of the version). Unknown fields are left out rather than stored as
    empty strings, which the registry's UI shows as labels."""
    out: dict[str, str | float | bool] = {}
    for key, value in lineage.rows(record):
        if value in ("", "(unknown)"):
            continue
        out[key] = value
    evaluation = record.get("evaluation") or {}
    for name, number in (evaluation.get("metrics") or {}).items():
        out[f"evaluation.metrics.{name}"] = float(number)
    if evaluation.get("gate"):
        out["evaluation.gate.passed"] = bool(evaluation["gate"]["passed"])
    return out


def labels(cfg: Config, outcome: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """The InferenceService's labels and annotations that link it to a registered version,
    as the registry's InferenceService controller reads them; nothing when ``outcome`` is
    not a registration.

    A cluster-local URL (``<service>.<namespace>.svc...``) names the registry's Service and
    namespace; any other URL goes in :data:`URL_ANNOTATION`, which the controller then
    calls directly."""
    if outcome.get("status") != "registered":
        return {}, {}
    found = {
        REGISTERED_MODEL_ID_LABEL: str(outcome["registered_model"]["id"]),
        MODEL_VERSION_ID_LABEL: str(outcome["model_version"]["id"]),
    }
    host = (urlsplit(cfg.registry.url).hostname or "").split(".")
    if len(host) >= 3 and host[2] == "svc":
        return {**found, NAME_LABEL: host[0], NAMESPACE_LABEL: host[1]}, {}
    return found, {URL_ANNOTATION: cfg.registry.url}


# --------------------------------------------------------------------------- the client


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run one of the client's coroutines on a fresh event loop in a worker thread.

    The client's default runner patches asyncio process-wide (nest_asyncio) so that it can
    nest event loops; a worker thread's own loop needs no patch, and works whether or not
    the caller runs a loop (a notebook kernel does)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _token(cfg: Config) -> str | None:
    """The bearer token to send: ``registry.token_file``'s, else the pod's service account's
    when one is mounted, else none (a registry inside the mesh may need none)."""
    path = Path(cfg.registry.token_file) if cfg.registry.token_file else None
    if path is None:
        default = SERVICE_ACCOUNT_DIR / "token"
        return default.read_text().strip() if default.is_file() else None
    try:
        return path.read_text().strip() or None
    except OSError as exc:
        raise RegistryError(f"registry.token_file: {path}: cannot be read ({exc})") from None


def connect(cfg: Config) -> Any:
    """A ``model_registry.ModelRegistry`` for ``registry.url`` (its first request checks
    that the server answers).

    Raises:
        RegistryError: the client is not installed, or the server cannot be reached.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydantic's note on a field of the client's types
            from model_registry import ModelRegistry
    except ImportError:
        raise RegistryError(
            "registry.enabled: the Model Registry client is not installed "
            "(pip install 'brain-ldm[registry]')"
        ) from None
    r = cfg.registry
    parts = urlsplit(r.url)
    secure = parts.scheme == "https"
    token = _token(cfg)
    if secure and not token:
        raise RegistryError(
            f"registry.url: {r.url} is https, where the client must send a bearer token; set "
            "registry.token_file (no service account token is mounted here)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "User access token is missing": said below if refused
        return _call(
            r.url,
            "connect",
            lambda: ModelRegistry(
                f"{parts.scheme}://{parts.hostname}",
                parts.port,
                author=r.author,
                is_secure=secure,
                user_token=token,
                custom_ca=r.ca_file or None,
                log_level=logging.ERROR,  # not its warning that 8080 is no http port
                async_runner=_run,
            ),
        )


def _call(url: str, what: str, fn: Any) -> Any:
    """``fn()``, with any failure of the client or the network as a RegistryError that says
    which registry, what was being done, and the server's answer when there was one."""
    try:
        return fn()
    except LdmError:
        raise
    except Exception as exc:  # the client raises its own, aiohttp's and pydantic's errors
        status = getattr(exc, "status", None)
        answer = f"HTTP {status}: {_message(exc)}" if status else f"{type(exc).__name__}: {exc}"
        raise RegistryError(f"Model Registry at {url}: {what} failed: {answer}") from None


def _message(exc: Exception) -> str:
    """The server's message in an error answer: the ``message`` of its Error body, which
    every release fills (v0.2.x leaves ``code`` empty, v0.3.4 sets it; neither is needed),
    else the body as it came."""
    body = getattr(exc, "body", None)
    try:
        message = json.loads(body).get("message") if body else None
    except (ValueError, AttributeError):
        message = None
    data = getattr(exc, "data", None)
    return str(message or getattr(data, "message", None) or body or data or exc)


# --------------------------------------------------------------------------- registering


def register(
    cfg: Config,
    record: Mapping[str, Any],
    storage_uri: str,
    *,
    model_format: str,
    model_format_version: str = "1",
    client: Any = None,
) -> dict[str, Any]:
    """Register the bundle of ``record`` at ``storage_uri`` as a model version; return what
    the registry answered (``status: registered``, the registered model's, version's and
    artifact's ids, and ``reused`` when the version existed already).

    A version of the same name that holds the same bundle is reused, its properties brought
    up to date; one that holds another bundle is refused.

    Raises:
        RegistryError: the registry is down, refused a request, or holds another bundle
            under this version's name.
    """
    url, name, version = cfg.registry.url, model_name(cfg), version_name(record)
    mr = client or connect(cfg)
    props = properties(record)
    existing = _call(url, f"look up {name}:{version}", lambda: _find_version(mr, name, version))
    reused = existing is not None
    if existing is None:
        _call(
            url,
            f"register {name}:{version}",
            lambda: mr.register_model(
                name,
                storage_uri,
                version=version,
                model_format_name=model_format,
                model_format_version=model_format_version,
                description=f"brain-ldm bundle {record['bundle']['digest']}",
                metadata=props,
            ),
        )
        existing = _call(
            url, f"read back {name}:{version}", lambda: _find_version(mr, name, version)
        )
    else:
        recorded = (existing.custom_properties or {}).get(DIGEST_PROPERTY)
        if recorded != record["bundle"]["digest"]:
            raise RegistryError(
                f"Model Registry at {url}: version {version} of {name} holds bundle "
                f"{recorded or '(no digest)'}, not {record['bundle']['digest']}; rename the "
                "registered model (registry.model_name) or archive that version"
            )
        existing.custom_properties = {**(existing.custom_properties or {}), **props}
        existing = _call(url, f"update {name}:{version}", lambda: mr.update(existing))
    if existing is None:
        raise RegistryError(
            f"Model Registry at {url}: {name}:{version} not found after registering"
        )
    model = _call(url, f"read {name}", lambda: mr.get_registered_model(name))
    artifact = _call(
        url, f"read {name}:{version}'s artifact", lambda: mr.get_model_artifact(name, version)
    )
    outcome = {
        "status": "registered",
        "url": url,
        "registered_model": {"id": model.id, "name": name},
        "model_version": {"id": existing.id, "name": version},
        "model_artifact": {"id": getattr(artifact, "id", None), "uri": storage_uri},
        "reused": reused,
    }
    log.info("registered %s version %s (id %s) in %s", name, version, existing.id, url)
    return outcome


def _find_version(mr: Any, name: str, version: str) -> Any:
    """The model version, or None when the model or the version does not exist (the client
    raises for a missing model and answers None for a missing version)."""
    if mr.get_registered_model(name) is None:
        return None
    return mr.get_model_version(name, version)


def record_deployment(
    cfg: Config, outcome: Mapping[str, Any], deployment: Mapping[str, Any], *, client: Any = None
) -> None:
    """After a successful rollout, add where the version serves to its properties (the
    InferenceService, its revision and URL): the link back when the registry's
    InferenceService controller is not installed (Kubeflow 1.10.0 ships none).

    Raises:
        RegistryError: the registry could not be reached or refused the update.
    """
    url, name = cfg.registry.url, model_name(cfg)
    version = outcome["model_version"]["name"]
    mr = client or connect(cfg)
    found = _call(url, f"look up {name}:{version}", lambda: _find_version(mr, name, version))
    if found is None:
        raise RegistryError(
            f"Model Registry at {url}: {name}:{version} disappeared before the update"
        )
    serving = lineage.with_deployment({}, deployment)["deployment"]
    found.custom_properties = {
        **(found.custom_properties or {}),
        **{f"deployment.{k}": str(v) for k, v in serving.items()},
    }
    _call(url, f"update {name}:{version}", lambda: mr.update(found))


def failure(cfg: Config, error: Exception) -> dict[str, Any]:
    """The outcome of a registration that failed: what the lineage record keeps."""
    return {"status": "failed", "url": cfg.registry.url, "error": str(error)}


# --------------------------------------------------------------------------- around a rollout


def before_rollout(
    cfg: Config, record: Mapping[str, Any], storage_uri: str, model_format: str
) -> dict[str, Any] | None:
    """Register the uploaded bundle when ``registry.enabled`` (None when off); a registry
    that is down or refuses gives a ``failed`` outcome, and the deploy goes on.

    Called before the rollout so that :func:`labels` go on the InferenceService in the same
    write as the new bundle: KServe copies an InferenceService's labels into its revision
    template (kserve v0.14.1 pkg/controller/v1beta1/inferenceservice/components/predictor.go,
    ``Labels: utils.Union(..., isvc.Labels, ...)``), so labelling it after the rollout would
    roll out a second revision that no smoke inference checked."""
    if not cfg.registry.enabled:
        return None
    try:
        return register(cfg, record, storage_uri, model_format=model_format)
    except RegistryError as exc:
        log.warning("deploying without the Model Registry: %s", exc)
        return failure(cfg, exc)


def after_rollout(
    cfg: Config,
    record: Mapping[str, Any],
    registration: Mapping[str, Any] | None,
    deployment: Mapping[str, Any],
) -> dict[str, Any]:
    """After a successful rollout: the lineage with the deployment and the registry's
    outcome; a registered version's properties get where it serves (a failure to update
    them is noted in the outcome, the deploy stands)."""
    out = lineage.with_deployment(record, deployment)
    if registration is None:
        return out
    if registration["status"] == "registered":
        try:
            record_deployment(cfg, registration, deployment)
        except RegistryError as exc:
            log.warning("the Model Registry does not know where the version serves: %s", exc)
            registration = {**registration, "deployment_update": str(exc)}
    return lineage.with_registry(out, registration)
