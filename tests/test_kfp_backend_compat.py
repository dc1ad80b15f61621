"""The compiled pipeline loads on the KFP backend of every supported Kubeflow release.

A KFP backend reads the pipeline with the protos it was built with (manifests/releases.yaml
names each release's backend; ``kfp-protos-<backend>.txt`` the released packages that hold
the same protos, and how that was checked). The API server parses the PipelineSpec and the
PlatformSpec on upload and refuses an unknown field. Each task's Kubernetes settings
(``KubernetesExecutorConfig``) are read later, and what an unknown field does there depends on
the backend: 2.4.1 and 2.5.0 drop it without a word (so an ``optional`` Secret would silently
become required), 2.15.0 refuses the run (the release table's ``kfp_executor_config``, with
its sources). Either way a field the backend does not know is a bug, so the checked-in YAML is
parsed here strictly with each backend's protos, each installed in a tools venv of its own
(``make kfp-protos``: ``.venv-kfp-<backend>``). Locally a missing venv skips; in CI it fails.

``pipelines.kfp_compat`` is what makes the SDK's output fit the oldest protos; its rules are
tested here on their own, without the venvs.
"""

# No ``from __future__ import annotations``: kfp reads the test component's annotations as types.

import copy
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import dsl, kubernetes

from pipelines import kfp_compat
from tests.harness.releases import RELEASES, Release

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipelines" / "brain_ldm.yaml"
CHECKER = ROOT / "tests" / "harness" / "kfp_protos.py"
EXECUTORS = {
    "exec-download",
    "exec-preprocess",
    "exec-train-autoencoder",
    "exec-train-diffusion",
    "exec-evaluate",
    "exec-deploy",
}


@dataclass(frozen=True)
class Protos:
    """The protos of one KFP backend: the tools venv holding them and the file pinning them."""

    backend: str

    @property
    def constraints(self) -> Path:
        return ROOT / f"kfp-protos-{self.backend}.txt"

    def python(self) -> str:
        """The venv's interpreter (``KFP_PROTOS_<BACKEND>_PYTHON``, dots as underscores,
        overrides the path)."""
        override = os.environ.get(f"KFP_PROTOS_{self.backend.replace('.', '_')}_PYTHON")
        python = Path(override or ROOT / f".venv-kfp-{self.backend}" / "bin" / "python")
        if not python.is_file():
            if os.environ.get("CI"):
                pytest.fail(
                    f"{python} missing in CI: the Makefile must run 'make kfp-protos' first"
                )
            pytest.skip(f"KFP {self.backend} protos not installed ({python}; make kfp-protos)")
        return str(python)

    def pins(self) -> dict[str, str]:
        lines = self.constraints.read_text().splitlines()
        return dict(line.split("==") for line in lines if line and not line.startswith("#"))

    def parse(self, pipeline_spec: dict[str, Any], platform_spec: dict[str, Any]) -> dict:
        """Errors per message (None when it parses), from tests/harness/kfp_protos.py run by
        the venv's interpreter (``-I``: nothing from this checkout or PYTHONPATH leaks in)."""
        proc = subprocess.run(
            [self.python(), "-I", str(CHECKER)],
            input=json.dumps({"pipeline_spec": pipeline_spec, "platform_spec": platform_spec}),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"kfp_protos.py failed for {self.backend}:\n{proc.stderr}"
        report = json.loads(proc.stdout)
        # The venv holds the releases the constraints name, or it is stale.
        for package in ("kfp-pipeline-spec", "kfp-kubernetes"):
            assert report["versions"][package] == self.pins()[package], (
                f"{self.backend} venv has {package} {report['versions'][package]}, "
                f"{self.constraints.name} pins {self.pins()[package]}: run 'make kfp-protos'"
            )
        return report["errors"]


def protos_of(release: Release) -> Protos:
    return Protos(release.kfp_backend)


@pytest.fixture(scope="module")
def compiled() -> tuple[dict, dict]:
    """The checked-in YAML (tests/test_pipeline_compile.py proves it is current)."""
    spec, platform = yaml.safe_load_all(PACKAGE.read_text())
    return spec, platform


def executors(platform: dict) -> dict[str, dict]:
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_every_release_backend_has_its_pinned_protos():
    """One ``kfp-protos-<backend>.txt`` per backend in the release table, and no other: a new
    release needs its backend's protos found, and a dropped one takes its venv along."""
    pinned = {p.name[len("kfp-protos-") : -len(".txt")] for p in ROOT.glob("kfp-protos-*.txt")}
    assert pinned == {r.kfp_backend for r in RELEASES}
    made = re.search(r"^KFP_BACKENDS\s*:=(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert made and set(made.group(1).split()) == pinned, "make kfp-protos must make them all"


@pytest.mark.parametrize("release", RELEASES, ids=str)
def test_checked_in_pipeline_parses_strictly(release, compiled):
    errors = protos_of(release).parse(*compiled)
    assert set(errors) == {"PipelineSpec", "PlatformSpec"} | set(executors(compiled[1]))
    assert set(executors(compiled[1])) <= EXECUTORS
    failed = {name: error for name, error in errors.items() if error}
    unknown = release.entries["kfp_executor_config"]["unknown_fields"]
    assert not failed, (
        f"Kubeflow {release} (KFP {release.kfp_backend}) rejects the pipeline; an unknown "
        f"field of a task's Kubernetes settings is {unknown} there: {failed}"
    )


NEWER_FIELDS = {"optional": "2.15.0", "pvcNameParameter": "2.5.0"}
"""Fields kfp_compat keeps out of the compiled YAML, and the first backend whose protos
have them (kubernetes_executor_config.proto: 55ec8469 and fd1b48b4 in kubeflow/pipelines)."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(map(int, text.split(".")))


@pytest.mark.parametrize("release", RELEASES, ids=str)
def test_each_backend_refuses_exactly_the_fields_newer_than_it(release, compiled):
    """The parse above can fail: the spec as the SDK compiles it before the down-levelling
    (optional Secret, PVC name through ``pvcNameParameter``) is refused by a backend older
    than the field and accepted by the others, so the difference is the backend's version,
    not a typo."""
    spec, platform = compiled
    platform = copy.deepcopy(platform)
    execs = executors(platform)
    execs["exec-download"]["secretAsEnv"][0]["optional"] = True
    execs["exec-train-autoencoder"]["pvcMount"][0]["pvcNameParameter"] = {
        "componentInputParameter": "pvc_name"
    }
    errors = protos_of(release).parse(spec, platform)
    where = {"optional": "exec-download", "pvcNameParameter": "exec-train-autoencoder"}
    for field, since in NEWER_FIELDS.items():
        error = errors[where[field]] or ""
        known = _version(release.kfp_backend) >= _version(since)
        assert (f'no field named "{field}"' not in error) is known, (release, field, error)
    assert errors["exec-deploy"] is None and errors["PipelineSpec"] is None


# --------------------------------------------------------------------------- kfp_compat rules


def test_pvc_name_goes_through_the_legacy_fields():
    """kfp-kubernetes writes the PVC name twice; only the field backend 2.4 reads stays."""
    parameter = {
        "componentInputParameter": "pvc_name",
        "mountPath": "/workspace",
        "pvcNameParameter": {"componentInputParameter": "pvc_name"},
    }
    constant = {
        "constant": "data",
        "mountPath": "/data",
        "pvcNameParameter": {"runtimeValue": {"constant": "data"}},
    }
    out = kfp_compat.down_level_executor("exec-x", {"pvcMount": [parameter, constant]})
    assert out == {
        "pvcMount": [
            {"componentInputParameter": "pvc_name", "mountPath": "/workspace"},
            {"constant": "data", "mountPath": "/data"},
        ]
    }
    assert "pvcNameParameter" in parameter  # the input is left alone


def test_constant_secret_name_and_node_selector_become_constant_fields():
    config = {
        "secretAsEnv": [
            {
                "keyToEnv": [{"envVar": "A", "secretKey": "A"}],
                "optional": False,
                "secretName": "s3",
                "secretNameParameter": {"runtimeValue": {"constant": "s3"}},
            }
        ],
        "nodeSelector": {"nodeSelectorJson": {"runtimeValue": {"constant": {"gpu": "a100"}}}},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
    }
    assert kfp_compat.down_level_executor("exec-x", config) == {
        "secretAsEnv": [{"keyToEnv": [{"envVar": "A", "secretKey": "A"}], "secretName": "s3"}],
        "nodeSelector": {"labels": {"gpu": "a100"}},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
    }


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"secretAsEnv": [{"secretName": "s3", "optional": True}]},
            r"exec-x: secretAsEnv\[0\]\.optional: optional Secrets need KFP backend 2\.15",
        ),
        (
            {"secretAsEnv": [{"secretNameParameter": {"componentInputParameter": "s3_secret"}}]},
            r"exec-x: secretAsEnv\[0\]\.secretNameParameter .* needs KFP backend 2\.5",
        ),
        (
            {"nodeSelector": {"nodeSelectorJson": {"componentInputParameter": "selector"}}},
            r"exec-x: nodeSelector\.nodeSelectorJson .* needs KFP backend 2\.5",
        ),
        (
            {
                "pvcMount": [
                    {
                        "mountPath": "/w",
                        "pvcNameParameter": {
                            "taskOutputParameter": {"producerTask": "t", "outputParameterKey": "o"}
                        },
                    }
                ]
            },
            r"exec-x: pvcMount\[0\]\.pvcNameParameter .* constant or a pipeline parameter",
        ),
    ],
    ids=["optional-secret", "secret-name-parameter", "node-selector-parameter", "pvc-task-output"],
)
def test_settings_backend_2_4_cannot_express_are_refused(config, message):
    with pytest.raises(kfp_compat.BackendCompatError, match=message):
        kfp_compat.down_level_executor("exec-x", config)


@dsl.component
def echo(text: str) -> str:
    return text


def test_down_level_fails_the_pipeline_definition_not_the_upload():
    """As a decorator, it refuses a pipeline with an optional Secret when it is defined."""
    with pytest.raises(kfp_compat.BackendCompatError, match=r"exec-echo: secretAsEnv\[0\]"):

        @kfp_compat.down_level
        @dsl.pipeline
        def optional_secret(text: str = "x"):
            task = echo(text=text)
            kubernetes.use_secret_as_env(
                task, secret_name="s3", secret_key_to_env={"A": "A"}, optional=True
            )


def test_down_level_leaves_a_pipeline_without_kubernetes_settings_alone():
    @dsl.pipeline
    def plain(text: str = "x"):
        echo(text=text)

    before = plain.platform_spec.SerializeToString(deterministic=True)
    assert kfp_compat.down_level(plain) is plain
    assert plain.platform_spec.SerializeToString(deterministic=True) == before
    assert "kubernetes" not in plain.platform_spec.platforms
