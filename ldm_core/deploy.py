"""Deploy stage: serve a model bundle and prove it answers, locally or on a cluster.

Both backends end the same way: a real V2 inference over HTTP
(:func:`ldm_core.smoke.smoke_check`) against the endpoint they brought up, so "deployed"
always means "answered a request".

- ``local``: ``python -m ldm_core.serve`` as a detached process on a free 127.0.0.1 port
  (log and pid files in a state directory), so it outlives the pipeline step that started
  it; ``stop_local(state_dir)`` stops it.
- ``kserve`` (alias ``kubeflow``): upload the bundle to S3 under a content-addressed prefix,
  then roll out an InferenceService built from the config (``ldm_core.kube.isvc_build``,
  rolled out by ``ldm_core.kube.isvc_rollout``): canary for an update, smoke inference
  through the new revision, promote or roll back. Inside a Kubeflow profile the predictor
  only answers callers its Istio AuthorizationPolicy admits, so the smoke inference carries
  the step's service account token (:func:`ldm_core.smoke.smoke_headers`).
Both return the bundle's lineage with where it went (``ldm_core.lineage``, ``ldm_core.registry``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from ldm_core import bundle as bundle_mod
from ldm_core import lineage, registry
from ldm_core.config import Config
from ldm_core.errors import DeployError, LdmError
from ldm_core.io import BUNDLE_JSON, DEPLOYMENT_JSON, atomic_write_json
from ldm_core.smoke import DeployedBundle, smoke_check, smoke_headers

log = logging.getLogger(__name__)

PID_FILE = "serve.pid"
LOG_FILE = "serve.log"
CLUSTER_BACKENDS = ("kserve", "kubeflow")
WAIT_MARGIN_S = 120
"""How much longer than the predictor's progress deadline the rollout waits for a revision:
time for Knative to mark it failed and KServe to report that."""


# --------------------------------------------------------------------------- local backend


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _is_our_server(pid: int) -> bool:
    """True if ``pid`` is alive and is an ``ldm_core.serve`` process (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid file
    return b"ldm_core.serve" in cmdline


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_local(state: str | Path | dict[str, Any], timeout_s: float = 15.0) -> bool:
    """Stop a local server started by ``deploy(..., backend="local")``.

    ``state`` is its state directory or the dict ``deploy`` returned. Returns True if a
    running server was stopped, False if none was running. SIGTERM first (graceful), then
    SIGKILL after ``timeout_s``.
    """
    state_dir = Path(state["state_dir"] if isinstance(state, dict) else state)
    pid_file = state_dir / PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    stopped = False
    if _is_our_server(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stopped = True
    pid_file.unlink(missing_ok=True)
    return stopped


def _alive(pid: int) -> bool:
    # Reap it if it is our child, so a zombie does not look alive.
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return _is_our_server(pid)


def _wait_ready(
    base_url: str, model_name: str, pid: int, log_file: Path, timeout_s: float
) -> float:
    started = time.monotonic()
    deadline = started + timeout_s
    last = "no answer yet"
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        while True:
            if not _alive(pid):
                raise DeployError(
                    f"local model server (pid {pid}) exited before it was ready; last log lines "
                    f"({log_file}):\n{_log_tail(log_file)}"
                )
            try:
                r = http.get(f"{base_url}/v2/models/{model_name}/ready")
                if r.status_code == 200:
                    return time.monotonic() - started
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if time.monotonic() >= deadline:
                raise DeployError(
                    f"local model server at {base_url} not ready after {timeout_s:g} s "
                    f"(GET /v2/models/{model_name}/ready: {last}); log: {log_file}"
                )
            time.sleep(0.25)


def deploy_local(
    cfg: Config,
    bundle_dir: str | Path,
    *,
    state_dir: str | Path | None = None,
    model_name: str | None = None,
    port: int | None = None,
    device: str = "auto",
    ready_timeout_s: float = 300.0,
    smoke_steps: int = 2,
    evaluation_dir: str | Path | None = None,
    run: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Start (or restart) the local model server for ``bundle_dir`` and smoke-test it.
    ``evaluation_dir``, ``run``: as :func:`deploy_kserve`'s, for the lineage it returns."""
    bundle = Path(bundle_dir).resolve()
    _require_bundle(bundle)
    record = lineage.for_deploy(bundle_mod.lineage(bundle), cfg, evaluation_dir, run)
    state = Path(state_dir) if state_dir is not None else bundle.parent / f"{bundle.name}-serving"
    state.mkdir(parents=True, exist_ok=True)
    if stop_local(state):
        log.info("stopped the previous local server in %s", state)
    name = model_name or cfg.serving.model_name
    port = port or _free_port()
    config_file = state / "serve-config.yaml"
    cfg.save(config_file)
    log_file = state / LOG_FILE
    cmd = [
        sys.executable,
        "-m",
        "ldm_core.serve",
        "--bundle",
        str(bundle),
        "--http-port",
        str(port),
        "--host",
        "127.0.0.1",
        "--model-name",
        name,
        "--device",
        device,
        "--config",
        str(config_file),
    ]
    with open(log_file, "ab") as out:
        # A new session: the server outlives this process (and the pipeline step) and
        # does not get the terminal's Ctrl-C.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (state / PID_FILE).write_text(f"{proc.pid}\n")
    base_url = f"http://127.0.0.1:{port}"
    try:
        ready_s = _wait_ready(base_url, name, proc.pid, log_file, ready_timeout_s)
        smoke = smoke_check(base_url, name, bundle=DeployedBundle.read(bundle), steps=smoke_steps)
    except LdmError:
        stop_local(state)
        raise
    result = {
        "backend": "local",
        "url": base_url,
        "infer_url": f"{base_url}/v2/models/{name}/infer",
        "model_name": name,
        "pid": proc.pid,
        "state_dir": str(state),
        "log_file": str(log_file),
        "bundle_dir": str(bundle),
        "ready_s": round(ready_s, 2),
        "smoke": smoke,
    }
    result["lineage"] = lineage.with_deployment(record, result)
    atomic_write_json(state / DEPLOYMENT_JSON, result)
    return result


# --------------------------------------------------------------------------- cluster backend


def deploy_kserve(
    cfg: Config,
    bundle_dir: str | Path,
    *,
    storage_prefix: str,
    name: str | None = None,
    runtime: str | None = "brain-ldm",
    canary_percent: int = 10,
    timeout_s: float | None = None,
    poll_s: float = 5.0,
    smoke_steps: int = 2,
    smoke_url: str | None = None,
    api_host: str | None = None,
    api_token: str | None = None,
    create_runtime: bool = False,
    evaluation_dir: str | Path | None = None,
    run: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Upload the bundle to ``<storage_prefix>/<model>/<sha256[:16]>`` and roll out an
    InferenceService serving it (canary + smoke + promote / roll back).

    The InferenceService is what ``cfg`` says: it lives in ``cluster.namespace`` (else the
    step's own namespace), and :func:`ldm_core.kube.isvc_build.build_inference_service`
    reads the predictor's image, identity and placement from ``cfg.cluster``, its pod from
    ``cfg.cluster.predictor``, replicas, autoscaling and deployment mode from
    ``cfg.serving``. The arguments here are about this deploy and the rollout itself:
    ``name`` defaults to ``serving.model_name``; ``runtime`` is the ServingRuntime to use
    (the one manifests/base ships), None runs a custom container; ``timeout_s`` bounds each
    wait of the rollout, by default ``serving.progress_deadline_s`` plus
    :data:`WAIT_MARGIN_S`, so Knative's own verdict on a slow revision comes first.
    ``evaluation_dir``, ``run``: what :func:`ldm_core.lineage.for_deploy` adds to the lineage
    the InferenceService carries."""
    from ldm_core.kube import isvc_build
    from ldm_core.kube.client import api_client, current_namespace
    from ldm_core.kube.isvc_build import build_inference_service, build_serving_runtime
    from ldm_core.kube.isvc_rollout import InferenceServiceRollout

    model = cfg.serving.model_name
    _require_bundle(Path(bundle_dir))
    deployed = DeployedBundle.read(bundle_dir)
    uri = _upload_bundle(cfg, Path(bundle_dir), deployed.digest, storage_prefix, model)
    record = lineage.for_deploy(bundle_mod.lineage(bundle_dir), cfg, evaluation_dir, run)
    registration = registry.before_rollout(cfg, record, uri, isvc_build.MODEL_FORMAT)
    ns = cfg.cluster.namespace or current_namespace()
    isvc_name = name or model
    if timeout_s is None:
        timeout_s = cfg.serving.progress_deadline_s + WAIT_MARGIN_S
    rollout = InferenceServiceRollout(
        api_client(api_host, api_token), timeout_s=timeout_s, poll_s=poll_s
    )
    if create_runtime and runtime:
        rollout.ensure_serving_runtime(build_serving_runtime(cfg, runtime, ns))
    desired = build_inference_service(
        cfg,
        name=isvc_name,
        namespace=ns,
        storage_uri=uri,
        bundle_digest=deployed.digest,
        runtime=runtime,
    )
    links, notes = registry.labels(cfg, registration or {})
    notes[lineage.ANNOTATION] = lineage.annotation(record)
    desired = isvc_build.with_metadata(desired, links, notes)
    result = rollout.rollout(
        desired,
        smoke=_cluster_smoke(model, deployed, smoke_steps),
        canary_percent=canary_percent,
        url_override=smoke_url,
    )
    deployment = {
        "backend": "kserve",
        "name": isvc_name,
        "namespace": ns,
        "model_name": model,
        "storage_uri": uri,
        "bundle_sha256": deployed.digest,
        **_served_at(result["url"], model),
        **{key: result[key] for key in ("action", "revision", "smoke")},
    }
    return {**deployment, "lineage": registry.after_rollout(cfg, record, registration, deployment)}


def _served_at(url: str | None, model: str) -> dict[str, str | None]:
    """The InferenceService's URL and its V2 infer endpoint for ``model`` (None: no URL)."""
    infer = f"{str(url).rstrip('/')}/v2/models/{model}/infer" if url else None
    return {"url": url, "infer_url": infer}


def _cluster_smoke(
    model: str, bundle: DeployedBundle, steps: int
) -> Callable[[str], dict[str, Any]]:
    """The rollout's smoke check: :func:`smoke_check` against the deployed ``bundle``, with
    the pod's credentials for the URL it is sent to (:func:`smoke_headers`)."""

    def smoke(url: str) -> dict[str, Any]:
        return smoke_check(url, model, bundle=bundle, steps=steps, headers=smoke_headers(url))

    return smoke


def _require_bundle(bundle: Path) -> None:
    """Refuse a directory that is not a model bundle before anything is started or uploaded."""
    if not (bundle / BUNDLE_JSON).is_file():
        raise DeployError(f"{bundle}: not a model bundle (no {BUNDLE_JSON})")


def _upload_bundle(cfg: Config, bundle: Path, digest: str, storage_prefix: str, model: str) -> str:
    """Copy the bundle to a prefix named by its ``digest``; return its URI. The same
    bundle lands on the same URI, so re-deploying it changes nothing."""
    from ldm_core import storage

    uri = storage.join(storage_prefix, model, digest[:16])
    storage.upload_dir(bundle, uri, cfg.storage)
    return uri


# --------------------------------------------------------------------------- entry point


def deploy(
    cfg: Config, bundle_dir: str | Path, backend: str = "local", **settings: Any
) -> dict[str, Any]:
    """Serve ``bundle_dir`` with ``backend`` and return where, with the smoke result.

    ``backend="local"``: settings of :func:`deploy_local` (state_dir, model_name, port,
    device, ready_timeout_s, smoke_steps). ``backend="kserve"`` (or ``"kubeflow"``):
    settings of :func:`deploy_kserve` (storage_prefix is required).
    """
    if backend == "local":
        fn = deploy_local
    elif backend in CLUSTER_BACKENDS:
        fn = deploy_kserve
        if "storage_prefix" not in settings:
            raise DeployError(
                "storage_prefix: the kserve backend needs an s3:// prefix to upload the bundle to"
            )
    else:
        raise DeployError(
            f"backend: {backend!r} is not one of local, {', '.join(CLUSTER_BACKENDS)}"
        )
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("cfg", "bundle_dir")]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise DeployError(
            f"{unknown[0]}: not a setting of the {backend} backend; it takes {', '.join(accepted)}"
        )
    return fn(cfg, bundle_dir, **settings)
