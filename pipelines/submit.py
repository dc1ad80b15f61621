"""Submit the compiled pipeline to a Kubeflow Pipelines endpoint.

    python -m pipelines.submit --host http://localhost:8080 [--experiment brain-ldm] \
        [--param preset=gpu-16g --param nproc=4 ...]

Uploads ``pipelines/brain_ldm.yaml`` (a new pipeline, or a new version named after the
file's content hash, so re-submitting the same file reuses its version), then starts a
run in the experiment. Parameters are checked against the pipeline's own inputs before
anything is sent, and an unreachable endpoint is reported in one line rather than after
the KFP client's retries.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ldm_core.errors import LdmError

DEFAULT_PACKAGE = Path(__file__).with_name("brain_ldm.yaml")
HEALTHZ = "/apis/v2beta1/healthz"
_TYPES = {
    "STRING": (str,),
    "NUMBER_INTEGER": (int,),
    "NUMBER_DOUBLE": (int, float),
    "BOOLEAN": (bool,),
    "LIST": (list,),
    "STRUCT": (dict,),
}


class SubmitError(LdmError):
    """The submission cannot proceed; the message says which input or endpoint is at fault."""


def read_package(path: str | Path) -> dict[str, Any]:
    """Load the compiled pipeline YAML (the first document: the pipeline spec)."""
    path = Path(path)
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except FileNotFoundError:
        raise SubmitError(f"{path}: compiled pipeline not found; run 'make compile'") from None
    except yaml.YAMLError as e:
        raise SubmitError(f"{path}: not valid YAML: {e}") from None
    if not docs or not isinstance(docs[0], dict) or "pipelineInfo" not in docs[0]:
        raise SubmitError(f"{path}: not a compiled KFP pipeline (no pipelineInfo)")
    return docs[0]


def pipeline_inputs(spec: dict[str, Any]) -> dict[str, str]:
    """Parameter name -> KFP parameter type of the pipeline's root inputs."""
    params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: p.get("parameterType", "STRING") for name, p in params.items()}


def parse_params(items: list[str], inputs: dict[str, str]) -> dict[str, Any]:
    """``['nproc=4', 'overrides=[a=1]']`` -> typed values, checked against ``inputs``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SubmitError(f"--param {item!r}: expected NAME=VALUE, e.g. --param nproc=4")
        name, raw = item.split("=", 1)
        name = name.strip()
        if name not in inputs:
            close = difflib.get_close_matches(name, inputs, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SubmitError(
                f"--param {name}: the pipeline has no such parameter{hint}; it takes {', '.join(sorted(inputs))}"
            )
        kind = inputs[name]
        value: Any = raw
        if kind != "STRING":
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise SubmitError(f"--param {name}: {raw!r} is not a valid {kind} value") from None
        if not isinstance(value, _TYPES.get(kind, (object,))) or (
            kind != "BOOLEAN" and isinstance(value, bool)
        ):
            raise SubmitError(f"--param {name}: expected {kind}, got {raw!r}")
        out[name] = value
    return out


def check_reachable(host: str, token: str | None = None, timeout: float = 10.0) -> None:
    """Fail fast, in one line, when the endpoint does not answer its healthz. ``token`` is
    sent as the KFP client sends it (behind Kubeflow's auth proxy every call needs it)."""
    url = host.rstrip("/") + HEALTHZ
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as resp:
            resp.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise SubmitError(f"{url}: HTTP {e.code}; pass --token (or set KFP_TOKEN)") from None
        if e.code >= 500:
            raise SubmitError(f"{url}: HTTP {e.code} from the KFP API server") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SubmitError(f"cannot reach Kubeflow Pipelines at {host}: {reason}") from None


def submit(
    host: str,
    package: str | Path = DEFAULT_PACKAGE,
    experiment: str = "brain-ldm",
    params: dict[str, Any] | None = None,
    run_name: str | None = None,
    namespace: str | None = None,
    token: str | None = None,
    service_account: str = "pipeline-runner",
) -> dict[str, str]:
    """Upload the package (or a new version of it) and start a run; return the ids."""
    import kfp
    from kfp_server_api.exceptions import ApiException

    spec = read_package(package)
    name = spec["pipelineInfo"]["name"]
    version_name = f"{name}-{hashlib.sha256(Path(package).read_bytes()).hexdigest()[:12]}"
    check_reachable(host, token)
    try:
        client = kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")
        pipeline_id = client.get_pipeline_id(name)
        if pipeline_id is None:
            pipeline_id = client.upload_pipeline(str(package), pipeline_name=name).pipeline_id
            version_id = _find_version(client, pipeline_id, None)
        else:
            try:
                version_id = client.upload_pipeline_version(
                    str(package), pipeline_version_name=version_name, pipeline_id=pipeline_id
                ).pipeline_version_id
            except ApiException as e:
                if e.status != 409:
                    raise
                version_id = _find_version(client, pipeline_id, version_name)
        exp = client.create_experiment(experiment, namespace=namespace)
        run = client.run_pipeline(
            experiment_id=exp.experiment_id,
            job_name=run_name or version_name,
            pipeline_id=pipeline_id,
            version_id=version_id,
            params=params or {},
            # The account manifests/ grants exactly what the stages call (PyTorchJobs,
            # InferenceServices, pod logs) in the namespace.
            service_account=service_account,
        )
    except ApiException as e:
        body = (e.body or "").strip().replace("\n", " ")[:300]
        raise SubmitError(
            f"{host}: KFP API refused the request (HTTP {e.status}): {body or e.reason}"
        ) from None
    return {
        "pipeline_id": pipeline_id,
        "version_id": version_id,
        "experiment_id": exp.experiment_id,
        "run_id": run.run_id,
        "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}",
    }


def _find_version(client: Any, pipeline_id: str, version_name: str | None) -> str:
    versions = (
        client.list_pipeline_versions(pipeline_id=pipeline_id, page_size=100).pipeline_versions
        or []
    )
    for v in versions:
        if version_name is None or v.display_name == version_name:
            return v.pipeline_version_id
    raise SubmitError(
        f"pipeline {pipeline_id}: version {version_name or '(default)'} not found after upload"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Submit the compiled brain-ldm pipeline to Kubeflow Pipelines."
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("KF_PIPELINES_ENDPOINT"),
        help="KFP API endpoint, e.g. http://localhost:8080 (default: $KF_PIPELINES_ENDPOINT)",
    )
    parser.add_argument("--package", default=str(DEFAULT_PACKAGE), help="compiled pipeline YAML")
    parser.add_argument(
        "--experiment", default="brain-ldm", help="experiment name (created if missing)"
    )
    parser.add_argument(
        "--run-name", help="run display name (default: pipeline name + content hash)"
    )
    parser.add_argument("--namespace", help="profile namespace (multi-user Kubeflow)")
    parser.add_argument(
        "--token", default=os.environ.get("KFP_TOKEN"), help="bearer token (default: $KFP_TOKEN)"
    )
    parser.add_argument(
        "--service-account",
        default="pipeline-runner",
        help="Kubernetes service account the run's pods use (default: pipeline-runner, "
        "from manifests/)",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="pipeline parameter, e.g. --param preset=gpu-16g (repeatable; lists/dicts as YAML)",
    )
    args = parser.parse_args(argv)
    try:
        if not args.host:
            raise SubmitError("--host: no KFP endpoint given (or set KF_PIPELINES_ENDPOINT)")
        params = parse_params(args.param, pipeline_inputs(read_package(args.package)))
        result = submit(
            args.host,
            args.package,
            args.experiment,
            params,
            args.run_name,
            args.namespace,
            args.token,
            args.service_account,
        )
    except LdmError as e:
        print(f"submit: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
