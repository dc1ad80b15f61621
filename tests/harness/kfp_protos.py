"""Parse a compiled pipeline with a KFP backend's protos, unknown fields rejected.

The API server parses the PipelineSpec and the PlatformSpec on upload and refuses an unknown
field. Each task's Kubernetes settings (``platforms.kubernetes.deploymentSpec.executors.*``)
are read as a ``KubernetesExecutorConfig`` when a run is compiled and by the driver; there an
unknown field is dropped (backends 2.4.1, 2.5.0) or refuses the run (2.15.0; the release table
manifests/releases.yaml, ``kfp_executor_config``, cites the code). Parsing strictly finds
both. Which fields are known depends on the protos the backend was built with, so this runs as
a script in a venv that holds the released ``kfp-pipeline-spec`` and ``kfp-kubernetes`` with
those protos (the tools venvs the Makefile makes from ``kfp-protos-<backend>.txt``). It
imports only protobuf and the generated modules, so those venvs need nothing else (no kfp
SDK, no PyYAML).

Reads ``{"pipeline_spec": …, "platform_spec": …}`` as JSON on stdin; prints JSON with the
releases it used and, per message (``PipelineSpec``, ``PlatformSpec``, each executor), the
parse error or null.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import sys
from types import ModuleType
from typing import Any

PACKAGES = ("kfp-pipeline-spec", "kfp-kubernetes", "protobuf")


def _kubernetes_pb2() -> ModuleType:
    """kfp-kubernetes' generated module, loaded from its file: importing ``kfp.kubernetes``
    would run the package's ``__init__``, which needs the whole kfp SDK."""
    path = importlib.metadata.distribution("kfp-kubernetes").locate_file(
        "kfp/kubernetes/kubernetes_executor_config_pb2.py"
    )
    spec = importlib.util.spec_from_file_location("kubernetes_executor_config_pb2", str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"kfp-kubernetes has no generated protos at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(pipeline_spec: dict[str, Any], platform_spec: dict[str, Any]) -> dict[str, Any]:
    """Parse both documents and every executor's Kubernetes config strictly."""
    from google.protobuf import json_format

    spec_pb2 = importlib.import_module("kfp.pipeline_spec.pipeline_spec_pb2")
    k8s_pb2 = _kubernetes_pb2()

    def error(doc: dict[str, Any], message: Any) -> str | None:
        try:
            json_format.ParseDict(doc, message, ignore_unknown_fields=False)
        except json_format.ParseError as err:
            return str(err)
        return None

    errors = {
        "PipelineSpec": error(pipeline_spec, spec_pb2.PipelineSpec()),
        "PlatformSpec": error(platform_spec, spec_pb2.PlatformSpec()),
    }
    kubernetes = platform_spec.get("platforms", {}).get("kubernetes", {})
    for name, config in kubernetes.get("deploymentSpec", {}).get("executors", {}).items():
        errors[name] = error(config, k8s_pb2.KubernetesExecutorConfig())
    versions = {p: importlib.metadata.version(p) for p in PACKAGES}
    return {"versions": versions, "errors": errors}


def main() -> int:
    docs = json.load(sys.stdin)
    json.dump(check(docs["pipeline_spec"], docs["platform_spec"]), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
